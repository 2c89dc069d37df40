"""GPU levers that make a training step faster and leaner without changing what is learned.

Each is measured against the plain transformers configuration by benchmarks/speed.py (numbers in the
README). The completion loss of ftstudy.loss (a fused head that never builds the full logits) is always
on; the levers here are switched by ``train.kernels``, ``train.compile`` and ``train.cuda_graphs``
("auto" = on with CUDA):

- torch.compile of each decoder layer ("regional" compilation: one graph serves every layer of a kind, so
  compiling costs seconds, not minutes), with activation checkpointing traced inside the graph and QLoRA's
  4-bit linears in traceable ops, so that the compiler recomputes them; and of the fused head's softmax and
  cross-entropy (ftstudy.loss.compile_head);
- CUDA graphs for those compiled layers: a step at 8 x 512 tokens is bound by kernel launches, not the GPU;
- Liger's Triton kernels for Gemma 3's RMSNorm, rotary embedding and GeGLU MLP where layers are not compiled;
- a fused AdamW (one kernel for all LoRA tensors instead of several per tensor).

GaLore's optimizer levers (its 8-bit step in place, the batched layer-wise optimizer) are in ftstudy.galore.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from types import MethodType

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftstudy.errors import UserError
from ftstudy.loss import COMPILED_HEAD, compile_head
from ftstudy.models import causal_lm


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def wanted(setting: str, cuda: bool) -> bool:
    return setting == "on" or (setting == "auto" and cuda)


def check(kernels: str, cuda: bool, cuda_graphs: str = "auto") -> None:
    """Refuse a lever this machine cannot run, before anything is loaded."""
    if cuda_graphs == "on" and not cuda:
        raise UserError("train.cuda_graphs=on needs CUDA; use auto or off here")
    if kernels == "on" and not cuda:
        raise UserError("train.kernels=on needs CUDA (Liger's kernels are Triton GPU kernels); use auto or off here")
    if kernels == "on" and not liger_installed():
        raise UserError("train.kernels=on needs liger-kernel, which is not installed: `pip install liger-kernel` "
                        "(or set train.kernels=auto to run without it)")


def apply_kernels(model) -> bool:
    """Swap Gemma 3's RMSNorm, rotary embedding and MLP for Liger's kernels; False where they do not apply."""
    lm = causal_lm(model)
    if lm.config.model_type not in ("gemma3_text", "gemma3") or not liger_installed():
        return False
    from liger_kernel.transformers import apply_liger_kernel_to_gemma3_text

    # The loss stays ours (ftstudy.loss): Liger's fused cross-entropy takes 16-row chunks at a 262k vocabulary.
    apply_liger_kernel_to_gemma3_text(rope=True, rms_norm=True, geglu=True, cross_entropy=False,
                                      fused_linear_cross_entropy=False, model=lm)
    return True


# Two wrong backward kernels from inductor on an H200 (torch 2.11), both for static shapes only, with the loss
# right (benchmarks/compiled_grads.py finds them; docs/gpu-speed.md has the sweeps):
# - loop reordering after fusion (on by default): query-projection gradients 10^4-10^5 times too large in every
#   layer at batch width 128; LoRA hid it, full-parameter GaLore diverged;
# - 2-D tiled kernels: with LoRA adapters (QLoRA and wide LoRA) NaN adapter gradients at width 512, from the
#   first call (CUDA graphs: every call). One tile dimension per kernel clears it; loop reordering, split or
#   persistent reductions do not. With both settings every weight's gradient matches the uncompiled model's
#   (the bf16 model's at widths 128 and 256, QLoRA's adapter at 128 and 512, with and without CUDA graphs).
INDUCTOR = {"loop_ordering_after_fusion": False, "triton.max_tiles": 1}


def compile_layers(model, cuda_graphs: bool = False, shapes: int = 8) -> None:
    """torch.compile each decoder layer; with ``cuda_graphs`` each compiled graph is replayed as one CUDA graph.

    A step of these layers is bound by the host launching kernels, not by the GPU: wide LoRA on an H100, 8 x 512
    tokens, took 0.235 s a step compiled with the checkpoint around each layer, 0.174 s with it inside, 0.089 s
    replayed as CUDA graphs (benchmarks/profile_step.py).

    Batches come in a few shapes (batches.Collator's width buckets, at most ``shapes``): each gets a static graph.
    A graph with a symbolic dimension, which the compiler tries at the second shape unless ``dynamic=False``,
    failed to compile for QLoRA on an H100 (inductor's partitioner: "Node add_714 was invalid, but is output").
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Dynamo's DDP optimizer splits graphs compiled inside a DDP forward at gradient-bucket boundaries; for
        # per-layer graphs that gains no overlap and its split backward failed on 2 H200s (a tangent of the
        # wrong rank with wide LoRA). DDP then reduces each layer's gradients after its compiled backward.
        torch._dynamo.config.optimize_ddp = False
    inductor = dict(INDUCTOR)
    options = {"options": inductor}
    if cuda_graphs:
        inductor["triton.cudagraphs"] = True  # mode="reduce-overhead"; torch.compile takes a mode or options, not both
        options["dynamic"] = False
        # The layers share their graphs (their weights are graph inputs): one entry per batch shape.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
    use_grouped_attention(model)
    compile_head(model)
    for layer in causal_lm(model).model.layers:
        _compile_layer(layer, getattr(layer, "gradient_checkpointing", False), **options)


def _compile_layer(layer, checkpointed: bool, **options) -> None:
    """One decoder layer compiled with ``options``: its 4-bit linears traceable, its recomputation inside the graph
    where it is ``checkpointed`` (else none)."""
    trace_4bit_linears(layer)
    if checkpointed:
        recompute_inside(layer)
    else:
        layer.gradient_checkpointing = False
    layer.compile(**options)


@contextlib.contextmanager
def compiled_for_probe(model, keep: int = 0, cuda_graphs: bool = False):
    """The decoder layers compiled as :func:`compile_layers` compiles them (static shapes; replayed as CUDA graphs
    with ``cuda_graphs``), checkpointed but for the last ``keep``, undone on leaving: for ftstudy.budget's probe of what
    compiled layers keep (a layer that keeps its activations may keep fewer compiled: inductor chooses what to save;
    checkpointed, they measured the same as eager ones on an H200). Leaving resets the
    compiler, CUDA-graph pools included: the probe's shapes would otherwise hold memory and count against the
    training shapes' recompile limit. The head's softmax is compiled too, as compile_layers compiles it: at a few
    rows the step's peak is the head's chunk, where the eager softmax makes fp32 copies the compiled one does not.
    The attention and 4-bit linears stay as compile_layers leaves them."""
    use_grouped_attention(model)
    lm = causal_lm(model)
    layers = lm.model.layers
    saved = [(layer.__dict__.get("forward"), getattr(layer, "gradient_checkpointing", False)) for layer in layers]
    head = lm.__dict__.get(COMPILED_HEAD)
    inductor = {**INDUCTOR, "triton.cudagraphs": cuda_graphs}
    try:
        compile_head(model)
        for i, layer in enumerate(layers):
            _compile_layer(layer, i < len(layers) - keep, dynamic=False, options=inductor)
        yield
    finally:
        if head is None:
            lm.__dict__.pop(COMPILED_HEAD, None)
        else:
            setattr(lm, COMPILED_HEAD, head)
        for layer, (forward, flag) in zip(layers, saved, strict=True):
            layer._compiled_call_impl = None
            layer.__dict__.pop("forward", None)
            if forward is not None:
                layer.forward = forward
            layer.gradient_checkpointing = flag
        torch._dynamo.reset()


GROUPED_ATTENTION = "ftstudy_grouped"


def use_grouped_attention(model) -> None:
    """Attention inside compiled layers: :func:`grouped_attention`, which the compiler fuses.

    Not SDPA: compiled Gemma 3 layers on an H200 (torch 2.11) computed wrong weight gradients through SDPA under an
    attention mask. Not transformers' eager attention either: on a CPU (torch 2.13) inductor's vectorised kernels
    for the backward of its keys, RMS-normed, rotated and then repeated for the query heads sharing them
    (``repeat_kv``'s expand), gave NaN key gradients for static shapes, with the loss right
    (tests/test_fastpath.py). Grouping the queries instead needs no repeat.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
    AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)  # an additive mask, as eager attention takes
    causal_lm(model).set_attn_implementation(GROUPED_ATTENTION)


def grouped_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      softcap: float | None = None, **kwargs):
    """transformers' eager attention (fp32 softmax, additive mask), with each key/value head's query heads
    stacked along the sequence instead of its keys and values repeated for them: the same products, no copies."""
    b, heads, t, d = query.shape
    kv, s = key.shape[1], key.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    grouped = query.reshape(b, kv, heads // kv * t, d)  # heads kv*g .. kv*g+g-1 share key head kv, as in repeat_kv
    weights = torch.matmul(grouped, key.transpose(2, 3)).view(b, heads, t, s) * scaling
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.view(b, kv, heads // kv * t, s), value).view(b, heads, t, value.shape[-1])
    return out.transpose(1, 2).contiguous(), weights


def recompute_inside(layer) -> None:
    """Move a layer's activation checkpointing from around its compiled graph to inside it.

    transformers' checkpoint wraps the call from outside, so the backward re-enters the compiled forward and
    CUDA graphs cannot record it ("input tensor deallocate during graph recording"). Traced inside, the
    checkpoint is a region the compiler recomputes in its own backward graph: the same activations are dropped
    and rebuilt, and forward and backward are one graph each.
    """
    forward = layer.forward

    def checkpointed(*args, **kwargs):  # a closure, not functools.partial: dynamo silently skipped the partial
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    layer.gradient_checkpointing = False
    layer.forward = checkpointed


def trace_4bit_linears(layer) -> None:
    """Run a layer's 4-bit (QLoRA) linears as dequantize + linear, which the compiler can recompute.

    bitsandbytes' own 4-bit matmul is an autograd.Function that the compiler keeps as one opaque node it will not
    recompute, so inside a checkpointed compiled layer it saved the outputs of every 4-bit matmul: QLoRA on an
    H100 (8 x 512 tokens) held 3.8 GB of activations where checkpointing should leave ~0.3 GB. The same
    arithmetic as bitsandbytes' (its backward multiplies by the dequantized weight too), in traceable ops.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        return
    import bitsandbytes as bnb

    for module in layer.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.forward = MethodType(_dequantized_forward, module)


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    dtype = self.compute_dtype or x.dtype
    weight = bnbf.dequantize_4bit(self.weight.data, self.weight.quant_state).to(dtype)
    bias = None if self.bias is None else self.bias.to(dtype)
    return F.linear(x.to(dtype), weight, bias).to(x.dtype)


def speed_up(model, *, kernels: str, compile: str, cuda: bool, cuda_graphs: str = "off", shapes: int = 8) -> list[str]:
    """Apply the levers the settings ask for; return the names of those applied (recorded in the metrics)."""
    applied = ["fused_linear_cross_entropy"]
    compiled = wanted(compile, cuda)
    # With compiled layers, kernels=auto leaves Liger out: inductor fuses the norms and GeGLU itself, and
    # Liger's Triton ops split each compiled layer into several graphs whose launches dominate a step (wide
    # LoRA on an H100, 8 x 512 tokens: 0.379 s a step with Liger inside the compiled layers, 0.202 s without).
    if wanted(kernels, cuda) and (kernels == "on" or not compiled) and apply_kernels(model):
        applied.append("liger_kernels")
    if compiled:
        graphs = cuda and wanted(cuda_graphs, cuda)
        compile_layers(model, graphs, shapes)
        applied.append("compiled_layers")
        if graphs:
            applied.append("cuda_graphs")
    return applied


def optimizer_name(name: str, cuda: bool) -> str:
    """The fused variant of a plain AdamW on CUDA: the same update in one kernel launch per step."""
    return "adamw_torch_fused" if cuda and name == "adamw_torch" else name


def keep_embedding_dtype(model, dtype: torch.dtype) -> None:
    """Undo peft's fp32 copy of QLoRA's frozen embedding (262,144 x 1152 here; it is the tied head too).

    prepare_model_for_kbit_training upcasts every non-quantized weight; for the norms that is cheap, for the
    embedding it is 1.2 GB and an fp32 residual stream, while the frozen weights themselves are bf16.
    """
    causal_lm(model).get_input_embeddings().to(dtype)
