"""BLEU-4 and ROUGE-L against values computed by hand."""

import math

import pytest

from ftstudy.metrics import bleu4, rouge_l_items, score_by_source


def test_bleu_identical_is_100_and_disjoint_is_0():
    refs = ["the quick brown fox jumps over the lazy dog"]
    assert bleu4(refs, refs) == pytest.approx(100.0)
    assert bleu4(["zzz yyy xxx www"], refs) == pytest.approx(0.0)


def test_bleu_brevity_penalty_by_hand():
    # All n-gram precisions are 1; hypothesis length 4, reference 6: BP = exp(1 - 6/4).
    assert bleu4(["a b c d"], ["a b c d e f"]) == pytest.approx(100 * math.exp(1 - 6 / 4), rel=1e-6)


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat sat on the mat") = 3: P = 3/3, R = 3/6, F1 = 2PR/(P+R) = 2/3.
    assert rouge_l_items(["the cat sat"], ["the cat sat on the mat"]) == [pytest.approx(2 / 3)]
    assert rouge_l_items(["dog"], ["cat"]) == [0.0]


def test_score_by_source_splits_and_averages():
    rows = [{"source": "a", "prediction": "x y", "reference": "x y"},
            {"source": "b", "prediction": "q", "reference": "x y"}]
    s = score_by_source(rows)
    assert s["per_source"]["a"]["rouge_l_f1_0_1"] == 1.0 and s["per_source"]["b"]["rouge_l_f1_0_1"] == 0.0
    assert s["overall"]["rouge_l_f1_0_1"] == 0.5 and s["overall"]["n"] == 2
