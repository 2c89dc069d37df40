"""Memory-budget mode (train.memory_budget_gb): spend a GPU memory budget on speed.

Checkpointing every decoder layer keeps a 1B model's training in a few GB of a card that has tens free. What the
free memory buys was measured on an H200 (gemma-3-1b, 512-token rows, benchmarks/results/budget_h200.json):
keeping every layer's activations instead of recomputing them was no faster on the compiled path (0.89-0.97x the
checkpointed rate at 8 rows, through the stages' train()), while more rows per step were (wide LoRA, 64 rows
1.19x 8 rows, both checkpointed). So a plan keeps checkpointing every layer and spends the budget on rows per
micro-step: the fewest micro-steps per optimizer step whose peak the memory model predicts within the budget.
The model is fitted on the method's own model before training (one eager forward and backward at 1 and at 2
rows), and the peak the run then reaches is recorded beside the prediction (metrics ``memory_plan``): it is
checked on every run. The rows per optimizer step never change: the budget buys speed, not another training run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ftstudy.errors import UserError

MARGIN = 0.95  # plan to this share of the budget: the allocator's fragmentation and compiled graphs' pools


@dataclass(frozen=True)
class Probe:
    """Peak bytes of one forward and backward, every layer checkpointed, measured on the method's model."""

    static: int    # allocated before the step (weights, quantization state) + optimizer state + gradients held
    one_row: int   # the step's peak above static with one row
    two_rows: int  # and with two

    def peak(self, rows: int) -> float:
        per_row = self.two_rows - self.one_row  # activations that grow with the rows
        fixed = self.one_row - per_row          # the step's transients that do not (the head's chunk, workspaces)
        return self.static + fixed + rows * per_row


@dataclass(frozen=True)
class MemoryPlan:
    budget_gb: float
    micro_batch: int
    grad_accum: int
    predicted_peak_gb: float

    def as_dict(self) -> dict:
        return asdict(self)


def choose(probe: Probe, budget_gb: float, rows: int, accumulate: bool) -> MemoryPlan:
    """The plan for ``rows`` per optimizer step with the fewest micro-steps that ``probe`` predicts within
    ``budget_gb``. Micro-batches divide ``rows``; ``accumulate`` False allows only ``rows`` itself (layer-wise
    optimizers step inside the backward; CUDA graphs forced on cannot accumulate)."""
    limit = budget_gb * 2**30 * MARGIN
    for micro in [m for m in range(rows, 0, -1) if rows % m == 0 and (accumulate or m == rows)]:
        if probe.peak(micro) <= limit:
            return MemoryPlan(budget_gb, micro, rows // micro, round(probe.peak(micro) / 2**30, 3))
    need = probe.peak(1 if accumulate else rows) / 2**30
    raise UserError(f"train.memory_budget_gb={budget_gb:g} is below what one optimizer step needs with every layer "
                    f"checkpointed ({need:.2f} GB predicted{'' if accumulate else f' for {rows} rows at once'}); "
                    f"raise it, or set it to 0 to train with the configured checkpointing and batch")


def check(budget_gb: float, cuda: bool) -> None:
    if budget_gb > 0 and not cuda:
        raise UserError(f"train.memory_budget_gb={budget_gb:g} plans GPU memory, measured with CUDA's allocator; "
                        "without a GPU set train.memory_budget_gb: 0 (and gradient_checkpointing as you want it)")


def measure(model, spec, seq_len: int, vocab_size: int) -> Probe:
    """Peak memory of eager steps of ``model`` (not compiled yet: compiled layers, which fuse, take no more).

    Gradients are dropped as they arrive (as a layer-wise optimizer consumes them) and counted as static memory
    where the optimizer holds them. Optimizer state is counted from the shapes: layer-wise GaLore's exactly
    (projected moments, buffers, bases: ``LayerwiseGaLore.held_bytes``), otherwise two moments per trainable
    value, 8-bit or fp32 (for non-layer-wise GaLore that errs on the safe side)."""
    from ftstudy.galore import LayerwiseGaLore, galore_targets
    from ftstudy.loss import completion_loss
    from ftstudy.methods import galore_target_patterns
    from ftstudy.models import causal_lm

    layers = causal_lm(model).model.layers
    trainable = [p for p in model.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in trainable]
    if spec.galore is not None and spec.layerwise:
        targets = galore_targets(model, galore_target_patterns(spec.galore.target_modules))
        held = LayerwiseGaLore.held_bytes(model, targets, eight_bit=spec.eight_bit, rank=spec.galore.rank)
    else:
        held = sum(p.numel() * (1 if spec.eight_bit else 4) * 2 for p in trainable)
    if not spec.layerwise:
        held += sum(p.numel() * p.element_size() for p in trainable)  # gradients live until the optimizer step
    was = [getattr(layer, "gradient_checkpointing", False) for layer in layers]
    model.train()
    for layer in layers:
        layer.gradient_checkpointing = True

    def step(rows: int) -> int:
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
        probe = Probe(static, step(1), step(2))
    finally:
        for h in hooks:
            h.remove()
        for layer, flag in zip(layers, was, strict=True):
            layer.gradient_checkpointing = flag
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return probe
