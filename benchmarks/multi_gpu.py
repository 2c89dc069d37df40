"""Scaling: the training stages' own path on 1 and N workers (torchrun), equal effective batch, one run.

    python benchmarks/multi_gpu.py --arch gemma-3-1b --processes 2 --out multi.json   # on a 2-GPU machine
    python benchmarks/multi_gpu.py --arch tiny --steps 4                              # CPU (gloo) smoke run

For QLoRA and wide LoRA (DDP) it trains a random-weight base through ``ftstudy.training.train`` with
``train.num_processes`` 1 and N and the same ``train.batch_size`` (the effective batch), and reports total
tokens/s after the warm-up steps (compilation), the ratio, per-device peak memory and the largest relative
difference between the two loss curves. Rows are the generated instruction data joined ``--join`` at a time,
so that every row fills ``--seq-len`` tokens: batches of one shape, so the comparison measures scaling, not
the recompilations that batches of new lengths cause in the first steps.
Then full-parameter training (``train_galore.optimizer=adamw_torch``) under FSDP on N workers (GPU only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_methods import build_base, write_train_data  # noqa: E402

from ftstudy.methods import method_spec  # noqa: E402
from ftstudy.params import Params, default_params  # noqa: E402
from ftstudy.training import train  # noqa: E402

RUNS = [("galore", "fsdp"), ("lora_wide", "ddp"), ("qlora", "ddp")]


def params_for(method: str, processes: int, strategy: str, steps: int, batch: int, seq_len: int) -> Params:
    p = dataclasses.replace(default_params(), profile="benchmark")
    return dataclasses.replace(
        p, train=dataclasses.replace(p.train, batch_size=batch, max_seq_len=seq_len, max_prompt_tokens=seq_len // 2,
                                     save_steps=steps, warmup_steps=0, gradient_checkpointing=True, max_steps=steps,
                                     num_processes=processes, strategy=strategy),
        train_qlora=dataclasses.replace(p.train_qlora, lora_dropout=0.0),
        train_lora_wide=dataclasses.replace(p.train_lora_wide, lora_dropout=0.0),
        train_galore=dataclasses.replace(p.train_galore, optimizer="adamw_torch"),
        ui=dataclasses.replace(p.ui, progress_bar=False),
    )


def worker(method: str, processes: int, strategy: str, work: Path, run: Path, a) -> None:
    params = params_for(method, processes, strategy, a.steps, a.batch, a.seq_len)
    m = train(method_spec(params, method), params, train_path=work / "train.jsonl", models_dir=work / "models",
              out_dir=run / "model", ckpt_dir=run / "ck", live_dir=None)
    if m is not None:  # the main worker: its checkpoint's trainer_state holds every step's loss
        state = json.loads((run / "ck" / f"checkpoint-{a.steps}" / "trainer_state.json").read_text())
        m["loss_curve"] = [h["loss"] for h in state["log_history"] if "loss" in h]
        (run / "metrics.json").write_text(json.dumps(m))


def rate(m: dict) -> float:
    """Tokens/s after the warm-up steps; over the whole run where it was too short to have any."""
    return m["steady_tokens_per_s"] or m["tokens_per_s"]


def launch(method: str, processes: int, strategy: str, work: Path, a) -> dict:
    run = work / f"{method}-{strategy}-{processes}"
    args = [str(Path(__file__).resolve()), "--worker", method, str(processes), strategy, str(work), str(run),
            "--steps", str(a.steps), "--batch", str(a.batch), "--seq-len", str(a.seq_len)]
    cmd = ([sys.executable, *args] if processes == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args])
    env = {**os.environ, "FTSTUDY_KEEP_CHECKPOINTS": "1"}
    subprocess.run(cmd, check=True, env=env)
    return json.loads((run / "metrics.json").read_text())


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["gemma-3-1b", "tiny"], default="gemma-3-1b")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--join", type=int, default=32,
                        help="generated rows per training row (~33 tokens each; 32 fill every row to --seq-len)")
    parser.add_argument("--batch", type=int, default=16, help="effective batch, split over the workers")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=[m for m, _ in RUNS], choices=[m for m, _ in RUNS])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.worker:
        method, processes, strategy, work, run = a.worker
        worker(method, int(processes), strategy, Path(work), Path(run), a)
        return []
    cuda = torch.cuda.is_available()
    records = []
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        build_base(a.arch, work / "models" / "base")
        # Exactly steps x batch rows: every step a full batch, no epoch boundary (where 1 and N workers would
        # fill a short last batch differently) and so the same rows in the same steps on 1 and N workers.
        write_train_data(work / "train.jsonl", join=a.join, rows=a.steps * a.batch)
        for method, strategy in [r for r in RUNS if r[0] in a.methods]:
            if strategy == "fsdp" and not cuda:
                continue  # FSDP here is for GPUs (refused on CPU with a message)
            one = launch(method, 1, "ddp", work, a) if strategy == "ddp" else None
            many = launch(method, a.processes, strategy, work, a)
            rec = {"method": method, "strategy": strategy, "processes": a.processes, "arch": a.arch,
                   "device": torch.cuda.get_device_name() if cuda else "cpu", "steps": a.steps,
                   "effective_batch": many["effective_batch"], "tokens_per_s": rate(many),
                   "tokens_per_s_with_warmup": many["tokens_per_s"], "peak_memory_gb_total": many["peak_memory_gb_total"],
                   "per_device": many["per_device"], "levers": many["speed_levers"], "loss_curve": many["loss_curve"]}
            if one:
                rec.update(single_tokens_per_s=rate(one), single_effective_batch=one["effective_batch"],
                           scaling=round(rate(many) / rate(one), 3),
                           single_peak_memory_gb=one["peak_memory_gb"], single_loss_curve=one["loss_curve"],
                           max_loss_rel_diff=max(abs(x - y) / abs(y) for x, y in zip(many["loss_curve"],
                                                                                   one["loss_curve"], strict=True)))
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if a.out:  # after each run, so a later failure keeps what was measured
                a.out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"\n{'method':10} {'strategy':8} {'1 worker tok/s':>15} {f'{a.processes} workers tok/s':>16} {'scaling':>8} "
          f"{'loss rel diff':>13}")
    for r in records:
        print(f"{r['method']:10} {r['strategy']:8} {r.get('single_tokens_per_s', float('nan')):>15.0f} "
              f"{r['tokens_per_s']:>16.0f} {r.get('scaling', float('nan')):>8.2f} {r.get('max_loss_rel_diff', float('nan')):>13.1e}")
    if a.out:
        a.out.write_text(json.dumps(records, indent=2) + "\n")
    return records


if __name__ == "__main__":
    main()
