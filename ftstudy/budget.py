"""Memory-budget mode (train.memory_budget_gb): spend a GPU memory budget on speed.

Checkpointing every decoder layer keeps a 1B model's training in a few GB of a card that has tens free; each
layer that keeps its activations instead saves its forward's recompute, and a larger micro-batch keeps the GPU
busier. The mode measures what a training row costs on the method's own model before training (one eager
forward and backward each at 1 and 2 rows with every layer checkpointed and at 1 row with none), fits a linear
model of peak memory, and picks among the plans predicted to fit the one a rule of thumb rates fastest
(``speed_score``). The rows per optimizer step never change: the budget buys speed, not a different training
run. The peak the run then reaches is recorded beside the
prediction (metrics ``memory_plan``): the model is checked on every run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ftstudy.errors import UserError

MARGIN = 0.95  # plan to this share of the budget: the allocator's fragmentation and compiled graphs' pools
# Tokens per micro-batch at which a step runs at half the rate a large batch reaches (Gemma 3 1B on an H100/H200:
# 8 x 512 tokens ran at ~0.7 of the rate 128 rows reached in benchmarks/multi_gpu.py's single-worker run).
HALF_BUSY_TOKENS = 2048


def speed_score(micro: int, accum: int, keep: int, layers: int, seq_len: int) -> float:
    """Relative speed of a plan: larger micro-batches keep the GPU busier; a checkpointed layer runs its forward
    a second time (about a third more work for that layer); accumulation turns CUDA graphs off."""
    busy = micro * seq_len / (micro * seq_len + HALF_BUSY_TOKENS)
    recompute = (layers - keep) / layers / 3
    return busy / (1 + recompute) * (0.8 if accum > 1 else 1.0)


@dataclass(frozen=True)
class Probe:
    """Peak bytes of one forward and backward above what the model holds, measured on the method's model."""

    static: int          # allocated before the step (weights, quantization state) + optimizer state + gradients held
    one_row: int         # one row, every layer checkpointed
    two_rows: int        # two rows, every layer checkpointed
    one_row_kept: int    # one row, no layer checkpointed
    layers: int

    def peak(self, rows: int, keep: int) -> float:
        per_row = self.two_rows - self.one_row                 # activations that grow with the rows
        fixed = self.one_row - per_row                         # the step's transients that do not
        per_layer = (self.one_row_kept - self.one_row) / self.layers  # a kept layer's activations, per row
        return self.static + fixed + rows * (per_row + keep * per_layer)


@dataclass(frozen=True)
class MemoryPlan:
    budget_gb: float
    micro_batch: int
    grad_accum: int
    keep_activations: int
    layers: int
    predicted_peak_gb: float
    score: float

    @property
    def checkpointing(self) -> bool:
        return self.keep_activations < self.layers

    def as_dict(self) -> dict:
        return {**asdict(self), "gradient_checkpointing": self.checkpointing}


def choose(probe: Probe, budget_gb: float, rows: int, accumulate: bool, seq_len: int) -> MemoryPlan:
    """The plan for ``rows`` per optimizer step that ``probe`` predicts within ``budget_gb`` and speed_score rates
    fastest. Micro-batches divide ``rows`` (``accumulate`` False: only ``rows`` itself, as for layer-wise
    optimizers, which step inside the backward); each keeps as many layers as fit."""
    limit = budget_gb * 2**30 * MARGIN
    plans = []
    for micro in [m for m in range(rows, 0, -1) if rows % m == 0 and (accumulate or m == rows)]:
        fits = [k for k in range(probe.layers, -1, -1) if probe.peak(micro, k) <= limit]
        if fits:
            plans.append(MemoryPlan(budget_gb, micro, rows // micro, fits[0], probe.layers,
                                    round(probe.peak(micro, fits[0]) / 2**30, 3),
                                    round(speed_score(micro, rows // micro, fits[0], probe.layers, seq_len), 4)))
    if plans:
        return max(plans, key=lambda p: p.score)
    need = probe.peak(1 if accumulate else rows, 0) / 2**30
    raise UserError(f"train.memory_budget_gb={budget_gb:g} is below what one optimizer step needs with every layer "
                    f"checkpointed ({need:.2f} GB predicted{'' if accumulate else f' for {rows} rows at once'}); "
                    f"raise it, or set it to 0 to train with the configured checkpointing and batch")


def check(budget_gb: float, cuda: bool) -> None:
    if budget_gb > 0 and not cuda:
        raise UserError(f"train.memory_budget_gb={budget_gb:g} plans GPU memory, measured with CUDA's allocator; "
                        "without a GPU set train.memory_budget_gb: 0 (and gradient_checkpointing as you want it)")


def measure(model, spec, seq_len: int, vocab_size: int) -> Probe:
    """Peak memory of eager steps of ``model`` (checkpointing enabled on every layer, not compiled yet).

    Gradients are dropped as they arrive (as a layer-wise optimizer consumes them) and counted as static memory
    where the optimizer holds them; optimizer state is estimated from the trainable parameters (two moments,
    8-bit or fp32; GaLore's projected moments are smaller, so this errs on the safe side)."""
    from ftstudy.loss import completion_loss
    from ftstudy.models import causal_lm

    layers = causal_lm(model).model.layers
    trainable = [p for p in model.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in trainable]
    state_bytes = 1 if spec.eight_bit else 4
    held = sum(p.numel() * state_bytes * 2 for p in trainable)
    if not spec.layerwise:
        held += sum(p.numel() * p.element_size() for p in trainable)  # gradients live until the optimizer step
    was = [getattr(layer, "gradient_checkpointing", False) for layer in layers]
    model.train()

    def step(rows: int, keep: int) -> int:
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i < len(layers) - keep
        ids = torch.randint(3, vocab_size, (rows, seq_len), device="cuda")
        labels = ids.clone()
        labels[:, : seq_len // 2] = -100
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = completion_loss(model, ids, torch.ones_like(ids), labels)
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    try:
        static = torch.cuda.memory_allocated() + held
        probe = Probe(static, step(1, 0), step(2, 0), step(1, len(layers)), len(layers))
    finally:
        for h in hooks:
            h.remove()
        for layer, flag in zip(layers, was, strict=True):
            layer.gradient_checkpointing = flag
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return probe
