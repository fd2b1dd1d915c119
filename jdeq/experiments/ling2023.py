"""Reproduction of Ling, Xie, Wang, Zhang & Lin 2023 (arXiv 2205.13814): over-parameterised DEQs.

``Z = ReLU(W Z + U X)``, ``ŷ = aᵀ Z*``, ``Φ = ½‖ŷ − y‖²``, gradient descent on ``(W, U, a)`` from the
Gaussian initialisation of :mod:`jdeq.models.ling`. Only the abstract was available: linear convergence under a
condition on the initial equilibrium (``λ₀ = λ_min(Z₀ᵀZ₀)`` bounded away from 0, met under mild
over-parameterisation), a unique equilibrium throughout training, and an analysis through the weight-untied
counterpart of the random DEQ. The bound ``Φ(t) ≤ (1 − ηλ₀/2)ᵗ Φ(0)`` and the condition ``λ₀ ≥ mλ*/2`` are
our reconstruction (the Du-et-al.-type form); the theorem's width and step-size conditions were not read.
Measured:

1. ``λ₀/m`` against ``m`` at every width and seed, against ``λ*/2`` with ``λ* = λ_min(G*)`` the infinite-width
   limit (:func:`_scaling.relu_gram_limit`), at a small ``σ_w`` and at one where the recurrence moves ``λ*``
   away from the one-layer kernel; the untied depth-``untied_depth`` network and a depth-1 control.
2. Training on an ``(m × η)`` grid, ``η = c/λ_max(K₀)`` for ``c`` up to the stability limit of the linearised
   dynamics: per cell, ``Φ(t)`` against the bound at every step (its decay ratio and worst step), ``‖W_t‖₂``,
   ``ηλ_max(K_T)`` measured at the end, the weight drift ``‖W_T − W₀‖_F/‖W₀‖_F`` and its exponent in ``m``
   with a 95 % interval, compared with −1/2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .. import plots, theory
from ..linalg import largest_singular_value
from ..models import ling
from . import _data, _scaling
from ._common import (
    Claim,
    Results,
    RunRecord,
    bound_claim,
    config_record,
    gradient_descent,
    rate_and_bound,
    rate_claim,
    seed_spread,
    solve_aux,
    timed,
)

ABSTRACT = "our reconstruction from the abstract (arXiv 2205.13814): "
UNINFORMATIVE_DECAY = 10.0  # a bound whose decay is 10× slower than the loss's says little about the rate


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and constants; :data:`PROVENANCE` says where each comes from."""

    samples: int = 32
    gram_widths: tuple[int, ...] = (32, 64, 128, 256)
    gram_sigma_ws: tuple[float, ...] = (0.1, 0.5)
    untied_depth: int = 10
    seeds: int = 5
    train_widths: tuple[int, ...] = (64, 128)
    step_scales: tuple[float, ...] = (0.25, 1.0, 1.9)
    steps: int = 150
    snapshot_every: int = 50
    sigma_w: float = ling.DEFAULT_SIGMA_W
    recurrent_sigma_w: float = 0.5
    limit_tolerance: float = 0.1
    far_start_scale: float = 10.0
    round_off: float = 1e-20
    seed: int = 0


PROVENANCE = {
    "samples": "our choice: N binary digits (unit-norm inputs, the papers' ‖x‖ = 1)",
    "gram_widths": "our choice: m from N up, to see λ₀/m level off at λ*",
    "gram_sigma_ws": "our choice: σ_w = 0.1 (λ* within ~1 % of the one-layer kernel) and 0.5 (the recurrence "
    "moves λ* by ~34 %)",
    "untied_depth": "our choice: depth of the weight-untied comparison; depth 1 is the control",
    "seeds": "our choice: >= 5 seeds for every spread",
    "train_widths": "our choice: m >= 2N",
    "step_scales": "our choice: ηλ_max(K₀) up to 1.9, below 2, the stability limit of GD on the linearised model at init",
    "steps": "our choice: long enough to fit the loss's tail rate at every width",
    "snapshot_every": "our choice: ‖W_t‖₂ recorded every 50 steps",
    "sigma_w": ABSTRACT + "W ~ N(0, 2σ_w²/m) with small σ_w (value not read; 0.1 is our choice)",
    "recurrent_sigma_w": "our choice: one training cell at σ_w = 0.5, where the equilibrium is not a shallow network",
    "limit_tolerance": "our choice: relative gap allowed between λ₀/m at the largest width and λ* (set before measuring)",
    "far_start_scale": "our choice: the far start z0 ~ 10·N(0, 1) for the uniqueness check",
    "round_off": "our choice: losses below this fraction of Φ(0) are float64 round-off (solves at tol 1e-12)",
    "seed": "our choice: first PRNG seed",
}

