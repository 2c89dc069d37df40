"""Memory-budget mode: the plan chosen from a measured probe (the measurement itself needs CUDA: benchmarks/speed.py
--budgets and train_methods.py --memory-budget-gb check predicted against measured peaks on the GPU)."""

import pytest

from ftstudy import budget
from ftstudy.errors import UserError
from ftstudy.params import ParamsError, default_params, parse_params, to_dict

GB = 2**30
# 2 GB held; each row 0.5 GB of activations; 0.5 GB of transients that do not grow with the rows
PROBE = budget.Probe(static=2 * GB, one_row=1 * GB, two_rows=int(1.5 * GB))


def test_the_prediction_is_linear_in_the_rows():
    assert PROBE.peak(1) == pytest.approx(3 * GB) and PROBE.peak(8) == pytest.approx(6.5 * GB)


def test_the_whole_batch_in_one_micro_step_when_it_fits():
    plan = budget.choose(PROBE, budget_gb=100, rows=8, accumulate=True)
    assert (plan.micro_batch, plan.grad_accum, plan.predicted_peak_gb) == (8, 1, 6.5)


def test_a_tighter_budget_splits_the_batch_into_the_fewest_micro_steps_that_fit():
    plan = budget.choose(PROBE, budget_gb=5 / budget.MARGIN, rows=8, accumulate=True)  # 8 rows: 6.5 GB, 4: 4.5
    assert (plan.micro_batch, plan.grad_accum) == (4, 2) and plan.predicted_peak_gb <= 5
    plan = budget.choose(PROBE, budget_gb=3.6 / budget.MARGIN, rows=12, accumulate=True)  # 2 rows: 3.5 GB
    assert (plan.micro_batch, plan.grad_accum) == (2, 6)


def test_a_budget_nothing_fits_names_the_fix_and_layerwise_never_accumulates():
    with pytest.raises(UserError, match="below what one optimizer step needs.*for 8 rows at once.*raise it, or set it to 0"):
        budget.choose(PROBE, budget_gb=5 / budget.MARGIN, rows=8, accumulate=False)  # layer-wise: 8 rows or nothing
    with pytest.raises(UserError, match="train.memory_budget_gb=1 is below"):
        budget.choose(PROBE, budget_gb=1, rows=8, accumulate=True)


def test_a_budget_without_a_gpu_or_with_fsdp_is_refused_naming_the_fix():
    with pytest.raises(UserError, match="without a GPU set train.memory_budget_gb: 0"):
        budget.check(12.0, cuda=False)
    budget.check(0.0, cuda=False)
    raw = to_dict(default_params())
    raw["train"].update(memory_budget_gb=40, num_processes=2, strategy="fsdp")
    with pytest.raises(ParamsError, match="train.memory_budget_gb: FSDP shards"):
        parse_params(raw)
