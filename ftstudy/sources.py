"""The three data sources: their raw hub schemas, converted to one record shape.

Unified record (one JSON object per line)::

    {id, source, instruction, input, response, history}

``history`` is a list of earlier ``{role, content}`` turns (empty for single-turn rows).

Multi-turn conversations (tulu-v2 and ultrachat_200k ``messages``) become ONE example each, so a
long conversation does not outweigh a short one. With ``multi_turn: last_turn`` (the default) the final
assistant message is the response, the user message before it the instruction, and every earlier turn
the history; the prompt renders the history, so a follow-up like "now sort them" stays answerable.
With ``first_turn`` only the opening exchange is kept and the history is empty.

Rows that cannot become a clean example are dropped and counted under one reason each
(:data:`DROP_REASONS`); nothing malformed is silently kept.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator

DROP_REASONS = (
    "not_a_mapping", "missing_field", "wrong_type", "invalid_text", "empty_instruction", "empty_response",
    "too_long", "bad_roles", "no_assistant_turn", "duplicate_id", "duplicate_content",
)

HUB_DATASETS = {
    "alpaca": {"repo": "tatsu-lab/alpaca", "splits": {"train": "train"}},
    "tulu": {"repo": "allenai/tulu-v2-sft-mixture", "splits": {"train": "train"}},
    "ultrachat": {"repo": "HuggingFaceH4/ultrachat_200k", "splits": {"train": "train_sft", "test": "test_sft"}},
}


class Dropped(Exception):
    """A raw row that cannot become an example; ``reason`` is one of DROP_REASONS."""

    def __init__(self, reason: str):
        assert reason in DROP_REASONS, reason
        super().__init__(reason)
        self.reason = reason


def _text(row: dict, key: str, *, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise Dropped("missing_field")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise Dropped("wrong_type")
    _check_text(value)
    return value.strip()


def _check_text(value: str) -> None:
    # Lone surrogates come from bytes that were not valid UTF-8; they break tokenizers and JSON writers.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Dropped("invalid_text") from None
    if "\x00" in value:
        raise Dropped("invalid_text")


def _record(source: str, rid: str, instruction: str, input_: str, response: str, history: list, max_chars: int) -> dict:
    if not instruction:
        raise Dropped("empty_instruction")
    if not response:
        raise Dropped("empty_response")
    if any(len(t) > max_chars for t in (instruction, input_, response)) or \
            sum(len(h["content"]) for h in history) > max_chars:
        raise Dropped("too_long")
    return {"id": rid, "source": source, "instruction": instruction, "input": input_,
            "response": response, "history": history}


def convert_alpaca(row: dict, index: int, max_chars: int, **_) -> dict:
    """tatsu-lab/alpaca: ``{instruction, input, output, text}``; ``text`` is derived and ignored."""
    if not isinstance(row, dict):
        raise Dropped("not_a_mapping")
    instruction = _text(row, "instruction")
    input_ = _text(row, "input", required=False)
    response = _text(row, "output")
    return _record("alpaca", f"alpaca-{index}", instruction, input_, response, [], max_chars)


def _messages(row: dict) -> list[dict]:
    msgs = row.get("messages")
    if msgs is None:
        raise Dropped("missing_field")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise Dropped("wrong_type")
    out = []
    for m in msgs:
        if "role" not in m or "content" not in m:
            raise Dropped("missing_field")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise Dropped("wrong_type")
        _check_text(m["content"])
        out.append({"role": m["role"], "content": m["content"].strip()})
    return out


def split_conversation(messages: list[dict], policy: str) -> tuple[list[dict], str, str]:
    """(history, instruction, response) from a chat; roles must alternate user/assistant after an optional system."""
    msgs = list(messages)
    history: list[dict] = []
    if msgs and msgs[0]["role"] == "system":
        history.append(msgs.pop(0))
    if not msgs:
        raise Dropped("no_assistant_turn")
    for i, m in enumerate(msgs):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise Dropped("bad_roles")
    if len(msgs) < 2:
        raise Dropped("no_assistant_turn")
    if len(msgs) % 2:  # a trailing user turn has no answer to learn; drop it, keep the rest
        msgs = msgs[:-1]
    if policy == "first_turn":
        return history, msgs[0]["content"], msgs[1]["content"]
    if policy == "last_turn":
        return history + msgs[:-2], msgs[-2]["content"], msgs[-1]["content"]
    raise ValueError(f"unknown multi_turn policy {policy!r}; allowed: last_turn, first_turn")


def _convert_chat(source: str, id_key: str, row: dict, index: int, max_chars: int, multi_turn: str) -> dict:
    """A chat-shaped row (``messages`` plus an id field) to a record; the two chat sources differ only in names."""
    if not isinstance(row, dict):
        raise Dropped("not_a_mapping")
    rid = row.get(id_key)
    if rid is not None and not isinstance(rid, str):
        raise Dropped("wrong_type")
    history, instruction, response = split_conversation(_messages(row), multi_turn)
    return _record(source, f"{source}-{rid or index}", instruction, "", response, history, max_chars)


def convert_tulu(row: dict, index: int, max_chars: int, multi_turn: str = "last_turn") -> dict:
    """allenai/tulu-v2-sft-mixture: ``{dataset, id, messages: [{role, content}]}``."""
    return _convert_chat("tulu", "id", row, index, max_chars, multi_turn)


def convert_ultrachat(row: dict, index: int, max_chars: int, multi_turn: str = "last_turn") -> dict:
    """HuggingFaceH4/ultrachat_200k: ``{prompt, prompt_id, messages: [{content, role}]}``."""
    return _convert_chat("ultrachat", "prompt_id", row, index, max_chars, multi_turn)


CONVERTERS = {"alpaca": convert_alpaca, "tulu": convert_tulu, "ultrachat": convert_ultrachat}


def content_key(rec: dict) -> str:
    """A hash of what the model sees and must produce; equal keys are duplicates (whitespace/case-insensitive)."""
    parts = [h["role"] + ":" + h["content"] for h in rec["history"]] + [rec["instruction"], rec["input"], rec["response"]]
    norm = "\x1f".join(" ".join(p.lower().split()) for p in parts)
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()


def convert_rows(source: str, rows: Iterable, max_chars: int, multi_turn: str,
                 seen_ids: set | None = None, seen_content: set | None = None,
                 drops: Counter | None = None) -> Iterator[dict]:
    """Convert raw rows, dropping and counting bad ones; ``seen_*`` carry dedup state across splits."""
    seen_ids = set() if seen_ids is None else seen_ids
    seen_content = set() if seen_content is None else seen_content
    drops = Counter() if drops is None else drops
    convert = CONVERTERS[source]
    for i, row in enumerate(rows):
        try:
            rec = convert(row, index=i, max_chars=max_chars, multi_turn=multi_turn)
            if rec["id"] in seen_ids:
                raise Dropped("duplicate_id")
            key = content_key(rec)
            if key in seen_content:
                raise Dropped("duplicate_content")
        except Dropped as d:
            drops[d.reason] += 1
            continue
        seen_ids.add(rec["id"])
        seen_content.add(key)
        yield rec
