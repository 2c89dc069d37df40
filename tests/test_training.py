"""The shared training path on the tiny model: masking, loss equivalence, that training trains, hardware gates."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from ftstudy import synthetic
from ftstudy.atomic import write_jsonl
from ftstudy.batches import Collator
from ftstudy.errors import UserError
from ftstudy.loss import completion_loss
from ftstudy.methods import check_hardware, method_spec
from ftstudy.params import Params, default_params
from ftstudy.prompt import IGNORE_INDEX, tokenize_example
from ftstudy.sources import convert_rows
from ftstudy.training import train


def _records(n=24, seed=0):
    rows = synthetic.generate("alpaca", "train", n, seed)
    return list(convert_rows("alpaca", rows, 10**6, "last_turn"))


def _batch(tokenizer, recs):
    return Collator(tokenizer.pad_token_id)([tokenize_example(tokenizer, r, 96, 64) for r in recs])


def test_prompt_positions_get_zero_gradient_and_eos_is_learned(tiny_model, tiny_tokenizer):
    """A masked prompt contributes nothing: the loss gradient w.r.t. its logits is exactly zero."""
    batch = _batch(tiny_tokenizer, _records(3))
    out = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits.detach().requires_grad_(True)
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
    loss.backward()
    grad_norm = logits.grad[:, :-1].abs().sum(-1)
    masked = targets == IGNORE_INDEX
    assert torch.all(grad_norm[masked] == 0)
    assert torch.all(grad_norm[~masked] > 0)
    eos = tiny_tokenizer.eos_token_id
    assert all(eos in row.tolist() for row in batch["labels"])


def test_masked_prompt_contributes_no_loss(tiny_model, tiny_tokenizer):
    """The loss is the mean cross-entropy of the response tokens (EOS included) alone, computed here by hand."""
    batch = _batch(tiny_tokenizer, _records(3))
    ours = completion_loss(tiny_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    terms = []
    for row in range(batch["input_ids"].shape[0]):
        for pos in range(1, batch["input_ids"].shape[1]):
            target = int(batch["labels"][row, pos])
            if target != IGNORE_INDEX:
                terms.append(-torch.log_softmax(logits[row, pos - 1], -1)[target])
    assert ours.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    unmasked = torch.where(batch["attention_mask"].bool(), batch["input_ids"], IGNORE_INDEX)
    with_prompt = completion_loss(tiny_model, batch["input_ids"], batch["attention_mask"], unmasked)
    assert not torch.allclose(ours, with_prompt)  # without the mask the prompt would count


def test_completion_loss_equals_the_standard_full_logits_loss(tiny_model, tiny_tokenizer):
    batch = _batch(tiny_tokenizer, _records(4))
    ours = completion_loss(tiny_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    standard = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(standard.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_packed_batches_learn_exactly_what_padded_batches_do(tiny_model_dir, tiny_tokenizer, method):
    """Padding-free packing: the same loss and gradients as the padded batch, rows never attending to each other."""
    from peft import LoraConfig, get_peft_model

    from ftstudy.models import load_model

    examples = [tokenize_example(tiny_tokenizer, r, 96, 64) for r in _records(5)]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # different lengths: the padded batch has padding
    row_len = 2 * max(len(e["input_ids"]) for e in examples)  # room for two examples a row
    results = []
    for pack in (False, True):
        batch = Collator(tiny_tokenizer.pad_token_id, pack=pack, row_len=row_len)(examples)
        if pack:  # fewer rows than examples, padded to the longest row, none over row_len
            assert batch["input_ids"].shape[0] < len(examples) and batch["input_ids"].shape[1] <= row_len
            assert (batch["input_ids"] == tiny_tokenizer.pad_token_id).any()
            assert batch["num_tokens"] == sum(len(e["input_ids"]) for e in examples)
        model = load_model(tiny_model_dir).train()
        if method == "lora":
            torch.manual_seed(0)
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
        loss = completion_loss(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                               position_ids=batch.get("position_ids"))
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (padded, g_padded), (packed, g_packed) = results
    assert packed == pytest.approx(padded, rel=1e-5)
    assert g_packed.keys() == g_padded.keys()
    for name, g in g_padded.items():
        assert torch.allclose(g_packed[name], g, atol=1e-6, rtol=1e-4), name
    # Without the restarting positions the examples sharing a row would see each other: the loss changes.
    batch = Collator(tiny_tokenizer.pad_token_id, pack=True, row_len=row_len)(examples)
    model = load_model(tiny_model_dir)
    leaky = completion_loss(model, batch["input_ids"], None, batch["labels"])
    assert abs(leaky.item() - padded) > 100 * abs(packed - padded) + 1e-5


def test_packing_fills_rows_first_fit_decreasing_and_never_exceeds_the_row_length():
    """Attention costs the square of a row's length, so a batch is never packed into one long sequence."""
    collate = Collator(0, pack=True, row_len=10)
    rows = collate.rows([6, 3, 4, 7, 2, 10, 1])
    assert sorted(i for r in rows for i in r) == list(range(7))  # every example exactly once
    assert all(sum([6, 3, 4, 7, 2, 10, 1][i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4  # 33 tokens need 4 rows of 10, and first-fit decreasing finds them
    batch = collate([{"input_ids": [5] * n, "labels": [5] * n} for n in (6, 3, 4, 7, 2, 10, 1)])
    assert batch["input_ids"].shape == (4, 10) and batch["num_tokens"] == 33
    assert (batch["labels"] != IGNORE_INDEX).sum() == 33 - 7  # each example's first label is masked
    assert Collator(0, pack=True)([{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 2)])["input_ids"].shape == (2, 3)


def test_compiled_layers_get_padded_batches_and_uncompiled_ones_packed_as_configured():
    """Compiled layers computed wrong gradients for packed rows on an H200 (ftstudy.batches.packed_batches)."""
    from ftstudy.batches import packed_batches

    assert packed_batches(True, ["fused_linear_cross_entropy", "liger_kernels"])
    assert not packed_batches(True, ["fused_linear_cross_entropy", "compiled_layers", "cuda_graphs"])
    assert not packed_batches(False, ["fused_linear_cross_entropy"])


def test_compiled_layers_see_at_most_width_buckets_batch_shapes_in_a_whole_run():
    """Compiled layers get padded batches whose widths round up to a few steps of max_seq_len, and the epoch's
    short last batch is dropped, so the layers compile and record a handful of shapes for any number of rows (a
    packed batch's row count, or a padded one's fullest row, would vary from batch to batch)."""
    from ftstudy.batches import WIDTH_BUCKETS, Collator, packed_batches

    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": [5] * n, "labels": [-100] + [5] * (n - 1)}
                for n in torch.randint(10, 129, (15_000,), generator=g).tolist()]
    levers = ["fused_linear_cross_entropy", "compiled_layers", "cuda_graphs"]
    collate = Collator(0, pack=packed_batches(True, levers), row_len=128, width_buckets=WIDTH_BUCKETS)
    shapes = {tuple(collate(examples[i:i + 8])["input_ids"].shape) for i in range(0, len(examples) - 7, 8)}
    assert {(8, 64), (8, 96), (8, 128)} <= shapes <= {(8, 32), (8, 64), (8, 96), (8, 128)}
    packed = Collator(0, pack=True, row_len=128, width_buckets=WIDTH_BUCKETS)
    assert len({tuple(packed(examples[i:i + 8])["input_ids"].shape) for i in range(0, 200, 8)}) > WIDTH_BUCKETS


def test_kernels_auto_leaves_liger_out_of_compiled_layers(monkeypatch):
    """Liger's ops inside compiled layers split them into several graphs (1.9x slower steps on an H100)."""
    from ftstudy import fastpath

    monkeypatch.setattr(fastpath, "apply_kernels", lambda model: True)
    monkeypatch.setattr(fastpath, "compile_layers", lambda model, graphs=False, shapes=8: None)
    base = ["fused_linear_cross_entropy"]
    assert fastpath.speed_up(None, kernels="auto", compile="auto", cuda=True) == [*base, "compiled_layers"]
    assert fastpath.speed_up(None, kernels="auto", compile="off", cuda=True) == [*base, "liger_kernels"]
    assert fastpath.speed_up(None, kernels="on", compile="on", cuda=True) == [*base, "liger_kernels", "compiled_layers"]


def test_8bit_optimizer_without_cuda_is_a_clear_error():
    p = default_params(train_galore=dict(optimizer="galore_adamw_8bit_layerwise"))
    with pytest.raises(UserError, match="needs CUDA.*galore_adamw_layerwise"):
        check_hardware(method_spec(p, "galore"), cuda=False)
    check_hardware(method_spec(default_params(), "galore"), cuda=False)  # the CPU variant is fine


def test_gpu_kernels_forced_on_without_cuda_is_a_clear_error(monkeypatch):
    from ftstudy import fastpath

    with pytest.raises(UserError, match="kernels=on needs CUDA.*auto or off"):
        fastpath.check("on", cuda=False)
    monkeypatch.setattr(fastpath, "liger_installed", lambda: False)
    with pytest.raises(UserError, match="needs liger-kernel.*pip install liger-kernel"):
        fastpath.check("on", cuda=True)
    fastpath.check("auto", cuda=False)  # auto: on only where it can run
    assert fastpath.speed_up(None, kernels="auto", compile="auto", cuda=False) == ["fused_linear_cross_entropy"]


def _tiny_params(tiny_model_dir, steps: int, **sections) -> Params:
    # Validated with at least 2 steps (the hybrid's two phases need one each); these tests train single methods.
    train = dict(batch_size=4, max_seq_len=96, max_prompt_tokens=64, save_steps=2, warmup_steps=0, max_steps=max(steps, 2))
    params = default_params(train=train, ui=dict(progress_bar=False), **sections)
    return dataclasses.replace(params, train=dataclasses.replace(params.train, max_steps=steps))


@pytest.fixture()
def workdir(tmp_path, tiny_model_dir):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(tiny_model_dir)
    write_jsonl(tmp_path / "train.jsonl", _records(32))
    return tmp_path


def _train(workdir, params, name):
    return train(method_spec(params, name), params, train_path=workdir / "train.jsonl", models_dir=workdir / "models",
                 out_dir=workdir / "models" / name, ckpt_dir=workdir / "ck" / name, live_dir=workdir / "live" / name)


def test_checkpoints_are_resumed_only_by_the_code_that_made_them(workdir, tiny_model_dir, monkeypatch):
    """A stage rerun after its code changed (DVC reruns it then) starts afresh instead of resuming the old code's
    checkpoints; the same code resumes them."""
    import shutil

    monkeypatch.setenv("FTSTUDY_KEEP_CHECKPOINTS", "1")  # what a killed run leaves behind
    # 3 steps: a checkpoint after step 2 (save_steps), none after the last one
    params = _tiny_params(tiny_model_dir, 3, train_lora_wide=dict(lora_r=4, lora_alpha=8))
    assert _train(workdir, params, "lora_wide")["resumed_from_step"] == 0
    assert [p.name for p in (workdir / "ck/lora_wide").glob("checkpoint-*")] == ["checkpoint-2"]
    shutil.rmtree(workdir / "models" / "lora_wide")
    assert _train(workdir, params, "lora_wide")["resumed_from_step"] == 2  # same code: resumed
    shutil.rmtree(workdir / "models" / "lora_wide")
    monkeypatch.setattr("ftstudy.training.code_fingerprint", lambda: "other code")
    assert _train(workdir, params, "lora_wide")["resumed_from_step"] == 0


def test_lora_trains_the_adapter_and_leaves_the_base_alone(workdir, tiny_model_dir):
    from safetensors.torch import load_file

    params = _tiny_params(tiny_model_dir, 3, train_lora_wide=dict(lora_r=4, lora_alpha=8,
                                                                      learning_rate=1e-2, target_modules=["q_proj", "down_proj"]))
    # Rows longer than train.max_seq_len (96): each trains exactly 96 tokens, so the count is known.
    long = [{**r, "response": " ".join([r["response"]] * 40)} for r in _records(32)]
    write_jsonl(workdir / "train.jsonl", long)
    before = load_file(tiny_model_dir / "model.safetensors")
    m = _train(workdir, params, "lora_wide")
    assert m["trained_tokens"] == 3 * 4 * 96  # the steps' tokens, not the batch the data loader prefetched
    adapter = load_file(workdir / "models/lora_wide/adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: nonzero means it trained
    after = load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m["steps"] == 3 and 0 < m["trainable_params"] < m["total_params"]
    assert (workdir / "live/lora_wide/plots/metrics/train/loss.tsv").read_text().count("\n") == 4
    # Sorted, not in peft's set order (which follows the hash seed): equal trainings, equal files and DVC hashes.
    config = json.loads((workdir / "models/lora_wide/adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj"]


def test_galore_trains_every_parameter(workdir, tiny_model_dir):
    from safetensors.torch import load_file

    params = _tiny_params(tiny_model_dir, 2, train_galore=dict(rank=4, learning_rate=1e-3))
    m = _train(workdir, params, "galore")
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(workdir / "models/galore/model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("self_attn" in k for k in changed) and any("mlp" in k for k in changed)
    assert m["optimizer"] == "galore_adamw_layerwise" and m["trainable_params"] == m["total_params"]
    assert m["peak_memory_gb"] > 0 and m["tokens_per_s"] > 0


def test_the_training_seed_orders_the_examples(workdir, tiny_model_dir):
    """GaLore has no random init or dropout: only the order drawn from the training seed can tell two seeds
    apart, and it must, or a seed experiment would measure no spread for full-parameter training."""
    from safetensors.torch import load_file

    weights = []
    for seed in (0, 1):
        params = dataclasses.replace(_tiny_params(tiny_model_dir, 2, train_galore=dict(rank=4, learning_rate=1e-3)),
                                     seed=seed)
        train(method_spec(params, "galore"), params, train_path=workdir / "train.jsonl", models_dir=workdir / "models",
              out_dir=workdir / f"g{seed}", ckpt_dir=workdir / f"ck{seed}", live_dir=None)
        weights.append(load_file(workdir / f"g{seed}/model.safetensors"))
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_layerwise_galore_logs_its_measured_gradient_norm_and_says_it_is_unclipped(workdir, tiny_model_dir):
    """Layer-wise GaLore consumes each gradient in its hook, so the Trainer would log a norm of 0 and clip nothing;
    the logged norm is the one the optimizer measured, and the metrics say that no clipping took place."""
    params = _tiny_params(tiny_model_dir, 3, train_galore=dict(rank=4, learning_rate=1e-3))
    m = _train(workdir, params, "galore")
    rows = (workdir / "live/galore/plots/metrics/train/grad_norm.tsv").read_text().splitlines()[1:]
    norms = [float(r.split("\t")[1]) for r in rows]
    assert len(norms) == 3 and all(0 < n < float("inf") for n in norms)
    assert m["gradient_clipping"] == "none (layer-wise optimizer)"
    lora = _tiny_params(tiny_model_dir, 1, train_lora_wide=dict(lora_r=4, lora_alpha=8))
    assert _train(workdir, lora, "lora_wide")["gradient_clipping"] == "global L2 norm <= 1.0"


def test_layerwise_galore_follows_the_learning_rate_schedule(workdir, tiny_model_dir):
    """One step at the start of a warm-up has a learning rate of 0: nothing may change. transformers' own
    layer-wise GaLore ignored the schedule and took that step at the peak rate (ftstudy.galore)."""
    from safetensors.torch import load_file

    params = _tiny_params(tiny_model_dir, 1, train_galore=dict(rank=4, learning_rate=1e-2))
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, warmup_steps=1))
    _train(workdir, params, "galore")
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(workdir / "models/galore/model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_keep_activations_exempts_the_last_layers_from_checkpointing(tiny_model_dir):
    from ftstudy.models import causal_lm
    from ftstudy.prepare import prepare_model

    for keep in (0, 1):
        params = _tiny_params(tiny_model_dir, 1)
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, gradient_checkpointing=True,
                                                                       keep_activations=keep))
        model, _, _ = prepare_model(method_spec(params, "lora_wide"), params, tiny_model_dir, tiny_model_dir.parent)
        layers = causal_lm(model).model.layers
        assert len(layers) > 1
        assert [layer.gradient_checkpointing for layer in layers] == [True] * (len(layers) - keep) + [False] * keep
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, keep_activations=len(layers) + 1))
    with pytest.raises(UserError, match=f"has {len(layers)} decoder layers; use at most {len(layers)}"):
        prepare_model(method_spec(params, "lora_wide"), params, tiny_model_dir, tiny_model_dir.parent)


