"""ftstudy.galore against galore-torch and transformers, weight for weight, on CPU: bitsandbytes' 8-bit and
32-bit AdamW updates run there; galore-torch's per-weight device sync needs CUDA, so it gets a no-op sync."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftstudy import galore
from ftstudy.galore import LayerwiseGaLore
from ftstudy.methods import galore_target_patterns

pytest.importorskip("galore_torch")
pytest.importorskip("bitsandbytes")

STEPS = 5


@pytest.fixture(autouse=True)
def same_projector(monkeypatch):
    """The references (galore-torch's optimizers, and transformers' built from them) take their basis from the
    project's projector, so that these tests compare everything but the basis, bit for bit; the basis itself is
    compared with galore-torch's SVD in test_basis_is_the_svds_top_subspace."""
    import galore_torch.adamw
    import galore_torch.adamw8bit

    for module in (galore_torch.adamw, galore_torch.adamw8bit):
        monkeypatch.setattr(module, "GaLoreProjector", galore._projector_class())


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
@pytest.mark.parametrize("data_rank", [None, 12])  # full rank, and the rank-deficient gradient of a short batch
def test_basis_is_the_svds_top_subspace(shape, data_rank):
    """The projector's basis spans what galore-torch's SVD keeps: the same projection of any gradient."""
    from galore_torch.galore_projector import GaLoreProjector

    g = torch.Generator().manual_seed(0)
    m, n = shape
    scale = torch.logspace(0, -3, min(m, n))  # distinct singular values: a unique top subspace
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    if data_rank is not None:
        scale[data_rank:] = 0
    grad = (u * scale) @ v.T
    rank = 8
    for proj_type in ("std", "reverse_std"):
        ours = galore.projector(rank, 200, 1.0, proj_type)
        svd = GaLoreProjector(rank, update_proj_gap=200, scale=1.0, proj_type=proj_type)
        low_ours, low_svd = ours.project(grad, 0), svd.project(grad, 0)
        assert low_ours.shape == low_svd.shape
        torch.testing.assert_close(ours.project_back(low_ours), svd.project_back(low_svd), atol=1e-5, rtol=1e-4)
        basis = ours.ortho_matrix
        eye = basis @ basis.T if basis.shape[0] == rank else basis.T @ basis
        torch.testing.assert_close(eye, torch.eye(rank), atol=1e-5, rtol=0)  # orthonormal


