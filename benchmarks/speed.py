"""Training speed and memory: the plain Hugging Face configuration vs this project's path, in one run.

    python benchmarks/speed.py --arch gemma-3-1b --out h100.json      # on the GPU (see ../shared/GPU.md)
    python benchmarks/speed.py --arch tiny --steps 3                  # CPU smoke run (part of the tests)

Every method is measured twice on the same random weights (saved once, loaded by both), the same batches
(``--batch`` x ``--seq-len`` tokens, the first ``--prompt-frac`` of each row masked as prompt, as in
instruction tuning), the same learning rate, and an optimizer built by transformers' Trainer for both:

- baseline, the plain stack as the seeds ran it: transformers + peft recipes (``prepare_model_for_kbit_training``
  for QLoRA), ``model(input_ids, labels=...)`` (full fp32 logits at every position), gradient checkpointing
  on every layer, bf16 autocast as ``Trainer(bf16=True)`` does, ``adamw_torch`` / ``galore_adamw_8bit``;
- project: ``ftstudy.prepare.prepare_model`` and ``completion_loss``, i.e. exactly what the training stages
  run (fused head loss, the levers of ftstudy.fastpath, layer-wise 8-bit GaLore, fused AdamW), with the
  same checkpointing;
- with ``--budgets``, the project again in memory-budget mode (ftstudy.budget): for each fraction of the
  baseline's peak memory, the rows per step (of ``--budget-rows``) and layers kept uncheckpointed that the budget's
  cost model rates fastest among those its memory model predicts fit; its predicted peak is printed beside the
  measured one. These rows spend memory on larger batches, so
  their loss is not the others' step for step;
- with ``--trl``, a third: the project's model and optimizer, but the loss through TRL's fused LM head
  (``trl.trainer.utils.add_fused_lm_head``, what TRL's SFTTrainer uses) instead of ``ftstudy.loss``: an A/B of
  the two heads, everything else equal.
- with ``--unsloth`` (LoRA methods, GPU, ``--tokenizer`` naming a Gemma 3 tokenizer its loader needs): Unsloth's
  Gemma 3 path (``FastModel``: its 4-bit or 16-bit load, its LoRA, its loss through ``model(..., labels=...)``) on
  the same weights, batches, learning rate and optimizer, twice: with its default checkpointing
  (``use_gradient_checkpointing="unsloth"``, activations offloaded to CPU memory) and with none (its fastest
  setting when memory allows). Unsloth must be importable (it needs transformers <= 5.17, see docs/gpu-speed.md).

Each variant runs in its own process: Liger patches transformers' Gemma 3 module and compiled code stays
cached, either of which would leak into a variant measured after it. LoRA dropout is 0 in both, so the
losses can be compared step by step. Prints tokens/s (median over timed steps, after warm-up), peak
allocated/reserved memory over the whole run (warm-up included: CUDA graphs allocate while recording), the
ratios to the baseline and the loss after the same steps; writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftstudy.arch import GEMMA3_1B  # noqa: E402
from ftstudy.params import Params, default_params  # noqa: E402
from ftstudy.prompt import IGNORE_INDEX  # noqa: E402

TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, sliding_window=64, max_position_embeddings=1024,
            pad_token_id=0, eos_token_id=1, bos_token_id=2)
METHODS = ("qlora", "lora_wide", "galore")
BASELINE_GALORE = {True: "galore_adamw_8bit", False: "galore_adamw"}            # by CUDA: the plain stack's
PROJECT_GALORE = {True: "galore_adamw_8bit_layerwise", False: "galore_adamw_layerwise"}  # the training stages'


def make_batches(n: int, batch: int, seq_len: int, vocab: int, prompt_frac: float, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq_len), generator=g)
        labels = ids.clone()
        labels[:, : int(seq_len * prompt_frac)] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


# Dense bf16 tensor-core peak by the datasheet (no sparsity), FLOP/s; MFU divides by it.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12}


def flops_per_token(arch: dict, seq_len: int, labelled: float, *, full: bool, lora_r: int = 0,
                    lora_modules: tuple[str, ...] = (), recompute: float = 1.0) -> float:
    """Model FLOPs one training token costs (2 per multiply-add), as both variants must compute them.

    Per decoder layer, a weight matmul costs 2 x its weights forward, as much again for the input gradient,
    and as much again for the weight gradient where the weight trains (``full``: every weight; else only LoRA's
    A and B, r x (in + out) per adapted module, which also run in the forward). Causal attention: QK^T and AV,
    2 x heads x head_dim x the mean context (seq_len + 1) / 2 each, twice that backward. Checkpointing runs
    each checkpointed layer's forward once more (``recompute``: the share of layers checkpointed). The head
    (d x vocab) runs only at labelled positions (``labelled`` of the tokens): forward, input gradient, and its
    weight gradient where it trains (tied to the embedding, so with ``full``). The quantized base's
    dequantization and elementwise work are not counted.
    """
    d, f, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    q, kv = arch["num_attention_heads"] * arch["head_dim"], arch["num_key_value_heads"] * arch["head_dim"]
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    base = sum(i * o for i, o in shapes.values())
    lora = sum(lora_r * (shapes[m][0] + shapes[m][1]) for m in lora_modules)
    forward = 2 * (base + lora) + 2 * 2 * q * (seq_len + 1) / 2
    backward = 2 * (base + lora) + 2 * (2 * 2 * q * (seq_len + 1) / 2) + 2 * (base if full else lora)
    layer = forward * (1 + recompute) + backward
    head = 2 * d * arch["vocab_size"] * labelled * (3 if full else 2)
    return layers * layer + head


STACK = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "galore-torch", "trl", "unsloth", "unsloth_zoo")


def stack() -> dict[str, str]:
    """The installed versions the numbers depend on (those present), read from the package metadata without
    importing them (Unsloth patches transformers on import)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in STACK:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def mfu(tokens_per_s: float, flops: float, device: str) -> float | None:
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    return round(tokens_per_s * flops / peak, 4) if peak else None


