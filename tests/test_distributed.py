"""Several training processes through torchrun: the CPU (gloo) run, and the combinations refused up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import _records

from ftstudy import distributed
from ftstudy.atomic import write_jsonl
from ftstudy.errors import UserError
from ftstudy.methods import method_spec
from ftstudy.params import default_params

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