def test_a_non_finite_gradient_is_refused_with_a_clear_error_instead_of_an_endless_svd():
    grad = torch.randn(64, 48)
    grad[3, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf.*train.compile=off"):
        galore.projector(8, 200, 0.25).project(grad, 0)


def test_basis_of_a_gradient_of_lower_rank_than_asked_is_still_orthonormal():
    """A batch of fewer tokens than GaLore's rank: the basis still has ``rank`` orthonormal vectors."""
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(64, 3, generator=g) @ torch.randn(3, 48, generator=g)
    basis = galore.top_singular_vectors(grad, 16, "right")
    assert basis.shape == (16, 48)
    torch.testing.assert_close(basis @ basis.T, torch.eye(16), atol=1e-5, rtol=0)


def _run(model, optim: str, loss_fn, tmp_path, target_modules, rank: int, rates=None):
    """STEPS steps as the Trainer takes them. Without ``rates``: the project's optimizer with the Trainer's
    warm-up-then-linear scheduler; with them: transformers' layer-wise optimizer, each of its per-weight
    optimizers given that rate at each step (what its per-weight schedulers are meant to do)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / optim), optim=optim, optim_target_modules=target_modules,
                             optim_args=f"rank={rank},update_proj_gap=2,scale=0.25", learning_rate=1e-2,
                             lr_scheduler_type="linear", warmup_steps=2, max_steps=STEPS, use_cpu=True,
                             report_to="none")
    trainer = Trainer(model=model, args=args)
    if rates is None:
        trainer.optimizer = LayerwiseGaLore.from_trainer_args(model, args)
        trainer.create_optimizer_and_scheduler(num_training_steps=STEPS)
    else:
        trainer.create_optimizer()
    used, left = [], []
    for step in range(STEPS):
        if rates is not None:
            for opt in trainer.optimizer.optimizer_dict.values():
                opt.param_groups[0]["lr"] = rates[step]
        used.append(trainer.optimizer.param_groups[0]["lr"])
        loss_fn(model, step).backward()
        left.append([n for n, p in model.named_parameters() if p.grad is not None])
        trainer.optimizer.step()
        if rates is None:
            trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad()
    return trainer.optimizer, used, left


@pytest.mark.parametrize("optim", ["galore_adamw_8bit_layerwise", "galore_adamw_layerwise"])
def test_same_weights_as_transformers_layerwise_galore_on_the_schedule(optim, tiny_model_dir, monkeypatch, tmp_path):
    import galore_torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    # transformers' own layer-wise optimizers take galore-torch's class by name: the one with its arguments bound
    monkeypatch.setattr(galore_torch, "GaLoreAdamW8bit", galore.adamw_8bit_class())
    # The tiny model's weights (8-33 kB) projected back a few at a time, as a decoder layer's are on Gemma 3 1B
    monkeypatch.setattr(galore, "PROJECT_BACK_BYTES", 64 * 2**10)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 200, (2, 24), generator=g) for _ in range(STEPS)]

    def loss_fn(model, step):
        return model(input_ids=batches[step], labels=batches[step]).loss

    targets = galore_target_patterns(["self_attn", "mlp"])
    init = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()}
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    opt, rates, left = _run(ours, optim, loss_fn, tmp_path / "ours", targets, rank=64)
    assert rates == pytest.approx([0.0, 5e-3, 1e-2, 2e-2 / 3, 1e-2 / 3])  # warm-up, then linear decay
    assert left == [[]] * STEPS  # every gradient was consumed during the backward, as layer-wise does
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    _run(hf, optim, loss_fn, tmp_path / "hf", targets, rank=64, rates=rates)
    if "8bit" in optim:
        kinds = {(b.galore, b.eight_bit) for b in opt.buckets}
        assert kinds == {(True, True), (True, False), (False, False)}  # 8-bit and 32-bit GaLore states, norms
        assert len(opt.single) == 1  # the (tied) embedding, stepped in its hook
    theirs = dict(hf.named_parameters())
    for name, w in ours.named_parameters():
        assert torch.equal(w, theirs[name]), name
        assert not torch.equal(w, init[name]), name  # and everything was trained


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(96, 64, bias=False)
        self.b = nn.Linear(64, 96, bias=False)
        self.norm = nn.Parameter(torch.ones(64))
        self.other = nn.Parameter(torch.ones(32))


def test_a_weight_without_gradient_keeps_its_own_step_count(monkeypatch, tmp_path):
    """Where a step leaves some weights without gradient, each weight's Adam step count still matches its own
    optimizer's in the layer-wise original (per-weight updates instead of the one batched call)."""
    import galore_torch

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(galore_torch, "GaLoreAdamW8bit", galore.adamw_8bit_class())  # for transformers' original
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 96, generator=g) for _ in range(STEPS)]

    def loss_fn(net, step):
        h = net.a(xs[step]) * net.norm
        loss = net.b(h).pow(2).mean()
        if step % 2:  # `other` and `b` miss alternate steps
            loss = (h.pow(2).mean() + net.other.sum())
        return loss

    torch.manual_seed(0)
    init = _Net().state_dict()
    ours, hf = _Net(), _Net()
    ours.load_state_dict(init)
    hf.load_state_dict(init)
    opt, rates, _ = _run(ours, "galore_adamw_8bit_layerwise", loss_fn, tmp_path / "ours", [r"^a$", r"^b$"], rank=8)
    _run(hf, "galore_adamw_8bit_layerwise", loss_fn, tmp_path / "hf", [r"^a$", r"^b$"], rank=8, rates=rates)
    assert [b.steps for b in opt.buckets if b.galore] == [[STEPS, (STEPS + 1) // 2]]
    theirs = hf.state_dict()
    for name, w in ours.state_dict().items():
        assert torch.equal(w, theirs[name]), name


@pytest.mark.parametrize("optim", ["galore_adamw_8bit_layerwise", "galore_adamw_layerwise"])
def test_grad_norm_is_the_global_norm_of_the_gradients_the_hooks_consumed(optim, monkeypatch, tmp_path):
    from transformers import TrainingArguments

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    torch.manual_seed(0)
    net, ref = _Net(), _Net()
    ref.load_state_dict(net.state_dict())
    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, optim_target_modules=[r"^a$", r"^b$"],
                             optim_args="rank=8", learning_rate=1e-2, use_cpu=True, report_to="none")
    opt = LayerwiseGaLore.from_trainer_args(net, args)
    x = torch.randn(4, 96)
    for model in (net, ref):
        (model.b(model.a(x) * model.norm).pow(2).mean() + model.other.sum()).backward()
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters()))
    assert all(p.grad is None for p in net.parameters())  # consumed by the hooks
    torch.testing.assert_close(opt.grad_norm(), expected)
    opt.step()
    assert opt.grad_norm() == 0  # a new step measures anew


