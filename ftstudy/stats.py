"""Paired bootstrap confidence intervals for BLEU-4 and ROUGE-L, and for differences between systems.

Every system is scored on the same test items, so one set of resampled item indices is drawn and
applied to all systems: differences are then paired, which is what makes small real gains detectable.
Corpus BLEU is recomputed per resample from per-sentence sufficient statistics (n-gram matches and
lengths), so a resample costs a sum, not a re-tokenisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def bleu_sentence_stats(predictions: list[str], references: list[str]) -> np.ndarray:
    """(n, 10) sacrebleu statistics per item: hyp len, ref len, 4 matched and 4 total n-gram counts."""
    from sacrebleu.metrics import BLEU

    return np.asarray(BLEU()._extract_corpus_statistics(predictions, [references]), dtype=np.int64)


def bleu_from_stats(stats_sum: np.ndarray) -> float:
    from sacrebleu.metrics import BLEU

    return float(BLEU()._compute_score_from_stats([int(x) for x in stats_sum]).score)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"estimate": round(self.estimate, 6), "low": round(self.low, 6), "high": round(self.high, 6)}


def resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _interval(point: float, draws: np.ndarray, confidence: float) -> Interval:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Interval(point, float(low), float(high))


class PairedBootstrap:
    """Bootstrap draws of BLEU-4, ROUGE-L and (generated data) exact match for several systems over the same
    resampled items."""

    def __init__(self, references: list[str], n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95):
        self.references = references
        self.idx = resample_indices(len(references), n_resamples, seed)
        self.confidence = confidence
        self.points: dict[str, dict[str, float]] = {}
        self.draws: dict[str, dict[str, np.ndarray]] = {}

    def add(self, name: str, predictions: list[str], rouge_items: list[float],
            exact_items: list[int] | None = None, means: dict[str, list[float]] | None = None) -> None:
        """``exact_items``: 1/0 per item where references are exactly right (generated data), else None;
        ``means``: further per-item values whose mean is a metric (e.g. the reference loss)."""
        stats = bleu_sentence_stats(predictions, self.references)
        sums = stats[self.idx].sum(axis=1)  # (resamples, 10)
        self.points[name] = {"bleu4": bleu_from_stats(stats.sum(0))}
        self.draws[name] = {"bleu4": np.array([bleu_from_stats(s) for s in sums])}
        for metric, items in (("rouge_l", rouge_items), ("exact_match", exact_items), *(means or {}).items()):
            if items is not None:  # a mean over items: resampled items, resampled mean
                values = np.asarray(items, dtype=np.float64)
                self.points[name][metric] = float(values.mean())
                self.draws[name][metric] = values[self.idx].mean(axis=1)

    def metrics(self) -> list[str]:
        """The metrics every system has."""
        first = next(iter(self.points.values()), {})
        return [k for k in first if all(k in p for p in self.points.values())]

    def interval(self, name: str, metric: str) -> Interval:
        return _interval(self.points[name][metric], self.draws[name][metric], self.confidence)

    def difference(self, a: str, b: str, metric: str) -> Interval:
        """a minus b, paired over the same resamples; significant when the interval excludes 0."""
        point = self.points[a][metric] - self.points[b][metric]
        return _interval(point, self.draws[a][metric] - self.draws[b][metric], self.confidence)
