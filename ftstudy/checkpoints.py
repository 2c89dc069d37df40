"""Checkpoints of an interrupted training stage (which one to resume, and whether it may be resumed at all), and
finished runs kept for reuse."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from ftstudy.atomic import atomic_dir, read_json, weights_digest, write_json
from ftstudy.methods import MethodSpec
from ftstudy.params import Params


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint whose trainer_state.json (the Trainer writes it last) is complete.

    A run killed while saving leaves a half-written checkpoint-N; resuming from it would crash or,
    worse, load partial state, so it is skipped in favour of the one before.
    """
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ck in found:
        try:
            json.loads((ck / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return ck
    return None


def truncate_curves(live_dir: Path, last_step: int) -> None:
    """Drop curve rows logged after the checkpoint being resumed, which the resumed run logs again, and what a kill
    left half-written: a row cut short, dvclive's summary (metrics.json, rewritten at the next point) cut mid-file."""
    for tsv in live_dir.glob("plots/metrics/**/*.tsv"):
        lines = tsv.read_text().splitlines()
        width = len(lines[0].split("\t")) if lines else 0
        kept = lines[:1] + [ln for ln in lines[1:] if len(cells := ln.split("\t")) == width and cells[0].isdigit()
                            and int(cells[0]) <= last_step]
        tsv.write_text("\n".join(kept) + "\n")
    summary = live_dir / "metrics.json"
    try:
        json.loads(summary.read_text())
    except FileNotFoundError:
        pass
    except ValueError:  # dvclive would fail to resume on it
        summary.unlink()


def code_fingerprint() -> str:
    """The project's own code: the ftstudy package and the stage scripts. Work a killed stage left behind
    (checkpoints, a sweep's finished rates) is resumed only by the code that made it: DVC reruns a stage whose code
    changed, and that rerun starts afresh."""
    package = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted([*package.glob("*.py"), *(package.parent / "stages").glob("*.py")]):
        h.update(f"{f.parent.name}/{f.name}:".encode() + f.read_bytes())
    return h.hexdigest()


def fingerprint(spec: MethodSpec, params: Params, train_path: Path, models_dir: Path) -> str:
    """What a checkpoint was made from; a checkpoint is resumed only when this matches.

    Covers the start weights too: the base (its fetch_info.json lists every file's hash) and, for a method
    that starts from another's adapter, that adapter's files, so a retrained QLoRA invalidates the hybrid's
    checkpoints.
    """
    h = hashlib.sha256(json.dumps({"spec": asdict(spec), "train": asdict(params.train), "seed": params.seed},
                                  sort_keys=True).encode())
    h.update(train_path.read_bytes())
    h.update(weights_digest(models_dir / "base"))
    if spec.starts_from:
        h.update(weights_digest(models_dir / spec.starts_from))
    return h.hexdigest()


class RunStore:
    """Finished runs kept for reuse: a run whose params, data, base and code match one kept here is copied, not
    trained again. The sweeps keep their winning rate's runs (``keep=True``); the study's training at that rate and
    seed, the same run, is then a copy (``keep=False``: it only reads). On a CPU the copy is the bytes a retraining
    would write; on a GPU it is that configuration's one run. ``used`` lists the keys this store served or kept.
    """

    def __init__(self, root: str | Path, keep: bool):
        self.root, self.keep, self.used = Path(root), keep, []

    def key(self, made_by: str, val_path: Path | None) -> str:
        """``made_by``: the run's fingerprint and the code's, as its checkpoints are stamped."""
        h = hashlib.sha256(made_by.encode())
        if val_path is not None:  # the validation loss recorded with the run
            h.update(Path(val_path).read_bytes())
        return h.hexdigest()[:20]

    def reuse(self, key: str, out_dir: Path, live_dir: Path | None) -> dict | None:
        """The kept run's metrics after copying its output to ``out_dir`` and its curves to ``live_dir``; None if no
        such run was kept (or it was kept without the curves asked for)."""
        entry = self.root / key
        if not (entry / "metrics.json").exists() or (live_dir is not None and not (entry / "live").is_dir()):
            return None
        with atomic_dir(out_dir) as tmp:
            shutil.copytree(entry / "model", tmp, dirs_exist_ok=True)
        if live_dir is not None:
            with atomic_dir(live_dir) as tmp:
                shutil.copytree(entry / "live", tmp, dirs_exist_ok=True)
        self.used.append(key)
        return read_json(entry / "metrics.json")

    def put(self, key: str, out_dir: Path, live_dir: Path | None, metrics: dict) -> None:
        if not self.keep:
            return
        with atomic_dir(self.root / key) as tmp:
            shutil.copytree(out_dir, tmp / "model")
            if live_dir is not None and live_dir.is_dir():
                shutil.copytree(live_dir, tmp / "live")
            write_json(tmp / "metrics.json", metrics)  # last: an entry counts as kept once this exists
        self.used.append(key)

    def prune(self, methods: set[str], keep: set[str]) -> None:
        """Drop the kept runs of ``methods`` (their run names) but those in ``keep``."""
        for entry in self.root.glob("*/metrics.json"):
            if entry.parent.name not in keep and read_json(entry).get("method") in methods:
                shutil.rmtree(entry.parent)
