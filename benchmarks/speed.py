"""Training speed and memory: the plain Hugging Face configuration vs this project's path, in one run.

    python benchmarks/speed.py --arch gemma-3-1b --out results.json      # on the GPU (see ../shared/GPU.md)
    python benchmarks/speed.py --arch tiny --steps 3                     # CPU smoke run (part of the tests)

For each method both variants start from the same random weights, see the same batches (``--batch`` x
``--seq-len`` tokens, the first ``--prompt-frac`` of each row masked as prompt, as in instruction tuning)
and run the same optimizer. Only how the loss is computed and the memory levers differ:

- baseline: ``model(input_ids, labels=...)``, i.e. full fp32 logits over the 262,144-way vocabulary at every
  position, gradient checkpointing on;
- project: ``ftstudy.loss.completion_loss`` (the head only where a label exists, in chunks, never the full
  logits), with the checkpointing the project uses for that method.

Prints tokens/s (median over timed steps, after warm-up), peak allocated/reserved memory, the ratios to the
baseline, and the loss after the same steps (they must agree within bf16 noise); writes JSON records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ftstudy.arch import GEMMA3_1B
from ftstudy.loss import completion_loss
from ftstudy.params import ALL_LINEAR
from ftstudy.params import ATTENTION as ATTN
from ftstudy.prompt import IGNORE_INDEX

TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, sliding_window=64, max_position_embeddings=1024,
            pad_token_id=0, eos_token_id=1, bos_token_id=2)
METHODS = ("qlora", "lora_wide", "galore")


def make_batches(n: int, batch: int, seq_len: int, vocab: int, prompt_frac: float, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq_len), generator=g)
        labels = ids.clone()
        labels[:, : int(seq_len * prompt_frac)] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def build(method: str, arch: dict, cuda: bool, checkpointing: bool, seed: int = 0):
    """The model and optimizer of ``method``: the same for both variants."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Gemma3TextConfig

    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(seed)
    config = Gemma3TextConfig(**arch)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    if method == "qlora":
        # Quantize the very same random weights: save, then reload in NF4.
        import tempfile

        with tempfile.TemporaryDirectory() as td:
            model.save_pretrained(td)
            del model
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(td, quantization_config=q, dtype=dtype,
                                                         device_map={"": 0} if cuda else {"": "cpu"})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if method in ("qlora", "lora_wide"):
        r, alpha, targets = (64, 16, ATTN) if method == "qlora" else (128, 32, ALL_LINEAR)
        torch.manual_seed(seed + 1)
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "qlora" and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    return model, make_optimizer(method, model, cuda)


def make_optimizer(method: str, model, cuda: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    if method != "galore":
        return torch.optim.AdamW(params, lr=1e-4)
    from galore_torch import GaLoreAdamW, GaLoreAdamW8bit

    galore, other = [], []
    for name, p in model.named_parameters():
        is_linear = p.dim() == 2 and any(f".{t}." in f".{name}" for t in ALL_LINEAR)
        (galore if is_linear else other).append(p)
    groups = [{"params": other},
              {"params": galore, "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}]
    return (GaLoreAdamW8bit if cuda else GaLoreAdamW)(groups, lr=1e-5)


def run_variant(method: str, variant: str, arch: dict, batches: list[dict], warmup: int, cuda: bool,
                checkpointing: bool) -> dict:
    model, opt = build(method, arch, cuda, checkpointing)
    device = "cuda" if cuda else "cpu"
    times, losses = [], []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    for step, b in enumerate(batches):
        if step == warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        b = {k: v.to(device) for k, v in b.items()}
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if variant == "baseline":
            loss = model(**b).loss
        else:
            loss = completion_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    tokens = batches[0]["input_ids"].numel()
    rec = {"tokens_per_s": round(tokens / statistics.median(times), 1), "loss": round(losses[-1], 5),
           "losses": [round(x, 5) for x in losses], "gradient_checkpointing": checkpointing}
    if cuda:
        rec["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        rec["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return rec


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["gemma-3-1b", "tiny"], default="gemma-3-1b")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-frac", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--project-checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    arch = GEMMA3_1B if args.arch == "gemma-3-1b" else TINY
    batches = make_batches(args.warmup + args.steps, args.batch, args.seq_len, arch["vocab_size"], args.prompt_frac)
    records = []
    for method in args.methods:
        base = run_variant(method, "baseline", arch, batches, args.warmup, cuda, checkpointing=True)
        ours = run_variant(method, "project", arch, batches, args.warmup, cuda,
                           checkpointing=args.project_checkpointing == "on")
        rec = {"method": method, "device": torch.cuda.get_device_name() if cuda else "cpu", "arch": args.arch,
               "batch": args.batch, "seq_len": args.seq_len, "prompt_frac": args.prompt_frac, "steps": len(batches),
               "baseline_tokens_per_s": base["tokens_per_s"], "tokens_per_s": ours["tokens_per_s"],
               "speedup": round(ours["tokens_per_s"] / base["tokens_per_s"], 3),
               "baseline_loss": base["loss"], "loss": ours["loss"],
               "baseline_losses": base["losses"], "losses": ours["losses"],
               "project_gradient_checkpointing": ours["gradient_checkpointing"]}
        if cuda:
            rec.update(baseline_peak_allocated_gb=base["peak_allocated_gb"], peak_allocated_gb=ours["peak_allocated_gb"],
                       baseline_peak_reserved_gb=base["peak_reserved_gb"], peak_reserved_gb=ours["peak_reserved_gb"],
                       memory_ratio=round(ours["peak_allocated_gb"] / base["peak_allocated_gb"], 3))
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if "losses" not in k}), flush=True)
    print(f"\n{'method':10} {'base tok/s':>11} {'ours tok/s':>11} {'speedup':>8} {'base GB':>8} {'ours GB':>8} "
          f"{'mem ratio':>9} {'base loss':>10} {'ours loss':>10}")
    for r in records:
        print(f"{r['method']:10} {r['baseline_tokens_per_s']:>11.0f} {r['tokens_per_s']:>11.0f} {r['speedup']:>8.2f} "
              f"{r.get('baseline_peak_allocated_gb', float('nan')):>8.2f} {r.get('peak_allocated_gb', float('nan')):>8.2f} "
              f"{r.get('memory_ratio', float('nan')):>9.2f} {r['baseline_loss']:>10.4f} {r['loss']:>10.4f}")
    if args.out:
        args.out.write_text(json.dumps(records, indent=2) + "\n")
    return records


if __name__ == "__main__":
    main()
    sys.exit(0)
