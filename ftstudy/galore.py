"""GaLore through galore-torch and bitsandbytes, as the training stages run it.

- ``adamw_8bit_class``: galore-torch's 8-bit optimizer subclassed. galore-torch 1.0 binds bitsandbytes 0.50's
  arguments wrongly, so weights with 32-bit states (Gemma's norms) never train: bound by name. Its step is
  ``galore_8bit_step``: galore-torch's without a device sync per weight and with weights updated in place
  (CUDA graphs read them where they were recorded).
- ``LayerwiseGaLore``: the layer-wise optimizers (``galore_adamw_layerwise``, ``galore_adamw_8bit_layerwise``)
  on the Trainer's schedule and, in 8 bits, with their per-weight work batched.

About the layer-wise optimizers. transformers builds layer-wise GaLore as one galore-torch optimizer per weight,
stepped in that weight's gradient hook, behind a dummy optimizer. Two costs:

1. The learning-rate schedule never reaches those optimizers: ``Trainer.train`` builds the scheduler after
   accelerate has wrapped the dummy, so ``get_scheduler`` no longer recognises it and schedules the dummy alone.
   Every weight trains at the peak rate from the first step (no warm-up, no decay) while the logged rate follows
   the schedule (transformers 5.23; its per-weight scheduler path itself fails on torch 2.13). Here one param
   group holds every weight and the Trainer's scheduler drives it; the hooks read its rate.
2. In 8 bits on a GPU, the Python: on Gemma 3 1B, 340 optimizer steps a training step of a few hundred
   microseconds each while the GPU waits (an H100 step of 8 x 512 tokens took 0.231 s, against 0.089 s for
   wide LoRA over the same layers). Here the hooks do only what has to happen while the backward runs, so that
   no full-size gradient outlives its layer: a GaLore weight's gradient is projected to its low rank and
   written into one flat buffer; a small weight's gradient (the norms) is copied into another; a large weight
   outside GaLore's targets (the embedding, whose gradient arrives last) is stepped there, as before.
   ``step()`` then runs one bitsandbytes update per buffer and projects each GaLore update back onto its weight.

The 8-bit update is galore-torch's (with its arguments fixed), update for update: bitsandbytes' blockwise 8-bit AdamW quantises each block
of 256 values on its own, so one call over a buffer whose every weight starts on a block boundary computes what
one call per weight computes; weights below bitsandbytes' 8-bit threshold keep 32-bit states; weight decay is
in the kernel for plain weights and on the full weight after projecting back for GaLore weights; galore-torch's
defaults (betas, eps, weight decay 0.01) are kept, since transformers passes only the learning rate.
``tests/test_galore.py`` checks the weights equal, bit for bit, those of transformers' layer-wise optimizers
given the same rate at every step and the same projector (below).

Unlike transformers' layer-wise optimizers, the state (moments, step counts, projections) is in the Trainer's
checkpoints, so a resumed run continues the interrupted one. Like them, gradient accumulation is refused, and
gradients are not clipped: each weight is updated in its hook, before the global norm of the step's gradients
exists. ``grad_norm()`` measures that norm, which the training loop logs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

BLOCK = 256  # bitsandbytes' block size for its blockwise 8-bit optimizer states
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.01  # galore-torch GaLoreAdamW8bit's defaults
MIN_8BIT_SIZE = 4096  # bitsandbytes: smaller tensors keep 32-bit states
# Full-size updates projected back at once after a step (a decoder layer's seven weights on Gemma 3 1B take 52 MB
# in bf16): a few launches over each group instead of four per weight, in bounded memory.
PROJECT_BACK_BYTES = 64 * 2**20


@dataclass
class _Bucket:
    """Weights whose updates run as one bitsandbytes call over flat buffers."""

    galore: bool  # the buffer's "weights" are zero stand-ins of the projected shape (galore-torch's trick)
    eight_bit: bool
    dtype: torch.dtype
    members: list = field(default_factory=list)  # (param, offset, shape of what is updated)
    size: int = 0
    STATE = ("state1", "state2", "absmax1", "absmax2")  # what a checkpoint keeps (with the step counts)

    def span(self, shape: torch.Size) -> int:
        """Buffer length a weight takes: in 8 bits whole blocks, so that every weight starts a block."""
        n = shape.numel()
        return -(-n // BLOCK) * BLOCK if self.eight_bit else n

    def add(self, param, shape: torch.Size) -> None:
        self.members.append((param, self.size, shape))
        self.size += self.span(shape)

    def allocate(self, device) -> None:
        from bitsandbytes import functional as bnbf

        self.g = torch.zeros(self.size, dtype=self.dtype, device=device)
        self.p = torch.zeros(self.size, dtype=self.dtype, device=device)
        state = torch.uint8 if self.eight_bit else torch.float32
        self.state1 = torch.zeros(self.size, dtype=state, device=device)
        self.state2 = torch.zeros(self.size, dtype=state, device=device)
        if self.eight_bit:
            self.absmax1 = torch.zeros(self.size // BLOCK, dtype=torch.float32, device=device)
            self.absmax2 = torch.zeros(self.size // BLOCK, dtype=torch.float32, device=device)
            self.qmap1 = bnbf.create_dynamic_map(signed=True).to(device)
            self.qmap2 = bnbf.create_dynamic_map(signed=False).to(device)
        self.steps = [0] * len(self.members)
        self.view = {id(p): (i, self.g[o:o + s.numel()].view(s)) for i, (p, o, s) in enumerate(self.members)}

    def tensors(self) -> list[torch.Tensor]:
        """What ``allocate`` made: the buffers, the states and, in 8 bits, their maxima and quantisation maps."""
        return [getattr(self, n) for n in ("g", "p", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")
                if hasattr(self, n)]

    def update(self, lr: float, weight_decay: float, ids: list[int]) -> None:
        """One bitsandbytes call over the buffers for the members ``ids`` (those with a gradient this step); one
        per weight where some weight had none (each weight's Adam step count is its own, as with one optimizer
        per weight)."""
        if len(ids) == len(self.members) and len(set(self.steps)) == 1:
            self._call(slice(0, self.size), self.steps[0] + 1, lr, weight_decay)
        else:
            for i in ids:
                _, o, s = self.members[i]
                self._call(slice(o, o + self.span(s)), self.steps[i] + 1, lr, weight_decay)
        for i in ids:
            self.steps[i] += 1

    def _call(self, sl: slice, step: int, lr: float, weight_decay: float) -> None:
        from bitsandbytes import functional as bnbf

        (b1, b2), g, p = BETAS, self.g[sl], self.p[sl]
        if self.eight_bit:
            bl = slice(sl.start // BLOCK, sl.stop // BLOCK)
            bnbf.optimizer_update_8bit_blockwise("adam", g, p, self.state1[sl], self.state2[sl], b1, b2, 0.0, 0.0,
                                                 EPS, step, lr, self.qmap1, self.qmap2, self.absmax1[bl],
                                                 self.absmax2[bl], weight_decay)
        else:
            bnbf.optimizer_update_32bit("adam", g, p, self.state1[sl], b1, EPS, step, lr, self.state2[sl], b2,
                                        0.0, 0.0, weight_decay)


def top_singular_vectors(matrix: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """The top-``rank`` right (``side="right"``: rows, like ``Vh[:rank]``) or left (columns, like ``U[:, :rank]``)
    singular vectors of ``matrix``, from the eigenvectors of its Gram matrix on that side, in float64.

    What galore-torch's projector takes from a full ``torch.linalg.svd``, without that SVD. On an H200 the Gram
    matrix of the smaller side (at most 1,152 x 1,152 on Gemma 3 1B) and its symmetric eigen-decomposition took
    13 ms for a 6,912 x 1,152 gradient against 72 ms for torch's default SVD (benchmarks/galore_svd.py), full
    rank or not; float64 keeps the squared spread of singular values exact enough. Singular vectors are defined
    up to sign (and, for equal singular values, up to rotation), as with any SVD solver. A gradient with NaN or
    inf values is refused with a clear error (cuSOLVER's SVD iterates on one for minutes).
    """
    a = matrix.double()
    gram = a.T @ a if side == "right" else a @ a.T
    if not torch.isfinite(gram).all():  # one sync per projection, which recurs every update_proj_gap steps
        raise FloatingPointError(
            f"GaLore: a gradient of shape {tuple(matrix.shape)} has NaN or inf values, so it has no projection; the "
            f"run diverged (try a lower learning rate or train.warmup_steps) or the forward/backward is broken "
            f"(retry with train.compile=off to rule out the compiled layers)")
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    top = vectors[:, -min(rank, gram.shape[0]):].flip(-1).float()
    return top.T.contiguous() if side == "right" else top.contiguous()


@functools.cache
def _projector_class():
    from galore_torch.galore_projector import GaLoreProjector

    class Projector(GaLoreProjector):
        """galore-torch's projector with its basis from :func:`top_singular_vectors` instead of a full SVD."""

        def get_orthogonal_matrix(self, weights, rank, type):
            if type not in ("right", "left"):
                return super().get_orthogonal_matrix(weights, rank, type)
            dtype = weights.dtype
            return top_singular_vectors(weights.data, rank, type).to(dtype)

    return Projector


def projector(rank: int, update_proj_gap: int, scale: float, proj_type: str = "std"):
    """A GaLore projector for one weight (galore-torch's, with :func:`top_singular_vectors`)."""
    return _projector_class()(rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)


@functools.cache
def adamw_8bit_class():
    """galore-torch's GaLoreAdamW8bit, subclassed: its bitsandbytes arguments bound by name, and its step
    :func:`galore_8bit_step`. Used wherever the project steps an 8-bit GaLore optimizer (the layer-wise one's
    embedding, and transformers' non-layer-wise ``galore_adamw_8bit`` through ``CompletionTrainer``); galore-torch's
    own class is left as installed.

    galore-torch 1.0 passes the arguments by position, for an older signature; bitsandbytes 0.50 has dropped
    percentile_clipping and block_wise, so galore-torch's 100 and True land in max_unorm and skip_zeros. A cap of
    100 x a weight norm that is never passed (0) scales to zero every update of a weight with 32-bit states
    (bitsandbytes keeps them below 4096 values): none of Gemma's norms would ever train, on a GPU as on a CPU.
    And elements whose gradient is exactly zero would be skipped (no moment decay, no weight decay).
    """
    import inspect

    import galore_torch
    from bitsandbytes.optim.optimizer import Optimizer2State

    by_position = "percentile_clipping" in inspect.signature(Optimizer2State.__init__).parameters

    class GaLoreAdamW8bit(galore_torch.GaLoreAdamW8bit):
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                     optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                     is_paged=False):
            if by_position:  # the signature galore-torch was written for
                super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
                                 percentile_clipping, block_wise, is_paged)
                return
            # percentile_clipping=100 is no clipping and bitsandbytes 0.50 is always block-wise: both its defaults
            Optimizer2State.__init__(self, "adam", params, lr, betas, eps, weight_decay, 8, args, min_8bit_size,
                                     is_paged=is_paged)

        def step(self, closure=None):
            return galore_8bit_step(self, closure)

    return GaLoreAdamW8bit