@pytest.mark.parametrize("optim", ["galore_adamw_8bit_layerwise", "galore_adamw_layerwise"])
def test_state_dict_round_trip_continues_the_same_run(optim, monkeypatch, tmp_path):
    """What a checkpoint saves (through torch.save and a weights-only load) restores moments, step counts and
    projections: the resumed optimizer takes the steps the uninterrupted one takes."""
    from transformers import TrainingArguments

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, optim_target_modules=[r"^a$", r"^b$"],
                             optim_args="rank=8,update_proj_gap=3", learning_rate=1e-2, use_cpu=True,
                             report_to="none")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 96, generator=g) for _ in range(6)]

    def steps(net, opt, which):
        for i in which:
            net.b(net.a(xs[i]) * net.norm).pow(2).mean().add(net.other.sum()).backward()
            opt.step()

    torch.manual_seed(0)
    whole, first = _Net(), _Net()
    first.load_state_dict(whole.state_dict())
    opt = LayerwiseGaLore.from_trainer_args(whole, args)
    steps(whole, opt, range(6))
    opt = LayerwiseGaLore.from_trainer_args(first, args)
    steps(first, opt, range(4))
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    resumed = _Net()
    resumed.load_state_dict(first.state_dict())
    opt = LayerwiseGaLore.from_trainer_args(resumed, args)
    opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    steps(resumed, opt, range(4, 6))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_galore_torch_8bit_trains_the_norms_only_with_its_arguments_bound_by_name(monkeypatch):
    """galore-torch 1.0 + bitsandbytes 0.50: positional arguments put 100 in max_unorm, which zeroes every update of
    a weight with 32-bit states (below 4096 values: Gemma's norms). The project's subclass trains them; galore-torch's
    class is left as installed (nothing patched process-wide)."""
    import inspect

    import galore_torch
    from bitsandbytes.optim.optimizer import Optimizer2State

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)

    def norm_moves(cls) -> bool:
        p = nn.Parameter(torch.zeros(64))
        opt = cls([p], lr=1e-2)
        p.grad = torch.randn(64)
        opt.step()
        return bool(p.abs().max() > 0)

    assert "percentile_clipping" not in inspect.signature(Optimizer2State.__init__).parameters, \
        "bitsandbytes has percentile_clipping again: the subclass's binding by name may be obsolete"
    ours = galore.adamw_8bit_class()
    assert (norm_moves(galore_torch.GaLoreAdamW8bit), norm_moves(ours)) == (False, True)
    assert issubclass(ours, galore_torch.GaLoreAdamW8bit) and galore_torch.GaLoreAdamW8bit.step is not ours.step


def test_galore_8bit_step_is_galore_torchs_update_with_weights_kept_in_place(monkeypatch):
    """Same weights as galore-torch's own step over reprojections and weight decay, without moving any weight
    (CUDA graphs read weights where they were recorded). bitsandbytes' 8-bit update runs on CPU too; only
    galore-torch's device sync needs CUDA, so the original gets a no-op sync here."""
    import galore_torch

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    torch.manual_seed(0)
    init = [torch.randn(256, 512) * 0.02, torch.randn(512, 256) * 0.02, torch.ones(300)]
    finals, moved, states = [], [], []
    for step_fn in (galore_torch.GaLoreAdamW8bit.step, galore.galore_8bit_step):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = galore.adamw_8bit_class()([{"params": params[2:]},  # outside GaLore's targets: plain 8-bit AdamW
                                            {"params": params[:2], "rank": 32, "update_proj_gap": 2, "scale": 0.25,
                                             "proj_type": "std"}], lr=1e-2, weight_decay=0.1)
        g = torch.Generator().manual_seed(1)
        was_moved = [False] * len(params)
        for _ in range(5):
            for q in params:
                q.grad = torch.randn(q.shape, generator=g)
            ptrs = [q.data_ptr() for q in params]  # per step: the allocator may hand an old address back later
            step_fn(opt)
            was_moved = [m or q.data_ptr() != ptr for m, q, ptr in zip(was_moved, params, ptrs, strict=True)]
        finals.append(params)
        moved.append(was_moved)
        states.append(opt.state[params[0]]["state1"].dtype)
    assert states == [torch.uint8, torch.uint8]  # the 8-bit path was exercised
    assert moved[0][:2] == [True, True]  # galore-torch moves the projected weights every step ...
    assert moved[1] == [False, False, False]  # ... the project's step never does
    for a, b, t in zip(*finals, init, strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, t)  # and the weights did change


