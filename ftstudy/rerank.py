"""Seed 004's ensemble, measured: one model proposes k sampled candidates, another picks by likelihood.

The proposer (QLoRA by default: cheap to serve) samples ``k`` candidates per prompt; the scorer (GaLore
by default) scores each by the mean log-likelihood of its tokens, EOS included, given the prompt; the
best is the answer. Mean rather than summed log-likelihood, so short candidates are not favoured just for
being short.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ftstudy import decode
from ftstudy.generation import left_pad
from ftstudy.loss import chunk_rows, head_ce
from ftstudy.models import causal_lm
from ftstudy.prompt import clean_generation, tokenize_prompt


@torch.inference_mode()
def mean_logprob(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> list[float]:
    """Mean log-probability of each completion's tokens given its prompt.

    One decoder pass per batch; the vocabulary projection runs only at completion positions (the same
    trick as the training loss), so scoring k candidates does not build k full-vocabulary logit tensors, and
    over as many of them at a time as ``ftstudy.loss`` allows its logits.
    """
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    ids, mask = left_pad(seqs, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    lm = causal_lm(model)
    hidden = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    width = ids.shape[1]
    # Left padding: a completion of length n occupies the last n positions; position t predicts t + 1.
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for row, c in enumerate(completion_ids):
        keep[row, width - len(c):] = True
    targets = ids[:, 1:][keep[:, 1:]]
    # A chunk of positions at a time: a GPU batch of candidates can hold a million of them, and their logits
    # at once would not fit any card.
    chunk = chunk_rows(lm.config.vocab_size)
    nll = torch.cat([head_ce(lm, h, t, reduction="none")
                     for h, t in zip(hidden[:, :-1][keep[:, 1:]].split(chunk), targets.split(chunk), strict=True)])
    lengths = [len(c) for c in completion_ids]
    return [float(-part.mean()) for part in torch.split(nll, lengths)]


@torch.inference_mode()
def rerank(proposer, scorer, tokenizer, records: list[dict], *, k: int, temperature: float, top_p: float,
           max_new_tokens: int, batch_size: int, max_prompt_tokens: int, seed: int,
           progress: bool = True, decoder: str = "auto") -> tuple[list[str], list[list[str]], dict]:
    """(chosen answer per record, all candidates per record, timing statistics).

    ``decoder`` as in ``ftstudy.generation.generate``: ``auto`` samples with ``ftstudy.decode.sample`` where the
    proposer supports it, ``hf`` with transformers' ``generate``; same distribution, different draws.
    """
    if decoder not in ("auto", "hf"):
        raise ValueError(f"decoder must be 'auto' or 'hf', not {decoder!r}")
    own = decoder == "auto" and decode.supports(proposer)
    encoded = [tokenize_prompt(tokenizer, r, max_prompt_tokens) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(encoded[i]), reverse=True)
    chosen, candidates = [""] * len(records), [[] for _ in records]
    device = next(proposer.parameters()).device
    propose_s = score_s = 0.0
    torch.manual_seed(seed)
    per_batch = max(1, batch_size // k)  # k sequences per prompt share the batch
    batches = [order[i:i + per_batch] for i in range(0, len(order), per_batch)]
    for batch in tqdm(batches, desc="rerank", disable=not progress, unit="batch"):
        t0 = time.perf_counter()
        ids, mask = left_pad([encoded[i] for i in batch], tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        if own:  # k rows per prompt, next to each other as generate's num_return_sequences lays them out
            out = decode.sample(proposer, ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0),
                                max_new_tokens, tokenizer.eos_token_id, temperature=temperature, top_p=top_p)
        else:
            out = proposer.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=True, temperature=temperature, top_p=top_p, top_k=None, num_return_sequences=k,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )[:, ids.shape[1]:]
        out = out.cpu()
        t1 = time.perf_counter()
        prompts, completions, owners, texts = [], [], [], []
        for row in range(out.shape[0]):
            i = batch[row // k]
            toks = out[row].tolist()
            if tokenizer.eos_token_id in toks:
                toks = toks[:toks.index(tokenizer.eos_token_id) + 1]
            text = clean_generation(tokenizer.decode(toks, skip_special_tokens=True))
            candidates[i].append(text)
            texts.append(text)
            prompts.append(encoded[i])
            completions.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            owners.append(i)
        scores = mean_logprob(scorer, prompts, completions, tokenizer.pad_token_id)
        best: dict[int, tuple[float, str]] = {}
        for i, cand, score in zip(owners, texts, scores, strict=True):
            if i not in best or score > best[i][0]:
                best[i] = (score, cand)
        for i, (_, text) in best.items():
            chosen[i] = text
        propose_s += t1 - t0
        score_s += time.perf_counter() - t1
    return chosen, candidates, {"propose_seconds": round(propose_s, 2), "score_seconds": round(score_s, 2),
                                "generate_seconds": round(propose_s + score_s, 2),
                                "decoder": "ftstudy" if own else "transformers"}
