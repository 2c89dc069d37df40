"""Where a training step's time goes: one method, one variant, a few levers, on the GPU.

    python benchmarks/profile_step.py --method lora_wide --variant project --liger --compile --profile

Prints the median step time, tokens/s, peak memory and (with --profile) the GPU's busy time per step
next to the wall time, and the kernels that take the most time. A diagnostic for benchmarks/speed.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import bench_params, build_base, build_variant, make_batches, train_step  # noqa: E402

from ftstudy.arch import GEMMA3_1B  # noqa: E402


def build(method: str, variant: str, liger: bool, compiled: bool, base_dir: Path, graphs: bool = False,
          ckpt: str = "inside", keep: int = 0, probe_rows: int = 0, seq_len: int = 512):
    """One variant of benchmarks/speed.py, with the project's levers switched one by one.

    ckpt: "inside" (the training path: recomputation traced into the compiled layers), "outside" (transformers'
    checkpoint around each compiled layer, as before), "off" (no recomputation). probe_rows: also the peak that
    ftstudy.budget's memory model predicts for that many rows and ``keep`` kept layers, in GiB, from its eager
    probe and from its probe of compiled layers (None: not probed).
    """
    from ftstudy import budget, fastpath
    from ftstudy.methods import method_spec
    from ftstudy.models import causal_lm

    params = bench_params(variant, True, keep)
    params = dataclasses.replace(params, train=dataclasses.replace(
        params.train, kernels="on" if liger else "off", compile="off", gradient_checkpointing=ckpt != "off"))
    model, opt, _, _ = build_variant(method, variant, base_dir, True, params)
    predicted = None
    if probe_rows:  # both probes, whichever the training stages would use (ftstudy.budget.plan)
        spec, vocab = method_spec(params, method), causal_lm(model).config.vocab_size
        kinds = {"eager": {}, "compiled": {"compiled": True, "cuda_graphs": graphs}}
        predicted = {kind: round(budget.measure(model, spec, seq_len, vocab, **how).peak(probe_rows, keep) / 2**30, 3)
                     for kind, how in kinds.items()}
    if compiled:
        if ckpt == "outside":
            for layer in causal_lm(model).model.layers:
                layer.compile(mode="reduce-overhead" if graphs else None)
        else:
            fastpath.compile_layers(model, graphs)
    return model, opt, predicted


KINDS = (("matmul", ("gemm", "cutlass", "nvjet", "sm90_", "sm80_", "cublas", "mm_")),
         ("optimizer", ("optim", "adam", "kOptimizer", "8bit")),
         ("copy", ("Memcpy", "Memset")), ("fused", ("triton_",)), ("eager", ("at::native", "void at::")))


def kernel_kind(name: str) -> str:
    """A kernel's family by its name: where a step's device time goes, at a glance."""
    return next((kind for kind, marks in KINDS if any(m.lower() in name.lower() for m in marks)), "other")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="lora_wide")
    p.add_argument("--variant", default="project", choices=["baseline", "project"])
    p.add_argument("--ckpt", default="inside", choices=["inside", "outside", "off"])
    p.add_argument("--keep", type=int, default=0, help="train.keep_activations")
    p.add_argument("--liger", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the compiled layers as CUDA graphs "
                   "(torch.compile reduce-overhead; implies --compile)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--base", type=Path, help="random-weight model directory to reuse (built there if missing)")
    p.add_argument("--probe", action="store_true", help="print ftstudy.budget's predicted peak for --batch and --keep "
                   "beside the measured ones (the whole run's, warm-up and CUDA-graph recording included, and the "
                   "timed steps')")
    a = p.parse_args()
    batches = make_batches(a.warmup + a.steps, a.batch, a.seq_len, GEMMA3_1B["vocab_size"], 0.5)
    base_dir = a.base or Path(tempfile.mkdtemp()) / "base"
    if not (base_dir / "config.json").exists():
        build_base(GEMMA3_1B, base_dir, True)
    a.compile = a.compile or a.cuda_graphs
    model, opt, predicted = build(a.method, a.variant, a.liger, a.compile, base_dir, a.cuda_graphs, a.ckpt, a.keep,
                                  a.batch if a.probe else 0, a.seq_len)
    times, losses, whole_run_peak = [], [], 0
    torch.cuda.reset_peak_memory_stats()
    t_compile = time.perf_counter()
    for step, b in enumerate(batches):
        if step == a.warmup:
            whole_run_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        b = {k: v.cuda() for k, v in b.items()}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if a.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = train_step(model, opt, b, a.variant, True)
        torch.cuda.synchronize()
        if step == 0:
            first = time.perf_counter() - t_compile
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(round(float(loss.detach()), 5))
    med = statistics.median(times)
    rec = {"method": a.method, "variant": a.variant, "ckpt": a.ckpt, "liger": a.liger, "compile": a.compile,
           "cuda_graphs": a.cuda_graphs, "keep": a.keep, "batch": a.batch,
           "step_s": round(med, 4), "tokens_per_s": round(a.batch * a.seq_len / med), "first_step_s": round(first, 1),
           "peak_alloc_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2), "losses": losses,
           "whole_run_peak_alloc_gb": round(max(whole_run_peak, torch.cuda.max_memory_allocated()) / 2**30, 3),
           "predicted_peak_gb": predicted}
    print("RESULT " + json.dumps(rec), flush=True)
    if not a.profile:
        return
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    b = {k: v.cuda() for k, v in batches[-1].items()}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            if a.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            train_step(model, opt, b, a.variant, True)
            torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernels and copies only: the host ops that launched them and the ranges around compiled graphs and optimizer
    # steps carry the same device time again.
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.key.startswith("## ") and "#" not in e.key]
    gpu_us = sum(e.self_device_time_total for e in kernels)
    cpu_us = sum(e.self_cpu_time_total for e in events)
    print(f"PROFILE gpu_busy_per_step_ms={gpu_us / 2000:.1f} cpu_self_per_step_ms={cpu_us / 2000:.1f} "
          f"wall_step_ms={med * 1000:.1f}")
    rows = sorted((e for e in events if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    kinds = {}
    for e in kernels:
        kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0) + e.self_device_time_total / 2000
    print("  by kind (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    for e in rows[:30]:
        print(f"  {e.self_device_time_total / 2000:8.2f} ms  x{e.count // 2:5d}  {e.key[:90]}")
    top_cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    for e in top_cpu:
        print(f"  cpu {e.self_cpu_time_total / 2000:8.2f} ms  x{e.count // 2:5d}  {e.key[:80]}")


if __name__ == "__main__":
    main()
