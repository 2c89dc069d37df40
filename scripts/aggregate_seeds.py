"""Collect finished seed experiments into data/seeds/, for REPORT.md's aggregate over training seeds.

    for s in 1 2; do dvc exp run --queue -S seed=$s; done
    dvc queue start -j 1            # one at a time: every run uses the whole CPU/GPU
    dvc queue status                # wait until every run is Success
    python scripts/aggregate_seeds.py
    dvc repro report                # REPORT.md: "Across training seeds"
    git add data/seeds && git commit -m "..."

A seed experiment changes the training seed only: data.seed and sweep.seed keep the data, test items and
learning rates, so it reruns the trainings, their evaluations, the re-rank and the report (not the data, the
sweeps or the base's evaluation). Experiments are listed by `dvc exp show --all-commits --json`; only those
whose params equal the workspace's apart from `seed` are collected, so an unrelated experiment never slips into
the aggregate. Each writes ``data/seeds/seed-<N>.json``: its per-item scores (ftstudy.seeds.run_record), read from the DVC cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftstudy import seeds  # noqa: E402
from ftstudy.atomic import write_json  # noqa: E402
from ftstudy.params import load_params, parse_params, to_dict  # noqa: E402
from ftstudy.report import MODEL_ORDER  # noqa: E402


def runs_from_exp_show(entries: list[dict]) -> list[dict]:
    """One record per experiment: {"name", "rev", "params": its params.yaml as a dict}."""
    runs = []
    for entry in entries:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
                if params and rev.get("rev"):
                    runs.append({"name": exp.get("name") or rev.get("name") or rev["rev"][:7], "rev": rev["rev"],
                                 "params": params})
    return runs


def same_but_seed(runs: list[dict], reference: dict) -> list[dict]:
    """Runs whose params equal ``reference`` (a params.yaml dict) apart from the training seed, one per seed, each
    with its params validated and defaults filled in (``parsed``)."""
    want = seeds.comparable(to_dict(parse_params(reference)))
    by_seed: dict = {}
    for r in runs:
        parsed = to_dict(parse_params(r["params"]))
        if seeds.comparable(parsed) == want:
            by_seed.setdefault(r["params"]["seed"], {**r, "parsed": parsed})
    return list(by_seed.values())


def finished(lock_text: str | None, seed: int) -> bool:
    """Whether a run's dvc.lock records every training stage at ``seed``: a queued or running experiment shows
    the params it asks for but the outputs (and lock) of the commit it started from."""
    import yaml

    stages = (yaml.safe_load(lock_text) or {}).get("stages", {}) if lock_text else {}
    trainings = [s for name, s in stages.items() if name.startswith("train_")]
    return bool(trainings) and all(s.get("params", {}).get("params.yaml", {}).get("seed") == seed for s in trainings)


def collect(runs: list[dict], reference: dict, read_at, out_dir: Path) -> list[int]:
    """Write one record per run to ``out_dir``; ``read_at(rev, path)`` returns a file of that experiment or None.
    The workspace's own seed is skipped: the report reads it from the workspace."""
    written = []
    for run in same_but_seed(runs, reference):
        seed = run["params"]["seed"]
        if seed == reference["seed"]:
            continue
        if not finished(read_at(run["rev"], "dvc.lock"), seed):
            print(f"{run['name']} (seed {seed}): its dvc.lock does not record a training at seed {seed} (queued, "
                  "running or failed): skipped", file=sys.stderr)
            continue
        params = run["parsed"]
        record = seeds.run_record(lambda path, rev=run["rev"]: read_at(rev, path), params, MODEL_ORDER,
                                  params["evaluate"]["extra_test_sets"])
        if not record["models"]:
            print(f"{run['name']} (seed {seed}): no predictions found; is it finished?", file=sys.stderr)
            continue
        write_json(out_dir / f"seed-{seed}.json", {**record, "experiment": run["name"], "rev": run["rev"]})
        written.append(seed)
    return sorted(written)


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    import dvc.api
    import yaml

    def read_at(rev: str, path: str) -> str | None:
        try:
            return dvc.api.read(path, repo=str(ROOT), rev=rev)
        except Exception:  # noqa: BLE001 - the run has no such file (a model it did not evaluate, an unfinished run)
            return None

    load_params(ROOT / "params.yaml")  # a clear error for a broken workspace before reading any experiment
    reference = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Every commit's experiments: committing (the records, say) after queueing must not hide them.
    shown = subprocess.run(["dvc", "exp", "show", "--all-commits", "--json"], check=True, capture_output=True,
                           text=True, cwd=ROOT).stdout
    written = collect(runs_from_exp_show(json.loads(shown)), reference, read_at, ROOT / seeds.FOLDER)
    if not written:
        print(f"error: no finished experiment with the workspace's params apart from seed (workspace seed "
              f"{reference['seed']}); queue some with `dvc exp run --queue -S seed=N`", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(f"{seeds.FOLDER}/seed-{s}.json" for s in written) + "; now `dvc repro report`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
