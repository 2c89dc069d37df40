"""Do compiled layers (and their CUDA graphs) give every weight the gradient the uncompiled model gives? (GPU)

    python benchmarks/compiled_grads.py --out compiled_grads.json
    python benchmarks/compiled_grads.py --layers 2 --calls 1 --variants compiled --inductor triton.max_tiles=1
    python benchmarks/compiled_grads.py --method qlora --joins 48 1    # the adapter's gradients, rows of 512 tokens

A diagnosis for full-parameter training (GaLore), where every weight's gradient counts and a right loss proves
nothing. It builds gemma-3-1b's architecture with random bf16 weights, makes padded batches in two widths as the
training stages do (8 short rows, then 8 rows of five joined: the collator's width buckets), and computes, for
each call of a sequence alternating between them, the norm of every weight's gradient: once uncompiled (the
reference), then through ``fastpath.compile_layers`` without and with CUDA graphs (``aot_eager``: AOTAutograd's
graphs without inductor), every layer checkpointed. The gradients are read and dropped in each weight's
post-accumulate hook, as layer-wise GaLore does. A variant whose every call stays within ``--tol`` of the
reference on every weight is clear; otherwise the worst weights are printed per call. ``--inductor`` sets
inductor's global options (compile_layers' own take precedence; ``--layer-inductor`` overrides those), to find the
part of the compiler at fault: docs/gpu-speed.md has the sweep that found loop reordering after fusion.
``--method qlora`` or ``lora_wide`` checks a LoRA method's model instead, built as the training stages build it (the
4-bit NF4 base for QLoRA, the study's adapter settings, its B matrices drawn at random so that A's gradients are
not zero): the adapter's weights are then the ones compared. ``--opaque-4bit`` leaves QLoRA's 4-bit linears as
bitsandbytes' own autograd function instead of tracing them; ``--train-mode`` runs the model in training mode (LoRA
dropout on, so each call draws its own masks: only NaNs and gross differences then mean anything).
A CPU runs it too (small ``--layers``), without CUDA graphs. It exits non-zero when any call is off: the compiler's
faults depend on its version, so run it before trusting compiled training on another torch (README).
"""

from __future__ import annotations

import argparse
import ast
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_methods import write_train_data  # noqa: E402

from ftstudy import fastpath  # noqa: E402
from ftstudy.arch import GEMMA3_1B  # noqa: E402
from ftstudy.atomic import read_jsonl, write_json  # noqa: E402
from ftstudy.batches import Collator, tokenize_dataset  # noqa: E402
from ftstudy.loss import completion_loss  # noqa: E402
from ftstudy.models import train_tiny_tokenizer  # noqa: E402
from ftstudy.prepare import enable_checkpointing  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # a CPU runs it as a smoke test (no CUDA graphs there)


def make(layers: int):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**{**GEMMA3_1B, "num_hidden_layers": layers}),
                                                 dtype=torch.bfloat16, attn_implementation="eager")
    model.config.use_cache = False
    model.requires_grad_(True)
    return model


def make_method(method: str, base_dir: Path):
    """``method``'s model as the training stages prepare it, from the random base saved in ``base_dir``."""
    from ftstudy.methods import method_spec
    from ftstudy.params import default_params
    from ftstudy.prepare import attach_adapter, load_start_model

    spec = method_spec(default_params("full"), method)
    model = load_start_model(spec, base_dir, base_dir.parent)
    model.config.use_cache = False
    model.set_attn_implementation("eager")  # as make()'s: the reference computes attention as compiled layers do
    torch.manual_seed(1)  # A's initialisation too: every variant's adapter must be the reference's
    model = attach_adapter(model, spec, gradient_checkpointing=True)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # zero at init: A's gradients would be zero too, and prove nothing
            torch.nn.init.normal_(p, std=0.02)
    return model if spec.quantize_4bit else model.to(DEVICE)  # a 4-bit model is placed as it loads


