"""Paired bootstrap intervals checked against cases whose answer is known independently."""

import random

import pytest

from ftstudy.metrics import bleu4, rouge_l_items
from ftstudy.stats import PairedBootstrap, bleu_from_stats, bleu_sentence_stats

WORDS = "the a cat dog sat ran on under mat rug red blue big small".split()


def _corpus(n=60, seed=0):
    rng = random.Random(seed)
    refs = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(n)]
    good = [r if i % 10 else r.split()[0] for i, r in enumerate(refs)]  # right 90 % of the time
    bad = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in refs]  # unrelated word salad
    return refs, good, bad


def test_bleu_from_sufficient_statistics_equals_sacrebleu():
    refs, good, bad = _corpus()
    for hyp in (good, bad):
        assert bleu_from_stats(bleu_sentence_stats(hyp, refs).sum(0)) == pytest.approx(bleu4(hyp, refs))


def _boot(refs, systems, resamples=500):
    boot = PairedBootstrap(refs, resamples, seed=1)
    for name, hyp in systems.items():
        boot.add(name, hyp, rouge_l_items(hyp, refs))
    return boot


def test_identical_systems_give_an_interval_around_zero():
    refs, good, _ = _corpus()
    boot = _boot(refs, {"a": good, "b": list(good)})
    for metric in ("bleu4", "rouge_l"):
        d = boot.difference("a", "b", metric)
        assert d.low <= 0 <= d.high and not d.excludes_zero


def test_a_clearly_better_system_excludes_zero_and_intervals_contain_the_estimate():
    refs, good, bad = _corpus()
    boot = _boot(refs, {"good": good, "bad": bad})
    for metric in ("bleu4", "rouge_l"):
        d = boot.difference("good", "bad", metric)
        assert d.excludes_zero and d.low > 0
        iv = boot.interval("good", metric)
        assert iv.low <= iv.estimate <= iv.high
    assert boot.points["good"]["bleu4"] == pytest.approx(bleu4(good, refs))


def test_a_small_difference_on_few_items_is_not_significant():
    refs, good, _ = _corpus(n=20)
    nearly = list(good)
    nearly[3] = nearly[3].split()[0]  # one item worse
    d = _boot(refs, {"a": good, "b": nearly}).difference("a", "b", "rouge_l")
    assert d.estimate > 0 and not d.excludes_zero
