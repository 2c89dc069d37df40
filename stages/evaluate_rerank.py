"""Stage evaluate_rerank: seed 004's ensemble (one model proposes k candidates, another re-ranks them)."""

from ftstudy.errors import run_stage
from ftstudy.evaluate import evaluate_rerank
from ftstudy.params import load_params


def main() -> None:
    params = load_params()
    m = evaluate_rerank("models", "data/processed/test.jsonl", params, "data/predictions/rerank.jsonl",
                        "metrics/eval/rerank.json", progress=params.ui.progress_bar)
    o, g = m["overall"], m["generation"]
    print(f"rerank ({params.rerank.proposer} proposes {params.rerank.k}, {params.rerank.scorer} scores): "
          f"BLEU-4 {o['bleu4_corpus_0_100']:.2f}, ROUGE-L F1 {o['rouge_l_f1_0_1']:.4f}, {g['generate_seconds']} s")


if __name__ == "__main__":
    run_stage(main)
