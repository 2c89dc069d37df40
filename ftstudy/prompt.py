"""The seeds' prompt template and its tokenization; training and evaluation both use only this module.

    ### Instruction:
    {instruction}

    ### Input:            (only when there is an input or history)
    {history, then input}

    ### Response:
    {response}<eos>
"""

from __future__ import annotations

import re

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
RESPONSE_HEADER = "### Response:\n"
_NEXT_SECTION = re.compile(r"(?m)^###")
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def build_prompt(rec: dict) -> str:
    """The prompt text up to and including the response header (what generation continues from)."""
    context = [f"{ROLE_NAMES.get(h['role'], h['role'])}: {h['content']}" for h in rec.get("history") or []]
    input_part = "\n".join(filter(None, ["\n".join(context), rec.get("input", "")]))
    text = f"### Instruction:\n{rec['instruction']}\n\n"
    if input_part:
        text += f"### Input:\n{input_part}\n\n"
    return text + RESPONSE_HEADER


def clean_generation(text: str) -> str:
    """Cut a generation at the next template section, which a base model tends to invent ("### Answer:").

    Applied identically to every model, so the base is not penalised for text past its answer that a
    fine-tuned model learns to end with EOS instead.
    """
    m = _NEXT_SECTION.search(text)
    return (text[: m.start()] if m else text).strip()


def tokenize_prompt(tokenizer, rec: dict, max_prompt_tokens: int) -> list[int]:
    """Prompt ids with BOS; an over-long prompt keeps BOS and its END (the instruction nearest the response)."""
    ids = tokenizer(build_prompt(rec), add_special_tokens=True)["input_ids"]
    if len(ids) > max_prompt_tokens:
        keep_bos = ids[:1] if ids and ids[0] == tokenizer.bos_token_id else []
        ids = keep_bos + ids[len(ids) - (max_prompt_tokens - len(keep_bos)):]
    return ids


def tokenize_example(tokenizer, rec: dict, max_seq_len: int, max_prompt_tokens: int) -> dict:
    """input_ids and labels for completion-only training.

    Prompt positions get IGNORE_INDEX so only the response is learned. EOS is appended and kept in the
    labels: it is how the model learns to stop. A response cut by ``max_seq_len`` gets no EOS, so a
    truncated answer never teaches the model to stop mid-sentence.
    """
    prompt = tokenize_prompt(tokenizer, rec, min(max_prompt_tokens, max_seq_len - 1))
    response = tokenizer(rec["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_seq_len - len(prompt)
    response = response[:room]
    return {
        "input_ids": prompt + response,
        "labels": [IGNORE_INDEX] * len(prompt) + response,
    }
