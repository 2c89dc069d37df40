"""Evaluation throughput: the evaluate stage's generate() on a random-weight model, extrapolated to the study.

    python benchmarks/generation.py --arch gemma-3-1b --prompts 6000 --batch-size 2000 --batch-tokens 400000 \
        --tokenizer DIR --out gen.json                                                  # GPU, the study's settings
    python benchmarks/generation.py --arch tiny --prompts 16 --max-new-tokens 8         # CPU smoke

Both decoders of ``generate()`` run on the same prompts in one process: ``hf`` (transformers' ``generate``)
and ``ftstudy`` (``ftstudy.decode``); each row prints its speed-up over ``hf`` at the same batch size and the
share of answers identical to ``hf``'s; ``--rerank-k`` times the re-rank stage's sampling and scoring too.
The prompts are the project's own instruction rows (the test split's templates), tokenized by Gemma 3's
tokenizer with ``--tokenizer`` (realistic lengths) or else by a small BPE tokenizer whose ids are valid in any
vocabulary. A random model almost never emits EOS, so every row
generates the full ``--max-new-tokens``: the worst case of the study's evaluation (6,000 prompts x 256).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftstudy import synthetic  # noqa: E402
from ftstudy.arch import GEMMA3_1B  # noqa: E402
from ftstudy.generation import generate  # noqa: E402
from ftstudy.models import tiny_config, train_tiny_tokenizer  # noqa: E402
from ftstudy.params import default_params  # noqa: E402
from ftstudy.sources import convert_rows  # noqa: E402

STUDY_PROMPTS = 6000  # 2,000 test rows per source x 3 sources


def records(n: int) -> list[dict]:
    out = []
    for source, splits in synthetic.RAW_SPLITS.items():
        out += list(convert_rows(source, synthetic.generate(source, splits[-1], n, 1), 10**6, "last_turn"))
    return out[:n] if len(out) >= n else (out * (n // len(out) + 1))[:n]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["gemma-3-1b", "tiny"], default="gemma-3-1b")
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=768)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[512])
    parser.add_argument("--batch-tokens", type=int, default=0, help="evaluate.batch_tokens (0 = no cap)")
    parser.add_argument("--decoder", nargs="+", default=["hf", "ftstudy"], choices=["hf", "ftstudy"])
    parser.add_argument("--tokenizer", type=Path, help="a Gemma 3 tokenizer folder (default: a small BPE one)")
    parser.add_argument("--rerank-k", type=int, default=0,
                        help="also time the evaluate_rerank stage's rerank() (k sampled candidates per prompt, "
                             "scored by the same model) with each decoder; batch size = the first --batch-size")
    parser.add_argument("--profile", action="store_true", help="print the kernels of one short batch")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    if args.tokenizer:
        from ftstudy.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = train_tiny_tokenizer(512, seed=0)
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    config = (Gemma3TextConfig(**GEMMA3_1B) if args.arch == "gemma-3-1b"
              else tiny_config(default_params().model.tiny, len(tokenizer)))
    with torch.device("cuda" if cuda else "cpu"):  # random init on the GPU: a minute faster than on its CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32).eval()
    recs = records(args.prompts)
    print(f"setup {time.perf_counter() - t0:.1f}s", flush=True)
    results = []
    answers: dict[tuple[str, int], list[str]] = {}
    for bs, decoder in [(b, d) for b in args.batch_size for d in args.decoder]:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out, stats = generate(model, tokenizer, recs, max_new_tokens=args.max_new_tokens, batch_size=bs,
                              max_prompt_tokens=args.max_prompt_tokens, progress=False, batch_tokens=args.batch_tokens,
                              decoder="auto" if decoder == "ftstudy" else "hf")
        answers[decoder, bs] = out
        seconds = time.perf_counter() - start
        rec = {"arch": args.arch, "device": torch.cuda.get_device_name() if cuda else "cpu", "prompts": len(recs),
               "batch_size": bs, "batch_tokens": args.batch_tokens, "decoder": stats["decoder"],
               "max_new_tokens": args.max_new_tokens, "seconds": round(seconds, 2),
               "generated_tokens": stats["generated_tokens"],
               "generated_tokens_per_s": round(stats["generated_tokens"] / seconds, 1),
               "prompts_per_s": round(len(recs) / seconds, 2),
               "extrapolated_study_minutes": round(STUDY_PROMPTS / len(recs) * seconds / 60, 2)}
        if cuda:
            rec["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results.append(rec)
        for r in results:  # ours against transformers' at the same batch size, whichever ran first
            if r["decoder"] == "ftstudy" and ("hf", r["batch_size"]) in answers:
                base = next(b for b in results if b["batch_size"] == r["batch_size"] and b["decoder"] == "transformers")
                ours, theirs = answers["ftstudy", r["batch_size"]], answers["hf", r["batch_size"]]
                r["speedup_vs_hf"] = round(base["seconds"] / r["seconds"], 2)
                r["same_answers_as_hf"] = round(sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours), 4)
        print(json.dumps(rec), flush=True)
        if args.out:  # after every row: a run cut short keeps what it measured
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.rerank_k:
        from ftstudy.rerank import rerank

        r = default_params().rerank
        for decoder in args.decoder:
            start = time.perf_counter()
            _, _, timing = rerank(model, model, tokenizer, recs, k=args.rerank_k, temperature=r.temperature,
                                  top_p=r.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size[0],
                                  max_prompt_tokens=args.max_prompt_tokens, seed=0, progress=False,
                                  decoder="auto" if decoder == "ftstudy" else "hf")
            seconds = time.perf_counter() - start
            rec = {"arch": args.arch, "device": torch.cuda.get_device_name() if cuda else "cpu", "task": "rerank",
                   "prompts": len(recs), "k": args.rerank_k, "batch_size": args.batch_size[0], **timing,
                   "max_new_tokens": args.max_new_tokens, "seconds": round(seconds, 2),
                   "prompts_per_s": round(len(recs) / seconds, 2),
                   "extrapolated_study_minutes": round(STUDY_PROMPTS / len(recs) * seconds / 60, 2)}
            results.append(rec)
            print(json.dumps(rec), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate(model, tokenizer, recs[: args.batch_size[0]], max_new_tokens=8, batch_size=args.batch_size[0],
                     max_prompt_tokens=args.max_prompt_tokens, progress=False)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))
    print(f"{'decoder':>12} {'batch':>6} {'tokens/s':>10} {'study min':>9} {'vs hf':>6} {'same':>6}")
    for r in results:
        if r.get("task") == "rerank":
            print(f"rerank k={r['k']} {r['decoder']:>12} {r['batch_size']:>6} {r['prompts_per_s']:>8} prompts/s "
                  f"{r['extrapolated_study_minutes']:>9} study min (propose {r['propose_seconds']} s, "
                  f"score {r['score_seconds']} s)")
            continue
        print(f"{r['decoder']:>12} {r['batch_size']:>6} {r['generated_tokens_per_s']:>10,.0f} "
              f"{r['extrapolated_study_minutes']:>9} {r.get('speedup_vs_hf', ''):>6} {r.get('same_answers_as_hf', ''):>6}")
    return results


if __name__ == "__main__":
    main()
