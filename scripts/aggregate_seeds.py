"""Mean ± sd of every method's metrics over DVC experiments that differ only in `seed`.

    for s in 1 2 3; do dvc exp run --queue -S seed=$s; done
    dvc queue start -j 1            # one at a time: every run uses the whole CPU/GPU
    dvc queue status                # wait until all are Success
    python scripts/aggregate_seeds.py --out metrics/seeds.md

`seed` drives data sampling and training together, so the spread covers both. Experiments are read
from `dvc exp show --json`; only those whose params equal the workspace's apart from `seed` are used,
so an unrelated experiment never slips into the average.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

KEYS = {
    "eval": [("overall.bleu4_corpus_0_100", "BLEU-4"), ("overall.rouge_l_f1_0_1", "ROUGE-L F1")],
    "train": [("peak_memory_gb", "peak memory GB"), ("train_seconds", "train s"), ("final_train_loss", "final loss")],
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def runs_from_exp_show(entries: list[dict]) -> list[dict]:
    """One record per experiment (and the baseline): {"name", "params": flat params.yaml, "metrics": {file: flat}}."""
    runs = []

    def add(name: str, data: dict | None) -> None:
        if not data:
            return
        params = _flat(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
        metrics = {path: _flat(m.get("data") or {}) for path, m in (data.get("metrics") or {}).items()}
        if metrics:
            runs.append({"name": name, "params": params, "metrics": metrics})

    for entry in entries:
        if entry.get("rev") != "workspace":
            add(entry.get("name") or entry.get("rev", "")[:7], entry.get("data"))
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(exp.get("name") or rev.get("name") or rev.get("rev", "")[:7], rev.get("data"))
    return runs


def same_but_seed(runs: list[dict], reference: dict) -> list[dict]:
    """Runs whose params equal ``reference`` apart from seed, one per seed (the baseline and an experiment
    with its seed are the same run)."""
    strip = {k: v for k, v in reference.items() if k != "seed"}
    by_seed = {}
    for r in runs:
        if {k: v for k, v in r["params"].items() if k != "seed"} == strip:
            by_seed.setdefault(r["params"].get("seed"), r)
    return list(by_seed.values())


def aggregate(runs: list[dict]) -> dict:
    """{method: {label: (mean, sd, n)}} over the runs."""
    table: dict = {}
    for r in runs:
        for path, values in r["metrics"].items():
            parts = Path(path).parts
            if len(parts) < 3 or parts[1] not in KEYS:
                continue
            method = Path(path).stem
            for key, label in KEYS[parts[1]]:
                if isinstance(values.get(key), (int, float)):
                    table.setdefault(method, {}).setdefault(label, []).append(float(values[key]))
    return {m: {label: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                for label, v in cols.items()} for m, cols in table.items()}


def to_markdown(agg: dict, seeds: list) -> str:
    labels = [label for group in KEYS.values() for _, label in group]
    lines = [f"Mean ± sd over seeds {', '.join(map(str, sorted(seeds)))}.", "",
             "| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for m, cols in sorted(agg.items()):
        cells = [f"{cols[label][0]:.4g} ± {cols[label][1]:.2g}" if label in cols else "-" for label in labels]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the markdown table here as well")
    args = parser.parse_args()
    shown = subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True).stdout
    runs = runs_from_exp_show(json.loads(shown))
    import yaml

    reference = _flat(yaml.safe_load(Path("params.yaml").read_text()))
    chosen = same_but_seed(runs, reference)
    seeds = sorted({r["params"].get("seed") for r in chosen})
    if len(seeds) < 2:
        print(f"error: found {len(chosen)} experiment(s) with the workspace's params apart from seed "
              f"(seeds {seeds}); queue more with `dvc exp run --queue -S seed=N`", file=sys.stderr)
        return 2
    text = to_markdown(aggregate(chosen), seeds)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
