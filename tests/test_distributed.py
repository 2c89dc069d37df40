"""Several training processes through torchrun: the CPU (gloo) run, and the combinations refused up front."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import _records

from ftstudy import distributed
from ftstudy.atomic import write_jsonl
from ftstudy.errors import UserError
from ftstudy.methods import method_spec
from ftstudy.params import ParamsError, default_params

WORKER = Path(__file__).with_name("ddp_worker.py")


def _workdir(path: Path, tiny_model_dir: Path) -> Path:
    (path / "models").mkdir(parents=True)
    (path / "models" / "base").symlink_to(tiny_model_dir)
    write_jsonl(path / "train.jsonl", _records(32))
    return path


def _curve(workdir: Path) -> list[float]:
    rows = (workdir / "live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    return [float(r.split("\t")[-1]) for r in rows]


def test_two_gloo_processes_train_like_one_at_the_same_effective_batch(tmp_path, tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    one = _workdir(tmp_path / "one", tiny_model_dir)
    two = _workdir(tmp_path / "two", tiny_model_dir)
    subprocess.run([sys.executable, str(WORKER), str(one), "1"], check=True, env=env)
    # The real launch path of the stages: torchrun, two workers, gloo on CPU.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(two), "2"]
    assert subprocess.run(cmd, env=env).returncode == 0
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert (m1["num_processes"], m1["per_device_batch"], m1["effective_batch"]) == (1, 4, 4)
    assert (m2["num_processes"], m2["per_device_batch"], m2["effective_batch"]) == (2, 2, 4)
    assert m2["strategy"] == "ddp" and [d["rank"] for d in m2["per_device"]] == [0, 1]
    assert all(d["peak_memory_gb"] > 0 and d["trained_tokens"] > 0 for d in m2["per_device"])
    assert m2["trained_tokens"] == sum(d["trained_tokens"] for d in m2["per_device"]) == m1["trained_tokens"]
    # Same rows per optimizer step, gradients averaged over workers: the same loss curve.
    assert len(_curve(two)) == len(_curve(one)) == 4
    assert _curve(two) == pytest.approx(_curve(one), rel=1e-4)
    assert (two / "models/lora_wide/adapter_model.safetensors").exists()
    assert not (two / "metrics.json").read_text().count("HF_TOKEN")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agreeing_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    distributed.init(cuda=False)
    try:  # each worker measured its own plan; all train the main worker's
        got = distributed.agree({"rank": rank, "micro_batch": 8 >> rank})
        Path(out, f"{rank}.json").write_text(json.dumps(got))
    finally:
        torch.distributed.destroy_process_group()


def test_workers_take_the_main_workers_memory_plan(tmp_path):
    """A memory budget is measured on every worker's card, and two measurements can fall either side of a limit;
    DDP's workers step in lockstep, so all train the main worker's plan (ftstudy.prepare)."""
    torch.multiprocessing.spawn(_agreeing_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert got == [{"rank": 0, "micro_batch": 8}] * 2
    assert distributed.agree("alone") == "alone"  # one process: its own


def test_two_machines_meet_at_the_endpoint_and_train_like_one_process(tmp_path, tiny_model_dir):
    """train.nnodes=2 as two "machines" on localhost: each starts the stages' launcher with its own
    FTSTUDY_NODE_RANK, torchrun's static rendezvous joins them (gloo), and machine 0 writes the results."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    one = _workdir(tmp_path / "one", tiny_model_dir)
    two = _workdir(tmp_path / "two", tiny_model_dir)
    subprocess.run([sys.executable, str(WORKER), str(one), "1"], check=True, env=env)
    endpoint = f"127.0.0.1:{_free_port()}"
    launcher = (
        "import sys; from ftstudy import distributed; from ftstudy.params import default_params; "
        f"t = default_params(train=dict(batch_size=4, nnodes=2, rdzv_endpoint={endpoint!r})).train; "
        f"sys.exit(distributed.launch({str(WORKER)!r}, [{str(two)!r}, '1', '2', {endpoint!r}], t))"
    )
    machines = [subprocess.Popen([sys.executable, "-c", launcher], env={**env, distributed.NODE_RANK_ENV: str(r)})
                for r in (1, 0)]  # machine 1 first: it waits at the endpoint for machine 0
    assert [m.wait(timeout=300) for m in machines] == [0, 0]
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert (m2["num_processes"], m2["per_device_batch"], m2["effective_batch"]) == (2, 2, 4)
    assert [d["rank"] for d in m2["per_device"]] == [0, 1]
    assert m2["trained_tokens"] == m1["trained_tokens"]
    assert _curve(two) == pytest.approx(_curve(one), rel=1e-4)


