"""The model a method trains: its start weights, its adapter, checkpointing and the speed levers."""

from __future__ import annotations

from pathlib import Path

import torch

from ftstudy import budget, distributed, fastpath
from ftstudy.errors import UserError
from ftstudy.methods import MethodSpec
from ftstudy.models import causal_lm, compute_dtype, merged_model
from ftstudy.params import Params


def load_start_model(spec: MethodSpec, base_dir: Path, models_dir: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype()
    if spec.starts_from is None:
        kwargs = {"dtype": dtype}
        if spec.quantize_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
            kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
        model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    else:
        model = merged_model(base_dir, models_dir / spec.starts_from, dtype)
    return model


def attach_adapter(model, spec: MethodSpec, gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if spec.lora is None:
        model.requires_grad_(True)  # full-parameter training; a merged PEFT model comes back frozen
        return model
    if spec.quantize_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        fastpath.keep_embedding_dtype(model, compute_dtype())
    config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                        target_modules=list(spec.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def enable_checkpointing(model, keep_activations: int) -> None:
    """Recompute each decoder layer's activations in the backward, except in the last ``keep_activations`` layers.

    Set here rather than through TrainingArguments so that layers can be exempted: each kept layer stores its
    activations (memory) instead of running its forward a second time (time).
    """
    lm = causal_lm(model)
    layers = lm.model.layers
    if keep_activations > len(layers):
        raise UserError(f"train.keep_activations={keep_activations} but the model has {len(layers)} decoder layers; "
                        f"use at most {len(layers)} (or turn train.gradient_checkpointing off)")
    kwargs = {"use_reentrant": False}  # the non-reentrant checkpoint needs no input gradients and works under DDP
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.20's name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in layers[len(layers) - keep_activations:]:
        layer.gradient_checkpointing = False


def prepare_model(spec: MethodSpec, params: Params, base_dir: Path,
                  models_dir: Path) -> tuple[object, list[str], budget.MemoryPlan | None]:
    """The model ``spec`` trains, with the speed levers of ftstudy.fastpath that params and the device call for,
    and with train.memory_budget_gb the plan that fits it (micro-batch, accumulation and layers kept uncheckpointed)."""
    t = params.train
    model = load_start_model(spec, base_dir, models_dir)
    model.config.use_cache = False
    planned = t.memory_budget_gb > 0
    model = attach_adapter(model, spec, t.gradient_checkpointing or planned)
    plan, keep, accum = None, t.keep_activations, t.grad_accum
    # Compiled layers under FSDP2 with its checkpointing crashed in cuDNN attention's backward on 2 H200s.
    compile = "off" if t.fsdp and t.compile == "auto" else t.compile
    cuda = torch.cuda.is_available()
    if planned:  # measured before compiling
        enable_checkpointing(model, 0)
        if not spec.quantize_4bit:
            model.to("cuda")
        card_gb = torch.cuda.mem_get_info()[1] / 2**30  # a budget above the card is the card
        plan = budget.plan(model, spec, min(t.memory_budget_gb, card_gb), rows=t.batch_size // t.world * t.grad_accum,
                           accumulate=not spec.layerwise and t.cuda_graphs != "on",  # see graphs below
                           seq_len=t.max_seq_len, compiled=fastpath.wanted(compile, cuda),
                           cuda_graphs=fastpath.wanted(t.cuda_graphs, cuda))  # off again below if it accumulates
        plan = distributed.agree(plan)  # measured on each card, taken from the main worker's
        keep, accum = plan.keep_activations, plan.grad_accum
    if (t.gradient_checkpointing or planned) and not t.fsdp:  # FSDP checkpoints with its own wrapper
        enable_checkpointing(model, keep)
    # Gradients accumulated over micro-steps would live in CUDA-graph memory that the next replay overwrites
    # (cudagraph trees refuse: "accessing tensor output of CUDAGraphs that has been overwritten").
    graphs = "off" if accum > 1 and t.cuda_graphs == "auto" else t.cuda_graphs
    levers = fastpath.speed_up(model, kernels=t.kernels, compile=compile, cuda=cuda, cuda_graphs=graphs,
                               shapes=t.batch_size)
    if spec.eight_bit and cuda:  # galore.adamw_8bit_class's step, and the batched layer-wise update
        levers.append("galore_8bit_in_place")
        if spec.layerwise:
            levers.append("galore_8bit_batched")  # CompletionTrainer.create_optimizer builds it
    return model, levers, plan


def _numel(p) -> int:
    # bitsandbytes packs two 4-bit weights per byte; count the weights, not the bytes.
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return trainable, total
