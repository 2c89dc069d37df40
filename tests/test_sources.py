"""Converters on fixtures written in each hub dataset's exact schema, and the drop reasons."""

from collections import Counter
from pathlib import Path

import pytest

from ftstudy.atomic import read_jsonl
from ftstudy.sources import Dropped, convert_rows, convert_tulu, split_conversation

FIX = Path(__file__).parent / "fixtures"


def _convert(source, policy="last_turn", max_chars=20000):
    drops = Counter()
    recs = list(convert_rows(source, read_jsonl(FIX / f"{source}.jsonl"), max_chars, policy, drops=drops))
    return recs, {k: v for k, v in drops.items() if v}


def test_alpaca_rows_become_records_and_bad_rows_are_counted_per_reason():
    recs, drops = _convert("alpaca")
    assert [r["instruction"] for r in recs] == ["Give three tips for staying healthy.", "Translate the sentence to French."]
    assert recs[1]["input"] == "I like cheese." and recs[1]["response"] == "J'aime le fromage."
    assert recs[0]["history"] == [] and recs[0]["source"] == "alpaca"
    assert drops == {"empty_response": 1, "empty_instruction": 1, "missing_field": 1, "wrong_type": 1,
                     "duplicate_content": 1}


def test_tulu_keeps_last_turn_with_system_and_history():
    recs, drops = _convert("tulu")
    assert len(recs) == 2
    multi = recs[1]
    assert multi["id"] == "tulu-sharegpt_1"
    assert multi["instruction"] == "And the next one?" and multi["response"] == "11 is the next prime."
    assert [h["role"] for h in multi["history"]] == ["system", "user", "assistant"]
    assert drops == {"bad_roles": 1, "no_assistant_turn": 1, "duplicate_id": 1, "wrong_type": 1, "empty_response": 1}


def test_tulu_first_turn_policy_keeps_only_the_opening_exchange():
    recs, _ = _convert("tulu", policy="first_turn")
    assert recs[1]["instruction"] == "Name a prime number." and recs[1]["response"] == "7 is prime."
    assert [h["role"] for h in recs[1]["history"]] == ["system"]


def test_ultrachat_multi_turn_and_trailing_user_turn():
    recs, drops = _convert("ultrachat")
    assert recs[0]["id"] == "ultrachat-5d41402abc4b2a76b9719d911017c592"
    assert recs[0]["instruction"] == "Why are the colours always in the same order?"
    assert recs[0]["history"][0] == {"role": "user", "content": "How does a rainbow form?"}
    # the unanswered final user turn is dropped, the answered exchange kept
    assert recs[1]["instruction"] == "Write a haiku about rain." and recs[1]["history"] == []
    assert drops == {"bad_roles": 1, "missing_field": 1}


def test_invalid_text_and_too_long_are_dropped():
    bad = {"dataset": "x", "id": "a", "messages": [{"role": "user", "content": "bad \udcff bytes"},
                                                   {"role": "assistant", "content": "ok"}]}
    with pytest.raises(Dropped) as e:
        convert_tulu(bad, index=0, max_chars=100)
    assert e.value.reason == "invalid_text"
    long = {"dataset": "x", "id": "b", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 101}]}
    with pytest.raises(Dropped) as e:
        convert_tulu(long, index=0, max_chars=100)
    assert e.value.reason == "too_long"
    drops = Counter()
    assert list(convert_rows("alpaca", ["not a dict", None], 100, "last_turn", drops=drops)) == []
    assert drops["not_a_mapping"] == 2


def test_split_conversation_rejects_unknown_policy():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="last_turn, first_turn"):
        split_conversation(msgs, "middle_turn")
