"""The report's plots: metrics against each swept knob, the Pareto front in 2-D and with sparsity in 3-D."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from mtlsparse import pareto
from mtlsparse.reporting.collect import Row
from mtlsparse.reporting.optuna import COLUMN as OPTUNA_COLUMN
from mtlsparse.reporting.tables import cell


def _is_numeric(values: Sequence[object]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def x_scale(values: Sequence[float]) -> str:
    """'log' when positive values span more than a decade, 'symlog' when 0 is swept too
    (λ sweeps start at 0), else 'linear'."""
    positive = [v for v in values if v > 0]
    if min(values) < 0 or len(positive) < 2 or max(positive) <= 10 * min(positive):
        return "linear"
    return "log" if len(positive) == len(values) else "symlog"


def plot_knob(path: Path, rows: Sequence[Row], knob: str, metrics: Sequence[str]) -> None:
    """One panel per metric against `knob`; every run is its own point."""
    rows = [row for row in rows if row.get(knob) is not None]
    values = [row[knob] for row in rows]
    numeric = _is_numeric(values)
    labels = list(dict.fromkeys(cell(v) for v in values))
    xs = values if numeric else [labels.index(cell(v)) for v in values]
    scale = x_scale(values) if numeric else "linear"
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        pts = [(x, pareto.as_float(row.get(metric))) for x, row in zip(xs, rows)]
        ax.plot(*zip(*pts), "o", alpha=0.7)
        ax.set(title=metric, xlabel=knob)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
            ax.tick_params(axis="x", labelrotation=45 if len(labels) > 4 else 0)
        elif scale == "symlog":
            ax.set_xscale(scale, linthresh=min(v for v in values if v > 0))
        else:
            ax.set_xscale(scale)
        if numeric:
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels collide on short ranges
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def _xy(rows: Sequence[Row], keys: Sequence[str]) -> list[list[float]]:
    return [[pareto.as_float(row.get(k)) for row in rows] for k in keys]


def plot_front(path: Path, rows: Sequence[Row], front: Sequence[Row], keys: Sequence[str], hv: float) -> None:
    """All successful runs grey, the non-dominated ones highlighted and connected; in an Optuna sweep
    the trials Optuna found best (on its validation objectives) ringed."""
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(*_xy(rows, keys[:2]), "o", color="0.7", label="runs")
    ordered = sorted(front, key=lambda row: pareto.as_float(row.get(keys[0])))
    ax.plot(*_xy(ordered, keys[:2]), "o-", color="C3", label="non-dominated")
    optuna_best = [row for row in rows if row.get(OPTUNA_COLUMN)]
    if optuna_best:
        ax.plot(*_xy(optuna_best, keys[:2]), "s", markersize=11, markerfacecolor="none", color="k",
                label="Optuna's Pareto set (validation)")
    ax.set(xlabel=keys[0], ylabel=keys[1], title=f"Pareto front (HV {hv:.4g})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def plot_front3d(path: Path, rows: Sequence[Row], front: Sequence[Row], keys: Sequence[str]) -> None:
    """Sparsity (z) against the first two objectives, non-dominated runs highlighted."""
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    ax.scatter(*_xy(rows, keys), color="0.6", label="runs")
    ax.scatter(*_xy(front, keys), color="C3", s=40, label="non-dominated")
    ax.set(xlabel=keys[0], ylabel=keys[1], zlabel=keys[2])
    ax.legend()
    fig.savefig(path, dpi=110)
