"""Memory-budget mode: the plan chosen from a measured probe (the measurement itself needs CUDA: benchmarks/speed.py
--budgets checks predicted against measured peaks on the GPU)."""

import pytest

from ftstudy import budget
from ftstudy.errors import UserError
from ftstudy.params import ParamsError, default_params, parse_params, to_dict

GB = 2**30
def test_the_prediction_is_linear_in_rows_and_kept_layers():
    p = budget.Probe(static=2 * GB, one_row=GB, two_rows=int(1.5 * GB), one_row_kept=2 * GB, layers=10)
    assert p.peak(1, 0) == pytest.approx(3 * GB) and p.peak(2, 0) == pytest.approx(3.5 * GB)
    assert p.peak(4, 10) == pytest.approx(2 * GB + 0.5 * GB + 4 * (0.5 + 0.1 * 10) * GB)


def test_a_large_budget_keeps_every_layer_in_one_micro_batch():
    p = budget.Probe(static=2 * GB, one_row=GB, two_rows=int(1.5 * GB), one_row_kept=2 * GB, layers=10)
    plan = budget.choose(p, budget_gb=100, rows=8, accumulate=True, seq_len=512)
    assert (plan.micro_batch, plan.grad_accum, plan.keep_activations, plan.checkpointing) == (8, 1, 10, False)


def test_a_tighter_budget_checkpoints_layers_before_it_splits_the_batch_and_the_fastest_plan_wins():
    p = budget.Probe(static=2 * GB, one_row=GB, two_rows=int(1.5 * GB), one_row_kept=2 * GB, layers=10)
    # 8 rows, all checkpointed: 2 + 0.5 + 8 x 0.5 = 6.5 GB; each kept layer 0.8 GB more
    plan = budget.choose(p, budget_gb=10 / budget.MARGIN, rows=8, accumulate=True, seq_len=512)
    assert (plan.micro_batch, plan.grad_accum, plan.keep_activations) == (8, 1, 4)
    assert plan.predicted_peak_gb <= 10
    plan = budget.choose(p, budget_gb=5 / budget.MARGIN, rows=8, accumulate=True, seq_len=512)  # 8 rows do not fit: 2 x 4
    assert (plan.micro_batch, plan.grad_accum, plan.keep_activations) == (4, 2, 1) and plan.predicted_peak_gb <= 5
    # 2 rows a micro-step would keep 7 layers, but four micro-steps of 2 rows are rated slower than two of 4
    assert budget.speed_score(2, 4, 7, 10, 512) < plan.score


def test_a_budget_nothing_fits_names_the_fix_and_layerwise_never_accumulates():
    p = budget.Probe(static=2 * GB, one_row=GB, two_rows=int(1.5 * GB), one_row_kept=2 * GB, layers=10)
    with pytest.raises(UserError, match="below what one optimizer step needs.*for 8 rows at once.*raise it, or set it to 0"):
        budget.choose(p, budget_gb=5 / budget.MARGIN, rows=8, accumulate=False, seq_len=512)  # layer-wise: 8 rows or nothing
    with pytest.raises(UserError, match="train.memory_budget_gb=1 is below"):
        budget.choose(p, budget_gb=1, rows=8, accumulate=True, seq_len=512)


def test_a_budget_without_a_gpu_or_with_fsdp_is_refused_naming_the_fix():
    with pytest.raises(UserError, match="without a GPU set train.memory_budget_gb: 0"):
        budget.check(12.0, cuda=False)
    budget.check(0.0, cuda=False)
    raw = to_dict(default_params())
    raw["train"].update(memory_budget_gb=40, num_processes=2, strategy="fsdp")
    with pytest.raises(ParamsError, match="train.memory_budget_gb: FSDP shards"):
        parse_params(raw)
