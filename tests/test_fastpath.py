"""The GPU levers of ftstudy.fastpath, checked where a CPU can: same numbers as the plain path, and the property
each lever exists for (recomputation really inside compiled layers, weights updated in place, ...)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ftstudy import fastpath, synthetic
from ftstudy.batches import Collator
from ftstudy.errors import UserError
from ftstudy.loss import COMPILED_HEAD, completion_loss
from ftstudy.methods import method_spec
from ftstudy.models import causal_lm
from ftstudy.params import Params, ParamsError, default_params, parse_params, to_dict
from ftstudy.prepare import prepare_model
from ftstudy.prompt import tokenize_example
from ftstudy.sources import convert_rows


def _batch(tokenizer, n=4):
    rows = convert_rows("alpaca", synthetic.generate("alpaca", "train", n, 0), 10**6, "last_turn")
    return Collator(tokenizer.pad_token_id)([tokenize_example(tokenizer, r, 96, 64) for r in rows])


def _params(method: str, **train) -> Params:
    p = default_params()
    sections = {"train": dataclasses.replace(p.train, **train)}
    name = f"train_{method}"
    if hasattr(getattr(p, name), "lora_dropout"):  # dropout off: runs are compared number for number
        sections[name] = dataclasses.replace(getattr(p, name), lora_dropout=0.0)
    return dataclasses.replace(p, **sections)


def _loss_grads_saved(model, batch):
    """Loss, gradients and the bytes the forward keeps for the backward (parameters, which it only refers to, excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(saved)


def test_compiled_layers_recompute_inside_their_graph_and_learn_the_same(tiny_model_dir, tiny_tokenizer):
    """Checkpointing moves into the compiled layers (so CUDA graphs can record them): same loss and gradients as
    the eager checkpointed model, and the compiled forward keeps far less than compiled without checkpointing."""
    batch = _batch(tiny_tokenizer)
    runs = {}
    for name, train in {"eager": dict(compile="off", gradient_checkpointing=True),
                        "compiled": dict(compile="on", gradient_checkpointing=True),
                        "compiled_no_ckpt": dict(compile="on", gradient_checkpointing=False)}.items():
        torch._dynamo.reset()
        p = _params("lora_wide", **train)
        torch.manual_seed(1)  # LoRA's A matrices: the same draw in every run
        model, levers, _ = prepare_model(method_spec(p, "lora_wide"), p, tiny_model_dir, tiny_model_dir.parent)
        model.train()
        assert ("compiled_layers" in levers) == (train["compile"] == "on")
        runs[name] = _loss_grads_saved(model, batch)
        # Compiled layers attend through fastpath.grouped_attention (why there); this batch is padded and masked.
        want = fastpath.GROUPED_ATTENTION if train["compile"] == "on" else "sdpa"
        assert causal_lm(model).config._attn_implementation == want
        if name == "compiled":
            assert all(not layer.gradient_checkpointing for layer in causal_lm(model).model.layers)
    loss, grads, _ = runs["eager"]
    assert runs["compiled"][0] == pytest.approx(loss, rel=1e-5)
    for n, g in grads.items():
        assert torch.allclose(runs["compiled"][1][n], g, atol=1e-6, rtol=1e-4), n
    assert runs["compiled"][2] < 0.5 * runs["compiled_no_ckpt"][2]


def test_4bit_linears_run_as_dequantize_and_linear_with_bitsandbytes_numbers(tiny_model_dir, tiny_tokenizer,
                                                                              monkeypatch):
    """QLoRA's frozen 4-bit linears as traceable ops: bitsandbytes' own 4-bit matmul is no longer called, and
    loss and adapter gradients are what it gave."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    batch = _batch(tiny_tokenizer)
    p = _params("qlora", compile="off")
    model, _, _ = prepare_model(method_spec(p, "qlora"), p, tiny_model_dir, tiny_model_dir.parent)
    model.train()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    loss, grads, _ = _loss_grads_saved(model, batch)
    model.zero_grad(set_to_none=True)
    for layer in causal_lm(model).model.layers:
        fastpath.trace_4bit_linears(layer)

    def refuse(*a, **k):
        raise AssertionError("bitsandbytes' 4-bit matmul was called")

    monkeypatch.setattr(bnb, "matmul_4bit", refuse)
    traced_loss, traced_grads, _ = _loss_grads_saved(model, batch)
    assert traced_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == traced_grads.keys() and grads
    for n, g in grads.items():
        assert torch.allclose(traced_grads[n], g, atol=1e-6, rtol=1e-5), n


def test_cuda_graph_settings_and_their_refusals(monkeypatch):
    seen = []
    monkeypatch.setattr(fastpath, "compile_layers", lambda model, graphs=False, shapes=8: seen.append(graphs))
    base = ["fused_linear_cross_entropy", "compiled_layers"]
    assert fastpath.speed_up(None, kernels="auto", compile="auto", cuda=True, cuda_graphs="auto") == [*base, "cuda_graphs"]
    assert fastpath.speed_up(None, kernels="auto", compile="auto", cuda=True, cuda_graphs="off") == base
    assert fastpath.speed_up(None, kernels="auto", compile="on", cuda=False, cuda_graphs="auto") == base
    assert seen == [True, False, False]
    with pytest.raises(UserError, match="cuda_graphs=on needs CUDA"):
        fastpath.check("auto", cuda=False, cuda_graphs="on")
    raw = to_dict(default_params())
    raw["train"].update(cuda_graphs="on", grad_accum=2)
    with pytest.raises(ParamsError, match=r"train.cuda_graphs: on with train.grad_accum=2.*allowed: auto"):
        parse_params(raw)
    raw["train"].update(grad_accum=1, compile="off")
    with pytest.raises(ParamsError, match="train.cuda_graphs: on replays compiled layers, but train.compile is off"):
        parse_params(raw)
    raw["train"].update(compile="auto")
    parse_params(raw)


def test_width_buckets_give_a_few_batch_shapes_for_compiled_layers():
    """Compiled layers compile (and record) per shape: widths round up to steps of row_len, packed or padded."""
    examples = [{"input_ids": [5] * n, "labels": [5] * n} for n in (6, 3, 2)]
    assert Collator(0, pack=True, row_len=12, width_buckets=4)(examples)["input_ids"].shape == (1, 12)
    assert Collator(0, pack=True, row_len=10)(examples)["input_ids"].shape == (2, 9)
    assert Collator(0, row_len=12, width_buckets=4)(examples)["input_ids"].shape == (3, 6)
    assert Collator(0, row_len=12, width_buckets=4)(examples[1:])["input_ids"].shape == (2, 3)
    assert Collator(0, row_len=12, width_buckets=1)(examples[1:])["input_ids"].shape == (2, 12)
    assert Collator(0, row_len=12)(examples[1:])["input_ids"].shape == (2, 3)

def _full_parameter_grads(compiled: bool, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """A bf16 Gemma 3 layer with four query heads sharing one key/value head, trained in full (as GaLore is)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=64, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager")
    model.config.use_cache = False
    if compiled:
        fastpath.compile_layers(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}


def test_compiled_layers_give_every_weight_its_gradient_with_shared_key_heads(tiny_tokenizer):
    """Full-parameter training needs every weight's gradient right, not only the loss. On a CPU inductor compiled
    the backward of transformers' eager attention (RMS-normed, rotated keys repeated for the query heads sharing
    them) wrongly for static shapes: NaN key gradients. Compiled layers attend through fastpath.grouped_attention
    instead. (On an H200 another static-shape fault, loop reordering after fusion, gave wrong query gradients and
    GaLore diverged; compile_layers turns it off, and benchmarks/compiled_grads.py checks it there.)"""
    torch._dynamo.reset()
    batch = Collator(tiny_tokenizer.pad_token_id, row_len=64, width_buckets=2)(
        [{"input_ids": list(range(3, 3 + n)), "labels": [-100] * (n // 2) + list(range(3 + n // 2, 3 + n))}
         for n in (50, 40)])  # padded to 64 tokens (the fault needs some length)
    ref_loss, ref = _full_parameter_grads(False, batch)
    loss, got = _full_parameter_grads(True, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    for n, g in ref.items():
        assert torch.isfinite(got[n]).all(), n
        assert (got[n] - g).norm() <= 0.05 * g.norm() + 1e-6, n


def test_grouped_attention_is_eager_attention():
    """The same numbers as transformers' eager attention (which repeats keys and values per query head)."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.head_dim = 3, 16
    q, k, v = torch.randn(2, 6, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    mask = torch.zeros(2, 1, 10, 10).masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), torch.finfo().min)
    want, want_w = eager_attention_forward(module, q, k, v, mask, scaling=0.25)
    got, got_w = fastpath.grouped_attention(module, q, k, v, mask, scaling=0.25)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got_w, want_w, atol=1e-6)


def test_the_budget_probe_compiles_the_layers_as_training_would_and_leaves_them_as_they_were(tiny_model_dir,
                                                                                           tiny_tokenizer):
    """ftstudy.budget measures compiled layers inside fastpath.compiled_for_probe: checkpointed there, they learn
    what the eager model learns and keep far less than without checkpointing; afterwards the model is the eager,
    checkpointed one it was (nothing compiled, flags back), ready for compile_layers to compile for training."""
    batch = _batch(tiny_tokenizer)
    p = _params("lora_wide", compile="off", gradient_checkpointing=True)
    model, _, _ = prepare_model(method_spec(p, "lora_wide"), p, tiny_model_dir, tiny_model_dir.parent)
    model.train()
    layers = causal_lm(model).model.layers
    loss, grads, _ = _loss_grads_saved(model, batch)
    runs = {}
    for checkpointed in (True, False):
        model.zero_grad(set_to_none=True)
        with fastpath.compiled_for_probe(model, keep=0 if checkpointed else len(layers)):
            assert all(layer._compiled_call_impl is not None for layer in layers)
            assert getattr(causal_lm(model), COMPILED_HEAD)  # the head's softmax as training compiles it
            runs[checkpointed] = _loss_grads_saved(model, batch)
        assert all(layer._compiled_call_impl is None and "forward" not in layer.__dict__ for layer in layers)
        assert not getattr(causal_lm(model), COMPILED_HEAD, False)
        assert all(layer.gradient_checkpointing for layer in layers)
    assert runs[True][0] == pytest.approx(loss, rel=1e-5)
    for n, g in grads.items():
        assert torch.allclose(runs[True][1][n], g, atol=1e-6, rtol=1e-4), n
    assert runs[True][2] < 0.5 * runs[False][2]
    model.zero_grad(set_to_none=True)
    again = _loss_grads_saved(model, batch)
    assert again[0] == pytest.approx(loss, rel=1e-6) and again[2] < runs[False][2]
