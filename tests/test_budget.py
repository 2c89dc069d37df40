"""Memory-budget mode: the plan chosen from a measured probe (the measurement itself needs CUDA: benchmarks/speed.py
--budgets and train_methods.py --memory-budget-gb check predicted against measured peaks on the GPU)."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

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


def test_accumulated_gradients_count_only_where_a_plan_accumulates():
    """A single micro-step's measured peak already holds the gradients made during it; from the second micro-step
    on, the sum of the earlier ones' sits under the whole step."""
    probe = dataclasses.replace(PROBE, kept=None, grads=1 * GB)
    assert probe.peak(8) == PROBE.peak(8) and probe.peak(4, accum=2) == pytest.approx(PROBE.peak(4) + 1 * GB)
    assert budget.choose(probe, 100, 8, True, 512).micro_batch == 8  # one micro-step: nothing held
    plan = budget.choose(probe, 5 / budget.MARGIN, 8, True, 512)  # 4 rows twice: 4.5 + 1 GB; 2 rows 4 times: 3.5 + 1
    assert (plan.micro_batch, plan.grad_accum, plan.predicted_peak_gb) == (2, 4, 4.5)


def test_given_several_batch_sizes_the_plan_takes_the_fastest_that_fits():
    """benchmarks/speed.py's budget rows: a larger batch spreads a step's fixed cost over more rows."""
    assert choose(100, rows=[8, 16, 32], accumulate=False).micro_batch == 32
    assert choose(12 / budget.MARGIN, rows=[8, 16, 32], accumulate=False).micro_batch == 16  # 32 rows: 18.5 GB


def test_a_budget_nothing_fits_names_the_fix_and_layerwise_never_accumulates():
    with pytest.raises(UserError, match="below what one optimizer step needs.*for 8 rows at once.*raise it, or set it to 0"):
        choose(5 / budget.MARGIN, accumulate=False)  # layer-wise: 8 rows or nothing
    with pytest.raises(UserError, match="train.memory_budget_gb=1 is below"):
        choose(1)


