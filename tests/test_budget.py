"""Memory-budget mode: the plan chosen from a measured probe (the measurement itself needs CUDA: benchmarks/speed.py
--budgets and train_methods.py --memory-budget-gb check predicted against measured peaks on the GPU)."""

import dataclasses
from types import SimpleNamespace

import pytest

from ftstudy import budget
from ftstudy.errors import UserError
from ftstudy.params import ParamsError, default_params, parse_params, to_dict

GB = 2**30
# 2 GB held; each row 0.5 GB of activations; 0.5 GB of transients that do not grow with the rows; a row with none of
# its 4 layers checkpointed 1 GB more (0.25 GB a kept layer)
PROBE = budget.Probe(static=2 * GB, one_row=1 * GB, two_rows=int(1.5 * GB), kept=1 * GB, layers=4)


def choose(budget_gb, rows=8, accumulate=True, keep_pays=False):
    probe = PROBE if keep_pays else dataclasses.replace(PROBE, kept=None)  # as budget.measure leaves it
    return budget.choose(probe, budget_gb=budget_gb, rows=rows, accumulate=accumulate, seq_len=512)


def test_the_prediction_is_linear_in_the_rows():
    assert PROBE.peak(1) == pytest.approx(3 * GB) and PROBE.peak(8) == pytest.approx(6.5 * GB)
    assert PROBE.peak(8, keep=2) == pytest.approx(10.5 * GB) and PROBE.peak(1, keep=4) == pytest.approx(4 * GB)


def test_the_whole_batch_in_one_micro_step_when_it_fits():
    plan = choose(100)
    assert (plan.micro_batch, plan.grad_accum, plan.keep_activations, plan.predicted_peak_gb) == (8, 1, 0, 6.5)


def test_a_tighter_budget_splits_the_batch_into_the_fewest_micro_steps_that_fit():
    plan = choose(5 / budget.MARGIN)  # 8 rows: 6.5 GB, 4: 4.5
    assert (plan.micro_batch, plan.grad_accum) == (4, 2) and plan.predicted_peak_gb <= 5
    plan = choose(3.6 / budget.MARGIN, rows=12)  # 2 rows: 3.5 GB
    assert (plan.micro_batch, plan.grad_accum) == (2, 6)


def test_memory_left_after_the_rows_keeps_layers_uncheckpointed_where_keeping_pays():
    assert choose(100, keep_pays=True).keep_activations == 4  # 14.5 GB: every layer
    plan = choose(10.5 / budget.MARGIN, keep_pays=True)  # 8 rows and 2 kept layers (10.5 GB) beat 4 rows twice, all kept
    assert (plan.micro_batch, plan.grad_accum, plan.keep_activations) == (8, 1, 2)
    assert choose(10.5 / budget.MARGIN, keep_pays=False).keep_activations == 0  # layer-wise GaLore: never
    assert not budget.keeping_pays(SimpleNamespace(layerwise=True)) and budget.keeping_pays(SimpleNamespace(layerwise=False))


def test_given_several_batch_sizes_the_plan_takes_the_fastest_that_fits():
    """benchmarks/speed.py's budget rows: a larger batch spreads a step's fixed cost over more rows."""
    assert choose(100, rows=[8, 16, 32], accumulate=False).micro_batch == 32
    assert choose(12 / budget.MARGIN, rows=[8, 16, 32], accumulate=False).micro_batch == 16  # 32 rows: 18.5 GB


def test_a_budget_nothing_fits_names_the_fix_and_layerwise_never_accumulates():
    with pytest.raises(UserError, match="below what one optimizer step needs.*for 8 rows at once.*raise it, or set it to 0"):
        choose(5 / budget.MARGIN, accumulate=False)  # layer-wise: 8 rows or nothing
    with pytest.raises(UserError, match="train.memory_budget_gb=1 is below"):
        choose(1)


def test_a_budget_without_a_gpu_or_with_fsdp_is_refused_naming_the_fix():
    with pytest.raises(UserError, match="without a GPU set train.memory_budget_gb: 0"):
        budget.check(12.0, cuda=False)
    budget.check(0.0, cuda=False)
    raw = to_dict(default_params())
    raw["train"].update(memory_budget_gb=40, num_processes=2, strategy="fsdp")
    with pytest.raises(ParamsError, match="train.memory_budget_gb: FSDP shards"):
        parse_params(raw)
