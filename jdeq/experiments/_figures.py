"""Figures of the Gao & Gao and Ling et al. reproductions: per-seed lines, bounds, thresholds, fitted slopes."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

CLIP = 1e6  # curves are drawn up to CLIP × their first value, so a blown-up run does not flatten the others


def panels(count: int, title: str) -> tuple[Figure, list]:
    """A row of ``count`` axes under one title (the configuration)."""
    fig = Figure(figsize=(4.2 * count, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, count)).tolist()
    fig.suptitle(title, fontsize=9)
    return fig, axes


def draw_seeds(ax, curves: list[np.ndarray], valid: list[bool], label: str, color: str, style: str = "-") -> None:
    """One thin line per seed; a run with a non-converged equilibrium is drawn dotted in red and labelled so."""
    for k, (curve, ok) in enumerate(zip(curves, valid)):
        curve = np.asarray(curve, np.float64)
        shown = np.isfinite(curve) & ((curve > 0) | (ax.get_yscale() != "log"))
        curve = np.minimum(np.where(shown, curve, np.nan), CLIP * np.abs(curve[0]))  # a blow-up is drawn to the clip
        ax.plot(
            curve,
            style if ok else ":",
            color=color if ok else "red",
            lw=0.8,
            alpha=0.8,
            label=(label if ok else "equilibrium not converged") if k == 0 or not ok else None,
        )


def draw_rate(ax, values: np.ndarray, rate: dict) -> None:
    """The fitted tail rate ``ρ`` as a line ``v_first · ρ^(t − first)`` over the fitted steps (a ``RateRecord`` dict)."""
    if not np.isfinite(rate["fitted"]):
        return
    steps = np.arange(rate["first"], rate["last"] + 1)
    line = values[rate["first"]] * rate["fitted"] ** (steps - rate["first"])
    ax.plot(steps, line, "k-.", lw=1, label=f"fitted tail rate (seed 0) ρ={rate['fitted']:.4g}, r²={rate['r2']:.3f}")


def finish(ax, xlabel: str, ylabel: str, title: str = "", logy: bool = True, logx: bool = False) -> None:
    """Labels, scales, grid and a legend without repeated entries."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)


def power_law_panel(ax, x, per_seed: list[list[float]], exponent: float, coeff: float, fit_from: float, label: str):
    """Per-seed markers, their median, and the fitted ``c·xᵅ`` over ``x >= fit_from`` (log-log)."""
    x = np.asarray(x, np.float64)
    for values in np.asarray(per_seed, np.float64).T:
        ax.plot(x, values, ".", color="grey", alpha=0.6)
    ax.plot(x, np.median(per_seed, axis=1), "o-", label=f"{label} (median over seeds)")
    fitted = x[x >= fit_from]
    ax.plot(fitted, coeff * fitted**exponent, "k--", label=f"fit {coeff:.3g}·x^{exponent:.2f} (x ≥ {fit_from:g})")
