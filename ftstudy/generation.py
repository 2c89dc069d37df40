"""Batched greedy generation for evaluation."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ftstudy.prompt import clean_generation, tokenize_prompt


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        # Left padding: the last prompt token of every row sits at the same position, where generation starts.
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.inference_mode()
def generate(model, tokenizer, records: list[dict], *, max_new_tokens: int, batch_size: int,
             max_prompt_tokens: int, progress: bool = True) -> tuple[list[str], dict]:
    """Greedy completions for ``records`` (in input order) and generation statistics.

    Prompts are sorted by length before batching so a batch holds similar lengths and little padding.
    """
    encoded = [tokenize_prompt(tokenizer, r, max_prompt_tokens) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(records)
    device = next(model.parameters()).device
    new_tokens = 0
    start = time.perf_counter()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
        ids, mask = _left_pad([encoded[i] for i in batch], tokenizer.pad_token_id)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, top_p=None, top_k=None, temperature=None,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        gen = out[:, ids.shape[1]:]
        for row, i in enumerate(batch):
            toks = gen[row]
            stop = (toks == tokenizer.eos_token_id).nonzero()
            n = int(stop[0]) + 1 if len(stop) else len(toks)
            new_tokens += n
            outputs[i] = clean_generation(tokenizer.decode(toks[:n], skip_special_tokens=True))
    seconds = time.perf_counter() - start
    stats = {"generate_seconds": round(seconds, 2), "generated_tokens": new_tokens,
             "generated_tokens_per_s": round(new_tokens / seconds, 2) if seconds else 0.0}
    return outputs, stats
