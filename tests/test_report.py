"""What REPORT.md states about each method's training budget."""

from ftstudy.params import default_params
from ftstudy.report import _budgets


def _run(steps: int, tokens: int) -> dict:
    return {"steps": steps, "effective_batch": 8, "trained_tokens": tokens}


def test_a_methods_budget_includes_the_run_it_starts_from():
    """The hybrid continues QLoRA's adapter: its budget is QLoRA's plus its own, so 'hybrid beats QLoRA' is
    never read as a like-for-like comparison."""
    trained = {"qlora": _run(16, 7000), "galore": _run(10, 4500), "sequential_ensemble": _run(6, 2600)}
    budgets = _budgets(default_params(), trained)
    assert budgets["qlora"] == {"steps": 16, "examples": 128, "tokens": 7000, "start": None}
    assert budgets["galore"] == {"steps": 10, "examples": 80, "tokens": 4500, "start": None}
    assert budgets["sequential_ensemble"] == {"steps": 22, "examples": 176, "tokens": 9600, "start": "qlora"}
    del trained["qlora"]  # without QLoRA's metrics the hybrid's own budget is all that is known
    assert _budgets(default_params(), trained)["sequential_ensemble"]["start"] is None
