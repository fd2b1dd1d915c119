"""jdeq's figures, in one module: training histories and the building blocks of the reproductions' figures.

matplotlib's object API only (no pyplot state; the user's backend is untouched). The reproductions' rules:
at most three panels per row; a run whose equilibrium did not converge is clipped and marked, never drawn as
if valid; an empty panel says "not measured"; a fitted rate is drawn only where its fit has ``r² >= MIN_R2``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

CLIP = 1e6  # curves are drawn up to CLIP × their first value, so a blown-up run does not flatten the others
MIN_R2 = 0.9  # a fitted-rate line is drawn only for fits at least this good
PANELS_PER_ROW = 3
INVALID = "equilibrium not converged (red, clipped; × marks its end)"


def plot_history(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss, accuracy and forward/backward solver steps per epoch, side by side; saved as ``path`` (PNG)."""
    epochs = [row["epoch"] for row in history]
    contents = [
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
    fig, axes = panels(len(contents), title)
    for ax, (label, curves, scale) in zip(axes, contents):
        for name, key in curves:
            ax.plot(epochs, [row[key] for row in history], marker="o", markersize=3, label=name)
        ax.set(xlabel="epoch", ylabel=label, yscale=scale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def panels(count: int, title: str = "", width: float = 4.4, height: float = 3.6) -> tuple[Figure, list]:
    """``count`` axes, at most :data:`PANELS_PER_ROW` per row, under one title (the configuration)."""
    columns = min(count, PANELS_PER_ROW)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel().tolist()
    for ax in axes[count:]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    return fig, axes[:count]


def not_measured(ax, why: str = "") -> None:
    """Mark an empty panel "not measured" (with the reason), so that no empty axis reads as a result."""
    ax.text(0.5, 0.5, "not measured" + (f"\n{why}" if why else ""), ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_seeds(ax, curves: list, valid: list[bool], label: str, color: str, style: str = "-", x=None) -> None:
    """One thin line per seed; a run whose equilibrium did not converge is red and dotted, clipped, its end marked ×."""
    for k, (curve, ok) in enumerate(zip(curves, valid)):
        curve = np.asarray(curve, np.float64)
        steps = np.arange(curve.size) if x is None else np.asarray(x)[: curve.size]
        shown = np.isfinite(curve) & ((curve > 0) | (ax.get_yscale() != "log"))
        first = np.abs(curve[0]) if np.isfinite(curve[0]) and curve[0] != 0 else 1.0
        clipped = np.minimum(np.where(shown, curve, np.nan), CLIP * first)
        if ok:
            ax.plot(steps, clipped, style, color=color, lw=0.8, alpha=0.8, label=label if k == 0 else None)
            continue
        ax.plot(steps, clipped, ":", color="red", lw=0.9, label=f"{label}: {INVALID}")
        end = np.flatnonzero(np.isfinite(clipped))
        if end.size:
            ax.plot(steps[end[-1]], clipped[end[-1]], "x", color="red", ms=6)


def draw_rate(ax, values, rate: dict, label: str = "fitted tail rate (seed 0)") -> None:
    """The fitted tail rate ``ρ`` as ``v_first · ρ^(t − first)`` over the fitted steps (a ``RateRecord`` dict).

    Not drawn when the fit is missing or its ``r² < MIN_R2`` (a line through a non-linear decay is no rate).
    """
    if not np.isfinite(rate["fitted"]) or not rate["r2"] >= MIN_R2:
        return
    steps = np.arange(rate["first"], rate["last"] + 1)
    line = np.asarray(values)[rate["first"]] * rate["fitted"] ** (steps - rate["first"])
    ax.plot(steps, line, "k-.", lw=1, label=f"{label} ρ={rate['fitted']:.4g}, r²={rate['r2']:.3f}")


def finish(ax, xlabel: str, ylabel: str, title: str = "", logy: bool = True, logx: bool = False, xticks=None) -> None:
    """Labels, scales, grid, ``xticks`` (labelled as given) and a legend without repeated entries."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    if xticks is not None:
        ax.set_xticks(list(xticks), [f"{v:g}" for v in xticks])
        ax.minorticks_off()
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=6)


def power_law_panel(ax, x, per_seed, fit: dict | None, label: str) -> None:
    """Per-seed markers, their median, and (when given) the fitted ``c·xᵅ`` over ``fit["x"]`` with its interval."""
    x = np.asarray(x, np.float64)
    per_seed = np.asarray(per_seed, np.float64)
    for values in per_seed.T:
        ax.plot(x, values, ".", color="grey", alpha=0.6)
    ax.plot(x, np.median(per_seed, axis=1), "o-", label=f"{label} (median over seeds)")
    if fit is not None:
        over = np.asarray(fit["x"], np.float64)
        interval = f" [{fit['low']:.2f}, {fit['high']:.2f}]" if "low" in fit else ""
        ax.plot(over, fit["coeff"] * over ** fit["exponent"], "k--", label=f"fit ∝ x^{fit['exponent']:.2f}{interval}")
