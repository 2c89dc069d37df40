"""One training path for every method. A method is data (:class:`MethodSpec`), never a copy of a script.

The methods differ in four choices: where the weights start, whether the base is quantized, which
adapter (if any) is trained, and which optimizer runs. Everything else (tokenization with
completion-only labels, batching, the transformers Trainer loop, checkpoints, resume, curves and cost
metrics) is shared.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ftstudy import distributed, fastpath, galore
from ftstudy.atomic import atomic_dir, read_jsonl, sha256_file, write_json
from ftstudy.errors import UserError
from ftstudy.loss import causal_lm, completion_loss
from ftstudy.models import load_tokenizer, merged_model
from ftstudy.params import Params
from ftstudy.prompt import IGNORE_INDEX, tokenize_example

METHODS = ("qlora", "galore", "lora_wide", "sequential_ensemble")
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


def method_spec(params: Params, name: str) -> MethodSpec:
    """The spec of ``name`` from params: the only place where methods differ."""
    if name == "qlora":
        q = params.train_qlora
        return MethodSpec(name, "base", True, LoraSpec(q.lora_r, q.lora_alpha, q.lora_dropout, tuple(q.target_modules)),
                          "adamw_torch", None, q.learning_rate, q.max_steps)
    if name == "lora_wide":
        w = params.train_lora_wide
        return MethodSpec(name, "base", False, LoraSpec(w.lora_r, w.lora_alpha, w.lora_dropout, tuple(w.target_modules)),
                          "adamw_torch", None, w.learning_rate, w.max_steps)
    if name in ("galore", "sequential_ensemble"):
        g = params.train_galore if name == "galore" else params.train_sequential_ensemble
        galore = (GaloreSpec(g.rank, g.update_proj_gap, g.scale, tuple(g.target_modules))
                  if g.optimizer.startswith("galore") else None)  # adamw_torch: plain full-parameter training
        return MethodSpec(name, "base" if name == "galore" else "merged:qlora", False, None, g.optimizer, galore,
                          g.learning_rate, g.max_steps)
    raise UserError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")


def check_hardware(spec: MethodSpec, cuda: bool | None = None) -> None:
    """Refuse, before loading anything, what this machine cannot run; never swap it silently."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if spec.optimizer in EIGHT_BIT_OPTIMIZERS and not cuda:
        raise UserError(
            f"train_{spec.name}.optimizer={spec.optimizer} needs CUDA (bitsandbytes' 8-bit optimizers), and no CUDA "
            f"device is visible; on a CPU use galore_adamw_layerwise or galore_adamw"
        )
    if spec.quantize_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # an ImportError, or a broken native library raising at import
            raise UserError(
                f"train_{spec.name} loads the base in 4-bit NF4, which needs bitsandbytes, and it cannot be imported "
                f"here ({type(err).__name__}: {err}); install it with `pip install 'bitsandbytes>=0.49,<0.51'`"
            ) from None


GALORE_LINEARS = {"self_attn": "(q|k|v|o)_proj", "mlp": "(gate|up|down)_proj"}


def galore_target_patterns(blocks) -> list[str]:
    """Regexes for the linear layers of the named blocks; GaLore projects only 2-D weights.

    Plain block names ("self_attn") would also match norms and activations, which transformers then
    ignores one warning line at a time.
    """
    return [rf".*\.{block}\.{GALORE_LINEARS[block]}" for block in blocks]


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype() -> torch.dtype:
    # bf16 on GPU as the seeds did; fp32 on CPU, where bf16 matmuls are slow and less exact.
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


# ---------------------------------------------------------------- data

WIDTH_BUCKETS = 4  # batch widths under compiled layers: max_seq_len / 4, / 2, 3/4 and whole


