"""Figures for the reproductions (matplotlib's object API: no pyplot state, the user's backend untouched)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def log_curves(curves: dict[str, np.ndarray], xlabel: str, ylabel: str, title: str | None = None, logy: bool = True):
    """One line per entry, on a log-scale y axis unless ``logy=False`` (non-positive values are not drawn)."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for label, values in curves.items():
        values = np.abs(np.asarray(values, np.float64))
        ax.plot(np.where(values > 0, values, np.nan), label=label)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def xy_plot(x, series: dict[str, np.ndarray], xlabel: str, ylabel: str, logx=False, logy=False, title=None):
    """Markers-and-lines plot of several series against a shared ``x``."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for label, y in series.items():
        ax.plot(x, y, "o-", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log")
        ax.set_xticks(list(x), [f"{v:g}" for v in x])
        ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return fig
