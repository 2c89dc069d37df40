"""Batched greedy generation: batching does not change answers, and an interrupted run resumes."""

from __future__ import annotations

import json

from ftstudy import synthetic
from ftstudy.generation import generate
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
