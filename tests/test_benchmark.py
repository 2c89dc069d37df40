"""The speed benchmark's CPU run: the project's loss path trains exactly like the plain HF one."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch


def _benchmark(name: str):
    """benchmarks/<name>.py, loaded afresh (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", Path(__file__).parents[1] / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speed = _benchmark("speed")


def test_tiny_benchmark_losses_agree_with_the_baseline(tmp_path):
    out = tmp_path / "speed.json"
    records = speed.main(["--arch", "tiny", "--methods", "lora_wide", "galore", "--steps", "7", "--warmup", "1",
                          "--batch", "2", "--seq-len", "48", "--trl", "--trace-dir", str(tmp_path / "traces"),
                          "--out", str(out)])
    assert out.exists() and [r["method"] for r in records] == ["lora_wide", "galore"]
    # Steps 3-6 profiled, timed apart from the others: where a step's time goes, per variant.
    assert "device busy s/step" in (tmp_path / "traces/trace_galore_project.txt").read_text()
    for r in records:
        # Same weights, batches and optimizer: the loss after every step agrees to fp32 rounding.
        assert r["losses"] == pytest.approx(r["baseline_losses"], rel=1e-4)
        # TRL's fused LM head in place of the project's: the same loss, so the A/B compares speed alone.
        assert r["trl_losses"] == pytest.approx(r["losses"], rel=1e-4)
        assert r["tokens_per_s"] > 0 and r["baseline_tokens_per_s"] > 0
        # Numbers are only comparable within one software stack: each record names its versions.
        assert r["stack"]["torch"] == speed.torch.__version__ and "transformers" in r["stack"]


def test_tiny_generation_benchmark_runs_the_evaluate_path(tmp_path):
    gen = _benchmark("generation")
    out = tmp_path / "gen.json"
    records = gen.main(["--arch", "tiny", "--prompts", "12", "--max-new-tokens", "4", "--batch-size", "6",
                        "--rerank-k", "3", "--out", str(out)])
    assert out.exists() and [r["decoder"] for r in records] == ["transformers", "ftstudy"] * 2
    greedy, reranked = records[:2], records[2:]
    assert all(r["prompts"] == 12 and r["generated_tokens"] == 48 for r in greedy)  # a random model: no EOS
    assert greedy[1]["same_answers_as_hf"] == 1.0 and greedy[1]["speedup_vs_hf"] > 0
    assert all(r["task"] == "rerank" and r["k"] == 3 and r["propose_seconds"] > 0 for r in reranked)


def test_speed_counts_model_flops_per_token_as_written_down():
    """A hand count on a toy shape: weights 40 a layer (q, k, v, o 4 each; gate, up, down 8 each), attention over
    a mean context of 2, a head of 2 x 10 at half the tokens."""
    arch = dict(vocab_size=10, hidden_size=2, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
                num_key_value_heads=1, head_dim=2)
    # full: forward 80 + attention 16; backward 80 + 32 + weight gradients 80; head 10 x 3 passes x 2.
    assert speed.flops_per_token(arch, 3, 0.5, full=True, recompute=False) == 96 + 192 + 60
    assert speed.flops_per_token(arch, 3, 0.5, full=True) == 96 * 2 + 192 + 60  # checkpointing: forward twice
    # LoRA r=1 on q_proj (4 more weights): frozen base, so weight gradients only for A and B; the head frozen too.
    assert speed.flops_per_token(arch, 3, 0.5, full=False, lora_r=1, lora_modules=("q_proj",)) == 104 * 2 + 128 + 40
    assert speed.mfu(1e12, 989.4, "NVIDIA H200") == 1.0 and speed.mfu(1.0, 1.0, "cpu") is None


def test_pipeline_extrapolates_trainings_sweeps_and_full_rows_to_the_study(tmp_path, monkeypatch):
    """benchmarks/pipeline.py's arithmetic: a training's 3,750 steps at its steady rate plus its one-off costs, a
    sweep as one such run per rate of the full profile, and the same at another measurement's full-row rate."""
    from ftstudy.atomic import read_json, write_json
    from ftstudy.params import default_params

    pipeline = _benchmark("pipeline")
    monkeypatch.chdir(tmp_path)
    # 10 steps of 400 tokens at 1,000 tokens/s steady, the first step 5 s more, two checkpoints 1.5 s each, 2 s of
    # loading and saving
    write_json("metrics/train/qlora.json", {"steady_tokens_per_s": 1000.0, "trained_tokens": 4000, "steps": 10,
                                            "train_seconds": 12.0, "peak_memory_gb": 1.0,
                                            "one_off_seconds": {"first_step": 5.0, "checkpoint": 3.0},
                                            "one_off_steps": {"first_step": 1, "checkpoint": 2}})
    write_json("metrics/sweep/qlora.json", {"grid": [{"train_seconds": 12.0}]})  # one rate here, 3 in the study
    timings = {"train_qlora": {"wall_s": 14.0}, "sweep_qlora": {"wall_s": 15.0}, "report": {"wall_s": 4.0}}
    full_rows = {"qlora": {"steady_tokens_per_s": 2000.0, "trained_tokens": 8000, "steps": 2}}
    study = default_params("full")
    rows = pipeline.extrapolate(timings, default_params("micro"), study, full_rows)
    checkpoints = 1.5 * (3750 // study.train.save_steps)  # the study's, at the measured cost of one
    run = 5.0 + checkpoints + 3750 * 400 / 1000  # the study's steps at the steady rate, and the first step
    assert rows["train_qlora"]["study_s"] == pytest.approx(2.0 + run)
    assert rows["train_qlora"]["study_s_full_rows"] == pytest.approx(2.0 + 5.0 + checkpoints + 3750 * 4000 / 2000)
    # Metrics the log kept as the stage wrote them come before the file on disk (a later call's checkout
    # restores the committed one): the same training at twice the rate.
    logged = {"metrics/train/qlora.json": {**read_json("metrics/train/qlora.json"), "steady_tokens_per_s": 2000.0}}
    again = pipeline.extrapolate({"train_qlora": {"wall_s": 14.0}}, default_params("micro"), study, {}, logged)
    assert again["train_qlora"]["study_s"] == pytest.approx(2.0 + run - 3750 * 400 / 2000)
    assert rows["sweep_qlora"]["study_rates"] == len(study.sweep.qlora) == 3
    assert rows["sweep_qlora"]["study_s"] == pytest.approx(3 * (3.0 + run))
    # The hybrid: its GaLore phase's rate (500 tokens/s) and one-off costs in its metrics, its QLoRA phase at
    # train_qlora's rate, and what the QLoRA phase took beyond its steps (4 s - 5 x 0.4 s) counted once.
    write_json("metrics/train/sequential_ensemble.json", {
        "steady_tokens_per_s": 500.0, "trained_tokens": 4000, "steps": 10, "train_seconds": 12.0, "peak_memory_gb": 1.0,
        "one_off_seconds": {"first_step": 3.0}, "one_off_steps": {"first_step": 1},
        "phases": [{"train_seconds": 4.0, "steps": 5}, {"train_seconds": 8.0, "steps": 5}]})
    f = study.train_sequential_ensemble.qlora_fraction
    hybrid = pipeline.extrapolate({"train_sequential_ensemble": {"wall_s": 20.0}}, default_params("micro"), study, {})
    step = f * 400 / 1000 + (1 - f) * 400 / 500
    assert hybrid["train_sequential_ensemble"]["study_s"] == pytest.approx(8.0 + 2.0 + 3.0 + 3750 * step, abs=0.1)
    got = pipeline.totals(rows)
    assert got["study_s"] == pytest.approx(2.0 + run + 4.0, abs=0.1)  # the seeds' study leaves the sweeps out
    assert got["study_with_sweeps_s"] == pytest.approx(got["study_s"] + 3 * (3.0 + run), abs=0.1)
    assert got["study_minutes"] == round(got["study_s"] / 60, 1) and "study_with_sweeps_minutes_full_rows" in got
    # A training that copied its sweep's run (1 s): trained in the seeds' study, with the sweep's 3 s of loading and
    # validation a run; after the sweeps, the copy.
    copied = pipeline.extrapolate({**timings, "train_qlora": {"wall_s": 1.0, "copied": True}}, default_params("micro"),
                                  study, full_rows)
    assert copied["train_qlora"]["study_s"] == pytest.approx(3.0 + run)
    got = pipeline.totals(copied)
    assert got["study_s"] == pytest.approx(3.0 + run + 4.0, abs=0.1)
    assert got["study_with_sweeps_s"] == pytest.approx(1.0 + 4.0 + 3 * (3.0 + run), abs=0.1)


def test_pipeline_fills_stages_a_lost_machine_never_ran_from_an_earlier_result(tmp_path):
    """--fill-from: stages missing from the log are not run but taken from an earlier result, and named as such."""
    from ftstudy.atomic import read_json, write_json

    pipeline = _benchmark("pipeline")
    log = tmp_path / "timings.jsonl"
    log.write_text(json.dumps({"stage": "fetch_data", "wall_s": 3.0, "ran": True, "gpu": "G", "versions": {}}) + "\n")
    write_json(tmp_path / "earlier.json", {"stages": {"report": {"measured_wall_s": 10.0}}})
    args = ["--stages", "fetch_data", "report", "--log", str(log), "--out", str(tmp_path / "out.json")]
    got = pipeline.main([*args, "--fill-from", str(tmp_path / "earlier.json")])
    assert got["stages"]["report"] == {"measured_wall_s": 10.0, "filled_from": str(tmp_path / "earlier.json")}
    assert got["filled_from"]["stages"] == ["report"] and got["study_s"] == 13.0 and got["measured_wall_s"] == 3.0
    assert read_json(tmp_path / "out.json")["study_s"] == 13.0
    write_json(tmp_path / "earlier.json", {"stages": {}})
    with pytest.raises(SystemExit, match="has no report"):
        pipeline.main([*args, "--fill-from", str(tmp_path / "earlier.json")])


def test_compiled_layers_of_gemma_3_1b_give_the_uncompiled_gradients_on_cpu(tmp_path):
    """benchmarks/compiled_grads.py on one layer of the real architecture, two padded widths: every weight's
    gradient within 5 % of the uncompiled model's at each call (inductor's defaults with eager attention gave
    NaN here; on an H200 the same check found the fault behind GaLore's divergence)."""
    cg = _benchmark("compiled_grads")
    out = tmp_path / "grads.json"
    results = cg.main(["--layers", "1", "--rows", "2", "--calls", "2", "--variants", "compiled", "--out", str(out)])
    assert out.exists() and results["clear"] and [row["width"] for row in results["compiled"]] == [128, 256]
    for row in results["compiled"]:
        assert row["off"] == 0 and not row["nan"] and not row["missing"], row
        assert row["loss"] == pytest.approx(row["ref_loss"], rel=1e-2)


def test_compiled_layers_give_a_lora_adapter_the_uncompiled_gradients_on_cpu(tmp_path):
    """The same check for a LoRA method's model (wide LoRA, as the stages build it, B drawn non-zero): every adapter
    weight's gradient within 5 %. Each variant builds its model anew, so the adapter's initialisation must be seeded
    alike (unseeded, A differed from the reference's and 10-30 % of the weights read as off, on a GPU too)."""
    cg = _benchmark("compiled_grads")
    results = cg.main(["--method", "lora_wide", "--layers", "1", "--rows", "2", "--calls", "2", "--seq-len", "128",
                       "--variants", "compiled"])
    assert results["clear"] and results["method"] == "lora_wide"
    for row in results["compiled"]:
        assert row["off"] == 0 and not row["nan"] and not row["missing"], row
        assert row["loss"] == pytest.approx(row["ref_loss"], rel=1e-3)
        assert all("lora_" in name for name in row["worst"])  # the adapter's weights, not the frozen base's


def test_galore_steps_single_step_reference_is_galore_torchs_update_on_the_projects_basis(monkeypatch):
    """benchmarks/galore_step.py's first part, small, on the CPU: galore-torch's 8-bit step and the project's leave
    the same bf16 weights, the project's in their storage. On its own full-SVD basis galore-torch's step ended up to
    0.0015 apart on an H200: the basis, not the update, so the reference takes the project's projector.
    galore-torch's step syncs the device, a no-op here."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    result = _benchmark("galore_step").single(steps=6, device="cpu", shapes=[(64, 96), (96, 64)])
    assert result["max_abs_diff"] == 0 and result["max_abs_change"] > 0
    assert result["weights_moved"]["project"] == 0 and result["weights_moved"]["galore_torch"] > 0


def test_galore_steps_reference_is_transformers_layerwise_galore_on_the_projects_classes():
    """benchmarks/galore_step.py's layer-wise comparison, small, on the CPU: the project's optimizer and transformers'
    equal bit for bit, as tests/test_galore.py finds. Its reference once drifted to galore-torch's own class and
    projector (weights up to 0.026 apart on an H200, every one differing): the comparison must stay like for like."""
    widths = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
    result = _benchmark("galore_step").layerwise(steps=4, device="cpu", widths=widths)
    assert result["control_max_abs_diff"] == 0 and result["max_abs_change"] > 0
    assert result["max_abs_diff"] == 0 and not result["params_differing"], result["params_differing"]
