"""Memory-budget mode (train.memory_budget_gb): spend a GPU memory budget on speed.

Checkpointing every decoder layer keeps a 1B model's training in a few GB of a card that has tens free. The budget
buys speed two ways, both measured on an H200 (gemma-3-1b, 8 x 512-token rows, compiled layers replayed as CUDA
graphs, benchmarks/profile_step.py; docs/gpu-speed.md):

- more rows per micro-step, which spread a step's fixed cost (kernel launches, the optimizer, the head's chunk
  loop): wide LoRA took 79 ms for 8 rows and 270 ms for 32, i.e. ~16 ms a step besides ~8 ms a row;
- layers that keep their activations instead of recomputing them: with none checkpointed, QLoRA stepped 1.31x and
  wide LoRA 1.23x (8 rows) and 1.29x (32 rows) faster. Layer-wise GaLore did not (0.80x at 8 rows: its backward
  runs a Python hook per weight, so the step waits on the host, not on the recompute), so for layer-wise
  optimizers a plan keeps checkpointing every layer.

A plan is the (micro-batch, kept layers) pair with the highest rate by that cost model (``rate``) among those the
memory model predicts within the budget. The memory model is fitted on the method's own model before training
(forward and backward at 1 and 2 rows with every layer checkpointed, their peaks apart, and at 1 row with none):
first on eager layers, then, where that keeps a faster plan out and the layers train compiled, on compiled ones.
The plan it picks is then measured whole and corrects the model, until a plan measures within the budget (``plan``).
The peak the run then reaches is recorded beside the prediction (metrics ``memory_plan``): it is checked on every
run. The rows per optimizer step never change: the budget buys speed, not another training run.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ftstudy.errors import UserError

MARGIN = 0.95  # plan to this share of the budget: the allocator's fragmentation and compiled graphs' pools
# The cost model's two constants, from wide LoRA on an H200 (above): a step's fixed cost in tokens' worth of
# compute (16 ms against 8 ms per 512-token row), and the share of a row's compute that recomputing every layer's
# forward adds (1 - 1/1.23-1.31).
STEP_COST_TOKENS = 1024
RECOMPUTE_SHARE = 0.24
CHECKS = 6  # shapes plan() measures whole at most (compiled, each costs a compile)


@dataclass(frozen=True)
class Probe:
    """Peak bytes of forwards and backwards, measured on the method's model."""

    static: int    # allocated before the step (weights, quantization state) + optimizer state
    one_row: int   # the step's peak above static with one row, every layer checkpointed, its gradients included
    two_rows: int  # and with two
    backward: tuple[int, int] | None = None  # the backward's own peak above static at one and two rows
    forward: tuple[int, int] | None = None  # and the forward's
    kept: int | None = None  # what one row adds to the forward's peak with no layer checkpointed; None: keeping
    #                          layers does not pay
    layers: int = 1
    compiled: bool = False  # measured on compiled layers (else eager ones)
    cuda_graphs: bool = False  # replayed as CUDA graphs
    grads: int = 0  # gradients held from one micro-step to the next (accumulation)
    # (rows, kept layers, the step's peak above static, its forward's; inf: out of memory) of plans measured whole
    checked: tuple[tuple[int, int, float, float], ...] = ()

    @property
    def checked_shapes(self) -> set[tuple[int, int]]:
        """(rows, kept layers) of the plans measured whole."""
        return {(n, k) for n, k, _, _ in self.checked}

    def peak(self, rows: int, keep: int = 0, accum: int = 1) -> float:
        """Bytes a micro-step of ``rows`` with the last ``keep`` layers uncheckpointed peaks at, ``accum`` of them
        a step. Two phases, each linear in the rows: the forward up to the head (whose fused loss makes its
        gradients there), which kept layers add to, and the backward's recompute of one checkpointed layer at a time
        on top of every layer's saved input. At one or two rows the head's chunk is the larger; at tens of rows the
        backward. A shape measured whole is what it measured."""
        held = self.grads if accum > 1 else 0  # a later micro-step's whole peak sits on the gradients summed so far
        measured = {(n, k): b for n, k, b, _ in self.checked}
        above = measured.get((rows, keep))
        if above is None:
            above = max(self._forward(rows) + rows * self._kept() * keep / self.layers, self._backward(rows))
        return self.static + held + above

    def _forward(self, rows: int) -> float:
        """Through the forward's peaks at one and two rows and at the plans measured whole that keep no layer (the
        step's peaks, where the forward was not measured apart), as :meth:`_backward` draws its line."""
        f1, f2 = self.forward or (self.one_row, self.two_rows)
        return _through({1: f1, 2: f2, **{n: f for n, k, _, f in self.checked if k == 0 and f < math.inf}}, rows)

    def _backward(self, rows: int) -> float:
        """Through the backward's peaks at one and two rows (the step's, where it was not measured apart) and the
        plans measured whole since: straight between measured rows, which errs high where the peak bends, and the
        last chord carried on past them, which errs low, so :func:`plan` measures the shape it takes."""
        b1, b2 = self.backward or (self.one_row, self.two_rows)
        return _through({1: b1, 2: b2, **{n: b for n, k, b, _ in self.checked if k == 0 and b < math.inf}}, rows)

    def _kept(self) -> float:
        """What a row adds with every layer kept. Measured at one row it includes what a kept layer holds whatever
        the rows (QLoRA on an H200: 2.17 GB for one row with all 26 layers kept, while at 64 rows one kept layer
        trained at no more than none, 6.49 GB against 6.65), so once plans that keep layers have been measured
        whole, the most any of them implies takes its place: all of its forward's excess over the forward's line put
        on its kept layers. The forward's, not the step's: where the backward is the step's peak (wide LoRA on an
        H200, whose adapter gradients arrive there), two kept layers at 8 rows raised the step's peak by a fifth
        of what they hold, and the twelve kept next measured 7.04 GB where that fifth predicted 4.80."""
        implied = [max(0.0, (f - self._forward(n)) * self.layers / (n * k))
                   for n, k, _, f in self.checked if k and f < math.inf]
        return max(implied) if implied else float(self.kept or 0)


