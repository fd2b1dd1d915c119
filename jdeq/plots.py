"""jdeq's figures: training runs and the reproductions' curves (matplotlib's object API: no pyplot state, the user's backend untouched)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def plot_history(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss, accuracy and forward/backward solver steps per epoch, side by side; saved as ``path`` (PNG)."""
    epochs = [row["epoch"] for row in history]
    panels = [
        ("cross-entropy loss", [("train", "loss"), ("test", "test_loss")], "log"),
        ("accuracy", [("train", "accuracy"), ("test", "test_accuracy")], "linear"),
        (
            "solver steps per sample",
            [
                ("forward mean (train)", "fwd_mean_steps"),
                ("forward max (train)", "fwd_max_steps"),
                ("backward mean", "bwd_mean_steps"),
            ],
            "linear",
        ),
    ]
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (label, curves, scale) in zip(axes, panels):
        for name, key in curves:
            ax.plot(epochs, [row[key] for row in history], marker="o", markersize=3, label=name)
        ax.set(xlabel="epoch", ylabel=label, yscale=scale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


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