QUICK = Config()
# The earlier full configuration (N = 100, λ₀ up to m = 4096, training at m = 1024 for 5000 steps) with the grids.
REFERENCE = Config(
    samples=100,
    gram_widths=(64, 128, 256, 512, 1024, 2048, 4096),
    train_widths=(128, 256, 512, 1024),
    step_scales=(0.25, 0.5, 1.0, 1.5, 1.9),
    steps=5000,
)
# What the shared, loaded 2-core machine affords (~7 CPU minutes).
FULL = dataclasses.replace(
    REFERENCE, samples=32, gram_widths=(32, 64, 128, 256, 512, 1024, 2048), train_widths=(64, 128, 256), steps=400
)

# Tiny sizes that exercise every code path in seconds (tests, the notebook's smoke run); measures nothing.
SMOKE = dataclasses.replace(
    QUICK,
    samples=6,
    gram_widths=(8, 16),
    seeds=2,
    train_widths=(12, 16),
    step_scales=(0.25, 1.9),
    steps=40,
    snapshot_every=20,
)


def _loss(params, data):
    value, stats = ling.quadratic_loss_and_stats(params, data["x"], data["y"])
    return value, solve_aux(stats)


@jax.jit
def _norm_w(params):
    return largest_singular_value(params["W"])


@jax.jit
def _gram_min(params, x):
    """``(λ₀, worst result code)`` of the equilibria at ``params``."""
    solution = ling.solve(params, x)
    return theory.gram_min_eigenvalue(solution.value), solution.stats.result.max()


@jax.jit
def _kernel_max(params, x):
    return _scaling.kernel_extremes(lambda p: ling.predict(p, x), params)[1]


@jax.jit
def _far_start_gap(params, x, key, scale):
    near = ling.equilibrium(params, x)
    far = ling.equilibrium(params, x, z0=scale * jax.random.normal(key, near.shape, near.dtype))
    return jnp.abs(near - far).max() / jnp.abs(near).max()


def _lambda0_over_m(x, width: int, seed: int, sigma_w: float) -> tuple[float, RunRecord]:
    lam, code = _gram_min(ling.init(jax.random.PRNGKey(seed), width, x.shape[0], sigma_w), x)
    record = RunRecord(f"gram m={width} seed={seed} σ_w={sigma_w:g}", int(code), 0.0)
    return (float(lam) / width if record.valid else float("nan")), record


def _untied(x, width: int, seed: int, depth: int, sigma_w: float) -> float:
    features = _scaling.untied_features(jax.random.PRNGKey(seed), x, width, depth, sigma_w)
    return float(theory.gram_min_eigenvalue(features)) / width