def _through(points: dict[int, float], rows: int) -> float:
    """The polyline through ``points`` (rows: bytes) at ``rows``, its last segment carried on. A segment never runs
    downwards: where a later point measured less (noise), it stays at the earlier one's bytes."""
    at = sorted(points.items())
    for (r0, b0), (r1, b1) in zip(at, at[1:], strict=False):
        if rows <= r1 or r1 == at[-1][0]:
            return b0 + (rows - r0) * max(b1 - b0, 0) / (r1 - r0)
    return float(at[0][1])


@dataclass(frozen=True)
class MemoryPlan:
    budget_gb: float
    micro_batch: int
    grad_accum: int
    keep_activations: int
    predicted_peak_gb: float
    probe: str = "eager"  # what the prediction was measured on: "eager", "compiled" or "compiled+graphs" layers
    # The shapes plan() measured whole, in order, this one among them (its prediction is its measurement):
    # (micro-batch, kept layers, GB one micro-step peaked at; None: out of memory)
    checks: tuple[tuple[int, int, float | None], ...] = ()

    def as_dict(self) -> dict:
        return asdict(self)


def rate(micro: int, accum: int, keep: int, layers: int, seq_len: int) -> float:
    """Tokens per unit of time by the cost model above (relative: only the order of plans matters)."""
    tokens = micro * accum * seq_len
    return tokens / (accum * STEP_COST_TOKENS + tokens * (1 - RECOMPUTE_SHARE * keep / layers))


def keeping_pays(spec) -> bool:
    """Whether layers that keep their activations make ``spec``'s steps faster: not for layer-wise optimizers,
    whose backward waits on a Python hook per weight (above)."""
    return not spec.layerwise