def test_completion_loss_keeps_an_instance_forward_wrapper(tiny_model_dir, tiny_tokenizer):
    """accelerate puts its autocast wrapper on the prepared model's forward; the loss must not strip it."""
    from ftstudy.models import load_model

    model = load_model(tiny_model_dir).train()
    calls = []
    original = model.forward

    def wrapper(*args, **kwargs):  # stands in for accelerate's autocast(model.forward)
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = wrapper
    batch = _batch(tiny_tokenizer, _records(2))
    completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert model.__dict__["forward"] is wrapper
    model(input_ids=batch["input_ids"])
    assert calls == [1]


def test_4bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(UserError, match="needs bitsandbytes.*pip install"):
        check_hardware(method_spec(default_params(), "qlora"), cuda=False)


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained-head", "frozen-head"])
def test_fused_and_chunked_losses_equal_the_plain_loss_and_gradients(tiny_model_dir, tiny_tokenizer, monkeypatch,
                                                                     frozen_head):
    """The fused head (gradients made in the forward; its softmax compiled or not) and the checkpointed chunks change
    nothing that is learned."""
    from ftstudy import loss as loss_mod
    from ftstudy.models import load_model

    batch = _batch(tiny_tokenizer, _records(4))
    vocab = load_model(tiny_model_dir).config.vocab_size
    results = {}
    for name, fused, rows in [("plain", False, 10**6), ("fused", True, 10**6), ("fused-chunks", True, 7),
                              ("compiled-fused-chunks", True, 7), ("checkpointed-chunks", False, 7)]:
        monkeypatch.setattr(loss_mod, "LOGIT_CHUNK_BYTES", rows * 4 * vocab)
        monkeypatch.setattr(loss_mod, "_fusable", lambda lm, fused=fused: fused)
        model = load_model(tiny_model_dir).train()
        if name.startswith("compiled"):  # train.compile's head: softmax_ce through torch.compile
            loss_mod.compile_head(model)
        if frozen_head:  # LoRA: the tied embedding / head is frozen, the gradient must still reach the layers
            model.lm_head.weight.requires_grad_(False)
        value = completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        value.backward()
        results[name] = (value.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    ref_loss, ref_grads = results.pop("plain")
    assert any("q_proj" in n for n in ref_grads) and ("model.embed_tokens.weight" in ref_grads) != frozen_head
    for name, (value, grads) in results.items():
        assert value == pytest.approx(ref_loss, rel=1e-6), name
        assert grads.keys() == ref_grads.keys(), name
        for n, g in grads.items():
            assert torch.allclose(g, ref_grads[n], atol=1e-6, rtol=1e-4), (name, n)


def _live_bytes_peak(fn) -> int:
    """The most bytes of tensor storage alive at once while ``fn`` runs (CPU): each op's outputs counted from their
    making until their storage is freed."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Live(TorchDispatchMode):
        now = peak = 0
        alive: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and (key := t.untyped_storage().data_ptr()) not in self.alive:
                    self.alive.add(key)
                    Live.now += t.untyped_storage().nbytes()
                    Live.peak = max(Live.peak, Live.now)
                    weakref.finalize(t.untyped_storage(), self.free, key, t.untyped_storage().nbytes())
            return out

        def free(self, key, nbytes):
            Live.now -= nbytes
            self.alive.discard(key)

    with Live():
        fn()
    return Live.peak


def test_the_fused_heads_memory_does_not_step_up_with_a_second_chunk():
    """One chunk's logits and gradient alive at a time, however many chunks: ftstudy.budget fits its memory model
    at one row and two, and a step from one chunk to two would be extrapolated as growth per row (on an H200 it
    was: 128 MiB at Gemma 3's vocabulary, read as 0.15 GiB a row where rows took 0.03)."""
    from ftstudy.loss import _FusedLinearCE

    def peak(rows: int, vocab: int = 4096, width: int = 64) -> int:
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(rows, width, generator=g, requires_grad=True)
        weight = torch.randn(vocab, width, generator=g, requires_grad=True)
        targets = torch.randint(0, vocab, (rows,), generator=g)
        return _live_bytes_peak(lambda: _FusedLinearCE.apply(hidden, weight, targets, 64, False))

    one, two, eight = peak(64), peak(128), peak(512)  # 1, 2 and 8 chunks of 64 rows x 4,096 logits (1 MiB in fp32)
    assert two - one < 2**16 and eight - two < 2**18  # what grows is the rows' input gradient (256 bytes a row)


def test_the_hybrids_checkpoints_are_tied_to_the_qlora_adapter_it_starts_from(tmp_path):
    from ftstudy.checkpoints import fingerprint

    (tmp_path / "models/base").mkdir(parents=True)
    (tmp_path / "models/sequential_ensemble_qlora").mkdir()
    (tmp_path / "train.jsonl").write_text("{}\n")
    adapter = tmp_path / "models/sequential_ensemble_qlora/adapter_model.safetensors"
    spec = method_spec(default_params(), "sequential_ensemble")
    adapter.write_bytes(b"first adapter")
    before = fingerprint(spec, default_params(), tmp_path / "train.jsonl", tmp_path / "models")
    adapter.write_bytes(b"retrained adapter")
    assert fingerprint(spec, default_params(), tmp_path / "train.jsonl", tmp_path / "models") != before


def test_throughput_sets_apart_compiling_recording_projection_and_checkpoint_steps(monkeypatch):
    """Steady tokens/s leaves out the steps that pay a one-off cost: the first, a new batch shape's compilation,
    under CUDA graphs a shape's second step (torch records its graphs then), GaLore's projection steps, and the step
    after a checkpoint (its interval holds the saving)."""
    from types import SimpleNamespace

    from ftstudy.trainer import throughput_callback

    clock = iter(range(0, 1000, 2))  # every step takes 2 s
    monkeypatch.setattr("ftstudy.trainer.time.perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(tokens_trained=0, batch_shapes=[])
    state = SimpleNamespace(global_step=0)
    cb = throughput_callback(trainer, compiled=True, cuda_graphs=True, projection_gap=6)
    cb.on_train_begin(None, state, None)
    for width in (64, 64, 64, 128, 64, 128, 128, 64, 64, 64):
        trainer.batch_shapes.append((8, width))
        trainer.tokens_trained += 100
        state.global_step += 1
        cb.on_step_end(None, state, None)
        if state.global_step == 8:
            cb.on_save(None, state, None)  # the Trainer saves after on_step_end
    costs = cb.costs
    assert costs == ["first_step", "recording", None, "new_shape", None, "recording", "projection", None,
                     "checkpoint", None]
    summary = cb.summary()
    assert summary["batch_shapes"] == 2
    assert summary["one_off_steps"] == {"first_step": 1, "recording": 2, "new_shape": 1, "projection": 1,
                                        "checkpoint": 1}
    assert summary["step_seconds"] == [2] * 10 and summary["steady_tokens_per_s"] == 50.0
    eager = throughput_callback(trainer, compiled=False, cuda_graphs=False, projection_gap=None)
    eager.on_train_begin(None, state, None)
    trainer.batch_shapes.append((8, 64))
    state.global_step += 1
    eager.on_step_end(None, state, None)
    trainer.batch_shapes.append((8, 256))
    state.global_step += 1
    eager.on_step_end(None, state, None)
    assert eager.costs == ["first_step", None]


def test_the_hybrid_splits_the_budget_and_sees_the_stream_a_single_method_sees(workdir, tiny_model_dir):
    """Equal budgets: the hybrid's QLoRA phase and its GaLore phase together train train.max_steps on the same
    examples a single method trains on (the second phase continues the stream where the first stopped)."""
    from ftstudy.training import train_method

    write_jsonl(workdir / "val.jsonl", _records(6, seed=1))
    params = _tiny_params(tiny_model_dir, 4, train_qlora=dict(lora_r=4, lora_alpha=8),
                          train_galore=dict(rank=4), train_sequential_ensemble=dict(rank=4, qlora_fraction=0.5))
    kw = dict(data_dir=workdir, models_dir=workdir / "models", ckpt_root=workdir / "ck")
    single = train_method("galore", params, live_dir=workdir / "live/galore", **kw)
    hybrid = train_method("sequential_ensemble", params, live_dir=workdir / "live/hybrid", **kw)
    assert [p["steps"] for p in hybrid["phases"]] == [2, 2] and hybrid["steps"] == single["steps"] == 4
    assert [p["optimizer"] for p in hybrid["phases"]] == ["adamw_torch", "galore_adamw_layerwise"]
    assert hybrid["trained_tokens"] == single["trained_tokens"]  # the same examples, not the first half twice
    assert (workdir / "models/sequential_ensemble_qlora/adapter_model.safetensors").exists()
    steps = [int(r.split("\t")[0]) for r in
             (workdir / "live/hybrid/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]  # one curve across both phases
    assert 0 < hybrid["validation_loss"] < 20 and 0 < single["validation_loss"] < 20


def test_throughput_on_a_gpu_times_steps_without_waiting_for_it(monkeypatch):
    """On a GPU each step's end is a CUDA event, read once after training: no step makes the host wait for the GPU
    (it queues the next step meanwhile), and the seconds between events are the steps' seconds."""
    from types import SimpleNamespace

    from ftstudy.trainer import throughput_callback

    waits = []

    class Event:  # a CUDA event on a fake clock: each records 3 s after the previous one
        recorded = 0

        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            Event.recorded += 1
            self.t = Event.recorded * 3.0

        def synchronize(self):
            waits.append("event")

        def elapsed_time(self, end):
            return (end.t - self.t) * 1000  # milliseconds, as CUDA reports them

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: waits.append("device"))
    trainer = SimpleNamespace(tokens_trained=0, batch_shapes=[])
    state = SimpleNamespace(global_step=0)
    cb = throughput_callback(trainer, compiled=False, cuda_graphs=False, projection_gap=None)
    cb.on_train_begin(None, state, None)
    for _ in range(4):
        trainer.batch_shapes.append((8, 64))
        trainer.tokens_trained += 30
        state.global_step += 1
        cb.on_step_end(None, state, None)
    assert waits == []  # four steps, no wait
    summary = cb.summary()
    assert waits == ["event"]  # one, for the last event, when the summary is read
    assert summary["step_seconds"] == [3.0] * 4 and summary["steady_tokens_per_s"] == 10.0


def test_resumed_curves_drop_what_a_kill_left_half_written(tmp_path):
    """A run killed while dvclive wrote its files resumes: rows after the checkpoint and a row cut short are dropped,
    and a summary cut mid-file (which dvclive could not read back) is removed."""
    from ftstudy.checkpoints import truncate_curves

    tsv = tmp_path / "plots/metrics/train/loss.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("step\tloss\n1\t2.5\n2\t2.4\n3\t2.3\n1")  # killed while writing step 14's row
    (tmp_path / "metrics.json").write_text('{"step": 1')
    truncate_curves(tmp_path, 2)
    assert tsv.read_text() == "step\tloss\n1\t2.5\n2\t2.4\n"
    assert not (tmp_path / "metrics.json").exists()
    (tmp_path / "metrics.json").write_text('{"step": 2}')
    truncate_curves(tmp_path, 2)
    assert (tmp_path / "metrics.json").exists()  # a whole summary stays


def test_weights_digest_takes_a_fetched_base_from_its_hash_list_and_hashes_any_other_folder(tmp_path):
    from ftstudy.atomic import weights_digest

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir(), adapter.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    (base / "fetch_info.json").write_text('{"files": {"model.safetensors": "sha of the weights"}}')
    assert weights_digest(base) == (base / "fetch_info.json").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(b"first")
    first = weights_digest(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"second")
    assert weights_digest(adapter) != first


def test_the_sweep_trains_the_hybrids_qlora_phase_once_and_the_training_at_its_best_rate_is_its_run(
        workdir, tiny_model_dir, capfd):
    """The run store: the hybrid's QLoRA phase (the same at every rate of its sweep) is trained once (each rate runs in
    a process of its own, so the messages are read from the file descriptor); the sweep keeps its best rate's runs
    alone, and the study's training at that rate and seed gets that run's model, curves and
    metrics without training; a training at another rate trains."""
    from ftstudy.checkpoints import RunStore
    from ftstudy.sweep import sweep_method
    from ftstudy.training import train_method

    write_jsonl(workdir / "val.jsonl", _records(6, seed=1))
    params = _tiny_params(tiny_model_dir, 4, train_qlora=dict(lora_r=4, lora_alpha=8),
                          train_sequential_ensemble=dict(rank=4, qlora_fraction=0.5),
                          sweep=dict(sequential_ensemble=[1e-4, 1e-2]))
    store = workdir / "runs"
    result = sweep_method("sequential_ensemble", params, data_dir=workdir, base_dir=workdir / "models/base",
                          work_dir=workdir / "sweep", store_dir=store)
    out = capfd.readouterr().out
    assert out.count("sequential_ensemble_qlora: this run") == 1  # the second rate's QLoRA phase: copied
    kept = {json.loads(f.read_text())["method"] for f in store.glob("*/metrics.json")}
    assert kept == {"sequential_ensemble_qlora", "sequential_ensemble"} and len(list(store.iterdir())) == 2

    best = result["best_learning_rate"]
    swept = next(r for r in result["grid"] if r["learning_rate"] == best)
    at_best = dataclasses.replace(params, train_sequential_ensemble=dataclasses.replace(
        params.train_sequential_ensemble, learning_rate=best))
    kw = dict(data_dir=workdir, models_dir=workdir / "models", ckpt_root=workdir / "ck",
              live_dir=workdir / "live/hybrid", store=RunStore(store, keep=False))
    m = train_method("sequential_ensemble", at_best, **kw)
    assert capfd.readouterr().out.count(": this run (params, data, base, code) finished before") == 2
    assert not (workdir / "ck").exists()  # nothing trained
    assert m["validation_loss"] == swept["validation_loss"] and m["final_train_loss"] == swept["final_train_loss"]
    assert (workdir / "models/sequential_ensemble/model.safetensors").exists()
    steps = [int(r.split("\t")[0]) for r in
             (workdir / "live/hybrid/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]  # the kept run's whole curve
    fresh = workdir / "fresh"  # the same run trained anew, elsewhere: on a CPU, the bytes of the copy
    fresh.mkdir()
    (fresh / "base").symlink_to(tiny_model_dir)
    train_method("sequential_ensemble", at_best, data_dir=workdir, models_dir=fresh, ckpt_root=workdir / "ck-fresh",
                 live_dir=workdir / "live/fresh")
    for f in ("sequential_ensemble_qlora/adapter_model.safetensors", "sequential_ensemble_qlora/adapter_config.json",
              "sequential_ensemble_qlora/README.md", "sequential_ensemble/model.safetensors"):
        assert (fresh / f).read_bytes() == (workdir / "models" / f).read_bytes(), f
    capfd.readouterr()

    other = dataclasses.replace(params, train_sequential_ensemble=dataclasses.replace(
        params.train_sequential_ensemble, learning_rate=3e-3))
    train_method("sequential_ensemble", other, **kw)
    assert capfd.readouterr().out.count(": this run (params, data, base, code) finished before") == 1  # QLoRA's
    assert (workdir / "ck/sequential_ensemble").exists()
    assert len(list(store.iterdir())) == 2  # a training only reads the store


def test_a_diverged_run_stops_with_advice_instead_of_saving_nan_weights(workdir, tiny_model_dir, monkeypatch):
    """A LoRA run whose loss turns NaN (here from its third step) is stopped at the next logged step with what to try,
    and no model is written (the Trainer alone would train NaN weights to the end of the budget and save them)."""
    from ftstudy import trainer

    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss = completion_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(trainer, "completion_loss", diverging)
    params = _tiny_params(tiny_model_dir, 6, train_lora_wide=dict(lora_r=4, lora_alpha=8))
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, logging_steps=2))
    with pytest.raises(UserError, match=r"lora_wide: loss nan.* at step 4: the run diverged .*train\.compile=off"):
        _train(workdir, params, "lora_wide")
    assert not (workdir / "models/lora_wide").exists()


def test_a_saved_adapter_names_the_pipelines_base_wherever_it_trained(workdir, tiny_model_dir):
    """A sweep trains under checkpoints/, the stage under models/: the adapter bytes (and so the run store's copy, and
    DVC's hash) must not depend on the folder the base was read from."""
    params = _tiny_params(tiny_model_dir, 2, train_lora_wide=dict(lora_r=4, lora_alpha=8))
    _train(workdir, params, "lora_wide")
    config = json.loads((workdir / "models/lora_wide/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "models/base"
    card = (workdir / "models/lora_wide/README.md").read_text()
    assert "base_model: models/base\n" in card and str(workdir) not in card and str(tiny_model_dir) not in card


def test_a_sweep_rates_process_ends_when_the_stage_process_is_killed(tmp_path):
    """Each sweep rate trains in a spawned process; a SIGKILLed stage must not leave it training on (on a GPU for
    hours) beside the stage run again to resume the sweep."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "stage.py"
    script.write_text("import time\nfrom ftstudy.sweep import _apart\n\n"
                      "if __name__ == '__main__':\n    _apart(time.sleep, 300)\n")
    stage = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(root)})
    try:
        deadline, workers = time.time() + 120, []
        while not workers and time.time() < deadline:
            workers = [c for c in psutil.Process(stage.pid).children(recursive=True)
                       if "spawn_main" in " ".join(c.cmdline())]
            time.sleep(0.2)
        assert workers, "the rate's process never started"
        time.sleep(2)  # its watcher is up once the worker has imported and run the pool's initializer
    finally:
        stage.kill()
        stage.wait()
    _, alive = psutil.wait_procs(workers, timeout=20)
    for p in alive:
        p.kill()
    assert not alive, "the rate's process outlived its stage"


def test_the_trainers_per_step_bookkeeping_is_cheap_and_the_same(tiny_model_dir, tiny_tokenizer, tmp_path):
    """CompletionTrainer's FLOP count, clipping, train() and zero_grad() give what the Trainer's own give, over
    the weights that train only: the Trainer's versions walk every module or parameter at every step."""
    from transformers import Trainer, TrainingArguments

    from ftstudy.prepare import prepare_model
    from ftstudy.trainer import completion_trainer_class, trained_weights

    params = _tiny_params(tiny_model_dir, 1)
    params = dataclasses.replace(params, train_lora_wide=dataclasses.replace(params.train_lora_wide, lora_dropout=0.5))
    model, _, _ = prepare_model(method_spec(params, "lora_wide"), params, tiny_model_dir, tiny_model_dir.parent)
    args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.01, report_to="none", use_cpu=True)
    trainer = completion_trainer_class()(model=model, args=args)
    batch = _batch(tiny_tokenizer, _records(4))
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch)  # counted once, still equal

    def loss_and_grads():
        model.zero_grad()
        completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).backward()

    # A fresh PEFT wrapper trains around a model loaded in eval mode: the first step must still switch every module
    # (dropout on; transformers checkpoints a layer only while it trains).
    model.base_model.model.eval()
    assert model.training and not all(m.training for m in model.modules())
    trainer.training_step(model, {**batch, "num_tokens": 1})  # installs the quick bookkeeping, as the loop's first step
    assert all(m.training for m in model.modules())
    weights = trained_weights(model)
    assert weights and all(p.requires_grad for p in weights)
    assert len(weights) == sum(p.requires_grad for p in model.parameters()) < len(list(model.parameters()))
    torch.manual_seed(0)
    loss_and_grads()
    ours = trainer._clip_grad_norm(model)
    clipped = [p.grad.clone() for p in weights]
    torch.manual_seed(0)
    loss_and_grads()
    theirs = Trainer._clip_grad_norm(trainer, model)
    assert float(ours) == pytest.approx(float(theirs)) and float(ours) > args.max_grad_norm  # it did clip
    assert all(torch.equal(a, p.grad) for a, p in zip(clipped, weights, strict=True))

    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # eval() turns dropout off everywhere, train() back on everywhere: the same modes as the Trainer's own calls.
    model.eval()
    assert not any(m.training for m in model.modules())
    assert model.train() is model and all(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    next(model.base_model.model.model.layers.modules()).eval()  # one submodule switched alone is switched back
    model.train()
    assert all(m.training for m in model.modules())
