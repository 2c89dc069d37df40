"""fetch (raw rows in each source's own schema) and preprocess (clean, dedup, subsample, split, statistics)."""

from __future__ import annotations

import random
import statistics
from collections import Counter
from pathlib import Path

from ftstudy import synthetic
from ftstudy.atomic import atomic_dir, read_jsonl, write_json, write_jsonl
from ftstudy.errors import UserError
from ftstudy.hub import require_hub
from ftstudy.params import DataParams
from ftstudy.prompt import tokenize_prompt
from ftstudy.sources import CONVERTERS, DROP_REASONS, HUB_DATASETS, Dropped, convert_rows

RAW_INFO = "fetch_info.json"


def raw_splits(source: str) -> dict[str, str]:
    """Our split name ("train"/"test") -> the hub's split name; sources without a test split get one from train."""
    return HUB_DATASETS[source]["splits"]


def fetch_data(p: DataParams, seed: int, out_dir: str | Path) -> dict:
    """Write ``out_dir/<source>/<hub split>.jsonl`` in the hub schema, plus what was fetched."""
    info: dict = {"source": p.source, "pool_per_source": p.pool_per_source, "datasets": {}}
    if p.source == "hub":
        require_hub("data.source=hub")
    with atomic_dir(out_dir) as tmp:
        for source in p.sources:
            entry = {"splits": {}}
            if p.source == "synthetic":
                entry.update(generator="ftstudy.synthetic", seed=seed, plays_the_role_of=HUB_DATASETS[source]["repo"])
                for hub_split in raw_splits(source).values():
                    rows = synthetic.generate(source, hub_split, p.pool_per_source, seed)
                    write_jsonl(tmp / source / f"{hub_split}.jsonl", rows)
                    entry["splits"][hub_split] = len(rows)
            else:
                entry.update(_fetch_hub(source, p, seed, tmp / source))
            info["datasets"][source] = entry
        write_json(tmp / RAW_INFO, info)
    return info


def task_families(p: DataParams, seed: int) -> dict[str, str]:
    """Record id -> the generator's task family, for generated data (fetch_data's rows, converted as preprocess
    converts them); empty for hub data, which has no families."""
    if p.source != "synthetic":
        return {}
    families = {}
    for source in p.sources:
        for hub_split in raw_splits(source).values():
            for i, (row, family) in enumerate(synthetic.generate_with_families(source, hub_split, p.pool_per_source, seed)):
                try:
                    families[CONVERTERS[source](row, i, p.max_chars, multi_turn=p.multi_turn)["id"]] = family
                except Dropped:
                    continue
    return families


def _fetch_hub(source: str, p: DataParams, seed: int, out: Path) -> dict:
    from datasets import load_dataset
    from huggingface_hub import HfApi

    repo = HUB_DATASETS[source]["repo"]
    revision = HfApi().dataset_info(repo, revision=p.hub_revision).sha
    entry = {"repo": repo, "requested_revision": p.hub_revision, "revision": revision, "splits": {}}
    for hub_split in raw_splits(source).values():
        ds = load_dataset(repo, split=hub_split, revision=revision)
        # A seeded shuffle before taking the pool keeps the subsample representative of the whole split.
        ds = ds.shuffle(seed=seed).select(range(min(p.pool_per_source, len(ds))))
        write_jsonl(out / f"{hub_split}.jsonl", ds)
        entry["splits"][hub_split] = len(ds)
    return entry


def _length_stats(values: list[int]) -> dict:
    if not values:
        return {"mean": 0, "p50": 0, "p95": 0, "max": 0}
    ordered = sorted(values)
    return {
        "mean": round(statistics.fmean(ordered), 1),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def preprocess(p: DataParams, seed: int, raw_dir: str | Path, out_dir: str | Path, tokenizer=None) -> dict:
    """Convert every source, drop bad rows (counted per reason), dedup, subsample and split.

    Returns the data statistics written as DVC metrics. Test rows whose content also appears in train
    are dropped as duplicates, so train and test never overlap.
    """
    raw_dir = Path(raw_dir)
    train, val, test, stats = [], [], [], {"sources": {}}
    for source in p.sources:
        drops: Counter = Counter({r: 0 for r in DROP_REASONS})
        seen_ids: set = set()
        seen_content: set = set()
        splits = raw_splits(source)
        pools = {}
        n_raw = 0
        for ours in ("train", "test"):  # train first: a train/test duplicate is dropped from test
            if ours not in splits:
                continue
            path = raw_dir / source / f"{splits[ours]}.jsonl"
            if not path.exists():
                raise UserError(f"{path} is missing: run the fetch_data stage (`dvc repro fetch_data`) first")
            rows = read_jsonl(path)
            n_raw += len(rows)
            pools[ours] = list(convert_rows(source, rows, p.max_chars, p.multi_turn, seen_ids, seen_content, drops))
        rng = random.Random(f"{seed}/{source}/subsample")
        for pool in pools.values():
            rng.shuffle(pool)
        if "test" not in pools:
            pools["test"], pools["train"] = pools["train"][: p.test_per_source], pools["train"][p.test_per_source:]
        for ours, wanted, keys in (("train", p.train_per_source + p.val_per_source, "train_per_source + val_per_source"),
                                   ("test", p.test_per_source, "test_per_source")):
            if len(pools[ours]) < wanted:
                raise UserError(
                    f"data.{keys}={wanted} but {source} has only {len(pools[ours])} clean {ours} rows "
                    f"(dropped: {dict((k, v) for k, v in drops.items() if v)}); lower data.{keys} "
                    f"or raise data.pool_per_source"
                )
        train += pools["train"][: p.train_per_source]
        val += pools["train"][p.train_per_source: p.train_per_source + p.val_per_source]  # never test rows
        test += pools["test"][: p.test_per_source]
        stats["sources"][source] = {
            "raw_rows": n_raw, "kept_rows": sum(len(v) for v in pools.values()),
            "dropped": dict(drops), "train": p.train_per_source, "val": p.val_per_source, "test": p.test_per_source,
        }
    if tokenizer is not None:
        for source in p.sources:
            for name, recs in (("train", train), ("test", test)):
                mine = [r for r in recs if r["source"] == source]
                stats["sources"][source][f"{name}_prompt_tokens"] = _length_stats(
                    [len(tokenize_prompt(tokenizer, r, 10**9)) for r in mine])
                stats["sources"][source][f"{name}_response_tokens"] = _length_stats(
                    [len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in mine])
    # The sources interleaved, seeded; training reorders the stream by its own seed (ftstudy.training).
    random.Random(f"{seed}/train-order").shuffle(train)
    stats["train_rows"], stats["val_rows"], stats["test_rows"] = len(train), len(val), len(test)
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "val.jsonl", val)
        write_jsonl(tmp / "test.jsonl", test)
    return stats
