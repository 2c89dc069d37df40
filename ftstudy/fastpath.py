"""GPU levers that make a training step faster and leaner without changing what is learned.

Each is measured against the plain transformers configuration by benchmarks/speed.py (numbers in the
README). The completion loss of ftstudy.loss (a fused head that never builds the full logits) is always
on; the levers here are switched by ``train.kernels`` and ``train.compile`` ("auto" = on with CUDA):

- Liger's Triton kernels for Gemma 3's RMSNorm, rotary embedding and GeGLU MLP: one pass over memory where
  the eager code makes several, and GeGLU recomputes its activation instead of storing it;
- torch.compile of each decoder layer ("regional" compilation: one graph serves every layer of a kind, so
  compiling costs seconds, not minutes), which fuses what is left of the elementwise work;
- a fused AdamW (one kernel for all LoRA tensors instead of several per tensor).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ftstudy.errors import UserError
from ftstudy.loss import causal_lm


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def wanted(setting: str, cuda: bool) -> bool:
    return setting == "on" or (setting == "auto" and cuda)


def check(kernels: str, cuda: bool) -> None:
    """Refuse a lever this machine cannot run, before anything is loaded."""
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


def compile_layers(model) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Dynamo's DDP optimizer splits graphs compiled inside a DDP forward at gradient-bucket boundaries; for
        # per-layer graphs that gains no overlap and its split backward failed on 2 H200s (a tangent of the
        # wrong rank with wide LoRA). DDP then reduces each layer's gradients after its compiled backward.
        torch._dynamo.config.optimize_ddp = False
    for layer in causal_lm(model).model.layers:
        layer.compile()


def speed_up(model, *, kernels: str, compile: str, cuda: bool) -> list[str]:
    """Apply the levers the settings ask for; return the names of those applied (recorded in the metrics)."""
    applied = ["fused_linear_cross_entropy"]
    compiled = wanted(compile, cuda)
    # With compiled layers, kernels=auto leaves Liger out: inductor fuses the norms and GeGLU itself, and
    # Liger's Triton ops split each compiled layer into several graphs whose launches dominate a step (wide
    # LoRA on an H100, 8 x 512 tokens: 0.379 s a step with Liger inside the compiled layers, 0.202 s without).
    if wanted(kernels, cuda) and (kernels == "on" or not compiled) and apply_kernels(model):
        applied.append("liger_kernels")
    if compiled:
        compile_layers(model)
        applied.append("compiled_layers")
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