def _plan(monkeypatch, budget_gb, compiled, rows=8, graphs=False, bends=0.0, keep_pays=True, accumulate=True,
          kept_share=1.0, card_gb=math.inf):
    """budget.plan with its measurements stood in for (measuring needs CUDA): the eager layers peak as PROBE says,
    compiled ones keep half as much per row and a quarter as much per kept layer; ``bends`` GB more per row for
    every row past two (the peak moving from the head to a layer's backward); kept layers hold ``kept_share`` of what
    the probe's one row says; a step past ``card_gb`` runs out of memory. Returns the plan and what was measured."""
    taken = []
    compiled_probe = dataclasses.replace(PROBE, one_row=int(0.75 * GB), two_rows=1 * GB, kept=GB // 4, compiled=True)

    def truth(rows, keep, compiled):
        probe = compiled_probe if compiled else PROBE
        above = probe.peak(rows) - probe.static + kept_share * (probe.peak(rows, keep) - probe.peak(rows))
        above += bends * GB * max(0, rows - 2)
        if probe.static + above > card_gb * GB:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return int(above)

    def measure(model, spec, seq_len, vocab_size, compiled=False, cuda_graphs=False):
        taken.append(("compiled+graphs" if cuda_graphs else "compiled") if compiled else "eager")
        probe = dataclasses.replace(compiled_probe, cuda_graphs=cuda_graphs) if compiled else PROBE
        return probe if keep_pays else dataclasses.replace(probe, kept=None)

    def peaks_at(model, spec, seq_len, vocab_size, rows, keep=0, compiled=False, cuda_graphs=False):
        taken.append((rows[0], keep))
        return [(truth(n, keep, compiled),) * 2 for n in rows]  # (forward, backward): a step that peaks in both

    monkeypatch.setattr(budget, "measure", measure)
    monkeypatch.setattr(budget, "peaks_at", peaks_at)
    lm = SimpleNamespace(lm_head=None, model=None, config=SimpleNamespace(vocab_size=32))
    return budget.plan(lm, SimpleNamespace(layerwise=False), budget_gb, rows, accumulate, 512, compiled, graphs), taken


def test_compiled_layers_are_probed_only_where_the_eager_probe_keeps_a_faster_plan_out(monkeypatch):
    plan, taken = _plan(monkeypatch, 100, compiled=True)  # everything fits by the eager probe: no compile spent
    assert taken == ["eager", (8, 4)] and plan.probe == "eager" and budget.shape(plan) == (8, 1, 4)
    plan, taken = _plan(monkeypatch, 10.5 / budget.MARGIN, compiled=True, graphs=True)  # eager: 8 rows, 2 kept
    assert taken == ["eager", "compiled+graphs", (8, 4)] and plan.probe == "compiled+graphs"
    assert budget.shape(plan) == (8, 1, 4) and plan.predicted_peak_gb == 6.5  # 2 + 0.5 + 8 x (0.25 + 0.25)
    plan, taken = _plan(monkeypatch, 10.5 / budget.MARGIN, compiled=False)  # layers left eager: the eager probe's plan
    assert taken == ["eager", (8, 2)] and budget.shape(plan) == (8, 1, 2) and plan.checks == ((8, 2, 10.5),)


def test_a_budget_only_compiled_layers_fit_gets_their_plan_and_one_nothing_fits_names_the_fix(monkeypatch):
    with pytest.raises(UserError, match="train.memory_budget_gb=2.9 is below"):
        _plan(monkeypatch, 2.9, compiled=False)  # one eager row: 3 GB
    plan, taken = _plan(monkeypatch, 2.9, compiled=True)  # one compiled row: 2 + 0.5 + 0.25 GB
    assert taken == ["eager", "compiled", (1, 0)] and budget.shape(plan) == (1, 8, 0) and plan.probe == "compiled"
    with pytest.raises(UserError, match="train.memory_budget_gb=2.5 is below what one optimizer step needs"):
        _plan(monkeypatch, 2.5, compiled=True)


def test_a_budget_without_a_gpu_or_with_fsdp_is_refused_naming_the_fix():
    with pytest.raises(UserError, match="without a GPU set train.memory_budget_gb: 0"):
        budget.check(12.0, cuda=False)
    budget.check(0.0, cuda=False)
    raw = to_dict(default_params())
    raw["train"].update(memory_budget_gb=40, num_processes=2, strategy="fsdp")
    with pytest.raises(ParamsError, match="train.memory_budget_gb: FSDP shards"):
        parse_params(raw)


def test_between_measured_rows_the_model_draws_chords_and_past_them_carries_the_last_on():
    """A step's peak is the highest of its phases', each linear in the rows, so it bends upwards: chords between
    measured rows err high, the last one carried on errs low (what plan's check of the chosen shape is for)."""
    probe = dataclasses.replace(PROBE, kept=None, checked=((8, 0, 5 * GB, 5 * GB),))  # 1 row: 1 GB, 2: 1.5, 8: 5
    assert probe.peak(2) == pytest.approx(3.5 * GB) and probe.peak(8) == pytest.approx(7 * GB)
    assert probe.peak(5) == pytest.approx(2 * GB + 1.5 * GB + 3 * 3.5 / 6 * GB)  # on the chord from 2 to 8 rows
    assert probe.peak(16) == pytest.approx(2 * GB + 5 * GB + 8 * 3.5 / 6 * GB)  # its slope carried on
    kept = dataclasses.replace(PROBE, checked=((8, 2, 10 * GB, 10 * GB),))  # 2 kept layers at 8 rows: 10 GB, not 8.5
    assert kept.peak(8, keep=2) == pytest.approx(12 * GB) and kept.peak(4, keep=4) > PROBE.peak(4, keep=4)
    assert kept.peak(8) == PROBE.peak(8)  # the excess is the kept layers', not the checkpointed rows'


def test_a_plan_over_the_budget_by_measurement_is_not_taken_the_next_one_that_measures_within_is(monkeypatch):
    """On an H200 the probe at 1 and 2 rows predicted 4.57 GB for 64 QLoRA rows, which trained at 6.66: the fitted
    line missed the peak's bend. Here each row past two costs 0.25 GB more than the line says."""
    plan, taken = _plan(monkeypatch, 7 / budget.MARGIN, compiled=False, rows=8, bends=0.25, keep_pays=False)
    # the line: 8 rows in 6.5 GB; measured 8. On the chord from 2 rows to that point, 4 rows twice: 2 + 1.5 + 2 x 0.75
    assert taken == ["eager", (8, 0), (4, 0)] and budget.shape(plan) == (4, 2, 0)
    assert plan.checks == ((8, 0, 8.0), (4, 0, 5.0))  # what the run's metrics record (memory_plan)
    assert plan.predicted_peak_gb == 5.0 == PROBE.peak(4) / GB + 0.25 * 2  # what 4 rows measured


def test_when_no_shape_measures_within_the_budget_the_error_names_the_fix(monkeypatch):
    """Layer-wise GaLore takes its 8 rows at once or not at all: predicted 6.5 GB, measured 8."""
    with pytest.raises(UserError, match="train.memory_budget_gb=7.5 is below what one optimizer step needs.*8 rows at"):
        _plan(monkeypatch, 7.5, compiled=False, rows=8, bends=0.25, keep_pays=False, accumulate=False)


def test_a_plan_that_measured_less_than_predicted_makes_room_for_a_faster_one_measured_in_its_turn(monkeypatch):
    """One row with every layer kept counts what a kept layer holds whatever the rows (QLoRA on an H200: predicted
    9.66 GB, measured 6.49, one layer kept where more fitted). Here kept layers hold half what the probe says."""
    plan, taken = _plan(monkeypatch, 8.5 / budget.MARGIN, compiled=False, kept_share=0.5)
    # the probe: 8 rows and 1 kept layer (6.5 + 2 = 8.5 GB); measured 7.5, so 8 rows and 2 kept (8.5) measured in turn
    assert taken == ["eager", (8, 1), (8, 2)] and budget.shape(plan) == (8, 1, 2) and len(plan.checks) == 2
    assert plan.predicted_peak_gb == 8.5 and plan.probe == "eager"


def test_a_shape_past_the_card_counts_as_over_the_budget_and_the_next_is_measured(monkeypatch):
    """A shape the model predicts low may not fit the card at all: its step runs out of memory, and it is refused
    like one measured over the budget."""
    plan, taken = _plan(monkeypatch, 100, compiled=False, rows=[8, 16], accumulate=False, keep_pays=False, bends=0.5,
                        card_gb=12)
    # 16 rows: 10.5 GB by the line, 17.5 with the bend, past a 12 GB card; 8 rows: 6.5 + 3 = 9.5
    assert taken == ["eager", (16, 0), (8, 0)] and budget.shape(plan) == (8, 1, 0) and plan.predicted_peak_gb == 9.5
    assert plan.checks == ((16, 0, None), (8, 0, 9.5))  # JSON has no infinity: the metrics say None


def test_measured_apart_the_forward_and_the_backward_each_carry_on_and_kept_layers_add_to_the_forward_only():
    """At one or two rows a step peaks at the head's chunk (the forward); at tens of rows in the backward, recomputing
    a layer on top of every layer's saved input. Measured apart at one and two rows, each phase is a line of its
    own, and the step's peak is the higher: the bend the one line through the step's peaks missed. Kept layers
    hold their activations through the forward and give them up first in the backward."""
    probe = budget.Probe(static=1 * GB, one_row=1 * GB, two_rows=int(1.1 * GB), kept=GB // 10, layers=4,
                         backward=(int(0.3 * GB), int(0.5 * GB)))
    line = dataclasses.replace(probe, backward=None)  # the step's peaks alone
    assert probe.peak(2) == pytest.approx(2.1 * GB) == line.peak(2)  # the head's
    assert probe.peak(16) == pytest.approx(1 * GB + 0.3 * GB + 15 * 0.2 * GB)  # the backward's: 4.3 GB
    assert line.peak(16) == pytest.approx(1 * GB + 1 * GB + 15 * 0.1 * GB)  # 3.5 GB: the bend missed
    assert probe.peak(16, keep=1) == probe.peak(16)  # 2.5 + 16 x 0.025 GB in the forward, under the backward's 3.3
    assert probe.peak(4, keep=4) == pytest.approx(1 * GB + 1.3 * GB + 4 * 0.1 * GB)  # in the forward, on top
    free = budget.fastest(probe, 2 / budget.MARGIN, 8, True, 512)  # as if activations took no memory, either phase
    assert budget.shape(free) == (8, 1, 4) and free.predicted_peak_gb == 1.0


def test_what_a_kept_layer_holds_is_read_from_the_forward_of_a_checked_plan_not_from_the_steps_peak():
    """Where the backward is a step's peak (wide LoRA on an H200, its adapter gradients arriving there), kept layers
    can raise the forward under it without raising the step's peak: a plan keeping one layer that measured no more
    than none says nothing about what four would hold. Here the backward holds 1 GB at one row and 0.2 more a row,
    the forward 0.5 and 0.1 a row, and a kept layer 0.1 GB a row (the one-row probe said 0.25)."""
    probe = budget.Probe(static=1 * GB, one_row=1 * GB, two_rows=int(1.2 * GB), kept=1 * GB, layers=4,
                         backward=(1 * GB, int(1.2 * GB)), forward=(GB // 2, int(0.6 * GB)),
                         checked=((8, 1, 2.4 * GB, 2.0 * GB),))  # 8 rows, 1 kept: forward 1.2 + 0.8, under 2.4
    assert probe.peak(8, keep=1) == pytest.approx(3.4 * GB)  # what it measured
    assert probe.peak(8, keep=4) == pytest.approx(1 * GB + 1.2 * GB + 8 * 0.4 * GB)  # the forward's: 5.4 GB
    steps = dataclasses.replace(probe, forward=None, checked=((8, 1, 2.4 * GB, 2.4 * GB),))  # the step's peaks only
    assert steps.peak(8, keep=4) == pytest.approx(3.4 * GB)  # the kept layers read as holding nothing: 2 GB low


def test_the_probe_reads_what_kept_layers_add_from_the_forwards_as_the_model_adds_them(monkeypatch):
    """budget.measure with its steps stood in for: at one row the backward (1 GB) is the step's peak and keeping all
    4 layers raises only the forward (0.5 GB to 0.8), so the steps' peaks alike would read kept layers as free."""

    def peaks_at(model, spec, seq_len, vocab_size, rows, keep=0, compiled=False, cuda_graphs=False):
        return [(int((0.5 + 0.1 * (n - 1) + 0.3 * n * keep / 4) * GB), int((1 + 0.2 * (n - 1)) * GB)) for n in rows]

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))  # 24 trained values
            self.lm_head = torch.nn.Linear(2, 3, bias=False).requires_grad_(False)

    monkeypatch.setattr(budget, "peaks_at", peaks_at)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 2 * GB)
    probe = budget.measure(LM(), SimpleNamespace(galore=None, layerwise=False, eight_bit=False), 512, 3)
    assert probe.static == 2 * GB + 24 * 4 * 2 and probe.grads == 24 * 4  # fp32 Adam's two moments; the gradients
    assert (probe.one_row, probe.two_rows) == (1 * GB, int(1.2 * GB))  # the steps' peaks: the backward's
    assert probe.forward == (GB // 2, int(0.6 * GB)) and probe.backward == (1 * GB, int(1.2 * GB))
    assert probe.kept == pytest.approx(0.3 * GB, abs=1) and probe.layers == 4
    assert probe.peak(8, keep=4) == pytest.approx(probe.static + (1.2 + 8 * 0.3) * GB, abs=8)  # the forward's: 3.6