class Collator:
    """Batches tokenized examples.

    Padded (``pack=False``): rows right-padded to the longest, padding with IGNORE_INDEX labels and a zero
    attention mask. Packed: the examples laid out first-fit-decreasing into rows of at most ``row_len`` tokens,
    positions restarting at each example and no attention mask, from which transformers builds a block-diagonal
    causal mask, so no example attends to another; each example's first label is IGNORE_INDEX, so none predicts
    the next one's first token. The rest of a row is padding that restarts its positions too (its own block,
    which no token attends to). Same examples, same loss (tested), little compute spent on padding.

    Rows, not the whole batch as one sequence: SDPA has no variable-length kernel, so a packed sequence gets
    a dense mask and its attention costs the square of its length: on an H200 a QLoRA step of 64 x 512 tokens as
    one sequence took 3.3x as long as one of 32 x 512. Rows of ``row_len`` cost what a padded batch's rows do.
    ``num_tokens`` (the non-padding tokens) rides along for the throughput metrics.
    """

    def __init__(self, pad_id: int, pack: bool = False, row_len: int | None = None, width_buckets: int = 0):
        self.pad_id = pad_id
        self.pack = pack
        self.row_len = row_len
        # > 0: rows padded up to the next of that many equal steps of row_len, not to the fullest row, so that
        # batches come in at most that many shapes (each one is compiled and recorded as a CUDA graph once).
        self.width_buckets = width_buckets

    def _width(self, fullest: int) -> int:
        if not (self.width_buckets and self.row_len):
            return fullest
        step = -(-self.row_len // self.width_buckets)
        return min(max(-(-fullest // step) * step, step), max(self.row_len, fullest))

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """Example indices per row, first-fit decreasing into rows of ``row_len`` (one per example if None)."""
        cap = self.row_len or 0
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
            if j is None:
                rows.append([i])
                room.append(cap - lengths[i])
            else:
                rows[j].append(i)
                room[j] -= lengths[i]
        return rows

    def __call__(self, examples: list[dict]) -> dict:
        if self.pack:
            lengths = [len(e["input_ids"]) for e in examples]
            layout = self.rows(lengths)
            width = self._width(max(sum(lengths[i] for i in row) for row in layout))
            ids = torch.full((len(layout), width), self.pad_id, dtype=torch.long)
            labels = torch.full((len(layout), width), IGNORE_INDEX, dtype=torch.long)
            positions = torch.zeros((len(layout), width), dtype=torch.long)
            for r, row in enumerate(layout):
                at = 0
                for i in row:
                    e, n = examples[i], lengths[i]
                    ids[r, at:at + n] = torch.tensor(e["input_ids"])
                    labels[r, at + 1:at + n] = torch.tensor(e["labels"][1:])
                    positions[r, at:at + n] = torch.arange(n)
                    at += n
                positions[r, at:] = torch.arange(width - at)
            return {"input_ids": ids, "labels": labels, "position_ids": positions,
                    "num_tokens": torch.tensor(sum(lengths))}
        width = self._width(max(len(e["input_ids"]) for e in examples))
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def packed_batches(packing: bool, levers: list[str]) -> bool:
    """Whether batches are packed: ``train.packing``, except into compiled layers.

    On an H200 (torch 2.11, transformers 5.17) compiled Gemma 3 layers computed wrong weight gradients for packed
    rows of short examples, in the steps that compiled or recorded a new batch shape (the last layer's q_proj
    gradient 25.0 against 0.0013 uncompiled, the same loss): layer-wise GaLore turned them non-finite and its
    projection stalled. Padded batches of the same examples, and packed ones in uncompiled layers, were exact.
    Until that is understood, compiled layers get padded batches.
    """
    return packing and "compiled_layers" not in levers


def tokenize_dataset(tokenizer, records: list[dict], max_seq_len: int, max_prompt_tokens: int) -> list[dict]:
    return [tokenize_example(tokenizer, r, max_seq_len, max_prompt_tokens) for r in records]


# ---------------------------------------------------------------- model


def load_start_model(spec: MethodSpec, base_dir: Path, models_dir: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype()
    if spec.start == "base":
        kwargs = {"dtype": dtype}
        if spec.quantize_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
            kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
        model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    else:
        model = merged_model(base_dir, models_dir / spec.start.split(":", 1)[1], dtype)
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


def prepare_model(spec: MethodSpec, params: Params, base_dir: Path, models_dir: Path) -> tuple[object, list[str]]:
    """The model ``spec`` trains, with the speed levers of ftstudy.fastpath that params and the device call for."""
    t = params.train
    model = load_start_model(spec, base_dir, models_dir)
    model.config.use_cache = False
    model = attach_adapter(model, spec, t.gradient_checkpointing)
    if t.gradient_checkpointing and not t.fsdp:  # FSDP checkpoints with its own wrapper
        enable_checkpointing(model, t.keep_activations)
    # Compiled layers under FSDP2 with its checkpointing crashed in cuDNN attention's backward on 2 H200s.
    compile = "off" if t.fsdp and t.compile == "auto" else t.compile
    # Gradients accumulated over micro-steps would live in CUDA-graph memory that the next replay overwrites
    # (cudagraph trees refuse: "accessing tensor output of CUDAGraphs that has been overwritten").
    graphs = "off" if t.grad_accum > 1 and t.cuda_graphs == "auto" else t.cuda_graphs
    cuda = torch.cuda.is_available()
    levers = fastpath.speed_up(model, kernels=t.kernels, compile=compile, cuda=cuda, cuda_graphs=graphs,
                               shapes=t.batch_size)
    if spec.optimizer in EIGHT_BIT_OPTIMIZERS:
        galore.fix_8bit_arguments()  # a correction, not a lever: without it the norms never train
        if cuda:
            galore.fast_galore_8bit()
            levers.append("galore_8bit_in_place")
            if spec.optimizer in LAYERWISE_OPTIMIZERS:
                levers.append("galore_8bit_batched")  # CompletionTrainer.create_optimizer builds it
    return model, levers


def optimizer_kwargs(spec: MethodSpec) -> dict:
    """TrainingArguments for ``spec``'s optimizer (the fused AdamW on CUDA; GaLore's targets and projection)."""
    kwargs = {"optim": fastpath.optimizer_name(spec.optimizer, torch.cuda.is_available())}
    if spec.galore is not None:
        g = spec.galore
        kwargs.update(optim_target_modules=galore_target_patterns(g.target_modules),
                      optim_args=f"rank={g.rank},update_proj_gap={g.update_proj_gap},scale={g.scale}")
    return kwargs


def _numel(p) -> int:
    # bitsandbytes packs two 4-bit weights per byte; count the weights, not the bytes.
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------- memory, curves


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3),
                "peak_memory_kind": "cuda_max_allocated"}
    # ru_maxrss is in KiB on Linux: the whole process's high-water mark, model loading included.
    return {"peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "peak_memory_kind": "cpu_peak_rss"}


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint whose trainer_state.json (the Trainer writes it last) is complete.

    A run killed while saving leaves a half-written checkpoint-N; resuming from it would crash or,
    worse, load partial state, so it is skipped in favour of the one before.
    """
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ck in found:
        try:
            json.loads((ck / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return ck
    return None


def _truncate_curves(live_dir: Path, last_step: int) -> None:
    """Drop curve rows logged after the checkpoint being resumed, which the resumed run logs again."""
    for tsv in live_dir.glob("plots/metrics/**/*.tsv"):
        lines = tsv.read_text().splitlines()
        kept = lines[:1] + [ln for ln in lines[1:] if int(ln.split("\t")[0]) <= last_step]
        tsv.write_text("\n".join(kept) + "\n")


def _throughput_callback(trainer, compiled: bool, cuda_graphs: bool, projection_gap: int | None):
    """Times every optimizer step and sorts out the steps that pay a one-off cost, for a steady rate.

    One-off costs: the first step (kernel set-up), with compiled layers every step whose batch shape is new
    (compilation), under CUDA graphs every step that meets a shape for the second time (torch records a shape's
    graphs on its second call: 0.7-1.5 s for Gemma 3 1B on an H200, against 0.1 s replayed), and with GaLore
    every step that recomputes the projections (galore-torch's step counts 0, gap, 2 x gap, ...). They are
    reported apart, not averaged into the rate.
    """
    from collections import Counter

    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        def __init__(self):
            self.steps = []  # (step, seconds, tokens, what it also paid for, or None)
            self.calls: Counter[tuple] = Counter()  # steps that met each batch shape

        def _mark(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels are done (the loss logging syncs anyway)
            self.t, self.n = time.perf_counter(), trainer.tokens_trained

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark()
            self.first = state.global_step  # > 0 when resumed

        def on_step_end(self, args, state, control, **kwargs):
            t, n = self.t, self.n
            self._mark()
            shapes = set(trainer.batch_shapes)
            trainer.batch_shapes.clear()
            met = {self.calls[shape] for shape in shapes}
            self.calls.update(shapes)
            step = state.global_step - 1
            cost = ("first_step" if step == self.first else "new_shape" if compiled and 0 in met
                    else "recording" if cuda_graphs and 1 in met
                    else "projection" if projection_gap and step % projection_gap == 0 else None)
            self.steps.append((step, round(self.t - t, 4), self.n - n, cost))

        def summary(self) -> dict:
            steady = [(s, k) for _, s, k, cost in self.steps if cost is None]
            once, count = {}, {}
            for _, s, _, cost in self.steps:
                if cost is not None:
                    once[cost] = round(once.get(cost, 0.0) + s, 2)
                    count[cost] = count.get(cost, 0) + 1
            seconds = sum(s for s, _ in steady)
            return {"steady_tokens_per_s": round(sum(k for _, k in steady) / seconds, 2) if seconds else None,
                    "batch_shapes": len(self.calls), "one_off_seconds": once, "one_off_steps": count,
                    "step_seconds": [s for _, s, _, _ in self.steps]}

    return Throughput()


def _total_steady(devices: list[dict]) -> float | None:
    rates = [d["steady_tokens_per_s"] for d in devices]
    return None if None in rates else round(sum(rates), 2)


def _curve_callback(live_dir: Path, resume: bool):
    from transformers import TrainerCallback

    from dvclive import Live

    class CurveCallback(TrainerCallback):
        """Step loss, learning rate and gradient norm to dvclive TSVs, which dvc.yaml declares as plots."""

        def __init__(self):
            self.live = Live(str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:
                return
            self.live.step = state.global_step
            self.live.log_metric("train/loss", float(logs["loss"]))
            if "learning_rate" in logs:
                self.live.log_metric("train/learning_rate", float(logs["learning_rate"]))
            if "grad_norm" in logs:
                self.live.log_metric("train/grad_norm", float(logs["grad_norm"]))
            self.live.next_step()

        def on_train_end(self, args, state, control, **kwargs):
            self.live.end()

    return CurveCallback()


# ---------------------------------------------------------------- train


def completion_trainer_class():
    from transformers import Trainer

    class CompletionTrainer(Trainer):
        """The transformers Trainer with the completion-only loss of ftstudy.loss."""

        loss_is_scaled_for_ga = True  # the loss is normalised by the accumulated batch's token count
        tokens_trained = 0  # counted here, not in the collator: the data loader prefetches a batch ahead

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.batch_shapes: list[tuple] = []  # since the last optimizer step (the throughput callback reads it)

        def autocast_smart_context_manager(self, cache_enabled=True):
            # accelerate puts bf16 autocast on the prepared model's forward. completion_loss stands in for the
            # causal LM's forward, so where the causal LM is the prepared model (full-parameter training) that
            # wrapper would be bypassed; autocast around the whole loss holds for every method.
            if self.args.bf16 and torch.cuda.is_available():
                return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache_enabled)
            return super().autocast_smart_context_manager(cache_enabled)

        def create_optimizer(self, model=None):
            # transformers' own layer-wise GaLore never sees the learning-rate schedule (ftstudy.galore)
            if self.optimizer is None and self.args.optim in LAYERWISE_OPTIMIZERS:
                self.optimizer = galore.LayerwiseGaLore.from_trainer_args(model or self.model, self.args)
            return super().create_optimizer(model)

        def _layerwise(self):
            opt = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper
            return opt if isinstance(opt, galore.LayerwiseGaLore) else None

        def _clip_grad_norm(self, model):
            # Layer-wise GaLore has updated every weight in its hook by now: there is nothing left to clip. The
            # norm it measured is logged as grad_norm (the Trainer's own would read the emptied gradients as 0).
            layerwise = self._layerwise()
            return layerwise.grad_norm() if layerwise else super()._clip_grad_norm(model)

        def _get_grad_norm(self, model, grad_norm=None):
            layerwise = self._layerwise()
            return layerwise.grad_norm().item() if layerwise else super()._get_grad_norm(model, grad_norm)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Packed batches carry their token count (their padding has no attention mask); padded ones a mask.
            count = inputs.pop("num_tokens", None)
            self.tokens_trained += int(inputs["attention_mask"].sum() if count is None else count)
            self.batch_shapes.append(tuple(inputs["input_ids"].shape))
            if model.training:
                # A new step for cudagraph trees: the previous step's graph outputs may be overwritten now.
                torch.compiler.cudagraph_mark_step_begin()
            loss = completion_loss(model, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"],
                                   num_items_in_batch, position_ids=inputs.get("position_ids"))
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # num_items_in_batch counts every worker's tokens and DDP averages gradients over workers:
                # scale back up, as Trainer.compute_loss does, so N workers learn what one would.
                loss = loss * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

    return CompletionTrainer


def fingerprint(spec: MethodSpec, params: Params, train_path: Path, models_dir: Path) -> str:
    """What a checkpoint was made from; a checkpoint is resumed only when this matches.

    Covers the start weights too: the base (its fetch_info.json lists every file's hash) and, for a method
    that starts from another's adapter, that adapter's files, so a retrained QLoRA invalidates the hybrid's
    checkpoints.
    """
    h = hashlib.sha256(json.dumps({"spec": asdict(spec), "train": asdict(params.train), "seed": params.seed},
                                  sort_keys=True).encode())
    h.update(train_path.read_bytes())
    info = models_dir / "base" / "fetch_info.json"
    if info.exists():
        h.update(info.read_bytes())
    if spec.start.startswith("merged:"):
        for f in sorted((models_dir / spec.start.split(":", 1)[1]).glob("*")):
            if f.is_file():
                h.update(f"{f.name}:{sha256_file(f)}".encode())
    return h.hexdigest()


def train(spec: MethodSpec, params: Params, *, train_path: str | Path, models_dir: str | Path,
          out_dir: str | Path, ckpt_dir: str | Path, live_dir: str | Path | None) -> dict:
    """Train ``spec`` and write its adapter or model to ``out_dir`` atomically; return its metrics.

    ``ckpt_dir`` survives an interrupted run (DVC ``persist``); a rerun with the same fingerprint
    resumes from its last checkpoint, a rerun with anything changed starts afresh. ``live_dir`` receives
    the loss and learning-rate curves (dvclive); None skips them (the GPU benchmark, where dvclive is absent).
    """
    from transformers import TrainingArguments, set_seed

    cuda = torch.cuda.is_available()
    check_hardware(spec)
    fastpath.check(params.train.kernels, cuda, params.train.cuda_graphs)
    distributed.check(spec, params.train, cuda)
    distributed.init(cuda)
    t = params.train
    main = distributed.is_main()
    live_dir = live_dir if main else None  # one worker writes the curves
    models_dir, ckpt_dir, train_path = Path(models_dir), Path(ckpt_dir), Path(train_path)
    base_dir = models_dir / "base"
    fp = fingerprint(spec, params, train_path, models_dir)
    stamp = ckpt_dir / "fingerprint.txt"
    with distributed.main_first():
        if main:
            if ckpt_dir.exists() and (not stamp.exists() or stamp.read_text() != fp):
                shutil.rmtree(ckpt_dir)  # made from other params or data: resuming it would mix two runs
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            stamp.write_text(fp)
        last = last_complete_checkpoint(ckpt_dir)
    resumed_from = int(last.name.split("-")[-1]) if last else 0
    if last and main:
        print(f"resuming {spec.name} from {last} (step {resumed_from})")
    if live_dir is not None and last:
        _truncate_curves(Path(live_dir), resumed_from)
    elif live_dir is not None:
        shutil.rmtree(live_dir, ignore_errors=True)

    set_seed(params.seed)
    tokenizer = load_tokenizer(base_dir, padding_side="right")
    records = read_jsonl(train_path)
    dataset = tokenize_dataset(tokenizer, records, t.max_seq_len, t.max_prompt_tokens)
    model, levers = prepare_model(spec, params, base_dir, models_dir)
    trainable, total = count_parameters(model)
    layer_cls = type(causal_lm(model).model.layers[0]).__name__
    optim_kwargs = optimizer_kwargs(spec)
    args = TrainingArguments(
        output_dir=str(ckpt_dir), max_steps=spec.max_steps, **distributed.trainer_kwargs(t, layer_cls),
        gradient_accumulation_steps=t.grad_accum, learning_rate=spec.learning_rate, warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=1, save_strategy="steps", save_steps=t.save_steps, save_total_limit=2,
        bf16=cuda, use_cpu=not cuda, seed=params.seed, data_seed=params.seed, report_to="none",
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=not params.ui.progress_bar, **optim_kwargs,
        # No short last batch of an epoch: with compiled layers every batch then has as many rows, and its width
        # one of a few (the collator's buckets), each compiled (and recorded as a CUDA graph) once for the run.
        dataloader_drop_last=True,
    )
    if distributed.world_size() == 1 and args.n_gpu > 1:
        # With several GPUs visible to one process the Trainer wraps the model in nn.DataParallel and multiplies
        # the batch by the GPU count. One process trains on one GPU; train.num_processes > 1 uses several (DDP).
        args._n_gpu = 1
    # Compiled layers are compiled (and CUDA graphs recorded) per batch shape: widths in a few steps of max_seq_len
    # and no short last batch leave at most WIDTH_BUCKETS shapes, yet short rows are not padded to max_seq_len.
    packed = packed_batches(t.packing, levers)
    collator = Collator(tokenizer.pad_token_id, pack=packed, row_len=t.max_seq_len,
                        width_buckets=WIDTH_BUCKETS if "compiled_layers" in levers else 0)
    trainer = completion_trainer_class()(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      callbacks=[] if live_dir is None else [_curve_callback(Path(live_dir), resume=last is not None)])
    throughput = _throughput_callback(trainer, compiled="compiled_layers" in levers, cuda_graphs="cuda_graphs" in levers,
                                      projection_gap=spec.galore.update_proj_gap if spec.galore else None)
    trainer.add_callback(throughput)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    devices = distributed.gather({"rank": distributed.rank(), "trained_tokens": trainer.tokens_trained,
                                  "tokens_per_s": round(trainer.tokens_trained / seconds, 2) if seconds else 0.0,
                                  **throughput.summary(),
                                  **peak_memory()})
    # FSDP holds a shard per worker: every worker takes part in gathering the full weights.
    state_dict = (trainer.accelerator.get_state_dict(trainer.model)
                  if distributed.world_size() > 1 and t.strategy == "fsdp" else None)
    if not main:
        distributed.barrier()  # the main worker saves; wait for it, then leave
        return None
    trained_tokens = sum(d["trained_tokens"] for d in devices)

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if spec.lora is None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "training_config.json", {"spec": asdict(spec), "train": asdict(t), "seed": params.seed,
                                                  "profile": params.profile, "fingerprint": fp})
    metrics = {
        "method": spec.name,
        "profile": params.profile,
        "optimizer": optim_kwargs["optim"],
        "speed_levers": levers,
        "packed_batches": packed,
        # Layer-wise optimizers update each weight during the backward, before the global norm exists.
        "gradient_clipping": ("none (layer-wise optimizer)" if spec.optimizer in LAYERWISE_OPTIMIZERS
                              else f"global L2 norm <= {t.max_grad_norm}"),
        "device": device_kind(),
        "train_seconds": round(seconds, 2),
        "tokens_per_s": round(trained_tokens / seconds, 2) if seconds else 0.0,
        # Without the steps that paid a one-off cost (compilation, GaLore's projections): the rate a longer run
        # settles at. Those steps' seconds are in one_off_seconds.
        "steady_tokens_per_s": _total_steady(devices),
        "batch_shapes": devices[0]["batch_shapes"],
        "one_off_seconds": devices[0]["one_off_seconds"],
        "one_off_steps": devices[0]["one_off_steps"],
        "trained_tokens": trained_tokens,
        "num_processes": distributed.world_size(),
        "strategy": t.strategy if distributed.world_size() > 1 else "single",
        "per_device_batch": args.per_device_train_batch_size,
        "effective_batch": args.per_device_train_batch_size * distributed.world_size() * t.grad_accum,
        "steps": result.global_step,
        "resumed_from_step": resumed_from,
        "trainable_params": trainable,
        "total_params": total,
        "final_train_loss": round(float(losses[-1]), 6) if losses else math.nan,
        "mean_train_loss": round(float(result.training_loss), 6),
        **{k: v for k, v in devices[0].items() if k.startswith("peak_")},  # the main worker's; all below
        "peak_memory_gb_total": round(sum(d["peak_memory_gb"] for d in devices), 3),
        "per_device": devices,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if os.environ.get("FTSTUDY_KEEP_CHECKPOINTS") != "1":
        for ck in ckpt_dir.glob("checkpoint-*"):
            shutil.rmtree(ck)  # finished: the final model is in out_dir; keep the (small) stamp only
    distributed.barrier()
    return metrics
