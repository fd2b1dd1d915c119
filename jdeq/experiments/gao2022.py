"""Reproduction of Gao & Gao 2022 (arXiv 2205.07463): ReLU implicit networks with linear widths.

``Z = ReLU(γ A Z + U X)``, ``ŷ = uᵀ Z*``, quadratic loss ``½‖ŷ − y‖²``, gradient descent on ``(A, U, u)``
with a fixed ``γ``. Measured: the fraction of seeds whose loss falls by ``success_ratio`` within the step
budget as a function of ``m/N`` (widths from ``N/8`` to ``4N``), on binary digits and on random labels
on the sphere; loss curves; and ``γ‖A_t‖₂`` along training (below 1: the equilibrium stays well posed).
The step size is ``step_scale / λ_max(K₀)`` with ``K₀`` the empirical neural tangent kernel at init.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .. import plots as _plots
from .. import theory
from ..models import gao
from . import _data
from ._common import Claim, Results, gradient_descent, timed


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and constants (``gamma``: the paper's fixed scale, a documented default, not the paper's value)."""

    samples: int = 16
    synthetic_dim: int = 4
    width_ratios: tuple[float, ...] = (0.25, 1.0, 4.0)
    seeds: int = 3
    steps: int = 1000
    gamma: float = gao.DEFAULT_GAMMA
    step_scale: float = 0.5
    success_ratio: float = 1e-3
    snapshot_every: int = 25
    seed: int = 0


QUICK = Config()
FULL = Config(samples=64, width_ratios=(0.125, 0.25, 0.5, 1.0, 2.0, 4.0), seeds=10, steps=4000)


def _loss(params, data):
    prediction = gao.predict(params, data["x"], data["gamma"])
    return 0.5 * jnp.sum(jnp.square(prediction - data["y"])), {}


@jax.jit
def _ntk_max_eigenvalue(params, x, gamma):
    return theory.ntk_max_eigenvalue(lambda p: gao.predict(p, x, gamma), params)


def _train(x, y, width: int, seed: int, cfg: Config) -> dict[str, np.ndarray]:
    params = gao.init(jax.random.PRNGKey(seed), width, x.shape[0])
    lr = cfg.step_scale / float(_ntk_max_eigenvalue(params, x, cfg.gamma))
    snapshot = jax.jit(lambda p: gao.well_posedness(p, cfg.gamma))
    data = {"x": x, "y": y, "gamma": cfg.gamma}
    _, metrics = gradient_descent(_loss, params, data, lr, cfg.steps, chunk=cfg.snapshot_every, snapshot=snapshot)
    return metrics


def _datasets(cfg: Config):
    return {
        "digits": _data.binary_digits(cfg.samples, cfg.seed),
        "synthetic": _data.sphere_with_random_signs(cfg.samples, cfg.synthetic_dim, cfg.seed),
    }


@timed
def run(cfg: Config = QUICK) -> Results:
    """Width sweep × seeds × datasets (float64 inside); claims, curves and figures."""
    widths = [max(1, round(r * cfg.samples)) for r in cfg.width_ratios]
    claims, measurements, curves, figures = [], {}, {}, {}
    with jax.enable_x64(True):
        for name, (x, y) in _datasets(cfg).items():
            x, y = jnp.asarray(x), jnp.asarray(y)
            runs = {
                (m, s): _train(x, y, m, cfg.seed + s, cfg)
                for m, s in tqdm([(m, s) for m in widths for s in range(cfg.seeds)], desc=f"gao2022 {name}")
            }
            ratio = {k: r["loss"][-1] / r["loss"][0] for k, r in runs.items()}
            fraction = [float(np.mean([ratio[m, s] <= cfg.success_ratio for s in range(cfg.seeds)])) for m in widths]
            posedness = [max(float(runs[m, s]["snapshot"].max()) for s in range(cfg.seeds)) for m in widths]
            loss_curves = {
                f"m={m} (m/N={m / cfg.samples:g})": np.median([runs[m, s]["loss"] for s in range(cfg.seeds)], 0)
                for m in widths
            }
            posedness_curves = {f"m={m}": np.max([runs[m, s]["snapshot"] for s in range(cfg.seeds)], 0) for m in widths}
            measurements[name] = {
                "widths": widths,
                "fraction_converged": fraction,
                "median_loss_ratio": [float(np.median([ratio[m, s] for s in range(cfg.seeds)])) for m in widths],
                "max_gamma_norm_A": posedness,
            }
            curves[name] = {"loss": loss_curves, "well_posedness": posedness_curves}
            wide = [m >= cfg.samples for m in widths]  # the theorems' regime m = Ω(N)
            claims += [
                Claim(
                    f"{name}: fraction of seeds with L_T/L_0 <= {cfg.success_ratio:g} in {cfg.steps} steps, "
                    f"worst width with m >= N={cfg.samples}",
                    min(f for f, w in zip(fraction, wide) if w),
                    1.0,
                    at_least=True,
                ),
                Claim(
                    f"{name}: max of γ‖A_t‖₂ over seeds, steps and widths m >= N (well-posed below 1)",
                    max(p for p, w in zip(posedness, wide) if w),
                    1.0,
                ),
            ]
            figures[f"{name}_loss"] = _plots.log_curves(loss_curves, "gradient-descent step", "median ½‖ŷ − y‖²", name)
            figures[f"{name}_well_posedness"] = _plots.log_curves(
                posedness_curves,
                f"gradient-descent step / {cfg.snapshot_every}",
                "max over seeds of γ‖A_t‖₂",
                name,
            )
        figures["fraction_converged"] = _plots.xy_plot(
            np.asarray(widths) / cfg.samples,
            {name: measurements[name]["fraction_converged"] for name in measurements},
            "m / N",
            f"fraction of seeds with L_T/L_0 <= {cfg.success_ratio:g}",
            logx=True,
        )
    return Results("gao2022", claims, measurements, curves, dataclasses.asdict(cfg), figures)
