"""Completion-only causal-LM loss that projects to the vocabulary only where a label exists.

Gemma 3's vocabulary has 262,144 entries, so the LM head dominates both compute and memory: the
standard path builds fp32 logits for every position, prompt and padding included, then throws most of
them away. Here the decoder runs as usual, but only hidden states whose next-token label is not
IGNORE_INDEX go through the head. The loss is the same cross-entropy over the same tokens (tested
against the standard path); only the wasted work is gone.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F

from ftstudy.models import causal_lm
from ftstudy.prompt import IGNORE_INDEX

LOGIT_CHUNK_BYTES = 256 * 2**20  # fp32 logits alive at once: 256 rows of Gemma 3's 262,144-way vocabulary


def chunk_rows(vocab: int) -> int:
    return max(1, LOGIT_CHUNK_BYTES // (4 * vocab))


def head_ce(lm, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy through the head, autograd all the way: for scoring and for heads the fused path cannot take."""
    logits = lm.lm_head(hidden).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets, reduction=reduction)


def softmax_ce(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy and its gradient with respect to the logits (softmax - one-hot), in the
    logits' dtype, reduced in fp32. What the fused head's eager loop computes in place; compiled (compile_head),
    it is a few fused passes over the bf16 logits instead of a dozen eager kernels, which on an H200 kept the GPU
    busy ~9 ms of a 64 ms wide-LoRA step of 8 x 512 rows (benchmarks/results/profile_checkpointing_h200.txt), and
    no fp32 copy of the chunk is made."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, targets[:, None]).squeeze(1)).sum()
    hot = torch.arange(x.shape[1], device=x.device) == targets[:, None]
    return loss, ((x - lse[:, None]).exp() - hot.to(x.dtype)).to(logits.dtype)


COMPILED_HEAD = "ftstudy_compiled_head"  # set on the causal LM whose fused head uses the compiled softmax_ce
_compiled_softmax_ce = None


def compile_head(model) -> None:
    """The fused head's per-chunk cross-entropy and gradient through torch.compile (with train.compile)."""
    global _compiled_softmax_ce
    if _compiled_softmax_ce is None:
        # dynamic: a batch's labelled rows, and so its last chunk's, vary from batch to batch.
        _compiled_softmax_ce = torch.compile(softmax_ce, dynamic=True)
    setattr(causal_lm(model), COMPILED_HEAD, True)


class _FusedLinearCE(torch.autograd.Function):
    """sum(CE(hidden @ weight.T, targets)), with both gradients computed chunk by chunk in the forward.

    The logits of one chunk (at most LOGIT_CHUNK_BYTES in fp32) exist at a time and nothing of them is kept
    for the backward, which only scales the stored gradients: the head runs once forward and twice for the
    gradients (input and, when trainable, weight), never a third time as under checkpointing. Logits are
    computed in the weight's dtype and reduced in fp32, as transformers' loss does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, compiled):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        grad_h = torch.empty_like(hidden, dtype=weight.dtype) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(weight.dtype)
                t = targets[start:start + chunk]
                if compiled and (need_h or need_w):
                    part, g = _compiled_softmax_ce(h @ weight.T, t)
                    total += part
                else:  # the same arithmetic in place, one fp32 chunk of logits at a time
                    logits = (h @ weight.T).float()
                    lse = torch.logsumexp(logits, dim=-1)
                    total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                    if not (need_h or need_w):
                        continue
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax: d(CE)/d(logits) = softmax - onehot
                    probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    g = probs.to(weight.dtype)
                    del logits, probs
                if need_h:
                    torch.mm(g, weight, out=grad_h[start:start + chunk])
                if need_w:
                    grad_w.addmm_(g.T, h)
                # Freed before the next chunk's logits, not when g is rebound after them: otherwise two chunks'
                # worth are alive from the second chunk on (128 MiB more at Gemma 3's vocabulary, measured on an
                # H200), a step in the peak between one chunk and two that ftstudy.budget's probe would read as
                # growth per row.
                del g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.hidden_dtype) if grad_h is not None else None
        gw = grad_w.mul_(grad_out.to(grad_w.dtype)) if grad_w is not None else None
        return gh, gw, None, None, None


def _fsdp_managed(module) -> bool:
    # FSDP2 re-classes each module it shards as FSDP<Name>, a subclass of FSDPModule and of the module's class.
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__)


def _fusable(lm) -> bool:
    head = lm.lm_head
    return (type(head) is torch.nn.Linear and head.bias is None
            and not getattr(lm.config, "final_logit_softcapping", None))


def labelled_ce(lm, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``hidden`` (n, d) against ``targets`` (n,), never more than one chunk of logits alive.

    A plain linear head goes through the fused function above. Any other head (adapted, biased, soft-capped)
    falls back to chunks under activation checkpointing, whose logits are rebuilt in the backward.
    """
    if not torch.is_grad_enabled():
        return head_ce(lm, hidden, targets)
    weight = lm.lm_head.weight
    chunk = chunk_rows(weight.shape[0])
    if _fusable(lm):
        return _FusedLinearCE.apply(hidden, weight, targets, chunk, getattr(lm, COMPILED_HEAD, False))
    if hidden.shape[0] <= chunk or _fsdp_managed(lm) or _fsdp_managed(lm.lm_head):
        # Under FSDP the head's weight is whole only inside its own forward: a chunk recomputed in the backward
        # would meet the sharded weight. FSDP runs hold the labelled positions' logits at once instead.
        return head_ce(lm, hidden, targets)
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(head_ce, lm, hidden[part], targets[part], use_reentrant=False)
    return total


def _completion_forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None,
                        position_ids=None, **_unused):
    """Stands in for the *ForCausalLM's forward during one completion_loss call (see there)."""
    hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    loss = labelled_ce(self, hidden[:, :-1][keep], targets[keep])
    denom = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    return {"loss": loss / denom}


def completion_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                    num_items: int | torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over positions whose label is not IGNORE_INDEX.

    Returns the mean over those tokens, or their sum divided by ``num_items`` when given (the token
    count of the whole accumulated batch, so gradient accumulation weighs every token equally). A packed batch
    (see batches.Collator) comes with ``position_ids`` and no attention mask.

    The call goes through ``model`` itself, whatever wraps the causal LM (PEFT, DDP, FSDP): DDP synchronises
    gradients and FSDP gathers weights only for a forward that passes through them. For that one call the
    causal LM's forward is swapped for one that returns this loss and no logits.
    """
    lm = causal_lm(model)
    wrapper = lm.__dict__.get("forward")  # an instance-level forward (accelerate's autocast wrapper) comes back after
    lm.forward = MethodType(_completion_forward, lm)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=num_items,
                    position_ids=position_ids)
    finally:
        if wrapper is None:
            del lm.forward  # the class's forward again
        else:
            lm.forward = wrapper
    return out["loss"]
