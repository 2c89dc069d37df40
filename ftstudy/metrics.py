"""BLEU-4 and ROUGE-L, computed directly with sacrebleu and rouge-score (no hub-fetched metric scripts).

Scales, stated once and carried in every key name:
- ``bleu4_corpus_0_100``: sacrebleu corpus BLEU (4-gram, 13a tokenizer, exponential smoothing), 0-100.
- ``rouge_l_f1_0_1``: mean over items of rouge-score's ROUGE-L F1 (Porter stemming), 0-1.
- ``exact_match_0_1``: for generated data, whose references are computed and exactly right, the share of
  predictions equal to the reference after :func:`normalise`; absent for hub data (no single right answer).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_TOKEN = re.compile(rf"{_NUMBER.pattern}|\w+|[^\w\s]")  # a number, a word, or one punctuation mark


def normalise(text: str) -> list:
    """Tokens compared by exact match: lower case, whitespace collapsed, trailing punctuation dropped, and
    numbers as numbers ("238.0" equals "238", "1,000" equals "1000")."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower()).strip().rstrip(".!?;:").strip()
    return [float(tok) if _NUMBER.fullmatch(tok) else tok for tok in _TOKEN.findall(text)]


def exact_match(prediction: str, reference: str) -> bool:
    return normalise(prediction) == normalise(reference)


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default): sound at 0 %, 100 % and small n."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(hits: list[bool]) -> dict:
    low, high = wilson(sum(hits), len(hits))
    return {"exact_match_0_1": round(sum(hits) / len(hits), 6) if hits else 0.0, "low": round(low, 6),
            "high": round(high, 6), "n": len(hits)}


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


def accuracy_by(rows: list[dict]) -> dict:
    """Exact-match accuracy with Wilson intervals, overall, per source and per task family."""
    groups: dict[str, dict[str, list[bool]]] = {"per_source": defaultdict(list), "per_family": defaultdict(list)}
    for r in rows:
        groups["per_source"][r["source"]].append(bool(r["exact_match"]))
        groups["per_family"][r["family"]].append(bool(r["exact_match"]))
    return {"overall": accuracy([bool(r["exact_match"]) for r in rows]),
            **{k: {name: accuracy(hits) for name, hits in sorted(g.items())} for k, g in groups.items()}}