def gram_sweep(x, sigma_w: float, cfg: Config) -> tuple[list[Claim], dict, list[RunRecord]]:
    """Item 1 at one ``σ_w``: ``λ₀/m`` per width and seed (DEQ, untied depth ``untied_depth`` and 1) against ``λ*``."""
    limit = float(jnp.linalg.eigvalsh(_scaling.relu_gram_limit(x, sigma_w))[0])
    one_layer = float(jnp.linalg.eigvalsh(_scaling.relu_gram_limit(x, 0.0))[0])
    tied, deep, shallow, records = [], [], [], []
    for m in tqdm(cfg.gram_widths, desc=f"ling2023 λ₀ sweep σ_w={sigma_w:g}"):
        seeds = [cfg.seed + s for s in range(cfg.seeds)]
        pairs = [_lambda0_over_m(x, m, s, sigma_w) for s in seeds]
        tied.append([v for v, _ in pairs])
        records += [r for _, r in pairs]
        deep.append([_untied(x, m, s, cfg.untied_depth, sigma_w) for s in seeds])
        shallow.append([_untied(x, m, s, 1, sigma_w) for s in seeds])
    widths = np.asarray(cfg.gram_widths)
    tag = f"σ_w={sigma_w:g}"
    claims = [
        Claim(
            f"{tag}: λ₀ >= mλ*/2 at m={m}, every seed (smallest (λ₀/m)/λ* over {cfg.seeds} seeds)",
            "property",
            float(np.min(np.asarray(values) / limit)),
            0.5,
            ABSTRACT + "λ₀ bounded away from 0 under mild over-parameterisation; the form λ₀ >= mλ*/2 is the "
            "Du-et-al.-type condition, not read",
            seeds=int(np.isfinite(values).sum()),
            at_least=True,
        )
        for m, values in zip(widths, tied)
    ]
    last, last_deep, last_shallow = (float(np.median(v[-1])) for v in (tied, deep, shallow))
    claims += [
        Claim(
            f"{tag}: λ₀/m at m={widths[-1]} within {cfg.limit_tolerance:g} (relative) of λ* = λ_min(G*) (median over seeds)",
            "scaling",
            abs(last - limit) / limit,
            cfg.limit_tolerance,
            "our choice: concentration of λ₀/m at its infinite-width limit (tolerance set before measuring)",
            seeds=cfg.seeds,
        ),
        Claim(
            f"{tag}: untied depth-{cfg.untied_depth} network's λ₀/m at m={widths[-1]} within "
            f"{cfg.limit_tolerance:g} (relative) of the DEQ's (median over seeds)",
            "scaling",
            abs(last_deep - last) / last,
            cfg.limit_tolerance,
            ABSTRACT + "the random DEQ is analysed through its weight-untied counterpart",
            seeds=cfg.seeds,
        ),
        Claim(
            f"{tag}: control — the depth-1 network's λ₀/m at m={widths[-1]} differs from the DEQ's by more than "
            f"{cfg.limit_tolerance:g} (relative; otherwise the untied comparison cannot tell depth from no depth)",
            "property",
            abs(last_shallow - last) / last,
            cfg.limit_tolerance,
            "our choice: a control for the untied comparison",
            seeds=cfg.seeds,
            at_least=True,
        ),
    ]
    measurements = {
        "sigma_w": sigma_w,
        "widths": widths,
        "lambda_star": limit,
        "lambda_star_one_layer": one_layer,
        "lambda_star_shift_from_one_layer": abs(limit - one_layer) / one_layer,
        "lambda0_over_m": {int(m): seed_spread(v) for m, v in zip(widths, tied)},
        "untied_lambda0_over_m": {int(m): seed_spread(v) for m, v in zip(widths, deep)},
        "depth1_lambda0_over_m": {int(m): seed_spread(v) for m, v in zip(widths, shallow)},
        "per_seed": {"tied": tied, "untied": deep, "depth1": shallow},
    }
    return claims, measurements, records


def train(x, y, width: int, seed: int, scale: float, sigma_w: float, cfg: Config) -> dict:
    """Gradient descent at ``η = scale/λ_max(K₀)`` for ``steps`` steps: the run against the bound, its drift, ``‖W_t‖₂``."""
    params0 = ling.init(jax.random.PRNGKey(seed), width, x.shape[0], sigma_w)
    lam0, code0 = (float(v) for v in _gram_min(params0, x))
    eta = scale / float(_kernel_max(params0, x))
    params, metrics = gradient_descent(
        _loss, params0, {"x": x, "y": y}, eta, cfg.steps, chunk=cfg.snapshot_every, snapshot=_norm_w
    )
    loss = metrics["loss"]
    factors = theory.half_step_factors(np.full(cfg.steps, eta), np.full(cfg.steps, lam0))
    bound = theory.bound_from_factors(loss[0], factors)
    metrics["solve_result"] = np.maximum(metrics["solve_result"], int(code0))
    record = RunRecord.from_metrics(f"m={width} seed={seed} c={scale:g} σ_w={sigma_w:g}", metrics)
    key = jax.random.PRNGKey(seed + 10_000)
    return {
        "record": record,
        "loss": loss,
        "bound": bound,
        "norm_W": metrics["snapshot"],
        "summary": {
            "valid": record.valid,
            "eta": eta,
            "lambda0": lam0,
            "eta_lambda0": eta * lam0,
            **rate_and_bound(loss, bound, factors, cfg.round_off * loss[0], solve_result=metrics["solve_result"]),
            "final_ratio": float(loss[-1] / loss[0]),
            "final_bound_ratio": float(bound[-1] / bound[0]),
            "max_norm_W": float(np.max(metrics["snapshot"])),
            "drift_W": _scaling.relative_drift(params["W"], params0["W"]),
            "eta_lambda_max_final": eta * float(_kernel_max(params, x)),
            "far_start_gap_final": float(_far_start_gap(params, x, key, cfg.far_start_scale)),
        },
    }


