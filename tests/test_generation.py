"""Batched greedy generation: batching does not change answers, and an interrupted run resumes."""

from __future__ import annotations

import json

import pytest

from ftstudy import synthetic
from ftstudy.generation import generate, plan_batches
from ftstudy.sources import convert_rows


def _recs(n=10):
    return list(convert_rows("ultrachat", synthetic.generate("ultrachat", "test_sft", n, 1), 10**6, "last_turn"))


def test_batched_left_padded_generation_equals_one_by_one(tiny_model, tiny_tokenizer):
    recs = _recs(6)
    batched, stats = generate(tiny_model, tiny_tokenizer, recs, max_new_tokens=6, batch_size=6,
                              max_prompt_tokens=256, progress=False)
    single, _ = generate(tiny_model, tiny_tokenizer, recs, max_new_tokens=6, batch_size=1,
                         max_prompt_tokens=256, progress=False)
    assert batched == single
    assert stats["generated_tokens"] > 0
    # Token-capped batches answer the same.
    capped, _ = generate(tiny_model, tiny_tokenizer, recs, max_new_tokens=6, batch_size=6, batch_tokens=120,
                         max_prompt_tokens=256, progress=False)
    assert capped == single


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_own_decoder_answers_exactly_as_transformers_generate(tiny_model, tiny_tokenizer, attention):
    """ftstudy.decode (fixed-width cache, masks built from the padding) against transformers' generate: the same
    tokens for left-padded batches of mixed lengths, with prompts and answers longer than the sliding window."""
    from ftstudy.prompt import tokenize_prompt

    recs = _recs(8) + list(convert_rows("alpaca", synthetic.generate("alpaca", "train", 8, 1), 10**6, "last_turn"))
    lengths = [len(tokenize_prompt(tiny_tokenizer, r, 256)) for r in recs]
    window = tiny_model.config.sliding_window
    assert max(lengths) > window > min(lengths)  # the window cuts into some prompts, not all
    saved = tiny_model.config._attn_implementation
    tiny_model.config._attn_implementation = attention
    try:
        for n in (1, 2, window + 10):  # prefill only; one step; decoding past the window
            ours, stats = generate(tiny_model, tiny_tokenizer, recs, max_new_tokens=n, batch_size=6,
                                   max_prompt_tokens=256, progress=False)
            theirs, ref = generate(tiny_model, tiny_tokenizer, recs, max_new_tokens=n, batch_size=6,
                                   max_prompt_tokens=256, progress=False, decoder="hf")
            assert (stats["decoder"], ref["decoder"]) == ("ftstudy", "transformers")
            assert ours == theirs and stats["generated_tokens"] == ref["generated_tokens"]
    finally:
        tiny_model.config._attn_implementation = saved


def test_long_prompts_get_smaller_batches_under_a_token_cap():
    lengths = [100, 90, 50, 40, 30, 20, 10, 10]
    order = list(range(8))  # longest first, as generate() sorts them
    assert plan_batches(order, lengths, batch_size=4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # 200 padded tokens: 2 rows of 100, then 4 of 50 (the cap counts rows x the batch's longest prompt).
    assert plan_batches(order, lengths, batch_size=4, batch_tokens=200) == [[0, 1], [2, 3, 4, 5], [6, 7]]
    assert plan_batches(order, lengths, batch_size=4, batch_tokens=10) == [[i] for i in order]  # never empty


def test_interrupted_generation_resumes_from_its_journal(tiny_model, tiny_tokenizer, tmp_path):
    recs = _recs(10)
    kw = dict(max_new_tokens=5, batch_size=4, max_prompt_tokens=256, progress=False)
    full, _ = generate(tiny_model, tiny_tokenizer, recs, **kw)
    journal = tmp_path / "j.jsonl"
    generate(tiny_model, tiny_tokenizer, recs, journal=journal, fingerprint="f1", **kw)
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 10
    # Simulate a kill after the first batch, mid-way through writing the second.
    journal.write_text("\n".join(lines[:5] + [lines[5][:7]]) + "\n")
    resumed, stats = generate(tiny_model, tiny_tokenizer, recs, journal=journal, fingerprint="f1", **kw)
    assert resumed == full and stats["resumed_items"] == 4
    # A journal made from other inputs is ignored.
    _, stats = generate(tiny_model, tiny_tokenizer, recs, journal=journal, fingerprint="other", **kw)
    assert stats["resumed_items"] == 0
    assert json.loads(journal.read_text().splitlines()[0]) == {"fingerprint": "other"}
