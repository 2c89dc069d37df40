"""The speed benchmark's CPU run: the project's loss path trains exactly like the plain HF one."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("speed", Path(__file__).parents[1] / "benchmarks/speed.py")
speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(speed)


def test_tiny_benchmark_losses_agree_with_the_baseline(tmp_path):
    out = tmp_path / "speed.json"
    records = speed.main(["--arch", "tiny", "--methods", "lora_wide", "galore", "--steps", "2", "--warmup", "1",
                          "--batch", "2", "--seq-len", "48", "--out", str(out)])
    assert out.exists() and [r["method"] for r in records] == ["lora_wide", "galore"]
    for r in records:
        # Same weights, batches and optimizer: the loss after every step agrees to fp32 rounding.
        assert r["losses"] == pytest.approx(r["baseline_losses"], rel=1e-4)
        assert r["tokens_per_s"] > 0 and r["baseline_tokens_per_s"] > 0