def choose(probe: Probe, budget_gb: float, rows: int | Sequence[int], accumulate: bool, seq_len: int,
           measured_only: bool = False) -> MemoryPlan:
    """The fastest plan by ``rate`` that ``probe`` predicts within ``budget_gb``, for ``rows`` per optimizer step
    (or, given several, for any of them: benchmarks that may spend the budget on a larger batch). Micro-batches
    divide the rows; ``accumulate`` False allows only the rows themselves (layer-wise optimizers step inside the
    backward; CUDA graphs forced on cannot accumulate). Layers keep their activations only where the probe
    measured what that costs (``keeping_pays``). ``measured_only``: among the shapes ``probe`` has checked."""
    limit = budget_gb * 2**30 * MARGIN
    measured = probe.checked_shapes
    options = [rows] if isinstance(rows, int) else list(rows)
    keeps = range(probe.layers + 1) if probe.kept is not None else [0]
    fits = [(rate(m, n // m, k, probe.layers, seq_len), -n // m, m, n // m, k)
            for n in options for m in range(n, 0, -1) if n % m == 0 and (accumulate or m == n)
            for k in keeps if probe.peak(m, k, n // m) <= limit and (not measured_only or (m, k) in measured)]
    if fits:
        _, _, micro, accum, keep = max(fits)
        return MemoryPlan(budget_gb, micro, accum, keep, round(probe.peak(micro, keep, accum) / 2**30, 3))
    least = min(options)
    need = (probe.peak(1, 0, least) if accumulate else probe.peak(least)) / 2**30
    raise UserError(f"train.memory_budget_gb={budget_gb:g} is below what one optimizer step needs with every layer "
                    f"checkpointed ({need:.2f} GB predicted{'' if accumulate else f' for {least} rows at once'}); "
                    f"raise it, or set it to 0 to train with the configured checkpointing and batch")


def shape(plan: MemoryPlan) -> tuple[int, int, int]:
    return plan.micro_batch, plan.grad_accum, plan.keep_activations


def fastest(probe: Probe, budget_gb: float, rows: int | Sequence[int], accumulate: bool, seq_len: int) -> MemoryPlan:
    """The plan :func:`choose` would pick if activations took no memory (the static part still has to fit)."""
    free = dataclasses.replace(probe, one_row=0, two_rows=0, kept=None if probe.kept is None else 0, checked=(),
                               backward=None, forward=None)
    return choose(free, budget_gb, rows, accumulate, seq_len)


def check(budget_gb: float, cuda: bool) -> None:
    if budget_gb > 0 and not cuda:
        raise UserError(f"train.memory_budget_gb={budget_gb:g} plans GPU memory, measured with CUDA's allocator; "
                        "without a GPU set train.memory_budget_gb: 0 (and gradient_checkpointing as you want it)")


def measure(model, spec, seq_len: int, vocab_size: int, compiled: bool = False, cuda_graphs: bool = False) -> Probe:
    """Peak memory of steps of ``model``, eager or with its layers ``compiled`` (:func:`ftstudy.fastpath.compiled_for_probe`;
    compiled layers, which fuse, keep less), replayed as ``cuda_graphs`` or not: one and two rows with every layer
    checkpointed and, where keeping layers pays, one row with none (:func:`peaks_at`). Static memory is read after an
    untimed first step, so that what a first step allocates for good (workspaces) counts once, in static, and what
    it allocates once and frees (layer-wise GaLore measured more at one row than at two without it) not at all.

    Optimizer state is counted from the shapes: layer-wise GaLore's exactly (projected moments, buffers, bases:
    ``LayerwiseGaLore.held_bytes``), otherwise two moments per trainable value, 8-bit or fp32 (for non-layer-wise
    GaLore that errs on the safe side)."""
    from ftstudy.galore import LayerwiseGaLore, galore_targets
    from ftstudy.methods import galore_target_patterns
    from ftstudy.models import causal_lm

    trainable = [p for p in model.parameters() if p.requires_grad]
    if spec.galore is not None and spec.layerwise:
        targets = galore_targets(model, galore_target_patterns(spec.galore.target_modules))
        held = LayerwiseGaLore.held_bytes(model, targets, eight_bit=spec.eight_bit, rank=spec.galore.rank)
    else:
        held = sum(p.numel() * (1 if spec.eight_bit else 4) * 2 for p in trainable)
    grads = 0 if spec.layerwise else sum(p.numel() * p.element_size() for p in trainable)
    layers = len(causal_lm(model).model.layers)
    peaks_at(model, spec, seq_len, vocab_size, [1])
    static = torch.cuda.memory_allocated() + held
    one, two = peaks_at(model, spec, seq_len, vocab_size, [1, 2], 0, compiled, cuda_graphs)
    # Kept layers add to the forward (Probe.peak): read from the forwards', as the checks are (Probe._kept).
    kept = (max(0, peaks_at(model, spec, seq_len, vocab_size, [1], layers, compiled, cuda_graphs)[0][0] - one[0])
            if keeping_pays(spec) else None)
    return Probe(static=static, one_row=max(one), two_rows=max(two), backward=(one[1], two[1]), forward=(one[0], two[0]),
                 kept=kept, layers=layers, compiled=compiled, cuda_graphs=cuda_graphs, grads=grads)


def peaks_at(model, spec, seq_len: int, vocab_size: int, rows: list[int], keep: int = 0, compiled: bool = False,
             cuda_graphs: bool = False) -> list[tuple[int, int]]:
    """The peaks above what was allocated before it of a step's forward and of its backward (:func:`probe_step`) for
    each of ``rows``, with the last ``keep`` layers uncheckpointed, the layers eager or ``compiled`` (then the highest
    of a shape's first three steps: compiling, CUDA graphs' warm-up and recording, a replay, as a training run goes
    through them).

    Gradients arrive as in training: kept until the step ends, or, for a layer-wise optimizer, dropped as they
    arrive (its hooks consume them). Each step's peak thus holds the gradients that coexist with its activations (in
    a backward, the earlier layers' activations are freed as the later layers' gradients are made), not all of them
    on top; ``Probe.grads`` adds them whole where accumulation holds them from micro-step to micro-step. The model is
    left as it was (checkpointing flags, no gradients)."""
    from ftstudy import fastpath
    from ftstudy.models import causal_lm

    def phases(n: int) -> tuple[int, int]:
        taken = probe_step(model, n, seq_len, vocab_size)
        return taken["forward"], taken["backward"]

    layers = causal_lm(model).model.layers
    trainable = [p for p in model.parameters() if p.requires_grad]
    hooks = ([p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in trainable]
             if spec.layerwise else [])
    was = [getattr(layer, "gradient_checkpointing", False) for layer in layers]
    model.train()
    try:
        if not compiled:
            for i, layer in enumerate(layers):
                layer.gradient_checkpointing = i < len(layers) - keep
            return [phases(n) for n in rows]
        with fastpath.compiled_for_probe(model, keep, cuda_graphs):
            return [tuple(map(max, *(phases(n) for _ in range(3)))) for n in rows]
    finally:
        for h in hooks:
            h.remove()
        for layer, flag in zip(layers, was, strict=True):
            layer.gradient_checkpointing = flag
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def probe_step(model, rows: int, seq_len: int, vocab_size: int) -> dict[str, int]:
    """One forward and backward of ``rows`` random rows, their second half labelled, under bf16 autocast: the step
    :func:`measure` takes. Bytes allocated before it (``before``), the peaks above that of its forward (``forward``;
    the fused head makes its gradients there), of its backward (``backward``) and of the whole step (``peak``), and
    what it left allocated (``left``)."""
    from ftstudy.loss import completion_loss

    ids = torch.randint(3, vocab_size, (rows, seq_len), device="cuda")
    labels = ids.clone()
    labels[:, : seq_len // 2] = -100
    model.zero_grad(set_to_none=True)  # the last step's gradients: an optimizer step would have consumed them
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.compiler.cudagraph_mark_step_begin()  # as the Trainer does (a no-op without CUDA graphs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = completion_loss(model, ids, torch.ones_like(ids), labels)
    forward = torch.cuda.max_memory_allocated() - before
    torch.cuda.reset_peak_memory_stats()  # the backward's own peak from here (what the forward left included)
    loss.backward()
    torch.cuda.synchronize()
    backward = torch.cuda.max_memory_allocated() - before
    return {"before": before, "forward": forward, "backward": backward, "peak": max(forward, backward),
            "left": torch.cuda.memory_allocated() - before}


def plan(model, spec, budget_gb: float, rows: int | Sequence[int], accumulate: bool, seq_len: int,
         compiled: bool, cuda_graphs: bool = False) -> MemoryPlan:
    """The plan :func:`choose` makes on a probe of ``model`` (:func:`measure`), measured whole before it is taken.

    The probe is eager and, where that keeps a faster plan out and the layers will train ``compiled`` (replayed as
    ``cuda_graphs`` or not), of the layers compiled so, where a layer that keeps its activations may keep fewer
    (inductor chooses what to save; with every layer checkpointed the two measured the same on an H200,
    benchmarks/results/budget_probe_h200.txt). A compiled probe costs a compile per probed shape, so it runs only
    where it can pay.

    One and two rows need not tell how the peak grows at tens (``Probe._backward``: on an H200 one line through the
    step's peaks at 1 and 2 rows gave 4.57 GB for 64 QLoRA rows, which trained at 6.66), and one row with every
    layer kept does not tell what a kept layer holds at tens (``Probe._kept``), so the chosen shape is then measured
    as the probe measures (one step; compiled, three) and becomes a point of the model, which chooses again: a shape
    over the budget is refused, and one that measured less than predicted can make room for a faster one, measured
    in its turn. It ends at a shape measured within the budget and still the fastest predicted, or after ``CHECKS``
    shapes at the fastest of those measured within it."""
    from ftstudy.models import causal_lm

    vocab_size = causal_lm(model).config.vocab_size
    probe = measure(model, spec, seq_len, vocab_size)
    try:
        chosen = choose(probe, budget_gb, rows, accumulate, seq_len)
    except UserError:
        if not compiled:
            raise
        chosen = None
    if compiled and (chosen is None or shape(chosen) != shape(fastest(probe, budget_gb, rows, accumulate, seq_len))):
        probe = measure(model, spec, seq_len, vocab_size, compiled=True, cuda_graphs=cuda_graphs)
        chosen = choose(probe, budget_gb, rows, accumulate, seq_len)
    for _ in range(CHECKS):
        micro, accum, keep = shape(chosen)
        if (micro, keep) in probe.checked_shapes:
            break  # measured, and still the fastest that fits
        try:
            [(forward, backward)] = peaks_at(model, spec, seq_len, vocab_size, [micro], keep, probe.compiled,
                                             probe.cuda_graphs)
        except torch.cuda.OutOfMemoryError:  # a shape predicted low can be past the card itself
            forward = backward = math.inf
        torch.cuda.empty_cache()  # the failed step's tensors, released with its exception
        probe = dataclasses.replace(probe, checked=(*probe.checked, (micro, keep, max(forward, backward), forward)))
        print(f"memory budget {budget_gb:g} GB: {micro} rows x {accum}, {keep} layers kept: "
              f"{chosen.predicted_peak_gb} GB predicted, {probe.peak(micro, keep, accum) / 2**30:.3f} measured",
              file=sys.stderr, flush=True)
        chosen = choose(probe, budget_gb, rows, accumulate, seq_len)  # raises once no shape is left
    else:  # the model kept moving: the fastest of the shapes measured within the budget
        chosen = choose(probe, budget_gb, rows, accumulate, seq_len, measured_only=True)
    print(f"memory budget {budget_gb:g} GB, probe {asdict(probe)}", file=sys.stderr, flush=True)
    kind = ("compiled+graphs" if probe.cuda_graphs else "compiled") if probe.compiled else "eager"
    checks = tuple((n, k, round((probe.static + b) / 2**30, 3) if b < math.inf else None) for n, k, b, _ in probe.checked)
    return dataclasses.replace(chosen, probe=kind, checks=checks)
