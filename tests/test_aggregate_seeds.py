"""Several training seeds: collecting experiments (scripts/aggregate_seeds.py) and the interval over seeds and
items (ftstudy.seeds)."""

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ftstudy import seeds

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("aggregate_seeds", ROOT / "scripts/aggregate_seeds.py")
agg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(agg)


def _params(seed, lr=None):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["seed"] = seed
    if lr is not None:
        p["train_qlora"]["learning_rate"] = lr
    return p


def _exp(name, rev, params):
    return {"rev": rev, "name": name, "data": {"params": {"params.yaml": {"data": params}}}}


def _predictions(ids, scores):
    return "".join(json.dumps({"id": i, "prediction": f"answer {s}", "rouge_l_f1": s, "exact_match": int(s > 0.5)})
                   + "\n" for i, s in zip(ids, scores, strict=True))


def test_collect_writes_one_record_per_seed_of_the_workspaces_params_only(tmp_path):
    shown = [{"rev": "workspace", "data": {}, "experiments": None},
             {"rev": "abc1234", "name": "main", "experiments": [
                 {"name": "exp-a", "revs": [_exp("exp-a", "r2", _params(2))]},
                 {"name": "exp-b", "revs": [_exp("exp-b", "r3", _params(3))]},
                 {"name": "own", "revs": [_exp("own", "r4", _params(42))]},            # the workspace's seed
                 {"name": "other", "revs": [_exp("other", "r5", _params(5, lr=0.5))]}]}]  # another rate
    ids = ["alpaca-1", "tulu-2"]
    files = {(rev, "data/predictions/qlora.jsonl"): _predictions(ids, [0.25 * k, 0.75]) for k, rev in
             enumerate(["r2", "r3", "r4", "r5", "r6"])}
    for rev, seed in (("r2", 2), ("r3", 3), ("r4", 42), ("r5", 5), ("r6", 42)):  # r6: still running, the old lock
        files[(rev, "dvc.lock")] = yaml.safe_dump({"stages": {"train_qlora": {"params": {"params.yaml": {"seed": seed}}},
                                                              "report": {"params": {"params.yaml": {"seed": 42}}}}})
    shown[1]["experiments"].append({"name": "running", "revs": [_exp("running", "r6", _params(6))]})
    written = agg.collect(agg.runs_from_exp_show(shown), _params(42), lambda rev, path: files.get((rev, path)), tmp_path)
    assert written == [2, 3]  # "own" is the workspace's run, "other" changed a rate, "running" has not finished
    record = json.loads((tmp_path / "seed-3.json").read_text())
    assert record["experiment"] == "exp-b" and record["models"]["qlora"]["rouge_l"] == [0.25, 0.75]
    assert record["models"]["qlora"]["exact_match"] == [0, 1] and record["params"] == seeds.comparable(
        agg.to_dict(agg.parse_params(_params(42))))


def _record(seed, per_model):
    ids = [f"alpaca-{i}" for i in range(len(next(iter(per_model.values()))))]
    return {"seed": seed, "params": {}, "extra": {}, "models": {
        m: {"ids": ids, "prediction": [f"p {v:.2f}" for v in values], "rouge_l": list(values)}
        for m, values in per_model.items()}}


def test_the_interval_over_seeds_widens_with_the_spread_between_seeds():
    """Within every seed b beats a on every item by the same margin, but the margin's sign flips between seeds:
    paired over items alone each seed would call it significant; over seeds it must not be."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 60)
    records = [_record(s, {"a": base, "b": base + d, "c": base + 0.2}) for s, d in ((1, 0.1), (2, -0.1), (3, 0.12))]
    refs = {f"alpaca-{i}": "ref" for i in range(60)}
    main, _ = seeds.aggregate(records, refs, n_resamples=400, seed=0, confidence=0.95)
    assert main.interval("c", "rouge_l").estimate == pytest.approx(base.mean() + 0.2)
    assert main.sd("b", "rouge_l") == pytest.approx(np.std([0.1, -0.1, 0.12], ddof=1), abs=1e-9)
    assert main.difference("c", "a", "rouge_l").excludes_zero  # the same gain in every seed
    assert not main.difference("b", "a", "rouge_l").excludes_zero  # the seeds disagree
    assert "bleu4" in main.per_seed["a"] and len(main.per_seed["a"]["bleu4"]) == 3


def test_records_made_with_other_params_are_left_out(tmp_path):
    """Other training settings exclude a record; where its workers ran (one process or several machines at
    the same effective batch) and how often its loss was logged do not."""
    current = {**_record(42, {"a": [0.5, 0.5]}), "params": {"train.max_steps": 16}}
    (tmp_path / seeds.FOLDER).mkdir(parents=True)
    for seed, params in ((1, {"train.max_steps": 16, "train.num_processes": 1}), (2, {"train.max_steps": 32}),
                         (3, {"train.max_steps": 16, "train.nnodes": 2, "train.rdzv_endpoint": "h:1",
                              "train.logging_steps": 10}),
                         (42, {"train.max_steps": 16})):
        rec = {**copy.deepcopy(current), "seed": seed, "params": params}
        (tmp_path / seeds.FOLDER / f"seed-{seed}.json").write_text(json.dumps(rec))
    chosen, stale = seeds.load_records(tmp_path, current)
    assert [r["seed"] for r in chosen] == [42, 1, 3] and stale == [2]
    assert seeds.comparable({"seed": 5, "ui": {"progress_bar": True}, "train": {"nnodes": 2, "max_steps": 16},
                             "sweep": {"seed": 42, "galore": [1e-4, 3e-4]}}) == {"train.max_steps": 16}
