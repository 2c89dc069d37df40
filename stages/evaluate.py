"""Stage evaluate@<model>: greedy generations on the test set, BLEU-4 and ROUGE-L overall and per source; the same
for each of evaluate.extra_test_sets, with the teacher-forced loss of their references."""

import argparse

from ftstudy.errors import run_stage
from ftstudy.evaluate import evaluate
from ftstudy.params import load_params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="a directory name under models/ (base, qlora, ...)")
    args = parser.parse_args()
    params = load_params()
    m = evaluate(args.model, f"models/{args.model}", "models/base", "data/processed/test.jsonl", params,
                 f"data/predictions/{args.model}.jsonl", f"metrics/eval/{args.model}.json",
                 f"data/showcase/{args.model}.jsonl", progress=params.ui.progress_bar)
    o = m["overall"]
    print(f"{args.model}: BLEU-4 {o['bleu4_corpus_0_100']:.2f} (0-100), ROUGE-L F1 {o['rouge_l_f1_0_1']:.4f} (0-1)")
    for name, e in m.get("extra_test_sets", {}).items():
        print(f"  {name} (outside the training distribution): reference loss {e['mean_reference_loss']:.4f}, "
              f"ROUGE-L F1 {e['rouge_l_f1_0_1']:.4f}")


if __name__ == "__main__":
    run_stage(main)
