"""Which attention path gives compiled Gemma 3 layers wrong gradients on packed rows? (a diagnosis, on a GPU)

    python benchmarks/packed_grads.py --out packed_grads.json

On an H200 (torch 2.11, transformers 5.17) compiled decoder layers computed wrong weight gradients for a packed
row of short examples (the last layer's q_proj gradient 25.0 against 0.0013 eager; see
``ftstudy.batches.packed_batches``). This builds gemma-3-1b's architecture with random weights, takes one packed
1 x 512 row of 8 generated examples, and compares the gradients of the eager model with those of compiled
layers (no CUDA graphs) under each attention path: SDPA with its default backend choice, SDPA restricted to the
math, memory-efficient or cuDNN kernel, and transformers' eager attention. A path whose compiled gradients match
the eager ones (``bad_layers`` 0, ``last_q_max`` near the eager value) on both calls is clear of the fault.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

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


def make(attn: str, layers: int):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**{**GEMMA3_1B, "num_hidden_layers": layers}),
                                                 dtype=torch.bfloat16, attn_implementation=attn)
    model.config.use_cache = False
    return model


def grads(model, batch) -> dict:
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = completion_loss(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"], None,
                               position_ids=batch.get("position_ids"))
    loss.backward()
    q = [layer.self_attn.q_proj.weight.grad.float() for layer in model.model.layers]
    return {"loss": round(loss.item(), 4), "last_q_max": round(q[-1].abs().max().item(), 5),
            "first_q_max": round(q[0].abs().max().item(), 5),
            "bad_layers": sum(not bool(torch.isfinite(g).all()) or g.abs().max().item() > 1 for g in q)}


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--padded", action="store_true",
                        help="the 8 examples as a padded 8 x 128 batch with an attention mask (what compiled layers "
                             "get in the stages) instead of one packed row")
    parser.add_argument("--backends", nargs="+", default=["default", "MATH", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION",
                                                          "eager"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    data = Path("/tmp/packed_grads.jsonl")
    write_train_data(data)
    tokenizer = train_tiny_tokenizer(512, seed=0)
    examples = tokenize_dataset(tokenizer, read_jsonl(data)[:8], 512, 384)
    batch = (Collator(0, width_buckets=4, row_len=512) if args.padded else Collator(0, pack=True, row_len=512))(examples)
    batch.pop("num_tokens")  # a host-side count, not a model input
    batch = {k: v.cuda() for k, v in batch.items()}
    results = {"batch_shape": list(batch["input_ids"].shape), "eager": grads(make("sdpa", args.layers), batch)}
    print("eager", results["eager"], flush=True)
    variants = [("eager", None) if b == "eager" else ("sdpa", None if b == "default" else getattr(SDPBackend, b))
                for b in args.backends]
    for attn, backend in variants:
        name = f"compiled {attn} {backend.name if backend else 'default'}"
        torch._dynamo.reset()
        model = make(attn, args.layers)
        fastpath.compile_layers(model, cuda_graphs=False)
        start = time.perf_counter()
        try:
            if backend is None:
                got = [grads(model, batch) for _ in range(2)]
            else:
                with sdpa_kernel([backend]):
                    got = [grads(model, batch) for _ in range(2)]
        except Exception as err:  # a backend that cannot take this mask: recorded, not fatal
            got = f"{type(err).__name__}: {str(err)[:300]}"
        results[name] = got
        print(name, got, f"{time.perf_counter() - start:.1f} s", flush=True)
        del model
        torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
