"""Greedy and sampled decoding with a preallocated KV cache: what transformers' ``generate`` does, faster.

transformers' ``generate`` launches every kernel of every layer from Python at each new token, grows its cache
by concatenation and rebuilds the attention masks each step; at a few hundred rows a step of a 1B model costs
~0.1 s on an H100-class GPU, most of it overhead. Here a batch gets a cache of fixed width (prompt columns +
new tokens) written in place, the masks come from one padding mask and the step counter, and the whole decoding
step (forward, argmax, bookkeeping) lives on the device. On a GPU that step is recorded once per batch as a CUDA
graph and replayed: no host work between tokens, one sync every ``check_every`` steps to stop early once every
row has emitted EOS.

The model is transformers' own (any layer mix of full and sliding-window attention named in
``config.layer_types``, e.g. Gemma 3), called with the masks already built, so the arithmetic is its own.
``greedy`` produces the same tokens as ``generate(do_sample=False)``; ``sample`` draws from the same distribution
as ``generate(do_sample=True, temperature=..., top_p=...)`` (temperature, then the nucleus) but not the same
draws: the random numbers are consumed differently.
"""

from __future__ import annotations

import inspect
import warnings

import torch

SUPPORTED_ATTENTION = ("sdpa", "eager")


def supports(model) -> bool:
    """Whether ``greedy`` can drive ``model``: a decoder that takes prebuilt per-layer-type masks (Gemma 3) with
    an attention implementation whose mask convention is known here."""
    config = model.config
    return (getattr(config, "model_type", "") in ("gemma3_text", "gemma3")
            and getattr(config, "layer_types", None) is not None
            and config._attn_implementation in SUPPORTED_ATTENTION)


class StaticKV:
    """A KV cache for transformers' attention layers: per layer, (batch, kv heads, columns, head dim) buffers;
    a forward writes its keys and values at ``cols`` (a device tensor, so a recorded graph replays with the
    next column) and attends over every column, the masks hiding what must not be seen."""

    def __init__(self, n_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.cols: torch.Tensor | None = None

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.cols, key.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, self.cols, value.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly


def _cache_kwarg(model) -> str:
    # transformers renamed ``past_key_values`` to ``cache`` (5.2x); the old name warns, so pass the one it has.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos_id: int,
           cuda_graph: bool = True, check_every: int | None = None) -> torch.Tensor:
    """(rows, ``max_new_tokens``) greedy continuations of left-padded ``ids`` (``mask`` 1 on prompt tokens).

    A row's tokens after its first EOS are unspecified (the caller cuts there); decoding stops early once every
    row has produced EOS, checked every ``check_every`` tokens (default: every token on a CPU, where the check
    costs nothing; every 16 on a GPU, where it waits for the device).
    """
    return _decode(model, ids, mask, max_new_tokens, eos_id, lambda logits: logits.argmax(-1), cuda_graph,
                   check_every)


@torch.inference_mode()
def sample(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos_id: int, *, temperature: float,
           top_p: float, cuda_graph: bool = True, check_every: int | None = None) -> torch.Tensor:
    """Like ``greedy``, each token drawn from softmax(logits / ``temperature``) cut to its nucleus: the most
    likely tokens until their mass reaches ``top_p`` (the token that crosses it included). Draws use torch's
    default generator, so ``torch.manual_seed`` makes them repeatable on one machine."""
    if not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, not {temperature}, {top_p}")
    # On a GPU the step is a CUDA graph, which cannot branch on data: sort the whole vocabulary (cheap there).
    whole = ids.device.type == "cuda"
    return _decode(model, ids, mask, max_new_tokens, eos_id,
                   lambda logits: nucleus_draw(logits, temperature, top_p, whole_vocabulary=whole),
                   cuda_graph, check_every)


