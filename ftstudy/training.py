"""One training path for every method (:mod:`ftstudy.methods` says how they differ), top to bottom:
checkpoint to resume, data to batches, the model with its adapter and speed levers, the Trainer, the saved
result and its cost metrics. Each step is one layer down: batches, prepare, trainer, checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ftstudy import budget, distributed, fastpath
from ftstudy.atomic import atomic_dir, read_json, read_jsonl, write_json
from ftstudy.batches import WIDTH_BUCKETS, Collator, packed_batches, tokenize_dataset
from ftstudy.checkpoints import RunStore, code_fingerprint, fingerprint, last_complete_checkpoint, truncate_curves
from ftstudy.clock import Clock
from ftstudy.methods import MethodSpec, check_hardware, optimizer_kwargs, phases
from ftstudy.models import causal_lm, device_kind, load_tokenizer
from ftstudy.params import Params
from ftstudy.prepare import count_parameters, prepare_model
from ftstudy.trainer import (
    completion_trainer_class,
    curve_callback,
    divergence_guard,
    no_final_checkpoint,
    peak_memory,
    throughput_callback,
    total_steady,
    validation_loss,
)

BASE_NAME = "models/base"  # where the pipeline keeps the base (dvc.yaml): what a saved adapter names as its base


def train(spec: MethodSpec, params: Params, *, train_path: str | Path, models_dir: str | Path,
          out_dir: str | Path, ckpt_dir: str | Path, live_dir: str | Path | None,
          val_path: str | Path | None = None, store: RunStore | None = None) -> dict:
    """Train ``spec`` and write its adapter or model to ``out_dir`` atomically; return its metrics.

    Examples are taken in ``train_path``'s rows in an order drawn from the training seed, so every method of a run
    sees the same stream; ``spec.skip_steps`` starts that many steps into it. ``val_path``'s rows give the trained model's
    teacher-forced ``validation_loss``, what learning rates are chosen on.
    ``ckpt_dir`` survives an interrupted run (DVC ``persist``); a rerun with the same fingerprint
    resumes from its last checkpoint, a rerun with anything changed starts afresh. ``live_dir`` receives
    the loss and learning-rate curves (dvclive); None skips them (the GPU benchmark, where dvclive is absent).
    ``store`` holds finished runs: one with this run's fingerprint, code and validation rows is copied from it
    instead of trained (one process only: a launched run always trains).
    """
    from transformers import TrainingArguments, set_seed

    clock = Clock()
    cuda = torch.cuda.is_available()
    check_hardware(spec)
    fastpath.check(params.train.kernels, cuda, params.train.cuda_graphs)
    budget.check(params.train.memory_budget_gb, cuda)
    distributed.check(spec, params.train, cuda)
    distributed.init(cuda)
    t = params.train
    main = distributed.is_main()
    live_dir = Path(live_dir) if live_dir is not None and main else None  # one worker writes the curves
    models_dir, ckpt_dir, train_path, out_dir = Path(models_dir), Path(ckpt_dir), Path(train_path), Path(out_dir)
    base_dir = models_dir / "base"
    fp = fingerprint(spec, params, train_path, models_dir)
    made_by = f"{fp}\n{code_fingerprint()}"  # the run's inputs and the code that trains them
    store = store if distributed.world_size() == 1 else None
    key = store.key(made_by, val_path) if store else None
    if store and (kept := store.reuse(key, out_dir, live_dir)) is not None:
        print(f"{spec.name}: this run (params, data, base, code) finished before, in {store.root / key}: copied, "
              "not trained again")
        return kept
    stamp = ckpt_dir / "fingerprint.txt"
    with distributed.main_first():
        if main:
            if ckpt_dir.exists() and (not stamp.exists() or stamp.read_text() != made_by):
                shutil.rmtree(ckpt_dir)  # made from other params, data or code: resuming it would mix two runs
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            stamp.write_text(made_by)
        last = last_complete_checkpoint(ckpt_dir)
    resumed_from = int(last.name.split("-")[-1]) if last else 0
    if last and main:
        print(f"resuming {spec.name} from {last} (step {resumed_from})")
    # A run that continues another (the hybrid's second phase) appends to its curves, steps counted on from there.
    step_offset = spec.skip_steps
    if live_dir is not None and (last or step_offset):
        truncate_curves(live_dir, step_offset + resumed_from)
    elif live_dir is not None:
        shutil.rmtree(live_dir, ignore_errors=True)

    set_seed(params.seed)
    tokenizer = load_tokenizer(base_dir, padding_side="right")
    records = read_jsonl(train_path)
    # The training seed orders the stream (the same order for every method of a run): a seed experiment varies
    # init, dropout and order while the data, and so the test items, stay those of data.seed.
    random.Random(f"{params.seed}/training-order").shuffle(records)
    # Rotated, not cut: epochs after the first go on cycling through the same stream a single method sees.
    skip = (spec.skip_steps * t.batch_size * t.grad_accum * distributed.world_size()) % len(records)
    dataset = tokenize_dataset(tokenizer, records[skip:] + records[:skip], t.max_seq_len, t.max_prompt_tokens)
    clock.lap("data")
    model, levers, plan = prepare_model(spec, params, base_dir, models_dir)
    clock.lap("model")  # loading, quantising, the adapter, the memory budget's probe
    if plan:  # the same rows per optimizer step, in the micro-batches the memory budget fits
        t = dataclasses.replace(t, batch_size=plan.micro_batch * t.world, grad_accum=plan.grad_accum)
    trainable, total = count_parameters(model)
    layer_cls = type(causal_lm(model).model.layers[0]).__name__
    optim_kwargs = optimizer_kwargs(spec)
    args = TrainingArguments(
        output_dir=str(ckpt_dir), max_steps=spec.max_steps, **distributed.trainer_kwargs(t, layer_cls),
        gradient_accumulation_steps=t.grad_accum, learning_rate=spec.learning_rate, warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        # Losses logged as they are: the Trainer's NaN/inf filter would log an average in their place, and its two
        # checks per step each make the host wait for the GPU before the optimizer step. Between logged steps the
        # host queues the next step while the GPU runs this one: batches are copied to it without waiting.
        logging_steps=t.logging_steps, logging_nan_inf_filter=False, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=2, bf16=cuda, use_cpu=not cuda, seed=params.seed, data_seed=params.seed, report_to="none",
        dataloader_num_workers=0, dataloader_pin_memory=cuda, accelerator_config={"non_blocking": cuda},
        remove_unused_columns=False, disable_tqdm=not params.ui.progress_bar, **optim_kwargs,
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
                      callbacks=[no_final_checkpoint(), divergence_guard(spec.name)] + ([] if live_dir is None else [
                          curve_callback(live_dir, resume=bool(last or step_offset), step_offset=step_offset)]))
    throughput = throughput_callback(trainer, compiled="compiled_layers" in levers, cuda_graphs="cuda_graphs" in levers,
                                      projection_gap=spec.galore.update_proj_gap if spec.galore else None)
    trainer.add_callback(throughput)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.perf_counter() - start
    clock.lap("train")  # steps, compilation, checkpoints
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # Every worker takes part: under FSDP the forward gathers the sharded weights.
    val_loss = (validation_loss(model, tokenizer, read_jsonl(val_path), t, Collator(tokenizer.pad_token_id))
                if val_path is not None else None)
    clock.lap("validation")
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
        if spec.lora is not None:  # the pipeline's base, not the folder it was read from (a sweep's is in
            for config in model.peft_config.values():  # checkpoints/): the same run writes the same bytes anywhere
                config.base_model_name_or_path = BASE_NAME
            base = model.get_base_model()  # and what peft's model card (README.md) names
            base.name_or_path = base.config._name_or_path = BASE_NAME
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if spec.lora is None:
            tokenizer.save_pretrained(tmp)
        else:  # peft writes target_modules from a set, in an order that follows Python's hash seed: sort them,
            # so the same training writes the same bytes (and DVC hash) in every process
            config = read_json(tmp / "adapter_config.json")
            if isinstance(config.get("target_modules"), list):
                write_json(tmp / "adapter_config.json", {**config, "target_modules": sorted(config["target_modules"])})
        write_json(tmp / "training_config.json", {"spec": asdict(spec), "train": asdict(t), "seed": params.seed,
                                                  "profile": params.profile, "fingerprint": fp})
    clock.lap("save")
    metrics = {
        "method": spec.name,
        "profile": params.profile,
        "optimizer": optim_kwargs["optim"],
        "speed_levers": levers,
        "packed_batches": packed,
        # Layer-wise optimizers update each weight during the backward, before the global norm exists.
        "gradient_clipping": ("none (layer-wise optimizer)" if spec.layerwise
                              else f"global L2 norm <= {t.max_grad_norm}"),
        "device": device_kind(),
        "train_seconds": round(seconds, 2),
        # Where the run's time went beside the steps, so its cost at another size can be estimated.
        "seconds": clock.laps,
        "tokens_per_s": round(trained_tokens / seconds, 2) if seconds else 0.0,
        # Without the steps that paid a one-off cost (compilation, GaLore's projections): the rate a longer run
        # settles at. Those steps' seconds are in one_off_seconds.
        "steady_tokens_per_s": total_steady(devices),
        "batch_shapes": devices[0]["batch_shapes"],
        "one_off_seconds": devices[0]["one_off_seconds"],
        "one_off_steps": devices[0]["one_off_steps"],
        "trained_tokens": trained_tokens,
        "num_processes": distributed.world_size(),
        "strategy": t.strategy if distributed.world_size() > 1 else "single",
        "per_device_batch": args.per_device_train_batch_size,
        "memory_plan": None if plan is None else {
            **plan.as_dict(), "measured_peak_gb": devices[0]["peak_memory_gb"],
            "within_budget": devices[0]["peak_memory_gb"] <= plan.budget_gb},
        "effective_batch": args.per_device_train_batch_size * distributed.world_size() * t.grad_accum,
        "steps": result.global_step,
        "resumed_from_step": resumed_from,
        "trainable_params": trainable,
        "total_params": total,
        "final_train_loss": round(float(losses[-1]), 6) if losses else math.nan,
        "validation_loss": val_loss,
        "mean_train_loss": round(float(result.training_loss), 6),
        **{k: v for k, v in devices[0].items() if k.startswith("peak_")},  # the main worker's; all below
        "peak_memory_gb_total": round(sum(d["peak_memory_gb"] for d in devices), 3),
        "per_device": devices,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if plan and not metrics["memory_plan"]["within_budget"]:
        print(f"warning: {spec.name} peaked at {devices[0]['peak_memory_gb']} GB, over train.memory_budget_gb="
              f"{plan.budget_gb:g} (predicted {plan.predicted_peak_gb} GB): lower the budget", file=sys.stderr)
    if store:
        store.put(key, out_dir, live_dir, metrics)
    if os.environ.get("FTSTUDY_KEEP_CHECKPOINTS") != "1":
        for ck in ckpt_dir.glob("checkpoint-*"):
            shutil.rmtree(ck)  # finished: the final model is in out_dir; keep the (small) stamp only
    distributed.barrier()
    return metrics


def train_method(name: str, params: Params, *, data_dir: str | Path, models_dir: str | Path, ckpt_root: str | Path,
                 live_dir: str | Path | None, store: RunStore | None = None) -> dict | None:
    """Train method ``name`` (its one run, or the hybrid's QLoRA phase and then its GaLore phase, one curve between
    them) into ``models_dir/<run>``; return the metrics of the whole, None on workers other than the main one.
    ``store``: see :func:`train`."""
    data_dir, models_dir, ckpt_root = Path(data_dir), Path(models_dir), Path(ckpt_root)
    runs = []
    for spec in phases(params, name):
        m = train(spec, params, train_path=data_dir / "train.jsonl", models_dir=models_dir,
                  out_dir=models_dir / spec.name, ckpt_dir=ckpt_root / spec.name, live_dir=live_dir,
                  val_path=data_dir / "val.jsonl" if spec.name == name else None, store=store)
        if m is None:
            return None
        runs.append(m)
    return runs[0] if len(runs) == 1 else combine_phases(runs)


PHASE_KEYS = ("method", "optimizer", "steps", "train_seconds", "trained_tokens", "peak_memory_gb", "final_train_loss",
              "trainable_params")


def combine_phases(runs: list[dict]) -> dict:
    """One method's metrics from its phases: the last phase's, with steps, tokens, time and peak memory of all."""
    seconds = sum(r["train_seconds"] for r in runs)
    tokens = sum(r["trained_tokens"] for r in runs)
    return {**runs[-1], "steps": sum(r["steps"] for r in runs), "train_seconds": round(seconds, 2),
            "trained_tokens": tokens, "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
            "peak_memory_gb": max(r["peak_memory_gb"] for r in runs),
            "phases": [{k: r[k] for k in PHASE_KEYS} for r in runs]}
