"""GPU levers that make a training step faster and leaner without changing what is learned.

Each is measured against the plain transformers configuration by benchmarks/speed.py (numbers in the
README). The completion loss of ftstudy.loss (a fused head that never builds the full logits) is always
on; the levers here are switched by ``train.kernels``, ``train.compile`` and ``train.cuda_graphs``
("auto" = on with CUDA):

- torch.compile of each decoder layer ("regional" compilation: one graph serves every layer of a kind, so
  compiling costs seconds, not minutes), with activation checkpointing traced inside the graph and QLoRA's
  4-bit linears in traceable ops, so that the compiler recomputes them;
- CUDA graphs for those compiled layers: a step at 8 x 512 tokens is bound by kernel launches, not the GPU;
- Liger's Triton kernels for Gemma 3's RMSNorm, rotary embedding and GeGLU MLP where layers are not compiled;
- a fused AdamW (one kernel for all LoRA tensors instead of several per tensor), and galore-torch's 8-bit
  step without its per-weight device sync and weight copies.
"""

from __future__ import annotations

import importlib.util
import os
from types import MethodType

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftstudy.errors import UserError
from ftstudy.loss import causal_lm


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


def compile_layers(model, cuda_graphs: bool = False) -> None:
    """torch.compile each decoder layer; with ``cuda_graphs`` each compiled graph is replayed as one CUDA graph.

    A step of these layers is bound by the host launching kernels, not by the GPU: wide LoRA on an H100, 8 x 512
    tokens, took 0.235 s a step compiled with the checkpoint around each layer, 0.174 s with it inside, 0.089 s
    replayed as CUDA graphs (benchmarks/profile_step.py).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Dynamo's DDP optimizer splits graphs compiled inside a DDP forward at gradient-bucket boundaries; for
        # per-layer graphs that gains no overlap and its split backward failed on 2 H200s (a tangent of the
        # wrong rank with wide LoRA). DDP then reduces each layer's gradients after its compiled backward.
        torch._dynamo.config.optimize_ddp = False
    for layer in causal_lm(model).model.layers:
        trace_4bit_linears(layer)
        if getattr(layer, "gradient_checkpointing", False):
            recompute_inside(layer)
        layer.compile(mode="reduce-overhead" if cuda_graphs else None)


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


def fast_galore_8bit() -> None:
    """Install ``galore_8bit_step`` as galore-torch's GaLoreAdamW8bit.step (idempotent)."""
    import galore_torch

    galore_torch.GaLoreAdamW8bit.step = galore_8bit_step


@torch.no_grad()
def galore_8bit_step(self, closure=None):
    """galore-torch's GaLoreAdamW8bit.step, the same update without its two costs on a GPU.

    Per weight, the original (1) synchronises the device after bitsandbytes' update, which a non-paged optimizer
    on one stream does not need: layer-wise, that is ~340 host stalls a step, 0.2 s of a 0.29 s GaLore step on an
    H100; and (2) replaces the weight's storage with a fresh copy (``p.data = p.saved_data.add_(...)``), which
    costs a copy of each weight and makes CUDA graphs, which read weights where they were recorded, record anew
    every step. Here the weight stays where it is and receives the projected-back update in place.
    The algorithm is galore-torch's: project the gradient (GaLoreProjector), run bitsandbytes' 8-bit AdamW
    step on a zero stand-in of the projected shape, project its result back onto the weight, then apply
    decoupled weight decay to the full weight. benchmarks/galore_step.py checks it against the original.
    """
    from galore_torch.galore_projector import GaLoreProjector

    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if not self.initialized:
        self.check_overrides()
        self.to_gpu()
        self.initialized = True
    for gindex, group in enumerate(self.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            state.setdefault("step", 0)
            if "rank" not in group:  # a weight outside GaLore's targets: plain 8-bit AdamW
                if "state1" not in state:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                continue
            if "projector" not in state:
                state["projector"] = GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                                     scale=group["scale"], proj_type=group["proj_type"])
            decay = group.get("weight_decay", 0.0)
            group["weight_decay"] = 0.0  # not on the low-rank stand-in: on the full weight, below
            weight = p.data
            grad = state["projector"].project(p.grad, state["step"])
            p.data = torch.zeros_like(grad, dtype=weight.dtype)
            p.grad = grad
            try:
                if "state1" not in state:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                update = p.data
            finally:
                p.data = weight
                group["weight_decay"] = decay
            weight.add_(state["projector"].project_back(update))
            if decay > 0:
                weight.add_(weight, alpha=-group["lr"] * decay)
    if self.is_paged:
        torch.cuda.synchronize()  # paged state moves asynchronously
    return loss


def speed_up(model, *, kernels: str, compile: str, cuda: bool, cuda_graphs: str = "off") -> list[str]:
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
        compile_layers(model, graphs)
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
