"""Learning rates chosen on validation data: each method trained at every rate of its grid, on the same budget and
examples as the study's run, and scored by its teacher-forced loss on the validation split (never the test set)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ftstudy.atomic import weights_digest, write_json
from ftstudy.checkpoints import RunStore, code_fingerprint
from ftstudy.methods import phases
from ftstudy.params import Params, to_dict
from ftstudy.training import train_method


def with_rate(params: Params, method: str, rate: float) -> Params:
    section = f"train_{method}"
    rated = dataclasses.replace(getattr(params, section), learning_rate=rate)
    return dataclasses.replace(params, seed=params.sweep.seed, **{section: rated})


def sweep_method(method: str, params: Params, *, data_dir: str | Path, base_dir: str | Path,
                 work_dir: str | Path, store_dir: str | Path) -> dict:
    """Train ``method`` at each rate of ``sweep.<method>``; return the grid with each rate's validation loss.

    The hybrid's grid is its GaLore phase's rate. A finished rate's result is kept in ``work_dir`` under a key of
    every param, the data and the base (``_key``), so a killed sweep goes on where it stopped; each run's own
    checkpoints make a killed rate resume too. The best rate's runs stay in the run store at ``store_dir``, where the
    study's training at that rate finds them (:class:`RunStore`); the hybrid's QLoRA phase, the same at every
    rate, is trained once.
    """
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    models = work_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / "base").exists():
        (models / "base").symlink_to(Path(base_dir).resolve())  # the study's base: read, never written
    grid, runs = [], {}  # runs: each rate's keys in the store
    run_names = {spec.name for spec in phases(params, method)}
    for rate in getattr(params.sweep, method):
        p = with_rate(params, method, rate)
        done = work_dir / f"lr-{rate:g}-{_key(p, data_dir, base_dir)}.json"
        if done.exists():
            row = json.loads(done.read_text())
        else:
            m, used = _train_apart(method, p, store_dir, data_dir=data_dir, models_dir=models,
                                   ckpt_root=work_dir / "checkpoints", live_dir=work_dir / "live")
            row = {"learning_rate": rate, "validation_loss": m["validation_loss"],
                   "final_train_loss": m["final_train_loss"], "train_seconds": m["train_seconds"], "runs": used}
            write_json(done, row)
        runs[rate] = row.pop("runs", [])
        grid.append(row)
        best = min(grid, key=lambda r: r["validation_loss"])
        RunStore(store_dir, keep=True).prune(run_names, keep=set(runs[best["learning_rate"]]))
    # The configured rate is not recorded here: it is not a param of the sweep (the report compares it).
    result = {"method": method, "profile": params.profile, "budget_steps": params.train.max_steps,
              "grid": grid, "best_learning_rate": best["learning_rate"],
              "sweep_seconds": round(sum(r["train_seconds"] for r in grid), 2)}
    shutil.rmtree(models, ignore_errors=True)  # the best rate's runs are in the store; the losses are the result
    shutil.rmtree(work_dir / "live", ignore_errors=True)
    for f in work_dir.glob("lr-*.json"):
        f.unlink()  # done: the result is the stage's output; the journal only carries a killed sweep over
    return result


def _train_apart(method: str, params: Params, store_dir: str | Path, **paths) -> tuple[dict, list[str]]:
    """One rate's run in a process of its own, as the training stage runs it: its peak memory (CPU RSS or CUDA),
    compiling and first steps are its own, not shaped by what an earlier rate left in this process, so the metrics
    the training at the best rate copies are those of a standalone run. Returns its metrics and its store keys."""
    return _apart(_train_kept, method, params, store_dir, **paths)


def _apart(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a spawned process that ends when this one does."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _exit_with_parent(parent: int) -> None:
    """End this process once ``parent`` is gone. A killed stage's rate process would otherwise train on to the end
    of its run (holding the CPU or GPU) beside the stage run again to resume the sweep."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _train_kept(method: str, params: Params, store_dir: str | Path, **paths) -> tuple[dict, list[str]]:
    store = RunStore(store_dir, keep=True)
    return train_method(method, params, store=store, **paths), store.used


def _key(params: Params, data_dir: Path, base_dir: str | Path) -> str:
    """What one rate's run depends on: every param but the cosmetic ones (the hybrid's QLoRA phase reads
    train_qlora), the training and validation rows, the base weights (fetch_info.json hashes every file) and the
    code."""
    h = hashlib.sha256(json.dumps({k: v for k, v in to_dict(params).items() if k != "ui"}, sort_keys=True).encode())
    h.update(code_fingerprint().encode())
    for f in (data_dir / "train.jsonl", data_dir / "val.jsonl"):
        h.update(f.read_bytes())
    h.update(weights_digest(Path(base_dir)))
    return h.hexdigest()[:16]
