"""Out-of-distribution test sets: any of the four schemas read, bad files refused clearly, references scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftstudy.errors import UserError
from ftstudy.heldout import read_test_set, reference_losses
from ftstudy.params import ParamsError, default_params
from ftstudy.prompt import IGNORE_INDEX, tokenize_example

FIXTURES = Path(__file__).parent / "fixtures"
SHIPPED = Path(__file__).parents[1] / "data/heldout/open_instructions.jsonl"


def test_the_shipped_set_has_over_100_distinct_items_with_references():
    rows = read_test_set(SHIPPED)
    assert len(rows) >= 100 and len({r["id"] for r in rows}) == len(rows)
    assert len({r["instruction"] for r in rows}) == len(rows) and all(len(r["response"].split()) >= 3 for r in rows)
    assert {r["source"] for r in rows} == {"open_instructions"}


def test_rows_in_the_unified_and_the_three_raw_schemas_are_read(tmp_path):
    lines = [json.dumps({"id": "u1", "instruction": "Say hi.", "input": "", "response": "Hi."})]
    for source in ("alpaca", "tulu", "ultrachat"):
        lines.append((FIXTURES / f"{source}.jsonl").read_text().splitlines()[0])
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows = read_test_set(path)
    assert len(rows) == 4 and {r["source"] for r in rows} == {"mixed"}
    assert rows[0] == {"id": "u1", "source": "mixed", "history": [], "instruction": "Say hi.", "input": "",
                       "response": "Hi."}
    assert all(r["instruction"] and r["response"] for r in rows)


def test_a_bad_set_is_refused_with_the_file_line_and_fix(tmp_path):
    with pytest.raises(UserError, match=r"does not exist; put the JSONL file under data/heldout/"):
        read_test_set(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: not a JSON object"):
        read_test_set(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(UserError, match=r"no usable row \(\{'missing_field': 1\}\)"):
        read_test_set(empty)
    twice = tmp_path / "twice.jsonl"
    twice.write_text("".join(json.dumps({"id": "x", "instruction": q, "response": "r"}) + "\n" for q in "ab"))
    with pytest.raises(UserError, match="ids repeat"):
        read_test_set(twice)


def test_sets_must_live_in_data_heldout_under_distinct_names():
    with pytest.raises(ParamsError, match=r"not \.jsonl files directly in data/heldout/"):
        default_params(evaluate=dict(extra_test_sets=["elsewhere/set.jsonl"]))
    with pytest.raises(ParamsError, match="repeat a file name"):
        default_params(evaluate=dict(extra_test_sets=["data/heldout/a.jsonl", "data/heldout/a.jsonl"]))
    assert default_params(evaluate=dict(extra_test_sets=[])).evaluate.extra_test_sets == []


def test_reference_loss_is_the_models_own_mean_token_loss_on_the_reference(tiny_model, tiny_tokenizer):
    """Teacher-forced, batched with left padding: each item's value equals transformers' mean cross-entropy over
    the reference's tokens and EOS, computed one item at a time with prompt positions masked."""
    rows = read_test_set(SHIPPED)[:5]
    losses = reference_losses(tiny_model, tiny_tokenizer, rows, max_prompt_tokens=256, max_response_tokens=512,
                              batch_size=3)
    for row, loss in zip(rows, losses, strict=True):
        ex = tokenize_example(tiny_tokenizer, row, max_seq_len=1024, max_prompt_tokens=256)
        labels = torch.tensor([ex["labels"]])
        assert (labels != IGNORE_INDEX).sum() > 1
        with torch.no_grad():
            expected = tiny_model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss
        assert loss == pytest.approx(float(expected), rel=1e-4)
