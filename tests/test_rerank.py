"""Re-ranking: the scorer's mean log-likelihood, and that the most likely candidate wins."""

import torch

from ftstudy import synthetic
from ftstudy.prompt import tokenize_prompt
from ftstudy.rerank import mean_logprob, rerank
from ftstudy.sources import convert_rows


def _recs(n):
    return list(convert_rows("alpaca", synthetic.generate("alpaca", "train", n, 4), 10**6, "last_turn"))


def test_mean_logprob_matches_a_direct_computation(tiny_model, tiny_tokenizer):
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
