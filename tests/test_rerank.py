"""Re-ranking: the scorer's mean log-likelihood, and that the most likely candidate wins."""

import pytest
import torch

from ftstudy import decode, synthetic
from ftstudy.generation import left_pad
from ftstudy.prompt import tokenize_prompt
from ftstudy.rerank import mean_logprob, rerank
from ftstudy.sources import convert_rows


def _recs(n):
    return list(convert_rows("alpaca", synthetic.generate("alpaca", "train", n, 4), 10**6, "last_turn"))


@pytest.mark.parametrize("chunk_bytes", [None, 3 * 4 * 512])  # the default; 3 positions' logits at a time
def test_mean_logprob_matches_a_direct_computation(tiny_model, tiny_tokenizer, monkeypatch, chunk_bytes):
    if chunk_bytes:
        monkeypatch.setattr("ftstudy.loss.LOGIT_CHUNK_BYTES", chunk_bytes)
    recs = _recs(3)
    prompts = [tokenize_prompt(tiny_tokenizer, r, 128) for r in recs]
    completions = [tiny_tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [1] for r in recs]
    got = mean_logprob(tiny_model, prompts, completions, tiny_tokenizer.pad_token_id)
    for p, c, g in zip(prompts, completions, got, strict=True):
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(tiny_model(input_ids=ids).logits[0].float(), -1)
        expected = torch.stack([logp[len(p) - 1 + j, tok] for j, tok in enumerate(c)]).mean()
        assert abs(g - float(expected)) < 1e-4


def test_rerank_keeps_the_candidate_the_scorer_likes_best(tiny_model, tiny_tokenizer):
    recs = _recs(4)
    chosen, candidates, timing = rerank(tiny_model, tiny_model, tiny_tokenizer, recs, k=3, temperature=1.0, top_p=1.0,
                                        max_new_tokens=6, batch_size=6, max_prompt_tokens=128, seed=0, progress=False)
    assert all(len(c) == 3 for c in candidates) and timing["generate_seconds"] > 0
    for rec, pick, cands in zip(recs, chosen, candidates, strict=True):
        prompt = tokenize_prompt(tiny_tokenizer, rec, 128)
        comps = [tiny_tokenizer(c, add_special_tokens=False)["input_ids"] + [1] for c in cands]
        scores = mean_logprob(tiny_model, [prompt] * 3, comps, tiny_tokenizer.pad_token_id)
        assert pick == cands[max(range(3), key=scores.__getitem__)]


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus distribution by its definition: sort, keep tokens while the mass before them is < top_p."""
    vals, idx = probs.sort(descending=True)
    vals = vals.masked_fill(vals.cumsum(0) - vals >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(0, idx, vals / vals.sum())


@pytest.mark.parametrize("spread", [1.0, 8.0])  # a peaked nucleus (inside the shortlist), a flat one (past it)
def test_nucleus_draws_follow_the_temperature_scaled_nucleus(spread):
    torch.manual_seed(0)
    vocab, temperature, top_p, n = 400, 0.7, 0.9, 100_000
    logits = torch.randn(vocab) * (4.0 / spread)
    expected = _nucleus(torch.softmax(logits / temperature, -1), top_p).double()
    if spread > 1:
        assert int((expected > 0).sum()) > 64  # the shortlist below cannot hold this nucleus
    draws = decode.nucleus_draw(logits.expand(n, -1), temperature, top_p, shortlist=64)
    freq = torch.bincount(draws, minlength=vocab).double() / n
    assert set(draws.unique().tolist()) <= set(expected.nonzero()[:, 0].tolist())  # never outside the nucleus
    # Total variation within twice its expected sampling noise (sum of E|freq - p| per token).
    noise = float(((expected * (1 - expected) / n).sqrt() * (2 / torch.pi) ** 0.5).sum())
    assert float((freq - expected).abs().sum()) < 2 * noise + 0.01


def test_sampling_with_a_one_token_nucleus_decodes_greedily(tiny_model, tiny_tokenizer):
    recs = _recs(4)
    ids, mask = left_pad([tokenize_prompt(tiny_tokenizer, r, 128) for r in recs], tiny_tokenizer.pad_token_id)
    greedy = decode.greedy(tiny_model, ids, mask, 8, tiny_tokenizer.eos_token_id)
    sampled = decode.sample(tiny_model, ids, mask, 8, tiny_tokenizer.eos_token_id, temperature=1.0, top_p=1e-6)
    assert torch.equal(greedy, sampled)
    with pytest.raises(ValueError, match="temperature > 0"):
        decode.sample(tiny_model, ids, mask, 8, tiny_tokenizer.eos_token_id, temperature=0.0, top_p=0.9)


@pytest.mark.parametrize("decoder", ["auto", "hf"])
def test_rerank_candidates_repeat_under_one_seed(tiny_model, tiny_tokenizer, decoder):
    recs = _recs(4)
    runs = [rerank(tiny_model, tiny_model, tiny_tokenizer, recs, k=3, temperature=1.0, top_p=0.95, max_new_tokens=6,
                   batch_size=6, max_prompt_tokens=128, seed=s, progress=False, decoder=decoder) for s in (0, 0, 1)]
    assert runs[0][2]["decoder"] == ("ftstudy" if decoder == "auto" else "transformers")
    assert runs[0][:2] == runs[1][:2] and runs[0][1] != runs[2][1]
