"""The seed aggregation: mean ± sd over experiments that differ only in seed, from `dvc exp show --json`."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("aggregate_seeds", Path(__file__).parents[1] / "scripts/aggregate_seeds.py")
agg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(agg)


def _data(seed, rouge, lr=1e-3):
    return {"params": {"params.yaml": {"data": {"seed": seed, "train_qlora": {"learning_rate": lr}}}},
            "metrics": {"metrics/eval/qlora.json": {"data": {"overall": {"rouge_l_f1_0_1": rouge, "bleu4_corpus_0_100": 10}}},
                        "metrics/train/qlora.json": {"data": {"peak_memory_gb": 4.0, "train_seconds": 100}}}}


def test_mean_and_sd_over_seed_only_experiments():
    shown = [{"rev": "workspace", "data": _data(1, 0.5), "experiments": None},
             {"rev": "abc1234", "name": "main", "data": _data(1, 0.5), "experiments": [
                 {"name": "exp-a", "revs": [{"rev": "r2", "name": "exp-a", "data": _data(2, 0.7)}]},
                 {"name": "exp-b", "revs": [{"rev": "r3", "name": "exp-b", "data": _data(3, 0.6)}]},
                 {"name": "other", "revs": [{"rev": "r4", "name": "other", "data": _data(4, 0.9, lr=5e-4)}]}]}]
    runs = agg.runs_from_exp_show(shown)
    chosen = agg.same_but_seed(runs, {"seed": 1, "train_qlora.learning_rate": 1e-3})
    assert sorted(r["params"]["seed"] for r in chosen) == [1, 2, 3]  # "other" changed lr: excluded
    table = agg.aggregate(chosen)
    mean, sd, n = table["qlora"]["ROUGE-L F1"]
    assert mean == pytest.approx(0.6) and sd == pytest.approx(0.1) and n == 3
    assert "0.6 ± 0.1" in agg.to_markdown(table, [1, 2, 3])
