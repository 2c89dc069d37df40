"""PNG figures for REPORT.md, drawn from the metrics and curves on disk."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def read_curve(tsv: Path) -> tuple[list[int], list[float]]:
    with open(tsv) as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    return [int(r[0]) for r in rows[1:]], [float(r[-1]) for r in rows[1:]]


def loss_curves(curves: dict[str, Path], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, tsv in curves.items():
        steps, values = read_curve(tsv)
        ax.plot(steps, values, marker=".", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (response tokens)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def frontier(points: dict[str, tuple[float, float]], xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Quality (y) against a cost (x), one labelled point per method."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=50)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def per_source_bars(values: dict[str, dict[str, float]], ylabel: str, path: Path) -> None:
    """values[model][source] -> grouped bars, one group per source."""
    models = list(values)
    sources = sorted({s for v in values.values() for s in v})
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, m in enumerate(models):
        xs = [j + i * width for j in range(len(sources))]
        ax.bar(xs, [values[m].get(s, 0.0) for s in sources], width, label=m)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(sources))], sources)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} per source")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
