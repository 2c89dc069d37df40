"""The transformers Trainer with the project's loss and layer-wise GaLore, and the callbacks that measure a run:
throughput with one-off costs set apart, peak memory, and the dvclive curves."""

from __future__ import annotations

import itertools
import math
import resource
import time
from pathlib import Path

import torch
import torch.utils.data

from ftstudy import galore
from ftstudy.errors import UserError
from ftstudy.loss import completion_loss
from ftstudy.methods import LAYERWISE_OPTIMIZERS
from ftstudy.prompt import IGNORE_INDEX


def completion_trainer_class():
    from transformers import Trainer

    class CompletionTrainer(Trainer):
        """The transformers Trainer with the completion-only loss of ftstudy.loss."""

        loss_is_scaled_for_ga = True  # the loss is normalised by the accumulated batch's token count
        tokens_trained = 0  # counted here, not in the collator: the data loader prefetches a batch ahead
        _flops_per_token = None

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

        @staticmethod
        def get_optimizer_cls_and_kwargs(args, model=None):
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
            if args.optim == "galore_adamw_8bit":  # galore-torch's class as installed binds bitsandbytes wrongly
                cls = galore.adamw_8bit_class()
            return cls, kwargs

        def _get_train_sampler(self, train_dataset=None):
            # The stream in the order train() gave it (the training seed's): every method sees the same examples in
            # the same order, and the hybrid's second phase can continue where its first stopped.
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

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
            if layerwise:
                return layerwise.grad_norm()
            if self.accelerator.distributed_type not in ("NO", "MULTI_GPU", "MULTI_CPU"):
                return super()._clip_grad_norm(model)
            # The same clipping over the weights that train, the only ones with gradients: the Trainer's own call
            # lists every parameter of the model at every step.
            return self.accelerator.clip_grad_norm_(trained_weights(model), self.args.max_grad_norm)

        def training_step(self, model, inputs, num_items_in_batch=None):
            quick_bookkeeping(model)
            return super().training_step(model, inputs, num_items_in_batch)

        def floating_point_ops(self, inputs):
            # The Trainer's estimate (6 x tokens x non-embedding parameters, for its logged total_flos) with the
            # parameters counted once: its own count walks every parameter at every step.
            if self._flops_per_token is None:
                self._flops_per_token = super().floating_point_ops({"input_ids": torch.empty(1, 1)})
            return self._flops_per_token * inputs["input_ids"].numel()

        def _get_grad_norm(self, model, grad_norm=None):
            # Called after _clip_grad_norm; only without clipping (max_grad_norm 0) is the norm still to be read.
            layerwise = self._layerwise()
            if layerwise and grad_norm is None:
                return layerwise.grad_norm()
            return super()._get_grad_norm(model, grad_norm)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.tokens_trained += inputs.pop("num_tokens")  # the collator's host-side count: no wait on the GPU
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


QUICK = "ftstudy_quick_bookkeeping"


def trained_weights(model) -> list:
    """The parameters of ``model`` that train, listed once per model."""
    if not hasattr(model, "ftstudy_trained_weights"):
        object.__setattr__(model, "ftstudy_trained_weights", [p for p in model.parameters() if p.requires_grad])
    return model.ftstudy_trained_weights


def quick_bookkeeping(model) -> None:
    """Makes the Trainer's per-step ``model.train()`` and ``model.zero_grad()`` cheap on ``model`` (the model its loop
    holds, wrapped or not), once.

    Each walks every module: ~1,500 in QLoRA's gemma-3-1b, ~2,300 in wide LoRA's, 3-7 ms of host time each a step on
    a CPU. A GPU step waits on that time when the host bounds it (compiled layers replayed as CUDA graphs leave the
    host little else to do). Here ``train()`` only reads the modules' flags, from a list made once, and walks them
    only where one is not training: the model's own flag does not tell, since a fresh PEFT wrapper trains around a
    model loaded in eval mode. ``zero_grad()`` visits only the weights that train, the only ones with gradients.
    """
    if getattr(model, QUICK, False):
        return
    weights, walk, modules = trained_weights(model), model.train, list(model.modules())

    def train(mode: bool = True):
        return model if mode and all(m.training for m in modules) else walk(mode)

    def zero_grad(set_to_none: bool = True):
        for p in weights:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    # Instance attributes, not a subclass: the model may be PEFT's, a causal LM, or DDP's wrapper around either.
    for name, value in (("train", train), ("zero_grad", zero_grad), (QUICK, True)):
        object.__setattr__(model, name, value)


