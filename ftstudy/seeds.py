"""Several training seeds: what one seed's run leaves behind (a record), and the report's aggregate over seeds.

A seed experiment (`dvc exp run -S seed=N`) changes only the training seed: the data, the test items and the
learning rates (data.seed, sweep.seed) stay. `scripts/aggregate_seeds.py` writes each finished experiment's record
to ``data/seeds/seed-<N>.json``; the report stage reads the workspace's own run as one more record and aggregates
the records made with the workspace's params. The interval resamples seeds and test items together, so it widens
with the spread between seeds as well as between items.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ftstudy.stats import Interval, _interval, bleu_from_stats, bleu_sentence_stats

FOLDER = "data/seeds"
# What may differ between runs that are aggregated: the training seed, display settings, how often the loss curve
# got a point, where the workers ran (the effective batch is fixed, so spreading it over processes or machines
# changes rounding, not the run), and the learning-rate sweeps (they choose train_<method>.learning_rate, which
# must match; a seed experiment reruns no sweep).
IGNORED = ("seed", "ui", "train.logging_steps", "train.num_processes", "train.nnodes", "train.rdzv_endpoint", "sweep")


def _without_ignored(flat_params: dict) -> dict:
    return {k: v for k, v in flat_params.items() if not any(k == i or k.startswith(i + ".") for i in IGNORED)}


def flat(d: dict, prefix: str = "") -> dict:
    """Nested params as {"a.b": value}, lists and numbers normalised as JSON has them."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.loads(json.dumps(v))
    return out


def comparable(params: dict) -> dict:
    """The params two runs must share to be aggregated: all but ``IGNORED``."""
    return _without_ignored(flat(params))


def run_record(read: Callable[[str], str | None], params: dict, models: list[str], extra_sets: list[str]) -> dict:
    """One run's per-item scores. ``read(path)`` returns a file of the run (the workspace's, or an experiment's
    through DVC) or None where it has none; ``params`` is the run's params.yaml."""
    record = {"seed": params["seed"], "params": comparable(params), "models": {}, "extra": {}}
    for m in models:
        text = read(f"data/predictions/{m}.jsonl")
        if text is None:
            continue
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        record["models"][m] = {"ids": [r["id"] for r in rows], "prediction": [r["prediction"] for r in rows],
                               "rouge_l": [r["rouge_l_f1"] for r in rows]}
        if all("exact_match" in r for r in rows):
            record["models"][m]["exact_match"] = [r["exact_match"] for r in rows]
    for path in extra_sets:
        name = Path(path).stem
        for m in models:
            text = read(f"data/predictions/extra/{m}/{name}.jsonl")
            if text is not None:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
                record["extra"].setdefault(name, {})[m] = {r["id"]: r["reference_loss"] for r in rows}
    return record


def load_records(root: Path, current: dict) -> tuple[list[dict], list[int]]:
    """The records in ``root/data/seeds`` made with ``current``'s params, one per seed, ``current`` first; and the
    seeds of records left out because their params differ."""
    chosen, stale = [current], []
    for f in sorted((root / FOLDER).glob("seed-*.json")):
        rec = json.loads(f.read_text())
        if rec["seed"] == current["seed"]:
            continue  # the workspace's own run is read from its outputs
        if _without_ignored(rec["params"]) == current["params"]:  # older records kept more
            chosen.append(rec)
        else:
            stale.append(rec["seed"])
    return chosen, sorted(stale)


class SeedBootstrap:
    """Bootstrap draws over seeds and test items at once: each resample draws seeds with replacement and items
    with replacement (the same items for every seed and system, so differences stay paired)."""

    def __init__(self, n_items: int, n_seeds: int, n_resamples: int, seed: int, confidence: float):
        rng = np.random.default_rng(seed)
        self.seed_idx = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
        self.item_idx = rng.integers(0, n_items, size=(n_resamples, n_items))
        self.confidence = confidence
        self.per_seed: dict[str, dict[str, list[float]]] = {}
        self.draws: dict[str, dict[str, np.ndarray]] = {}

    def add(self, name: str, means: dict[str, list], predictions: list[list[str]] | None = None,
            references: list[str] | None = None) -> None:
        """``means``: metric -> (seeds, items) values whose mean is the metric (ROUGE-L, exact match, reference
        loss); ``predictions`` per seed and ``references`` add corpus BLEU-4 (its mean over seeds)."""
        self.per_seed[name], self.draws[name] = {}, {}
        if predictions is not None:
            stats = np.stack([bleu_sentence_stats(p, references) for p in predictions])  # (S, N, 10)
            self.per_seed[name]["bleu4"] = [bleu_from_stats(s.sum(0)) for s in stats]
            self.draws[name]["bleu4"] = np.array([
                np.mean([bleu_from_stats(stats[s][items].sum(0)) for s in seeds])
                for seeds, items in zip(self.seed_idx, self.item_idx, strict=True)])
        for metric, values in means.items():
            values = np.asarray(values, dtype=np.float64)
            self.per_seed[name][metric] = values.mean(axis=1).tolist()
            picked = values[self.seed_idx]  # (B, S, N): the drawn seeds
            self.draws[name][metric] = np.take_along_axis(picked, self.item_idx[:, None, :], axis=2).mean(axis=(1, 2))

    def interval(self, name: str, metric: str) -> Interval:
        return _interval(float(np.mean(self.per_seed[name][metric])), self.draws[name][metric], self.confidence)

    def sd(self, name: str, metric: str) -> float:
        values = self.per_seed[name][metric]
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    def difference(self, a: str, b: str, metric: str) -> Interval:
        point = float(np.mean(self.per_seed[a][metric]) - np.mean(self.per_seed[b][metric]))
        return _interval(point, self.draws[a][metric] - self.draws[b][metric], self.confidence)


def aggregate(records: list[dict], references: dict[str, str], n_resamples: int, seed: int,
              confidence: float) -> tuple[SeedBootstrap, dict[str, SeedBootstrap]]:
    """Bootstraps of the main test set and of every out-of-distribution set's reference loss, over the records'
    models that every record has. ``references``: test item id -> reference answer, in test-set order."""
    ids = list(references)
    models = [m for m in records[0]["models"] if all(m in r["models"] for r in records)]
    main = SeedBootstrap(len(ids), len(records), n_resamples, seed, confidence)
    for m in models:
        by_seed = [dict(zip(r["models"][m]["ids"], range(len(r["models"][m]["ids"])), strict=True)) for r in records]
        order = [[b[i] for i in ids] for b in by_seed]  # every run's rows in test-set order: the pairing
        means = {"rouge_l": [[r["models"][m]["rouge_l"][j] for j in o] for r, o in zip(records, order, strict=True)]}
        if all("exact_match" in r["models"][m] for r in records):
            means["exact_match"] = [[r["models"][m]["exact_match"][j] for j in o] for r, o in zip(records, order, strict=True)]
        main.add(m, means, [[r["models"][m]["prediction"][j] for j in o] for r, o in zip(records, order, strict=True)],
                 list(references.values()))
    extra = {}
    for name in records[0]["extra"]:
        have = [m for m in records[0]["extra"][name] if all(m in r["extra"].get(name, {}) for r in records)]
        if not have:
            continue
        item_ids = sorted(records[0]["extra"][name][have[0]])
        boot = SeedBootstrap(len(item_ids), len(records), n_resamples, seed, confidence)
        for m in have:
            boot.add(m, {"loss": [[r["extra"][name][m][i] for i in item_ids] for r in records]})
        extra[name] = boot
    return main, extra