def test_the_trainer_builds_non_layerwise_8bit_galore_from_the_projects_class(tiny_model_dir, tmp_path):
    """transformers picks galore-torch's GaLoreAdamW8bit by name for `galore_adamw_8bit`; the project's Trainer
    puts the subclass with the arguments bound by name in its place."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from ftstudy.methods import galore_target_patterns
    from ftstudy.trainer import completion_trainer_class

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), optim="galore_adamw_8bit", use_cpu=True, report_to="none",
                             optim_target_modules=galore_target_patterns(["self_attn"]), optim_args="rank=8")
    trainer = completion_trainer_class()(model=model, args=args)
    trainer.create_optimizer()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(opt) is galore.adamw_8bit_class()
    assert any(group.get("rank") == 8 for group in opt.param_groups)


class _Mixed(nn.Module):
    """One weight of each kind the batched optimizer treats apart: a GaLore target whose projection fills 8-bit
    blocks, one whose projection is too small for 8 bits, a large non-target (the embedding's path) and a norm."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(256, 512, bias=False)   # 512 x 256, projected on the right: 512 x 8 = 4,096 values
        self.small = nn.Linear(96, 64, bias=False)   # 64 x 96, projected on the left: 8 x 96
        self.emb = nn.Embedding(600, 16)             # 9,600 values, not a target
        self.norm = nn.Parameter(torch.ones(64))

    def loss(self, ids):
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(4, 256, generator=g), torch.randn(4, 96, generator=g)
        return self.big(x).pow(2).mean() + (self.small(y) * self.norm).pow(2).mean() + self.emb(ids).pow(2).mean()


def _held(opt) -> int:
    """Bytes of every tensor the optimizer keeps between steps (scalars such as step counts left out)."""
    tensors = [proj.ortho_matrix for proj in opt.projectors.values()]
    for b in opt.buckets:
        tensors += [getattr(b, name) for name in ("g", "p", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")
                    if hasattr(b, name)]
    for single in opt.single.values():
        for state in single.state.values():
            for v in state.values():
                tensors.append(getattr(v, "ortho_matrix", v))
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 1)


@pytest.mark.parametrize("eight_bit", [True, False])
def test_held_bytes_predicts_what_the_optimizer_holds_after_its_first_step(eight_bit, monkeypatch):
    """The memory-budget mode plans with LayerwiseGaLore.held_bytes before any optimizer exists: it must equal
    what the optimizer then allocates (projected moments, buffers, 8-bit maxima and maps, the bases made at the
    first step), not the full-size moments the plan counted before (1.2 GB too many for gemma-3-1b)."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    torch.manual_seed(0)
    net = _Mixed()
    targets = {"big.weight", "small.weight"}
    predicted = LayerwiseGaLore.held_bytes(net, targets, eight_bit=eight_bit, rank=8)
    opt = LayerwiseGaLore(net, targets, eight_bit=eight_bit, lr=1e-3, rank=8, update_proj_gap=10, scale=0.25)
    if eight_bit:
        assert {(b.galore, b.eight_bit) for b in opt.buckets} == {(True, True), (True, False), (False, False)}
        assert len(opt.single) == 1  # the embedding
    net.loss(torch.randint(0, 600, (4, 8))).backward()
    opt.step()
    assert predicted == _held(opt)
    full_size_moments = sum(p.numel() for p in net.parameters()) * 2 * (1 if eight_bit else 4)
    assert predicted < full_size_moments / 2


def test_updates_are_projected_back_in_groups_of_bounded_size():
    sizes = [3, 1, 4, 1, 5, 9, 2, 6]
    members = [(torch.empty(n, dtype=torch.uint8), 0, None) for n in sizes]
    groups = galore._by_bytes(members, 6)
    assert [[m[0].numel() for m in g] for g in groups] == [[3, 1], [4, 1], [5], [9], [2], [6]]
    assert sum(groups, []) == members  # every weight once, in order
