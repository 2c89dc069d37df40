"""One training stage on several processes (GPUs, or CPU processes on gloo), launched by torchrun.

A stage whose params ask for ``train.num_processes > 1`` or ``train.nnodes > 1`` runs itself again under
``torch.distributed.run``; each worker then goes through the same ``training.train`` as a single process, and
transformers' Trainer (through accelerate) does the data parallelism: DDP by default, FSDP with
``train.strategy=fsdp``. Nothing here synchronises gradients or shards weights itself.

Across machines every machine starts the stage with the same params; torchrun's static rendezvous at
``train.rdzv_endpoint`` (machine 0) joins them, and ``FTSTUDY_NODE_RANK`` (0 to nnodes - 1, from the
environment because it is the one value that differs per machine) orders them, so global rank 0, which writes
the outputs, is always on machine 0.

``train.batch_size`` stays the effective batch: with N processes in all each takes batch_size / N rows per
step, so the optimizer sees the same batch, and the same loss curve, on 1 or N devices.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import torch

from ftstudy.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


NODE_RANK_ENV = "FTSTUDY_NODE_RANK"


def needs_launch(t) -> bool:
    """True in the stage's own process when params ask for several workers (false inside a worker)."""
    return t.world > 1 and "LOCAL_RANK" not in os.environ


def _workers(t) -> str:
    n = f"train.num_processes={t.num_processes}"
    return n if t.nnodes == 1 else f"train.nnodes={t.nnodes} x {n} = {t.world} workers"


def check(spec, t, cuda: bool, gpus: int | None = None) -> None:
    """Refuse, before anything is loaded, the combinations that cannot run distributed, naming the fix."""
    n = t.world
    if n == 1:
        return
    if t.batch_size % n:
        raise UserError(f"train.batch_size={t.batch_size} is the effective batch and must split evenly over "
                        f"{_workers(t)}; use a multiple of {n}")
    if spec.optimizer.endswith("_layerwise"):
        fix = spec.optimizer.removesuffix("_layerwise")
        raise UserError(
            f"{spec.section}.optimizer={spec.optimizer} steps each weight inside its backward hook, which data "
            f"parallelism cannot synchronise (transformers: layer-wise GaLore does not support DDP); with "
            f"{_workers(t)} use optimizer={fix} (the same GaLore update, after the gradient all-reduce)"
        )
    if t.nnodes > 1:
        node_rank(t.nnodes)  # set and in range on this machine, or say how
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if cuda and t.num_processes > gpus:
        raise UserError(f"train.num_processes={t.num_processes} (per machine) but {gpus} GPU(s) are visible; lower "
                        f"it or expose more GPUs")
    if t.strategy == "fsdp":
        if not cuda:
            raise UserError("train.strategy=fsdp needs CUDA GPUs; on CPU use strategy=ddp (gloo)")
        if spec.quantize_4bit:
            raise UserError(f"train.strategy=fsdp does not shard {spec.name}'s 4-bit NF4 base here; use strategy=ddp")
        if spec.galore is not None:
            raise UserError(
                f"train.strategy=fsdp shards every gradient, while GaLore ({spec.optimizer}) projects each weight's "
                f"whole gradient; use strategy=ddp with {spec.optimizer}, or {spec.section}.optimizer=adamw_torch "
                f"for full-parameter training under FSDP"
            )


def node_rank(nnodes: int) -> int:
    """This machine's rank among ``nnodes`` machines, from FTSTUDY_NODE_RANK (refused when unset or out of range)."""
    raw = os.environ.get(NODE_RANK_ENV, "")
    if not raw.isdigit():
        raise UserError(f"{NODE_RANK_ENV}={raw!r}: with train.nnodes > 1 every machine needs its rank in the "
                        f"environment; set {NODE_RANK_ENV}=0 on the machine at train.rdzv_endpoint and 1, 2, ... on "
                        f"the others")
    if int(raw) >= nnodes:
        raise UserError(f"{NODE_RANK_ENV}={raw} but train.nnodes={nnodes}; allowed: 0 to {nnodes - 1}")
    return int(raw)


def launch(script: str, args: list[str], t) -> int:
    """Run ``script args`` through torchrun (this machine's train.num_processes workers, joined with the other
    machines' when train.nnodes > 1); return its exit status."""
    if t.nnodes == 1:
        where = ["--standalone"]
    else:
        rank = node_rank(t.nnodes)
        host, port = t.rdzv_endpoint.rsplit(":", 1)
        # Static rendezvous: ranks follow FTSTUDY_NODE_RANK, so the outputs are written on machine 0.
        where = [f"--nnodes={t.nnodes}", f"--node_rank={rank}", f"--master_addr={host}", f"--master_port={port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={t.num_processes}",
           script, *args]
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def init(cuda: bool) -> None:
    """Join the workers' process group (the Trainer reuses it), one GPU per worker."""
    if world_size() == 1 or torch.distributed.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextmanager
def main_first():
    """The main worker runs the block first (e.g. clearing stale checkpoints); the others follow."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def agree(obj):
    """The main worker's ``obj`` on every worker (``obj`` itself in a single process): for what each worker measures
    on its own card but all must share, such as the memory budget's plan (DDP's workers step in lockstep, so one
    worker on other micro-batches would hang the rest)."""
    return gather(obj)[0]


def gather(obj) -> list:
    """``obj`` from every worker, in rank order (just [obj] in a single process)."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def trainer_kwargs(t, layer_cls: str) -> dict:
    """TrainingArguments for the strategy; per-device batch = effective batch / processes.

    Under FSDP (version 2: per-parameter sharding, each decoder layer its own unit) checkpointing is FSDP's own,
    as transformers advises: the Trainer's would all-gather every layer's weights once more in the backward.
    """
    # Checkpointing without FSDP is set on the model (training.enable_checkpointing), not through the Trainer.
    kwargs = {"per_device_train_batch_size": t.batch_size // t.world}
    if t.world > 1:
        kwargs["ddp_find_unused_parameters"] = False
    if t.fsdp:
        kwargs["fsdp"] = "full_shard auto_wrap"
        kwargs["fsdp_config"] = {"version": 2, "transformer_layer_cls_to_wrap": [layer_cls],
                                 "activation_checkpointing": t.gradient_checkpointing}
    return kwargs
