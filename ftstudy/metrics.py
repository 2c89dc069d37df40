"""BLEU-4 and ROUGE-L, computed directly with sacrebleu and rouge-score (no hub-fetched metric scripts).

Scales, stated once and carried in every key name:
- ``bleu4_corpus_0_100``: sacrebleu corpus BLEU (4-gram, 13a tokenizer, exponential smoothing), 0-100.
- ``rouge_l_f1_0_1``: mean over items of rouge-score's ROUGE-L F1 (Porter stemming), 0-1.
"""

from __future__ import annotations

from collections import defaultdict


def bleu4(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def rouge_l_items(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def summarize(predictions: list[str], references: list[str], rouge_items: list[float] | None = None) -> dict:
    rouge_items = rouge_l_items(predictions, references) if rouge_items is None else rouge_items
    return {
        "bleu4_corpus_0_100": round(bleu4(predictions, references), 4),
        "rouge_l_f1_0_1": round(sum(rouge_items) / len(rouge_items), 6) if rouge_items else 0.0,
        "n": len(predictions),
    }


def score_by_source(rows: list[dict]) -> dict:
    """``rows``: dicts with source, prediction, reference; returns overall and per-source summaries."""
    items = rouge_l_items([r["prediction"] for r in rows], [r["reference"] for r in rows])
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_source[r["source"]].append(i)

    def pick(idx):
        return summarize([rows[i]["prediction"] for i in idx], [rows[i]["reference"] for i in idx],
                         [items[i] for i in idx])

    return {
        "overall": pick(range(len(rows))),
        "per_source": {s: pick(idx) for s, idx in sorted(by_source.items())},
        "rouge_l_items": items,
    }
