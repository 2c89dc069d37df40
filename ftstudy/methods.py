"""The methods as data. A method is a :class:`MethodSpec`, never a copy of a script.

The methods differ in four choices: where the weights start, whether the base is quantized, which adapter (if
any) is trained, and which optimizer runs. Everything else is shared (ftstudy.training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftstudy import fastpath
from ftstudy.errors import UserError
from ftstudy.params import Params

METHODS = ("qlora", "galore", "lora_wide", "sequential_ensemble")
HYBRID_QLORA_PHASE = "sequential_ensemble_qlora"  # the hybrid's first phase: its adapter lives in models/ by this name
EIGHT_BIT_OPTIMIZERS = ("galore_adamw_8bit", "galore_adamw_8bit_layerwise")
LAYERWISE_OPTIMIZERS = ("galore_adamw_layerwise", "galore_adamw_8bit_layerwise")


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class GaloreSpec:
    rank: int
    update_proj_gap: int
    scale: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    start: str                 # "base", or "merged:<method>" (that method's adapter merged into the base)
    quantize_4bit: bool        # NF4 with double quantization (QLoRA)
    lora: LoraSpec | None      # None: full-parameter training
    optimizer: str             # a transformers `optim` name
    galore: GaloreSpec | None
    learning_rate: float
    max_steps: int
    # Optimizer steps of the example stream already trained on before this run (the hybrid's GaLore phase continues
    # where its QLoRA phase stopped): the run starts that far into the stream.
    skip_steps: int = 0

    @property
    def section(self) -> str:
        """The params.yaml section that configures this run (the hybrid's QLoRA phase: train_qlora's)."""
        return "train_qlora" if self.name == HYBRID_QLORA_PHASE else f"train_{self.name}"

    @property
    def starts_from(self) -> str | None:
        """The method whose merged adapter this one starts from; None when it starts from the base."""
        return self.start.split(":", 1)[1] if self.start.startswith("merged:") else None

    @property
    def eight_bit(self) -> bool:
        return self.optimizer in EIGHT_BIT_OPTIMIZERS

    @property
    def layerwise(self) -> bool:
        """Each weight updated in a hook during the backward (no global gradient norm, no clipping)."""
        return self.optimizer in LAYERWISE_OPTIMIZERS


def method_spec(params: Params, name: str) -> MethodSpec:
    """The spec of ``name`` from params: the only place where methods differ. Every method trains train.max_steps;
    the hybrid's two phases (``sequential_ensemble_qlora`` then ``sequential_ensemble``) share them."""
    steps = params.train.max_steps
    if name in ("qlora", HYBRID_QLORA_PHASE):
        q = params.train_qlora
        return MethodSpec(name, "base", True, LoraSpec(q.lora_r, q.lora_alpha, q.lora_dropout, tuple(q.target_modules)),
                          "adamw_torch", None, q.learning_rate, steps if name == "qlora" else params.hybrid_steps[0])
    if name == "lora_wide":
        w = params.train_lora_wide
        return MethodSpec(name, "base", False, LoraSpec(w.lora_r, w.lora_alpha, w.lora_dropout, tuple(w.target_modules)),
                          "adamw_torch", None, w.learning_rate, steps)
    if name in ("galore", "sequential_ensemble"):
        g = params.train_galore if name == "galore" else params.train_sequential_ensemble
        galore = (GaloreSpec(g.rank, g.update_proj_gap, g.scale, tuple(g.target_modules))
                  if g.optimizer.startswith("galore") else None)  # adamw_torch: plain full-parameter training
        if name == "galore":
            return MethodSpec(name, "base", False, None, g.optimizer, galore, g.learning_rate, steps)
        first, rest = params.hybrid_steps
        return MethodSpec(name, f"merged:{HYBRID_QLORA_PHASE}", False, None, g.optimizer, galore, g.learning_rate,
                          rest, skip_steps=first)
    raise UserError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")


def phases(params: Params, name: str) -> list[MethodSpec]:
    """The runs that train ``name``, in order: one, or the hybrid's QLoRA phase and then its GaLore phase."""
    first = [method_spec(params, HYBRID_QLORA_PHASE)] if name == "sequential_ensemble" else []
    return first + [method_spec(params, name)]


def check_hardware(spec: MethodSpec, cuda: bool | None = None) -> None:
    """Refuse, before loading anything, what this machine cannot run; never swap it silently."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if spec.eight_bit and not cuda:
        raise UserError(
            f"{spec.section}.optimizer={spec.optimizer} needs CUDA (bitsandbytes' 8-bit optimizers), and no CUDA "
            f"device is visible; on a CPU use galore_adamw_layerwise or galore_adamw"
        )
    if spec.quantize_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # an ImportError, or a broken native library raising at import
            raise UserError(
                f"{spec.section} loads the base in 4-bit NF4, which needs bitsandbytes, and it cannot be imported "
                f"here ({type(err).__name__}: {err}); install it with `pip install 'bitsandbytes>=0.49,<0.51'`"
            ) from None


GALORE_LINEARS = {"self_attn": "(q|k|v|o)_proj", "mlp": "(gate|up|down)_proj"}


def galore_target_patterns(blocks) -> list[str]:
    """Regexes for the linear layers of the named blocks; GaLore projects only 2-D weights.

    Plain block names ("self_attn") would also match norms and activations, which transformers then
    ignores one warning line at a time.
    """
    return [rf".*\.{block}\.{GALORE_LINEARS[block]}" for block in blocks]


def optimizer_kwargs(spec: MethodSpec) -> dict:
    """TrainingArguments for ``spec``'s optimizer (the fused AdamW on CUDA; GaLore's targets and projection)."""
    kwargs = {"optim": fastpath.optimizer_name(spec.optimizer, torch.cuda.is_available())}
    if spec.galore is not None:
        g = spec.galore
        kwargs.update(optim_target_modules=galore_target_patterns(g.target_modules),
                      optim_args=f"rank={g.rank},update_proj_gap={g.update_proj_gap},scale={g.scale}")
    return kwargs