def test_several_machines_need_an_endpoint_and_each_its_rank(monkeypatch):
    with pytest.raises(ParamsError, match="train.rdzv_endpoint: '' with train.nnodes=2"):
        default_params(train={"nnodes": 2})
    with pytest.raises(ParamsError, match="train.rdzv_endpoint: 'h:1' is for several machines"):
        default_params(train={"rdzv_endpoint": "h:1"})
    t = default_params(train={"nnodes": 2, "rdzv_endpoint": "10.0.0.1:29500"}).train
    spec = method_spec(default_params(), "qlora")
    monkeypatch.delenv(distributed.NODE_RANK_ENV, raising=False)
    with pytest.raises(UserError, match="FTSTUDY_NODE_RANK=0 on the machine at train.rdzv_endpoint"):
        distributed.check(spec, t, cuda=False)
    monkeypatch.setenv(distributed.NODE_RANK_ENV, "2")
    with pytest.raises(UserError, match="FTSTUDY_NODE_RANK=2 but train.nnodes=2"):
        distributed.launch("stages/train.py", ["qlora"], t)
    monkeypatch.setenv(distributed.NODE_RANK_ENV, "1")
    distributed.check(spec, t, cuda=False)  # a valid machine 1 passes
    with pytest.raises(UserError, match="split evenly over train.nnodes=2 x train.num_processes=1 = 2 workers"):
        distributed.check(spec, dataclasses.replace(t, batch_size=3), cuda=False)


def _spec(**galore):
    return method_spec(default_params(train_galore=galore), "galore")


def _train(**train):
    return default_params(train=train).train


@pytest.mark.parametrize("spec_args, train_args, cuda, match", [
    ({}, {"num_processes": 2}, False, "optimizer=galore_adamw .*same GaLore update"),
    ({"optimizer": "galore_adamw"}, {"num_processes": 3, "batch_size": 8}, False, "multiple of 3"),
    ({"optimizer": "galore_adamw"}, {"num_processes": 2, "strategy": "fsdp"}, False, "fsdp needs CUDA"),
    ({"optimizer": "galore_adamw_8bit"}, {"num_processes": 2, "strategy": "fsdp"}, True, "optimizer=adamw_torch"),
    ({"optimizer": "galore_adamw_8bit"}, {"num_processes": 4}, True, "4 .*2 GPU"),
])
def test_what_cannot_run_distributed_is_refused_with_the_fix(spec_args, train_args, cuda, match):
    with pytest.raises(UserError, match=match):
        distributed.check(_spec(**spec_args), _train(**train_args), cuda, gpus=2)


def test_qlora_under_fsdp_is_refused_and_supported_combinations_pass():
    with pytest.raises(UserError, match="4-bit.*strategy=ddp"):
        distributed.check(method_spec(default_params(), "qlora"), _train(num_processes=2, strategy="fsdp"), True, gpus=2)
    distributed.check(method_spec(default_params(), "qlora"), _train(num_processes=2), True, gpus=2)
    distributed.check(_spec(optimizer="galore_adamw_8bit"), _train(num_processes=2), True, gpus=2)
    full = _spec(optimizer="adamw_torch")
    assert full.galore is None  # plain full-parameter training, the one FSDP shards
    distributed.check(full, _train(num_processes=2, strategy="fsdp"), True, gpus=2)