@torch.no_grad()
def galore_8bit_step(self, closure=None):
    """galore-torch's GaLoreAdamW8bit.step, the same update without its two costs on a GPU.

    Per weight, the original (1) synchronises the device after bitsandbytes' update, which a non-paged optimizer
    on one stream does not need: layer-wise, that is ~340 host stalls a step, 0.2 s of a 0.29 s GaLore step on an
    H100; and (2) replaces the weight's storage with a fresh copy (``p.data = p.saved_data.add_(...)``), which
    costs a copy of each weight and makes CUDA graphs, which read weights where they were recorded, record anew
    every step. Here the weight stays where it is and receives the projected-back update in place.
    The algorithm is galore-torch's: project the gradient (GaLoreProjector), run bitsandbytes' 8-bit AdamW
    step on a zero stand-in of the projected shape, project its result back onto the weight, then apply
    decoupled weight decay to the full weight. benchmarks/galore_step.py checks it against the original.
    """
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if not self.initialized:
        self.check_overrides()
        self.to_gpu()
        self.initialized = True
    for gindex, group in enumerate(self.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            state.setdefault("step", 0)
            if "rank" not in group:  # a weight outside GaLore's targets: plain 8-bit AdamW
                if "state1" not in state:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                continue
            if "projector" not in state:
                state["projector"] = projector(group["rank"], group["update_proj_gap"], group["scale"],
                                               group["proj_type"])
            decay = group.get("weight_decay", 0.0)
            group["weight_decay"] = 0.0  # not on the low-rank stand-in: on the full weight, below
            weight = p.data
            grad = state["projector"].project(p.grad, state["step"])
            p.data = torch.zeros_like(grad, dtype=weight.dtype)
            p.grad = grad
            try:
                if "state1" not in state:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                update = p.data
            finally:
                p.data = weight
                group["weight_decay"] = decay
            weight.add_(state["projector"].project_back(update))
            if decay > 0:
                weight.add_(weight, alpha=-group["lr"] * decay)
    if self.is_paged:
        torch.cuda.synchronize()  # paged state moves asynchronously
    return loss


def _by_bytes(members: list, limit: int) -> list[list]:
    """``members`` (param, offset, shape) in consecutive groups whose full-size weights take at most ``limit`` bytes
    together (a group of one where a weight alone is larger)."""
    groups, size = [], 0
    for m in members:
        n = m[0].numel() * m[0].element_size()
        if not groups or size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(m)
        size += n
    return groups


def _projects_right(p, proj_type: str) -> bool:
    """Whether GaLoreProjector projects ``p``'s gradient on its right (m x r) rather than its left (r x n)."""
    m, n = p.shape
    right = {"std": m >= n, "reverse_std": m < n, "right": True, "left": False}
    if proj_type not in right:
        raise ValueError(f"GaLore proj_type={proj_type!r} is not supported by the batched layer-wise optimizer; "
                         f"use one of {sorted(right)}")
    return right[proj_type]


def _projected_shape(p, rank: int, proj_type: str) -> torch.Size:
    """The low-rank gradient's shape, as GaLoreProjector.project makes it (its SVD keeps min(rank, m, n))."""
    m, n = p.shape
    r = min(rank, m, n)
    return torch.Size((m, r) if _projects_right(p, proj_type) else (r, n))


def _layout(named, target_names: set[str], *, eight_bit: bool, rank: int, proj_type: str):
    """Which weight ``LayerwiseGaLore`` steps how, without allocating anything: (name, weight) pairs stepped by an
    optimizer of their own (every weight in 32 bits; in 8 bits a large weight outside GaLore's targets, the
    embedding), and the 8-bit buckets with each member's offset and updated shape (projected for GaLore weights)."""
    singles, buckets = [], {}
    for name, p in named:
        target = name in target_names
        if not eight_bit or (not target and p.numel() >= MIN_8BIT_SIZE):
            singles.append((name, p))
            continue
        shape = _projected_shape(p, rank, proj_type) if target else p.shape
        eight = shape.numel() >= MIN_8BIT_SIZE
        buckets.setdefault((target, eight, p.dtype), _Bucket(target, eight, p.dtype)).add(p, shape)
    return singles, list(buckets.values())


def galore_targets(model, wanted) -> set[str]:
    """The weights GaLore projects, as transformers selects them for its layer-wise optimizers: every linear layer
    for "all-linear", else those whose module name matches ``wanted``."""
    from torch import nn
    from transformers.trainer_utils import check_target_module_exists

    every = isinstance(wanted, str) and wanted.replace("_", "-") == "all-linear"
    return {f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (every or check_target_module_exists(wanted, n))}


class LayerwiseGaLore(torch.optim.Optimizer):
    """Layer-wise GaLore for the transformers Trainer: one param group that the Trainer's scheduler drives.

    ``eight_bit``: galore_adamw_8bit_layerwise, batched as described above; otherwise galore_adamw_layerwise,
    one galore-torch GaLoreAdamW per weight stepped in its hook, as transformers builds it.
    """

    def __init__(self, model, target_names: set[str], *, eight_bit: bool, lr: float, rank: int,
                 update_proj_gap: int, scale: float, proj_type: str = "std"):
        from galore_torch import GaLoreAdamW

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        super().__init__([p for _, p in named], {"lr": lr})
        galore = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type}
        singles, self.buckets = _layout(named, target_names, eight_bit=eight_bit, rank=rank, proj_type=proj_type)
        self.single = {}
        for name, p in singles:
            if eight_bit:  # the embedding: stepped in its hook by galore-torch's own class
                self.single[p] = adamw_8bit_class()([p], lr=lr)
            else:
                self.single[p] = GaLoreAdamW([{"params": [p], **(galore if name in target_names else {})}], lr=lr)
                _seed_projector(self.single[p], p)
        self.projectors = {p: projector(rank, update_proj_gap, scale, proj_type)  # the 8-bit buckets' GaLore weights
                           for name, p in named if eight_bit and name in target_names}
        for b in self.buckets:
            b.allocate(b.members[0][0].device)
        self.slot = {pid: (b, i, view) for b in self.buckets for pid, (i, view) in b.view.items()}
        # Which side a GaLore weight's basis multiplies (what galore-torch's project() decides per call), so that the
        # hook projects straight into the weight's slot of its bucket.
        self.right = {p: _projects_right(p, proj_type) for p in self.projectors}
        self._got: set[int] = set()
        # Each weight's gradient norm in a slot of its own, written by its hook in one kernel; the global norm is
        # theirs. Slots of weights without a gradient stay zero (cleared after every step).
        self._norms = torch.zeros(len(named), dtype=torch.float32, device=named[0][1].device)
        self._norm_slot = {id(p): self._norms[k] for k, (_, p) in enumerate(named)}
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for _, p in named]

    @staticmethod
    def held_bytes(model, target_names: set[str], *, eight_bit: bool, rank: int, proj_type: str = "std") -> int:
        """Bytes this optimizer holds for ``model`` from its first step on, before anything is allocated
        (ftstudy.budget plans memory with it): the buckets of the same layout as the constructor's, sized on the
        meta device; the per-weight optimizers' moments (bitsandbytes' 8-bit AdamW for the embedding with its
        maxima and maps; galore-torch's at the projected size); the projection bases galore-torch makes at a
        weight's first step."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        singles, buckets = _layout(named, target_names, eight_bit=eight_bit, rank=rank, proj_type=proj_type)
        total = 0
        for b in buckets:
            b.allocate(torch.device("meta"))
            total += sum(t.numel() * t.element_size() for t in b.tensors())
        for name, p in singles:
            n = _projected_shape(p, rank, proj_type).numel() if name in target_names else p.numel()
            total += 2 * n + 2 * 4 * (-(-n // BLOCK) + 256) if eight_bit else 2 * n * p.element_size()
        for name, p in named:
            if name in target_names:  # the basis: rank rows of the side not projected on
                total += min(rank, *p.shape) * p.shape[1 if _projects_right(p, proj_type) else 0] * p.element_size()
        return total

    @classmethod
    def from_trainer_args(cls, model, args) -> LayerwiseGaLore:
        """Targets and GaLore settings read as transformers reads them for its layer-wise GaLore optimizers."""
        if args.gradient_accumulation_steps != 1:
            raise ValueError(f"Layerwise {args.optim} does not support gradient accumulation!")
        targets = galore_targets(model, args.optim_target_modules)
        opts = dict(kv.split("=") for kv in (args.optim_args or "").replace(" ", "").split(",") if kv)
        return cls(model, targets, eight_bit="8bit" in args.optim, lr=args.learning_rate, rank=int(opts.get("rank", 128)),
                   update_proj_gap=int(opts.get("update_proj_gap", 200)), scale=float(opts.get("scale", 0.25)),
                   proj_type=opts.get("proj_type", "std"))

    @torch.no_grad()
    def _hook(self, p) -> None:
        if p.grad is None:
            return
        # A hook's kernels are launched by the host inside the backward, 340 hooks a step on Gemma 3 1B: a layer-wise
        # step waits on them, so each does its work in as few launches as it can (two for a bucketed weight).
        # The norm on the device (no sync per weight), reduced in fp32 without an fp32 copy of the gradient.
        torch.linalg.vector_norm(p.grad, dtype=torch.float32, out=self._norm_slot[id(p)])
        if p in self.single:
            opt = self.single[p]
            opt.param_groups[0]["lr"] = self.param_groups[0]["lr"]
            opt.step()
            opt.zero_grad()
            return
        bucket, i, view = self.slot[id(p)]
        if not bucket.galore:
            view.copy_(p.grad)
        elif (proj := self.projectors[p]).ortho_matrix is None or bucket.steps[i] % proj.update_proj_gap == 0:
            view.copy_(proj.project(p.grad, bucket.steps[i]))  # a new basis, from galore-torch's project()
        elif self.right[p]:  # project() with the basis it holds: the same product, written into the bucket
            torch.matmul(p.grad, proj.ortho_matrix.t(), out=view)
        else:
            torch.matmul(proj.ortho_matrix.t(), p.grad, out=view)
        self._got.add(id(p))
        # The gradient may live in CUDA-graph memory that the next replay overwrites: it is consumed now.
        p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = self.param_groups[0]["lr"]
        for b in self.buckets:
            ids = [i for i, (p, _, _) in enumerate(b.members) if id(p) in self._got]
            got = [b.members[i] for i in ids]
            if not got:
                continue
            if b.galore:
                b.p.zero_()  # zero stand-ins: the kernel writes the low-rank update into them
                b.update(lr, 0.0, ids)
                for group in _by_bytes(got, PROJECT_BACK_BYTES):
                    self._project_back(b, group, lr)
            else:
                params = [p for p, _, _ in got]
                flat = [b.p[o:o + s.numel()].view(s) for _, o, s in got]
                torch._foreach_copy_(flat, params)
                b.update(lr, WEIGHT_DECAY, ids)
                torch._foreach_copy_(params, flat)
        self._got.clear()
        self._norms.zero_()
        return loss

    def _project_back(self, b: _Bucket, group: list, lr: float) -> None:
        """galore-torch's project_back, add and weight decay for ``group``'s weights: the products one by one, the
        scaling, adding and decay as one launch each over the group (the same arithmetic as per weight)."""
        params = [p for p, _, _ in group]
        full = []
        for p, o, s in group:
            low, basis = b.p[o:o + s.numel()].view(s), self.projectors[p].ortho_matrix
            full.append(torch.matmul(low, basis) if self.right[p] else torch.matmul(basis, low))
        torch._foreach_mul_(full, self.projectors[params[0]].scale)
        torch._foreach_add_(params, full)
        torch._foreach_add_(params, params, alpha=-lr * WEIGHT_DECAY)

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of this step's gradients (before any update; none is clipped), read between the
        backward and ``step()``."""
        return torch.linalg.vector_norm(self._norms)

    # The Trainer saves ``state_dict()`` in each checkpoint and loads it on resume: the moments, the step counts
    # and the projections live in the buckets, the projectors and the per-weight optimizers, so they go in it.
    def state_dict(self):
        index = {p: i for i, p in enumerate(self.param_groups[0]["params"])}
        sd = super().state_dict()
        sd["layerwise"] = {
            "buckets": [{k: getattr(b, k) for k in b.STATE if hasattr(b, k)} | {"steps": list(b.steps)}
                        for b in self.buckets],
            "projections": {index[p]: proj.ortho_matrix for p, proj in self.projectors.items()
                            if proj.ortho_matrix is not None},
            "single": {index[p]: _portable(opt.state_dict()) for p, opt in self.single.items()},
        }
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("layerwise")
        super().load_state_dict(state_dict)
        params = self.param_groups[0]["params"]
        for b, got in zip(self.buckets, saved["buckets"], strict=True):
            b.steps = list(got["steps"])
            for k in b.STATE:
                if k in got:
                    getattr(b, k).copy_(got[k])
        for i, matrix in saved["projections"].items():
            p = params[i]
            self.projectors[p].ortho_matrix = matrix.to(p.device, p.dtype)
        for i, sd in saved["single"].items():
            p = params[i]
            opt = self.single[p]
            matrix = sd["state"].get(0, {}).get("projector")
            sd = {**sd, "state": {k: {n: v for n, v in st.items() if n != "projector"} for k, st in sd["state"].items()}}
            opt.load_state_dict(sd)  # replaces the whole state, projector included
            _seed_projector(opt, p, matrix)


def _seed_projector(opt, p, matrix: torch.Tensor | None = None) -> None:
    """Give a per-weight galore-torch optimizer of a GaLore target the project's projector (galore-torch makes its
    own only where the state has none), holding ``matrix`` where a checkpoint saved one."""
    g = opt.param_groups[0]
    if "rank" in g:
        opt.state[p]["projector"] = projector(g["rank"], g["update_proj_gap"], g["scale"], g["proj_type"])
        if matrix is not None:
            opt.state[p]["projector"].ortho_matrix = matrix.to(p.device, p.dtype)


def _portable(state_dict: dict) -> dict:
    """A per-weight optimizer's state with its projector object as the projection matrix it holds (checkpoints
    are loaded with ``weights_only``, which takes tensors and plain values only)."""
    return {**state_dict, "state": {k: {n: (v.ortho_matrix if n == "projector" else v) for n, v in st.items()}
                                    for k, st in state_dict["state"].items()}}