def throughput_callback(trainer, compiled: bool, cuda_graphs: bool, projection_gap: int | None):
    """Times every optimizer step and sorts out the steps that pay a one-off cost, for a steady rate.

    One-off costs: the first step (kernel set-up), with compiled layers every step whose batch shape is new
    (compilation), under CUDA graphs every step that meets a shape for the second time (torch records a shape's
    graphs on its second call: 0.7-1.5 s for Gemma 3 1B on an H200, against 0.1 s replayed), and with GaLore
    every step that recomputes the projections (galore-torch's step counts 0, gap, 2 x gap, ...), and the step after
    each checkpoint (its interval holds the saving: ``train.save_steps``). They are reported apart, not averaged
    into the rate.
    """
    from collections import Counter

    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        def __init__(self):
            self.marks = []  # (clock, tokens trained) at the start and after every step
            self.costs = []  # per step: the one-off cost it also paid for, or None
            self.calls: Counter[tuple] = Counter()  # steps that met each batch shape
            self.saved = False  # a checkpoint was written since the last step

        def _mark(self):
            # On a GPU a CUDA event, read after training: waiting for the GPU here every step would stop the host
            # from queueing the next step while this one runs.
            if torch.cuda.is_available():
                clock = torch.cuda.Event(enable_timing=True)
                clock.record()
            else:
                clock = time.perf_counter()
            self.marks.append((clock, trainer.tokens_trained))

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark()
            self.first = state.global_step  # > 0 when resumed

        def on_step_end(self, args, state, control, **kwargs):
            self._mark()
            shapes = set(trainer.batch_shapes)
            trainer.batch_shapes.clear()
            met = {self.calls[shape] for shape in shapes}
            self.calls.update(shapes)
            step = state.global_step - 1
            cost = ("first_step" if step == self.first else "checkpoint" if self.saved
                    else "new_shape" if compiled and 0 in met else "recording" if cuda_graphs and 1 in met
                    else "projection" if projection_gap and step % projection_gap == 0 else None)
            self.saved = False
            self.costs.append(cost)

        def on_save(self, args, state, control, **kwargs):
            self.saved = True  # written between this step's mark and the next one's

        def seconds(self) -> list[float]:
            """Each step's seconds, from its end to the previous one's."""
            clocks = [c for c, _ in self.marks]
            if clocks and isinstance(clocks[0], torch.cuda.Event):
                clocks[-1].synchronize()
                return [round(a.elapsed_time(b) / 1000, 4) for a, b in itertools.pairwise(clocks)]
            return [round(b - a, 4) for a, b in itertools.pairwise(clocks)]

        def summary(self) -> dict:
            tokens = [b - a for (_, a), (_, b) in itertools.pairwise(self.marks)]
            timed = list(zip(self.seconds(), tokens, self.costs, strict=True))
            steady = [(s, k) for s, k, cost in timed if cost is None]
            once, count = {}, {}
            for s, _, cost in timed:
                if cost is not None:
                    once[cost] = round(once.get(cost, 0.0) + s, 2)
                    count[cost] = count.get(cost, 0) + 1
            seconds = sum(s for s, _ in steady)
            return {"steady_tokens_per_s": round(sum(k for _, k in steady) / seconds, 2) if seconds else None,
                    "batch_shapes": len(self.calls), "one_off_seconds": once, "one_off_steps": count,
                    "step_seconds": [s for s, _, _ in timed]}

    return Throughput()


def no_final_checkpoint():
    """Unsets the Trainer's checkpoint after the last step: the run is over, its model is saved next (a GaLore
    checkpoint, with the optimizer's state, is several times the model), and a finished run's checkpoints are
    deleted anyway."""
    from transformers import TrainerCallback

    class NoFinalCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False

    return NoFinalCheckpoint()


def divergence_guard(name: str):
    """Stops a run whose logged loss or gradient norm is NaN or infinite: the Trainer would go on training NaN weights
    to the end of the budget and save them as the result. (Layer-wise GaLore stops sooner, at the projection.)"""
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            bad = {k: v for k, v in (logs or {}).items() if k in ("loss", "grad_norm") and not math.isfinite(float(v))}
            if bad:
                raise UserError(
                    f"{name}: {', '.join(f'{k} {v}' for k, v in bad.items())} at step {state.global_step}: the run "
                    f"diverged (lower the learning rate or raise train.warmup_steps) or the forward/backward is broken "
                    f"(retry with train.compile=off to rule out the compiled layers)")

    return DivergenceGuard()


def total_steady(devices: list[dict]) -> float | None:
    rates = [d["steady_tokens_per_s"] for d in devices]
    return None if None in rates else round(sum(rates), 2)


def curve_callback(live_dir: Path, resume: bool, step_offset: int = 0):
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
            self.live.step = state.global_step + step_offset
            self.live.log_metric("train/loss", float(logs["loss"]))
            if "learning_rate" in logs:
                self.live.log_metric("train/learning_rate", float(logs["learning_rate"]))
            if "grad_norm" in logs:
                self.live.log_metric("train/grad_norm", float(logs["grad_norm"]))
            self.live.next_step()

        def on_train_end(self, args, state, control, **kwargs):
            self.live.end()

    return CurveCallback()


@torch.no_grad()
def validation_loss(model, tokenizer, records: list[dict], t, collate) -> float | None:
    """Mean per-token loss of the responses in ``records`` (teacher-forced: independent of decoding), eager and without
    dropout; the model is put back in training mode after."""
    from ftstudy.batches import tokenize_dataset

    if not records:
        return None
    examples = tokenize_dataset(tokenizer, records, t.max_seq_len, t.max_prompt_tokens)
    device = next(p for p in model.parameters()).device
    total = count = 0.0
    was_training = model.training
    model.eval()
    with torch.compiler.set_stance("force_eager"):  # compiled layers would compile a no-grad graph per new shape
        for i in range(0, len(examples), t.batch_size):
            batch = collate(examples[i:i + t.batch_size])
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = completion_loss(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                       batch["labels"].to(device))
            total += float(loss) * n
            count += n
    model.train(was_training)
    return round(total / count, 6) if count else None


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3),
                "peak_memory_kind": "cuda_max_allocated"}
    # ru_maxrss is in KiB on Linux: the whole process's high-water mark, model loading included.
    return {"peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "peak_memory_kind": "cpu_peak_rss"}