def bench_params(variant: str, cuda: bool, keep_activations: int = 0, **train) -> Params:
    p = dataclasses.replace(default_params(), profile="benchmark")
    ours = variant != "baseline"
    galore = (PROJECT_GALORE if ours else BASELINE_GALORE)[cuda]
    return dataclasses.replace(
        p, train=dataclasses.replace(p.train, gradient_checkpointing=True, weight_decay=0.0,
                                     keep_activations=keep_activations if ours else 0, **train),
        train_qlora=dataclasses.replace(p.train_qlora, lora_dropout=0.0, learning_rate=1e-4),
        train_lora_wide=dataclasses.replace(p.train_lora_wide, lora_dropout=0.0, learning_rate=1e-4),
        train_galore=dataclasses.replace(p.train_galore, optimizer=galore, learning_rate=1e-5),
    )


def build_baseline(spec, base_dir: Path, cuda: bool):
    """The plain transformers + peft recipe for ``spec``."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs = {"dtype": dtype}
    if spec.quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0} if cuda else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    model.config.use_cache = False
    if not spec.quantize_4bit:
        model.to("cuda" if cuda else "cpu")
    if spec.quantize_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if spec.lora is not None:
        model = get_peft_model(model, LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=0.0,
                                                 target_modules=list(spec.lora.target_modules), task_type="CAUSAL_LM"))
    else:
        model.requires_grad_(True)
    return model


def make_optimizer(model, optim_kwargs: dict, lr: float, cuda: bool, workdir: Path, project: bool):
    """The optimizer the Trainer builds: transformers' own for the baseline, the training stages' for the project
    (ftstudy.galore's layer-wise GaLore)."""
    from transformers import Trainer, TrainingArguments

    from ftstudy.trainer import completion_trainer_class

    args = TrainingArguments(output_dir=str(workdir), learning_rate=lr, weight_decay=0.0, report_to="none",
                             bf16=cuda, use_cpu=not cuda, **optim_kwargs)
    trainer_class = completion_trainer_class() if project else Trainer
    return trainer_class(model=model, args=args).create_optimizer()


# Unsloth's variants: its default checkpointing (offloaded to CPU memory) and none at all.
UNSLOTH_CHECKPOINTING = {"unsloth": "unsloth", "unsloth_no_checkpointing": False}


def build_unsloth(spec, variant: str, base_dir: Path, seq_len: int):
    """Unsloth's Gemma 3 recipe for ``spec`` (its loader, LoRA and checkpointing; LoRA dropout 0 as elsewhere)."""
    from unsloth import FastModel  # before transformers and peft: it patches them on import

    model, _ = FastModel.from_pretrained(model_name=str(base_dir), max_seq_length=seq_len, dtype=torch.bfloat16,
                                         load_in_4bit=spec.quantize_4bit, full_finetuning=False,
                                         local_files_only=True)
    return FastModel.get_peft_model(model, r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=0.0, bias="none",
                                    target_modules=list(spec.lora.target_modules), random_state=1,
                                    use_gradient_checkpointing=UNSLOTH_CHECKPOINTING[variant])


def build_variant(method: str, variant: str, base_dir: Path, cuda: bool, params: Params | None = None,
                  seq_len: int = 0):
    """Model, optimizer, applied levers and optimizer name of one variant, checkpointing on in both."""
    from ftstudy.methods import method_spec, optimizer_kwargs
    from ftstudy.prepare import enable_checkpointing, prepare_model

    params = params or bench_params(variant, cuda)
    spec = method_spec(params, method)
    torch.manual_seed(1)  # LoRA's A matrices: the same draw in both variants
    plain = variant in ("baseline", *UNSLOTH_CHECKPOINTING)  # the plain optimizer: GaLore's targets alike, no fused AdamW
    if plain:
        okw = {**optimizer_kwargs(spec), "optim": spec.optimizer}
    if variant == "baseline":
        model, levers = build_baseline(spec, base_dir, cuda), []
        enable_checkpointing(model, 0)  # every layer, as Trainer(gradient_checkpointing=True) does
    elif variant in UNSLOTH_CHECKPOINTING:
        model = build_unsloth(spec, variant, base_dir, seq_len)
        levers = [f"unsloth_checkpointing={UNSLOTH_CHECKPOINTING[variant]}"]
    else:
        model, levers, _ = prepare_model(spec, params, base_dir, base_dir.parent)  # checkpointing as params say
        if not spec.quantize_4bit:
            model.to("cuda" if cuda else "cpu")
        okw = optimizer_kwargs(spec)
        if variant == "trl":
            from trl.trainer.utils import add_fused_lm_head

            from ftstudy.models import causal_lm

            add_fused_lm_head(causal_lm(model))  # its forward, looked up through PEFT's wrapper at each call
            levers = [lv for lv in levers if lv != "fused_linear_cross_entropy"] + ["trl_fused_lm_head"]
    model.train()
    with tempfile.TemporaryDirectory() as td:
        opt = make_optimizer(model, okw, spec.learning_rate, cuda, Path(td), not plain)
    return model, opt, levers, okw["optim"]


def train_step(model, opt, batch: dict, variant: str, cuda: bool) -> torch.Tensor:
    """One optimizer step under bf16 autocast (as Trainer(bf16=True)); the loss is the variant's."""
    from ftstudy.loss import completion_loss

    with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
        if variant == "baseline" or variant in UNSLOTH_CHECKPOINTING:  # the model's own loss (Unsloth's is fused)
            loss = model(**batch).loss
        elif variant == "trl":
            loss = model(**batch, fused_lm_head=True).loss
        else:
            loss = completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def plan_budget(method: str, base_dir: Path, budget_gb: float, rows: list[int], seq_len: int):
    """The budget's plan as the training stages make it (ftstudy.budget.plan: the eager probe of the project's
    model and, where it keeps a faster plan out, a probe of its compiled layers), the fastest by ftstudy.budget's
    cost model among the candidate rows per step and layers kept."""
    from ftstudy import budget
    from ftstudy.errors import UserError
    from ftstudy.methods import method_spec
    from ftstudy.prepare import prepare_model

    params = bench_params("project", True, compile="off", kernels="off")
    spec = method_spec(params, method)
    model, _, _ = prepare_model(spec, params, base_dir, base_dir.parent)
    if not spec.quantize_4bit:
        model.to("cuda")
    try:
        return budget.plan(model, spec, budget_gb, rows, accumulate=False, seq_len=seq_len, compiled=True,
                           cuda_graphs=True)
    except UserError:
        raise SystemExit(f"{method}: no candidate of --budget-rows fits {budget_gb:.2f} GB") from None
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()


def start_trace(cuda: bool):
    """A torch profiler over the host and, on a GPU, the device; already entered."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    prof = torch.profiler.profile(activities=acts)
    prof.__enter__()
    return prof


def end_trace(prof, steps: int, wall_s: float, cuda: bool) -> tuple[dict, str]:
    """Stop ``prof`` after ``steps`` steps that took ``wall_s``: per step the wall and device-busy seconds and the
    costliest device operations (a wall well above the busy time means the host holds the GPU up), and the
    profiler's tables."""
    prof.__exit__(None, None, None)
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if not e.key.startswith("## ")) / 1e6 / steps
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:12]
    summary = {"wall_s_per_step": round(wall_s / steps, 4), "device_busy_s_per_step": round(busy, 4),
               "top_device_ops": {e.key[:80]: round(e.self_device_time_total / 1e6 / steps, 5) for e in top}}
    tables = (events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25)
              + "\n" + events.table(sort_by="cpu_time_total", row_limit=20))
    return summary, tables


