"""What REPORT.md states about each method's training budget."""

from ftstudy.report import _budgets


def _run(steps: int, tokens: int, **extra) -> dict:
    return {"steps": steps, "effective_batch": 8, "trained_tokens": tokens, **extra}


def test_a_methods_budget_counts_all_its_phases_and_says_how_the_hybrid_split_them():
    """The hybrid's budget is both of its phases, so 'hybrid vs QLoRA' compares equal budgets, and the report says
    how the hybrid spent it."""
    phases = [{"steps": 8, "optimizer": "adamw_torch"}, {"steps": 8, "optimizer": "galore_adamw_layerwise"}]
    trained = {"qlora": _run(16, 7000), "sequential_ensemble": _run(16, 7000, phases=phases)}
    budgets = _budgets(trained)
    assert budgets["qlora"] == {"steps": 16, "examples": 128, "tokens": 7000, "phases": ""}
    assert budgets["sequential_ensemble"] == {"steps": 16, "examples": 128, "tokens": 7000,
                                              "phases": "8 adamw_torch + 8 galore_adamw_layerwise"}
