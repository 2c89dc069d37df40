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


@pytest.mark.parametrize("prediction, reference, right", [
    ("863 - 625 = 238", "863 - 625 = 238", True),
    ("863 - 625 = 4625", "863 - 625 = 238", False),                 # ROUGE-L 0.67, yet wrong
    ("  863 - 625   =  238.", "863 - 625 = 238", True),            # whitespace, trailing punctuation
    ("863 - 625 = 238.0", "863 - 625 = 238", True),                # numbers compared as numbers
    ("151 hours is 9,060 minutes.", "151 hours is 9060 minutes.", True),
    ('The letter "U" appears 0 times in "apple"!', 'The letter "u" appears 0 times in "apple".', True),  # case
    ("The letter u appears 0 times in apple.", 'The letter "u" appears 0 times in "apple".', False),     # quotes count
    ("3, 5, 7", "3, 7, 5", False),                                 # order matters (a sorted list)
    ("238", "863 - 625 = 238", False),                             # the whole reference, not a part of it
    ("", "863 - 625 = 238", False),
])
def test_exact_match_normalises_formatting_only(prediction, reference, right):
    from ftstudy.metrics import exact_match

    assert exact_match(prediction, reference) is right


def test_wilson_interval_by_hand_and_at_the_edges():
    from ftstudy.metrics import accuracy, wilson

    low, high = wilson(5, 10)  # p = 0.5, n = 10, z = 1.96: 0.5 -/+ 1.96 * sqrt(0.025 + 0.0096) / 1.384
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and 0 < wilson(0, 10)[1] < 0.3 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert accuracy([True, False, False, True]) == {"exact_match_0_1": 0.5, "low": pytest.approx(0.15, abs=0.01),
                                                    "high": pytest.approx(0.85, abs=0.01), "n": 4}


def test_every_generated_test_item_has_its_task_family_and_hub_data_has_none():
    """Exact match per family needs the family of each test item; the row keeps its hub schema, so the family
    is regenerated from the data params. Hub data has no single right answer: no families, no accuracy."""
    import dataclasses
    import random
    import tempfile
    from pathlib import Path

    from ftstudy.atomic import read_jsonl
    from ftstudy.data import fetch_data, preprocess, task_families
    from ftstudy.params import default_params
    from ftstudy.synthetic import FAMILIES

    p = default_params("micro")
    families = task_families(p.data, p.seed)
    known = {make(random.Random(0)).family for make in FAMILIES.values()}
    known |= {f"conversation_{k}" for k in ("numbers", "word", "country", "sentence")}
    assert set(families.values()) <= known and len(set(families.values())) > 10
    with tempfile.TemporaryDirectory() as td:
        fetch_data(p.data, p.seed, Path(td) / "raw")
        preprocess(p.data, p.seed, Path(td) / "raw", Path(td) / "processed")
        test = read_jsonl(Path(td) / "processed/test.jsonl")
    assert test and all(r["id"] in families for r in test)
    assert task_families(dataclasses.replace(p.data, source="hub"), p.seed) == {}