SPREAD_KEYS = ("bound_ratio", "decay_ratio", "worst_t", "final_ratio", "final_bound_ratio", "max_norm_W", "drift_W")
SPREAD_KEYS += ("eta_lambda0", "eta_lambda_max_final", "far_start_gap_final")


def _cell(runs: list[dict]) -> dict:
    """A grid cell's spreads over its valid seeds, and whether it was stable (every run valid, its loss fell)."""
    spreads = _scaling.valid_spreads([r["summary"] for r in runs], SPREAD_KEYS)
    stable = all(r["record"].valid and r["summary"]["final_ratio"] < 1 for r in runs)
    informative = spreads["decay_ratio"]["max"] <= UNINFORMATIVE_DECAY
    return spreads | {"stable": stable, "bound_informative": bool(informative)}


def _drift_claim(inside: dict, cfg: Config) -> tuple[Claim, dict]:
    """The drift's exponent in ``m`` over every valid seed, with its 95 % interval, against −1/2."""
    points = [(m, r["summary"]["drift_W"]) for m, runs in inside.items() for r in runs if r["record"].valid]
    m, drift = (np.array(v, np.float64) for v in zip(*points))
    fit = theory.power_law_fit(m, drift)
    outside = max(fit.low - (-0.5), -0.5 - fit.high, 0.0)
    claim = Claim(
        f"weight drift ‖W_T − W₀‖_F/‖W₀‖_F ∝ m^α with −1/2 inside α's 95 % interval: α = {fit.exponent:.4g} "
        f"[{fit.low:.4g}, {fit.high:.4g}] over m in {list(cfg.train_widths)} (distance from −1/2 to the interval)",
        "scaling",
        outside,
        0.0,
        "our choice: 1/√m is the drift of the over-parameterised (lazy) regime; the paper's radius was not read",
        seeds=len(points),
    )
    return claim, fit._asdict() | {"x": list(cfg.train_widths)}