def batches(rows: int, seq_len: int, joins=(1, 5)) -> list[dict]:
    """Padded batches of ``rows`` examples, one per ``joins`` (generated rows joined into one example), so of
    different widths; 48 joined fill ``seq_len``."""
    tokenizer = train_tiny_tokenizer(512, seed=0)
    out = []
    for join in joins:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rows.jsonl"
            write_train_data(path, join=join)
            examples = tokenize_dataset(tokenizer, read_jsonl(path)[:rows], seq_len, seq_len * 3 // 4)
        batch = Collator(0, width_buckets=4, row_len=seq_len)(examples)
        batch.pop("num_tokens")
        out.append({k: v.to(DEVICE) for k, v in batch.items()})
    return out


class Norms:
    """Each weight's gradient norm, taken (on the device) and the gradient dropped in its post-accumulate hook."""

    def __init__(self, model):
        self.got: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:  # a LoRA method's frozen base has none
                p.register_post_accumulate_grad_hook(lambda p, name=name: self._hook(name, p))

    @torch.no_grad()
    def _hook(self, name, p):
        self.got[name] = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        p.grad = None

    def call(self, model, batch) -> tuple[float, dict[str, float]]:
        self.got = {}
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = completion_loss(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"])
        loss.backward()
        names = list(self.got)
        values = torch.stack([self.got[n] for n in names]).tolist()
        return loss.item(), dict(zip(names, values, strict=True))


def global_norm(norms: dict[str, float]) -> float:
    return round(sum(v * v for v in norms.values()) ** 0.5, 4)


def compare(got: dict[str, float], ref: dict[str, float], tol: float) -> dict:
    rel = {n: abs(got.get(n, 0.0) - r) / max(r, 1e-6) for n, r in ref.items()}
    rel = {n: v if v == v else float("inf") for n, v in rel.items()}  # a NaN norm is as far off as can be
    worst = sorted(rel, key=lambda n: -rel[n])[:4]
    return {"total_norm": global_norm(got),
            "missing": sorted(set(ref) - set(got))[:4], "off": sum(v > tol for v in rel.values()),
            "nan": sorted(n for n, v in got.items() if v != v)[:6],
            "worst": {n: [round(got.get(n, 0.0), 5), round(ref[n], 5)] for n in worst}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calls", type=int, default=6, help="calls per variant, alternating the two widths")
    parser.add_argument("--joins", type=int, nargs=2, default=[1, 5], metavar="N",
                        help="generated rows joined per example in the two batches (48: every row seq-len tokens)")
    parser.add_argument("--variants", nargs="+", default=["compiled", "cuda_graphs"] if DEVICE == "cuda" else ["compiled"],
                        choices=["compiled", "cuda_graphs", "aot_eager"])
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings for the compiled variants (e.g. triton.max_tiles=1), to "
                             "find the part of the compiler at fault")
    parser.add_argument("--layer-inductor", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override compile_layers' own inductor options (e.g. loop_ordering_after_fusion=True)")
    parser.add_argument("--opaque-4bit", action="store_true",
                        help="QLoRA: keep bitsandbytes' 4-bit matmul instead of fastpath.trace_4bit_linears")
    parser.add_argument("--bf16-norms", action="store_true",
                        help="QLoRA: cast back to bf16 the norms prepare_model_for_kbit_training made fp32")
    parser.add_argument("--train-mode", action="store_true", help="model.train(): LoRA dropout as in training")
    parser.add_argument("--method", choices=["full", "qlora", "lora_wide"], default="full",
                        help="full: every weight of the bf16 model (GaLore's case); a LoRA method: its adapter's")
    parser.add_argument("--tol", type=float, default=0.05, help="relative difference of a weight's gradient norm")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    for setting in args.inductor:
        key, value = setting.split("=", 1)
        *path, name = key.split(".")
        setattr(functools.reduce(getattr, path, torch._inductor.config), name, ast.literal_eval(value))
    layer_options = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.layer_inductor)}
    if args.opaque_4bit:
        fastpath.trace_4bit_linears = lambda layer: None
    make_lora = make_method
    if args.bf16_norms:
        def make_lora(*a, **kw):  # the same model with its frozen fp32 weights (the norms) in bf16
            model = make_method(*a, **kw)
            for p in model.parameters():
                if p.dtype == torch.float32 and not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
            return model
    data = batches(args.rows, args.seq_len, args.joins)
    results = {"shapes": [list(b["input_ids"].shape) for b in data]}

    build = functools.partial(make, args.layers)
    if args.method != "full":
        base_dir = Path(tempfile.mkdtemp()) / "base"
        make(args.layers).save_pretrained(base_dir, safe_serialization=True)
        build = functools.partial(make_lora, args.method, base_dir)
    results["method"] = args.method
    results["settings"] = {"inductor": args.inductor, "layer_inductor": args.layer_inductor,
                           "opaque_4bit": args.opaque_4bit, "bf16_norms": args.bf16_norms, "train_mode": args.train_mode}
    model = build().train(args.train_mode)
    enable_checkpointing(model, 0)
    norms = Norms(model)
    reference = [norms.call(model, b) for b in data]
    results["reference"] = [{"loss": round(loss, 4), "total_norm": global_norm(g)} for loss, g in reference]
    print("reference", results["reference"], flush=True)
    del model, norms
    for variant in args.variants:
        torch._dynamo.reset()
        model = build().train(args.train_mode)
        enable_checkpointing(model, 0)
        compile_ = torch.nn.Module.compile

        def compile_as_asked(self, variant=variant, _compile=compile_, **kw):
            if variant == "aot_eager":  # AOTAutograd's graphs without inductor: tells its codegen from the rest
                kw = {"backend": "aot_eager", **{k: v for k, v in kw.items() if k != "options"}}
            else:
                kw["options"] = {**kw.get("options", {}), **layer_options}
            return _compile(self, **kw)

        torch.nn.Module.compile = compile_as_asked
        try:
            fastpath.compile_layers(model, cuda_graphs=variant == "cuda_graphs", shapes=2)
        finally:
            torch.nn.Module.compile = compile_
        norms = Norms(model)
        rows = []
        for i in range(args.calls):
            start = time.perf_counter()
            loss, got = norms.call(model, data[i % 2])
            row = {"call": i, "width": data[i % 2]["input_ids"].shape[1], "loss": round(loss, 4),
                   "ref_loss": results["reference"][i % 2]["loss"], "seconds": round(time.perf_counter() - start, 2),
                   **compare(got, reference[i % 2][1], args.tol)}
            rows.append(row)
            print(variant, row, flush=True)
        results[variant] = rows
        del model, norms
    off = [f"{v} call {row['call']}" for v in args.variants for row in results[v] if row["off"] or row["nan"]]
    results["clear"] = not off
    print("every weight's gradient matches the uncompiled model's" if not off else
          f"WRONG GRADIENTS ({', '.join(off)}): do not train "
          f"{'full-parameter methods' if args.method == 'full' else args.method} with train.compile on here; "
          f"set train.compile=off", flush=True)
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["clear"] else 1)
