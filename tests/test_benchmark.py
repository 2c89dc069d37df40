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
                          "--batch", "2", "--seq-len", "48", "--trl", "--out", str(out)])
    assert out.exists() and [r["method"] for r in records] == ["lora_wide", "galore"]
    for r in records:
        # Same weights, batches and optimizer: the loss after every step agrees to fp32 rounding.
        assert r["losses"] == pytest.approx(r["baseline_losses"], rel=1e-4)
        # TRL's fused LM head in place of the project's: the same loss, so the A/B compares speed alone.
        assert r["trl_losses"] == pytest.approx(r["losses"], rel=1e-4)
        assert r["tokens_per_s"] > 0 and r["baseline_tokens_per_s"] > 0


def test_tiny_generation_benchmark_runs_the_evaluate_path(tmp_path):
    gspec = importlib.util.spec_from_file_location("generation_bench",
                                                   Path(__file__).parents[1] / "benchmarks/generation.py")
    gen = importlib.util.module_from_spec(gspec)
    gspec.loader.exec_module(gen)
    out = tmp_path / "gen.json"
    records = gen.main(["--arch", "tiny", "--prompts", "12", "--max-new-tokens", "4", "--batch-size", "5",
                        "--out", str(out)])
    assert out.exists() and [r["decoder"] for r in records] == ["transformers", "ftstudy"]
    assert all(r["prompts"] == 12 and r["generated_tokens"] == 48 for r in records)  # a random model: no EOS
    assert records[1]["same_answers_as_hf"] == 1.0 and records[1]["speedup_vs_hf"] > 0
