"""The memory-budget probe's steps beside a training step's, on the GPU: what ftstudy.budget's memory model is fitted on.

    python benchmarks/budget_probe.py probe lora_wide 1 2 8   # the probe's steps at 1, 2 and 8 rows
    python benchmarks/budget_probe.py train lora_wide 8       # training steps at 8 rows, as speed.py's "ours" runs

``probe``: the method's model as benchmarks/speed.py builds it (random gemma-3-1b weights), every layer checkpointed,
steps as ``ftstudy.budget.measure`` takes them (``budget.probe_step``), on compiled layers with and
without CUDA graphs and on eager ones. Per step it prints, in GiB: memory allocated before it, the forward's peak,
the backward's and the step's above that, and what the step left allocated. ``train``: the same model with its layers compiled
as the stages compile them (CUDA graphs) and its optimizer, a few steps; per step the memory allocated before it,
its peak and what it left. The probe's peak at the rows a plan chooses, plus the optimizer state, should be the
training step's peak.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import bench_params, build_base, build_variant, make_batches, train_step  # noqa: E402

from ftstudy.arch import GEMMA3_1B  # noqa: E402

GIB = 2**30
SEQ_LEN = 512


def model_for(method: str):
    base = Path(tempfile.mkdtemp()) / "base"
    build_base(GEMMA3_1B, base, True)
    params = bench_params("project", True, 0)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, compile="off"))
    return build_variant(method, "project", base, True, params)


def probe(method: str, rows: list[int]) -> None:
    from ftstudy import fastpath
    from ftstudy.budget import probe_step
    from ftstudy.models import causal_lm

    model, _, _, _ = model_for(method)
    print(f"weights {torch.cuda.memory_allocated() / GIB:.3f} GiB", flush=True)

    def step(n: int) -> tuple[float, ...]:
        taken = probe_step(model, n, SEQ_LEN, GEMMA3_1B["vocab_size"])
        return tuple(round(taken[k] / GIB, 3) for k in ("before", "forward", "backward", "peak", "left"))

    for graphs in (True, False):
        with fastpath.compiled_for_probe(model, 0, graphs):
            for n in rows:
                print(f"compiled, CUDA graphs {graphs}, {n} rows (before, forward, backward, peak, left) per step:",
                      [step(n) for _ in range(3)], flush=True)
    for layer in causal_lm(model).model.layers:
        layer.gradient_checkpointing = True
    for n in rows:
        print(f"eager, {n} rows:", [step(n) for _ in range(2)], flush=True)


def train(method: str, rows: list[int]) -> None:
    from ftstudy import fastpath

    model, opt, _, _ = model_for(method)
    fastpath.compile_layers(model, True)
    print(f"weights {torch.cuda.memory_allocated() / GIB:.3f} GiB", flush=True)
    for s, b in enumerate(make_batches(6, rows[0], SEQ_LEN, GEMMA3_1B["vocab_size"], 0.5)):
        b = {k: v.cuda() for k, v in b.items()}
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.compiler.cudagraph_mark_step_begin()
        train_step(model, opt, b, "project", True)
        torch.cuda.synchronize()
        print(f"train, {rows[0]} rows, step {s}: before {before / GIB:.3f}, peak "
              f"{torch.cuda.max_memory_allocated() / GIB:.3f}, after {torch.cuda.memory_allocated() / GIB:.3f} GiB",
              flush=True)


if __name__ == "__main__":
    {"probe": probe, "train": train}[sys.argv[1]](sys.argv[2], [int(x) for x in sys.argv[3:]])