def training(x, y, cfg: Config) -> tuple[list[Claim], dict, dict, list[RunRecord]]:
    """Item 2: the ``(m × c)`` grid at ``σ_w``; one cell at ``recurrent_sigma_w``."""
    grid = {
        (m, c): [train(x, y, m, cfg.seed + s, c, cfg.sigma_w, cfg) for s in range(cfg.seeds)]
        for m, c in tqdm([(m, c) for m in cfg.train_widths for c in cfg.step_scales], desc="ling2023 (m × η)")
    }
    width, base = cfg.train_widths[len(cfg.train_widths) // 2], cfg.step_scales[0]
    recurrent = [train(x, y, width, cfg.seed + s, base, cfg.recurrent_sigma_w, cfg) for s in range(cfg.seeds)]
    claims = []
    for (m, c), runs in grid.items():
        invalid = sum(not r["record"].valid for r in runs)
        claims.append(
            bound_claim(
                f"(m={m}, ηλ_max(K₀)={c:g}): Φ(t) <= (1 − ηλ₀/2)ᵗ Φ(0) at every step t >= 1 (max of Φ(t)/bound "
                f"over {len(runs)} runs; {invalid} with a non-converged equilibrium count as violations)",
                [r["summary"] for r in runs],
                ABSTRACT + "linear convergence; the bound's form (1 − ηλ₀/2)ᵗ is the Du-et-al.-type one, not read",
            )
        )
    all_runs = [r for runs in grid.values() for r in runs]
    valid = [r["summary"] for r in all_runs if r["record"].valid]
    drift_claim, drift_fit = _drift_claim({m: grid[m, base] for m in cfg.train_widths}, cfg)
    claims += [
        rate_claim(
            f"fitted tail decay at least 1 − ηλ₀/2 over the whole (m × η) grid (min decay ratio; {len(valid)} valid "
            f"of {len(all_runs)} runs)",
            valid,
            ABSTRACT + "the rate 1 − ηλ₀/2 of the reconstructed bound",
        ),
        bound_claim(
            f"σ_w={cfg.recurrent_sigma_w:g} (m={width}, ηλ_max(K₀)={base:g}): Φ(t) <= (1 − ηλ₀/2)ᵗ Φ(0) at every "
            f"step t >= 1 ({len(recurrent)} runs; {sum(not r['record'].valid for r in recurrent)} with a "
            "non-converged equilibrium count as violations)",
            [r["summary"] for r in recurrent],
            ABSTRACT + "linear convergence; the bound's form is the Du-et-al.-type one, not read",
        ),
        Claim(
            f"‖W_t‖₂ < 1 at every recorded step of every run at σ_w={cfg.sigma_w:g} (max over {len(all_runs)} runs, "
            "invalid ones included) — sufficient for a unique equilibrium",
            "property",
            max(r["summary"]["max_norm_W"] for r in all_runs),
            1.0,
            "our choice: ‖W‖₂ < 1 with the 1-Lipschitz ReLU gives uniqueness; the abstract states a unique "
            "equilibrium throughout training",
            seeds=len(all_runs),
        ),
        drift_claim,
    ]
    measurements = {
        "cells": {f"m={m} c={c:g}": _cell(runs) for (m, c), runs in grid.items()},
        "recurrent_cell": {"width": width, "step_scale": base, "sigma_w": cfg.recurrent_sigma_w, **_cell(recurrent)},
        "drift_fit": drift_fit,
        "largest_stable_step_scale": {
            int(m): max((c for c in cfg.step_scales if _cell(grid[m, c])["stable"]), default=None)
            for m in cfg.train_widths
        },
        "runs": {r["record"].run: r["summary"] for r in all_runs + recurrent},
    }
    curves = {"grid": grid, "recurrent": recurrent}
    records = [r["record"] for r in all_runs + recurrent]
    return claims, measurements, curves, records


def _gram_figure(grams: list[dict], cfg: Config, n: int):
    fig, axes = plots.panels(len(grams), f"Ling et al. 2023 — λ₀/m at init: N={n}, {cfg.seeds} seeds per width")
    for ax, gram in zip(axes, grams):
        widths = gram["widths"]
        for label, key, color in (
            ("DEQ (weight-tied)", "tied", "C0"),
            (f"untied, depth {cfg.untied_depth}", "untied", "C2"),
            ("untied, depth 1 (control)", "depth1", "C3"),
        ):
            values = np.asarray(gram["per_seed"][key])
            for column in values.T:
                ax.plot(widths, column, ".", color=color, alpha=0.5)
            ax.plot(widths, np.median(values, 1), "o-", color=color, ms=3, label=f"{label}, median")
        ax.axhline(gram["lambda_star"], color="k", ls="--", label=f"λ* = {gram['lambda_star']:.4g}")
        ax.axhline(gram["lambda_star"] / 2, color="k", ls=":", label="λ*/2 (condition λ₀ >= mλ*/2)")
        plots.finish(
            ax,
            "width m",
            "λ₀ / m",
            f"σ_w = {gram['sigma_w']:g}: λ* {100 * gram['lambda_star_shift_from_one_layer']:.3g} % from one layer",
            logx=True,
            xticks=widths,
        )
    return fig


def _grid_figure(grid: dict, cfg: Config, n: int):
    """One panel per ``(m, c)`` cell: Φ(t) per seed and its bound; invalid runs clipped and marked."""
    fig, axes = plots.panels(len(grid), f"Ling et al. 2023 — Φ(t) vs (1 − ηλ₀/2)ᵗΦ(0) on the (m × η) grid: N={n}")
    for ax, ((m, c), runs) in zip(axes, grid.items()):
        ax.set_yscale("log")
        valid = [r["record"].valid for r in runs]
        plots.draw_seeds(ax, [r["loss"] for r in runs], valid, "Φ(t) (per seed)", "C0")
        bounds = [r["bound"] for r in runs if r["record"].valid]
        plots.draw_seeds(ax, bounds, [True] * len(bounds), "(1 − ηλ₀/2)ᵗ Φ(0), valid runs", "C1", "--")
        first = next((r for r in runs if r["record"].valid), None)
        if first is not None:
            plots.draw_rate(ax, first["loss"], first["summary"]["rate"], "fitted tail rate (first valid seed)")
        end = np.median([r["summary"]["eta_lambda_max_final"] for r in runs])
        plots.finish(ax, "gradient-descent step", "Φ", f"m={m}, ηλ_max(K₀)={c:g}; median ηλ_max(K_T)={end:.3g}")
    return fig


def _zoom_figure(grid: dict, cfg: Config):
    """Φ(t)/bound over the first steps of every cell: where the bound is violated, and when."""
    fig, axes = plots.panels(len(cfg.train_widths), "Ling et al. 2023 — Φ(t)/bound over the first 20 steps (zoom)")
    for ax, m in zip(axes, cfg.train_widths):
        for k, c in enumerate(cfg.step_scales):
            runs = grid[m, c]
            ratios = [np.asarray(r["loss"][:21]) / np.asarray(r["bound"][:21]) for r in runs]
            plots.draw_seeds(ax, ratios, [r["record"].valid for r in runs], f"ηλ_max(K₀)={c:g}", f"C{k}")
        ax.axhline(1.0, color="k", lw=1, label="bound")
        plots.finish(ax, "gradient-descent step", "Φ(t) / bound", f"m={m}")
    return fig


def _drift_figure(grid: dict, fit: dict, cfg: Config, n: int):
    base = cfg.step_scales[0]
    fig, axes = plots.panels(
        2, f"Ling et al. 2023 — weights: N={n}, ηλ_max(K₀)={base:g}, {cfg.steps} steps, {cfg.seeds} seeds"
    )
    widths = list(cfg.train_widths)
    drifts = [[r["summary"]["drift_W"] for r in grid[m, base]] for m in widths]
    plots.power_law_panel(axes[0], widths, drifts, fit, "drift")
    axes[0].plot(widths, drifts[0][0] * (np.asarray(widths) / widths[0]) ** -0.5, "k:", label="∝ m^(−1/2)")
    plots.finish(axes[0], "width m", "‖W_T − W₀‖_F / ‖W₀‖_F", logx=True, xticks=widths)
    for k, m in enumerate(widths):
        for r in grid[m, base]:
            steps = np.arange(len(r["norm_W"])) * cfg.snapshot_every
            axes[1].plot(steps, r["norm_W"], color=f"C{k}", lw=0.8, label=f"m={m}")
    axes[1].axhline(1.0, color="k", lw=1, label="‖W‖₂ = 1 (uniqueness guaranteed below)")
    plots.finish(axes[1], "gradient-descent step", "‖W_t‖₂", logy=False)
    return fig


@timed
def run(cfg: Config = QUICK) -> Results:
    """λ₀ sweeps, the (m × η) training grid and the recurrent cell on binary digits (float64 inside)."""
    claims, grams, records = [], [], []
    with jax.enable_x64(True):
        x, y = (jnp.asarray(a) for a in _data.binary_digits(cfg.samples, cfg.seed))
        for sigma_w in cfg.gram_sigma_ws:
            c, gram, r = gram_sweep(x, sigma_w, cfg)
            claims, records = claims + c, records + r
            grams.append(gram)
        c, train_m, curves, r = training(x, y, cfg)
        claims, records = claims + c, records + r
    n = cfg.samples
    figures = {
        "lambda0_vs_width": _gram_figure(grams, cfg, n),
        "loss_vs_bound": _grid_figure(curves["grid"], cfg, n),
        "bound_zoom": _zoom_figure(curves["grid"], cfg),
        "weights": _drift_figure(curves["grid"], train_m["drift_fit"], cfg, n),
    }
    for gram in grams:
        gram.pop("per_seed")
    measurements = {"gram": {f"sigma_w={g['sigma_w']:g}": g for g in grams}, "training": train_m}
    config = config_record(cfg, REFERENCE, PROVENANCE)
    return Results("ling2023", claims, measurements, {}, config, figures, runs=records)