def run_worker(method: str, variant: str, base_dir: Path, batches: list[dict], warmup: int,
               keep_activations: int = 0, trace_dir: Path | None = None, budget_rows: list[int] = (),
               prompt_frac: float = 0.5, vocab: int = 0) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    params, plan = bench_params(variant, cuda, keep_activations), None
    if variant.startswith("budget="):
        seq_len = batches[0]["input_ids"].shape[1]
        plan = plan_budget(method, base_dir, float(variant.split("=")[1]), budget_rows, seq_len)
        params = bench_params("project", cuda, plan.keep_activations)  # the layers the plan keeps uncheckpointed
        batches = make_batches(len(batches), plan.micro_batch, seq_len, vocab, prompt_frac)
        variant = "project"
    model, opt, levers, optim = build_variant(method, variant, base_dir, cuda, params, batches[0]["input_ids"].shape[1])
    times, losses = [], []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    first = time.perf_counter()
    run_peak = run_reserved = 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prof = None
    for step, b in enumerate(batches):
        if trace_dir and step == warmup + 2:  # a few timed steps under the profiler (timed apart, below)
            prof = start_trace(cuda)
            traced, t_traced = 0, time.perf_counter()
        if step == warmup and cuda:
            # CUDA graphs allocate their memory while recording, in the warm-up; replays allocate nothing, so
            # the allocator's peak over the timed steps alone would miss it. The whole run's peak counts it.
            run_peak, run_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            torch.cuda.reset_peak_memory_stats()
        b = {k: v.to(device) for k, v in b.items()}
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()  # as the training stages do (a no-op without CUDA graphs)
        loss = train_step(model, opt, b, variant, cuda)
        if cuda:
            torch.cuda.synchronize()
        if step == 0:
            first = time.perf_counter() - first
        if prof is not None:
            traced += 1
        elif step >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(round(float(loss.detach()), 5))
        if prof is not None and traced == 4:
            summary, tables = end_trace(prof, traced, time.perf_counter() - t_traced, cuda)
            trace_dir.mkdir(parents=True, exist_ok=True)
            (trace_dir / f"trace_{method}_{variant}.txt").write_text(
                f"wall s/step {summary['wall_s_per_step']:.4f} (profiled), device busy s/step "
                f"{summary['device_busy_s_per_step']:.4f}\n{tables}")
            prof = None
    rec = {"tokens_per_s": round(batches[0]["input_ids"].numel() / statistics.median(times), 1),
           "loss": losses[-1], "losses": losses, "optimizer": optim, "levers": levers,
           "first_step_s": round(first, 2), "plan": plan.as_dict() if plan else None}
    if cuda:
        rec["steady_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        rec["peak_allocated_gb"] = round(max(run_peak, torch.cuda.max_memory_allocated()) / 2**30, 3)
        rec["peak_reserved_gb"] = round(max(run_reserved, torch.cuda.max_memory_reserved()) / 2**30, 3)
    return rec


def build_base(arch: dict, out: Path, cuda: bool) -> None:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**arch),
                                             dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(out, safe_serialization=True)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["gemma-3-1b", "tiny"], default="gemma-3-1b")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-frac", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (compilation, GaLore's SVD)")
    parser.add_argument("--keep-activations", type=int, default=0,
                        help="the project's train.keep_activations: last N layers not checkpointed")
    parser.add_argument("--budgets", nargs="*", type=float, default=[],
                        help="memory-budget rows: fractions of the baseline's peak allocated memory (e.g. 0.33 1.0)")
    parser.add_argument("--budget-rows", nargs="+", type=int, default=[8, 16, 32, 64],
                        help="rows per step the budget rows may choose from (the same --seq-len)")
    parser.add_argument("--trl", action="store_true",
                        help="also run the project's path with TRL's fused LM head as its loss (an A/B of the heads)")
    parser.add_argument("--unsloth", action="store_true",
                        help="also run Unsloth's Gemma 3 path for the LoRA methods (GPU; needs --tokenizer)")
    parser.add_argument("--tokenizer", type=Path,
                        help="a saved Gemma 3 tokenizer, copied beside the random weights (Unsloth's loader reads it)")
    parser.add_argument("--trace-dir", type=Path,
                        help="profile 4 steps after the timed ones' start in every variant; tables written there")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "VARIANT", "BASE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.unsloth and not (cuda and args.tokenizer and (args.tokenizer / "tokenizer.json").is_file()):
        parser.error("--unsloth needs a CUDA GPU and --tokenizer DIR holding a Gemma 3 tokenizer.json "
                     "(e.g. an embedded run's models/base)")
    arch = GEMMA3_1B if args.arch == "gemma-3-1b" else TINY
    batches = make_batches(args.warmup + args.steps, args.batch, args.seq_len, arch["vocab_size"], args.prompt_frac)
    if args.worker:
        method, variant, base_dir = args.worker
        if variant in UNSLOTH_CHECKPOINTING:
            import unsloth  # noqa: F401  (first: it patches transformers, peft and trl as they are imported)
        print("WORKER " + json.dumps(run_worker(method, variant, Path(base_dir), batches, args.warmup,
                                                args.keep_activations, args.trace_dir, args.budget_rows,
                                                args.prompt_frac, arch["vocab_size"])), flush=True)
        return []

    records = []
    checkpointed = (f"baseline all layers, project all but the last {args.keep_activations}"
                    if args.keep_activations else "all layers, both")
    with tempfile.TemporaryDirectory() as td:
        base_dir = Path(td) / "base"
        build_base(arch, base_dir, cuda)
        if args.unsloth:
            for f in args.tokenizer.glob("tokenizer*"):
                shutil.copy(f, base_dir / f.name)
        shared = ["--arch", args.arch, "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--prompt-frac",
                  str(args.prompt_frac), "--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--keep-activations", str(args.keep_activations), "--budget-rows", *map(str, args.budget_rows),
                  *(["--trace-dir", str(args.trace_dir.resolve())] if args.trace_dir else [])]
        def worker(method: str, variant: str) -> dict:
            # Unsloth would otherwise fetch a README from the hub to count its users.
            env = {**os.environ, "UNSLOTH_DISABLE_STATISTICS": "1"} if variant in UNSLOTH_CHECKPOINTING else None
            proc = subprocess.run([sys.executable, __file__, *shared, "--worker", method, variant, str(base_dir)],
                                  capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER ")]
            if proc.returncode or not lines:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                said = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                raise SystemExit(f"{method}/{variant} failed: {said[0]}")
            for line in proc.stderr.splitlines():
                if line.startswith("memory budget "):
                    print(line, flush=True)  # the budget's measured memory model, beside the table
            return json.loads(lines[-1][len("WORKER "):])

        for method in args.methods:
            variants = ["baseline", "project"] + (["trl"] if args.trl else [])
            if args.unsloth and method != "galore":  # Unsloth trains adapters; it has no GaLore
                variants += list(UNSLOTH_CHECKPOINTING)
            got = {v: worker(method, v) for v in variants}
            base, ours = got["baseline"], got["project"]
            rec = {"method": method, "device": torch.cuda.get_device_name() if cuda else "cpu", "arch": args.arch,
                   "batch": args.batch, "seq_len": args.seq_len, "prompt_frac": args.prompt_frac,
                   "steps": len(batches), "timed_steps": args.steps, "gradient_checkpointing": checkpointed,
                   "baseline_tokens_per_s": base["tokens_per_s"], "tokens_per_s": ours["tokens_per_s"],
                   "speedup": round(ours["tokens_per_s"] / base["tokens_per_s"], 3),
                   "baseline_loss": base["loss"], "loss": ours["loss"],
                   "baseline_losses": base["losses"], "losses": ours["losses"],
                   "baseline_optimizer": base["optimizer"], "optimizer": ours["optimizer"], "levers": ours["levers"],
                   "baseline_first_step_s": base["first_step_s"], "first_step_s": ours["first_step_s"],
                   "stack": stack()}
            if cuda:
                rec.update(baseline_peak_allocated_gb=base["peak_allocated_gb"],
                           peak_allocated_gb=ours["peak_allocated_gb"],
                           baseline_steady_peak_allocated_gb=base["steady_peak_allocated_gb"],
                           steady_peak_allocated_gb=ours["steady_peak_allocated_gb"],
                           baseline_peak_reserved_gb=base["peak_reserved_gb"], peak_reserved_gb=ours["peak_reserved_gb"],
                           memory_ratio=round(ours["peak_allocated_gb"] / base["peak_allocated_gb"], 3))
            p = bench_params("project", cuda)
            lora = {"qlora": p.train_qlora, "lora_wide": p.train_lora_wide}.get(method)
            method_flops = functools.partial(flops_per_token, arch, args.seq_len, 1 - args.prompt_frac,
                                             full=lora is None, lora_r=lora.lora_r if lora else 0,
                                             lora_modules=tuple(lora.target_modules) if lora else ())
            flops = method_flops()  # every layer recomputed, as in the baseline
            rec.update(model_flops_per_token=round(flops), mfu=mfu(ours["tokens_per_s"], flops, rec["device"]),
                       baseline_mfu=mfu(base["tokens_per_s"], flops, rec["device"]))
            rec["budgets"] = []
            for fraction in args.budgets if cuda else []:
                try:
                    b = worker(method, f"budget={fraction * base['peak_allocated_gb']:.3f}")
                except SystemExit as err:  # no candidate fits the predicted memory: say so, measure the rest
                    rec["budgets"].append({"fraction": fraction, "error": str(err)})
                    continue
                plan = b["plan"]
                b_flops = method_flops(recompute=1 - plan["keep_activations"] / arch["num_hidden_layers"])
                rec["budgets"].append({
                    "fraction": fraction, "budget_gb": plan["budget_gb"], "rows": plan["micro_batch"],
                    "keep_activations": plan["keep_activations"],
                    "predicted_peak_gb": plan["predicted_peak_gb"], "probe": plan["probe"],
                    "checks": plan["checks"],
                    "peak_allocated_gb": b["peak_allocated_gb"],
                    "within_budget": b["peak_allocated_gb"] <= plan["budget_gb"],
                    "memory_ratio": round(b["peak_allocated_gb"] / base["peak_allocated_gb"], 3),
                    "tokens_per_s": b["tokens_per_s"], "speedup": round(b["tokens_per_s"] / base["tokens_per_s"], 3),
                    "model_flops_per_token": round(b_flops), "mfu": mfu(b["tokens_per_s"], b_flops, rec["device"]),
                    "loss": b["loss"], "first_step_s": b["first_step_s"]})
            if args.trl:
                t = got["trl"]
                rec.update(trl_tokens_per_s=t["tokens_per_s"], trl_loss=t["loss"], trl_losses=t["losses"],
                           trl_first_step_s=t["first_step_s"], trl_levers=t["levers"],
                           trl_vs_project=round(t["tokens_per_s"] / ours["tokens_per_s"], 3))
                if cuda:
                    rec.update(trl_peak_allocated_gb=t["peak_allocated_gb"],
                               trl_steady_peak_allocated_gb=t["steady_peak_allocated_gb"])
            rec["unsloth"] = [{
                "variant": v, "checkpointing": UNSLOTH_CHECKPOINTING[v], "tokens_per_s": got[v]["tokens_per_s"],
                "speedup": round(got[v]["tokens_per_s"] / base["tokens_per_s"], 3),
                "project_vs_unsloth": round(ours["tokens_per_s"] / got[v]["tokens_per_s"], 3),
                "peak_allocated_gb": got[v]["peak_allocated_gb"], "peak_reserved_gb": got[v]["peak_reserved_gb"],
                "memory_ratio": round(got[v]["peak_allocated_gb"] / base["peak_allocated_gb"], 3),
                "mfu": mfu(got[v]["tokens_per_s"], flops, rec["device"]), "loss": got[v]["loss"],
                "losses": got[v]["losses"], "first_step_s": got[v]["first_step_s"]}
                for v in UNSLOTH_CHECKPOINTING if v in got]
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if "losses" not in k}), flush=True)
            if args.out:  # after every method, so a run cut short by a time limit keeps what it measured
                args.out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"\n{'method':10} {'base tok/s':>11} {'ours tok/s':>11} {'speedup':>8} {'base GB':>8} {'ours GB':>8} "
          f"{'mem ratio':>9} {'base loss':>10} {'ours loss':>10} {'MFU':>6}")
    for r in records:
        print(f"{r['method']:10} {r['baseline_tokens_per_s']:>11.0f} {r['tokens_per_s']:>11.0f} {r['speedup']:>8.2f} "
              f"{r.get('baseline_peak_allocated_gb', float('nan')):>8.2f} {r.get('peak_allocated_gb', float('nan')):>8.2f} "
              f"{r.get('memory_ratio', float('nan')):>9.2f} {r['baseline_loss']:>10.4f} {r['loss']:>10.4f} "
              f"{r['mfu'] if r['mfu'] is not None else '-':>6}")
    if any(r["budgets"] for r in records):
        print(f"\n{'method':10} {'budget':>7} {'GB':>6} {'rows':>5} {'kept':>5} {'pred GB':>8} {'probe':>15} {'checks':>6} {'peak GB':>8} "
              f"{'mem ratio':>9} {'tok/s':>8} {'speedup':>8} {'MFU':>6}")
        for r in records:
            for b in r["budgets"]:
                if "error" in b:
                    print(f"{r['method']:10} {b['fraction']:>6.2f}x  {b['error']}")
                    continue
                print(f"{r['method']:10} {b['fraction']:>6.2f}x {b['budget_gb']:>6.1f} {b['rows']:>5} {b['keep_activations']:>5} "
                      f"{b['predicted_peak_gb']:>8.2f} {b.get('probe', 'eager'):>15} {len(b.get('checks', ())):>6} "
                      f"{b['peak_allocated_gb']:>8.2f} "
                      f"{b['memory_ratio']:>9.2f} {b['tokens_per_s']:>8.0f} {b['speedup']:>8.2f} {b['mfu']!s:>6}")
    if any(r["unsloth"] for r in records):
        print(f"\n{'method':10} {'variant':25} {'tok/s':>8} {'vs plain':>8} {'ours/it':>8} {'peak GB':>8} "
              f"{'mem ratio':>9} {'loss':>8} {'MFU':>6}")
        for r in records:
            for u in [{"variant": "ours", "tokens_per_s": r["tokens_per_s"], "speedup": r["speedup"],
                       "project_vs_unsloth": 1.0, "peak_allocated_gb": r.get("peak_allocated_gb"),
                       "memory_ratio": r.get("memory_ratio"), "loss": r["loss"], "mfu": r["mfu"]}] + r["unsloth"]:
                print(f"{r['method']:10} {u['variant']:25} {u['tokens_per_s']:>8.0f} {u['speedup']:>8.2f} "
                      f"{u['project_vs_unsloth']:>8.2f} {u['peak_allocated_gb']:>8.2f} {u['memory_ratio']:>9.2f} "
                      f"{u['loss']:>8.4f} {u['mfu']!s:>6}")
    if args.trl:
        print(f"\n{'method':10} {'ours tok/s':>11} {'TRL head tok/s':>15} {'TRL/ours':>9} {'ours GB':>8} {'TRL GB':>8} "
              f"{'ours loss':>10} {'TRL loss':>10}")
        for r in records:
            print(f"{r['method']:10} {r['tokens_per_s']:>11.0f} {r['trl_tokens_per_s']:>15.0f} {r['trl_vs_project']:>9.3f} "
                  f"{r.get('peak_allocated_gb', float('nan')):>8.2f} {r.get('trl_peak_allocated_gb', float('nan')):>8.2f} "
                  f"{r['loss']:>10.4f} {r['trl_loss']:>10.4f}")
    if args.out:
        args.out.write_text(json.dumps(records, indent=2) + "\n")
    return records


if __name__ == "__main__":
    main()
    sys.exit(0)
