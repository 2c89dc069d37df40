"""Test sets outside the training distribution (``evaluate.extra_test_sets``): what fine-tuning costs elsewhere.

Each set is a JSONL file under ``data/heldout/`` (that folder is a dependency of every evaluation, so adding or
editing a set reruns the evaluations and the report, nothing else). Rows may be in the project's unified schema
(``instruction``, ``input``, ``response``) or in any of the three raw hub schemas; every model answers each set
with the same greedy decoding as the main test set (BLEU-4, ROUGE-L) and is scored on its reference answers by
teacher forcing: the mean per-token loss of the reference (EOS included) given the prompt, which does not
depend on decoding.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ftstudy.errors import UserError
from ftstudy.params import HELDOUT_DIR
from ftstudy.prompt import tokenize_prompt
from ftstudy.sources import CONVERTERS, Dropped

FOLDER = HELDOUT_DIR


def set_name(path: str | Path) -> str:
    return Path(path).stem


def _schema(row: dict) -> str:
    if "response" in row and "instruction" in row:
        return "unified"
    if "output" in row and "instruction" in row:
        return "alpaca"
    if "prompt_id" in row:
        return "ultrachat"
    if "messages" in row:
        return "tulu"
    raise Dropped("missing_field")


def _unified(row: dict, name: str, line_no: int) -> dict:
    fields = {k: row.get(k) or "" for k in ("instruction", "input", "response")}
    if not all(isinstance(v, str) for v in fields.values()):
        raise Dropped("wrong_type")
    if not fields["instruction"].strip():
        raise Dropped("empty_instruction")
    if not fields["response"].strip():
        raise Dropped("empty_response")
    return {"id": str(row.get("id") or f"{name}-{line_no}"), "source": name, "history": [],
            **{k: v.strip() for k, v in fields.items()}}


def read_test_set(path: str | Path, max_chars: int = 100_000) -> list[dict]:
    """A set's rows as unified records (``source`` = the set's name); a clear error for a file that cannot be
    one, naming the path, the line and what is expected."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"evaluate.extra_test_sets: {path} does not exist; put the JSONL file under {FOLDER}/ "
                        "or remove it from the list")
    name, records, drops = set_name(path), [], Counter()
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{line_no}: not a JSON object; each line must be one row "
                                "(the unified schema: instruction, input, response)") from None
            try:
                if not isinstance(row, dict):
                    raise Dropped("not_a_mapping")
                kind = _schema(row)
                if kind == "unified":
                    rec = _unified(row, name, line_no)
                else:
                    rec = CONVERTERS[kind](row, index=line_no, max_chars=max_chars, multi_turn="last_turn")
                    rec["source"] = name
            except Dropped as d:
                drops[d.reason] += 1
                continue
            records.append(rec)
    if not records:
        raise UserError(f"{path}: no usable row ({dict(drops) or 'empty file'}); expected JSONL rows with "
                        "instruction, input, response (or a raw alpaca / tulu / ultrachat row)")
    ids = Counter(r["id"] for r in records)
    if max(ids.values()) > 1:
        raise UserError(f"{path}: ids repeat ({', '.join(i for i, c in ids.items() if c > 1)[:200]}); "
                        "give every row its own id")
    return records


def read_test_sets(paths: list[str]) -> dict[str, list[dict]]:
    """Every configured set, read (and so checked) before a model is loaded."""
    return {set_name(p): read_test_set(p) for p in paths}


@torch.inference_mode()
def reference_losses(model, tokenizer, records: list[dict], *, max_prompt_tokens: int, max_response_tokens: int,
                     batch_size: int) -> list[float]:
    """Per record, the mean per-token negative log-likelihood of its reference answer (EOS included) given its
    prompt: teacher-forced, so it measures the model, not its decoding."""
    from ftstudy.rerank import mean_logprob

    prompts = [tokenize_prompt(tokenizer, r, max_prompt_tokens) for r in records]
    answers = [tokenizer(r["response"], add_special_tokens=False)["input_ids"][:max_response_tokens]
               + [tokenizer.eos_token_id] for r in records]
    losses: list[float] = []
    for start in range(0, len(records), batch_size):
        part = slice(start, start + batch_size)
        losses += [-lp for lp in mean_logprob(model, prompts[part], answers[part], tokenizer.pad_token_id)]
    return losses