def nucleus_draw(logits: torch.Tensor, temperature: float, top_p: float, whole_vocabulary: bool = False,
                 shortlist: int = 256) -> torch.Tensor:
    """One token per row of ``logits`` (rows, vocabulary), drawn from the temperature-scaled nucleus.

    Sorting a 262k-entry vocabulary for every row and step is what makes transformers' sampling slow on a CPU;
    the nucleus is usually a handful of tokens, so the ``shortlist`` most likely are tried first and the whole
    vocabulary is sorted only for a batch where some row's nucleus reaches past them (or when
    ``whole_vocabulary``). Either way the nucleus, and so the distribution, is the same.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        vals, idx = probs, None
    else:
        k = probs.shape[-1] if whole_vocabulary else min(shortlist, probs.shape[-1])
        vals, idx = probs.topk(k, dim=-1) if k < probs.shape[-1] else probs.sort(dim=-1, descending=True)
        before = vals.cumsum(-1) - vals  # the mass of more likely tokens
        if k < probs.shape[-1] and not bool((before[:, -1] >= top_p).all()):
            return nucleus_draw(logits, temperature, top_p, whole_vocabulary=True)
        vals = vals.masked_fill(before >= top_p, 0.0)
    # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) picks i with probability p_i / sum(p). Unlike
    # torch.multinomial it needs no normalisation, costs one pass and records in a CUDA graph.
    race = vals / torch.empty_like(vals).exponential_().clamp_(min=torch.finfo(vals.dtype).tiny)
    choice = race.argmax(-1)
    return choice if idx is None else idx.gather(-1, choice[:, None])[:, 0]


def _decode(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos_id: int, pick,
            cuda_graph: bool, check_every: int | None) -> torch.Tensor:
    """The decoding loop; ``pick`` turns the last position's logits (rows, vocabulary) into the next tokens."""
    if check_every is None:
        check_every = 16 if ids.device.type == "cuda" else 1
    config, device = model.config, ids.device
    rows, width = ids.shape
    cols = width + max_new_tokens
    dtype = next(model.parameters()).dtype
    kv = StaticKV(config.num_hidden_layers, (rows, config.num_key_value_heads, cols, config.head_dim), dtype, device)
    cache_kw = _cache_kwarg(model)
    eager = config._attn_implementation == "eager"
    windows = {t: (config.sliding_window if t == "sliding_attention" else None) for t in set(config.layer_types)}
    col = torch.arange(cols, device=device)
    # Keys a query may see: real prompt tokens and every generated column (causality below hides the future).
    key_ok = torch.cat([mask.bool(), torch.ones(rows, max_new_tokens, dtype=torch.bool, device=device)], dim=1)

    def masks(q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per layer type, (rows, 1, queries, cols) masks for queries at columns ``q``, as transformers builds
        them: causal, padding, and for sliding layers kv > q - window (cache columns, padding included)."""
        seen = key_ok[:, None, None, :] & (col[None, None, None, :] <= q[None, None, :, None])
        out = {}
        for kind, window in windows.items():
            m = seen if window is None else seen & (col[None, None, None, :] > q[None, None, :, None] - window)
            # A left-padding query sees no key; let it see itself so no row of the softmax is empty (NaN).
            # Its output is never used: no real query attends to padding columns.
            m = m | (col[None, None, None, :] == q[None, None, :, None])
            if eager:  # eager attention adds its mask
                m = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill_(~m, torch.finfo(dtype).min)
            out[kind] = m
        return out

    def forward(tokens, positions, q):
        kv.cols = q
        out = model(input_ids=tokens, position_ids=positions, attention_mask=masks(q), use_cache=True,
                    logits_to_keep=1, **{cache_kw: kv})
        return pick(out.logits[:, -1])

    # Prefill: positions count real tokens only (transformers' convention for left padding).
    positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    first = forward(ids, positions, torch.arange(width, device=device))
    generated = torch.empty(rows, max_new_tokens, dtype=torch.long, device=device)
    generated[:, 0] = first
    if max_new_tokens == 1:
        return generated
    token = first[:, None].clone()
    pos = positions[:, -1:] + 1
    t = torch.ones(1, dtype=torch.long, device=device)  # index of the token the next step produces

    def step():
        nxt = forward(token, pos, t + (width - 1))  # the previous token sits at column width + t - 1
        generated.index_copy_(1, t, nxt[:, None])
        token.copy_(nxt[:, None])
        pos.add_(1)
        t.add_(1)

    def all_done(upto: int) -> bool:
        return bool((generated[:, :upto] == eos_id).any(1).all())

    graph, done = None, 1
    if cuda_graph and device.type == "cuda":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step()  # warm-up on a side stream (as graph capture requires); it is token 1
        torch.cuda.current_stream(device).wait_stream(stream)
        done = 2
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()  # recorded, not run
        except RuntimeError as err:  # something in the forward cannot be recorded: same tokens, launched one by one
            warnings.warn(f"decoding without a CUDA graph: {err}", stacklevel=2)
            graph = None
    while done < max_new_tokens:
        if done % check_every == 0 and all_done(done):
            break
        graph.replay() if graph is not None else step()
        done += 1
    return generated
