"""Reproduction of Ling, Xie, Wang, Zhang & Lin 2023 (arXiv 2205.13814): over-parameterised DEQs.

``Z = ReLU(W Z + U X)``, ``ŷ = aᵀ Z*``, ``Φ = ½‖ŷ − y‖²``, gradient descent on ``(W, U, a)`` from the
Gaussian initialisation of :mod:`jdeq.models.ling`. Measured:

1. ``λ₀ = λ_min(Z₀ᵀ Z₀)`` (Gram matrix of the initial equilibria) against the width, with a fitted
   power law ``λ₀ ∝ m^α``.
2. The loss against the bound ``Φ(t) ≤ (1 − ηλ₀/2)ᵗ Φ(0)`` at every step, for ``η = step_scale / λ_max(K₀)``
   (``K₀``: the empirical neural tangent kernel at init, ``K₀ ⪰ Z₀ᵀZ₀``). The theorem's own step-size
   threshold is not reproduced here; ``step_scale`` is a documented argument.
3. Uniqueness of the equilibrium during training: solves from ``z0 = 0`` and from a large random ``z0``
   agree at checkpoints; ``‖W_t‖₂`` is recorded (below 1 it implies uniqueness).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .. import plots as _plots
from .. import theory
from ..linalg import largest_singular_value
from ..models import ling
from . import _data
from ._common import Claim, Results, gradient_descent, timed


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and constants; ``sigma_w`` is the initial scale of ``W`` (``W ~ N(0, 2σ_w²/m)``)."""

    samples: int = 32
    gram_widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    gram_seeds: int = 3
    width: int = 128
    steps: int = 1000
    checkpoints: int = 5
    sigma_w: float = ling.DEFAULT_SIGMA_W
    step_scale: float = 0.5
    far_start_scale: float = 10.0
    uniqueness_tol: float = 1e-9
    seed: int = 0


QUICK = Config()
FULL = Config(samples=100, gram_widths=(64, 128, 256, 512, 1024, 2048, 4096), gram_seeds=5, width=1024, steps=5000)


def _loss(params, data):
    return ling.quadratic_loss(params, data["x"], data["y"]), {}


@jax.jit
def _norm_w(params):
    return largest_singular_value(params["W"])


def _lambda0(x, width: int, seed: int, cfg: Config) -> float:
    params = ling.init(jax.random.PRNGKey(seed), width, x.shape[0], cfg.sigma_w)
    return float(theory.gram_min_eigenvalue(_equilibrium(params, x, jnp.zeros((width, x.shape[1]), x.dtype))))


def gram_sweep(x, cfg: Config) -> tuple[list[Claim], dict, dict]:
    """Claim 1: λ₀ of the initial equilibria, per width (mean over seeds), and its fitted growth."""
    lam = np.array(
        [
            np.mean([_lambda0(x, m, cfg.seed + s, cfg) for s in range(cfg.gram_seeds)])
            for m in tqdm(cfg.gram_widths, desc="ling2023 λ₀ sweep")
        ]
    )
    alpha, coeff = theory.power_law_exponent(np.asarray(cfg.gram_widths), lam)
    measurements = {"widths": list(cfg.gram_widths), "lambda0": lam, "fitted_exponent": alpha, "fitted_coeff": coeff}
    claims = [Claim("λ₀ = λ_min(Z₀ᵀZ₀) > 0 at every width (min over widths)", float(lam.min()), 1e-8, at_least=True)]
    return claims, measurements, {"lambda0": lam}


def _max_disagreement(params, x, key, cfg: Config) -> float:
    """Relative distance between the equilibria solved from ``z0 = 0`` and from a large random ``z0``."""
    near = _equilibrium(params, x, jnp.zeros((cfg.width, x.shape[1]), x.dtype))
    far = _equilibrium(params, x, cfg.far_start_scale * jax.random.normal(key, near.shape, near.dtype))
    return float(jnp.abs(near - far).max() / jnp.abs(near).max())


@jax.jit
def _equilibrium(params, x, z0):
    return ling.equilibrium(params, x, z0=z0)


@jax.jit
def _ntk_max_eigenvalue(params, x):
    return theory.ntk_max_eigenvalue(lambda p: ling.predict(p, x), params)


def training(x, y, cfg: Config) -> tuple[list[Claim], dict, dict]:
    """Claims 2 and 3: the loss under the bound at every step; one equilibrium throughout training."""
    params = ling.init(jax.random.PRNGKey(cfg.seed), cfg.width, x.shape[0], cfg.sigma_w)
    lam0 = _lambda0(x, cfg.width, cfg.seed, cfg)
    eta = cfg.step_scale / float(_ntk_max_eigenvalue(params, x))
    data = {"x": x, "y": y}
    segment = cfg.steps // cfg.checkpoints
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed + 1), cfg.checkpoints + 1)
    disagreement = [_max_disagreement(params, x, keys[0], cfg)]
    pieces, norms = [], []
    for k in tqdm(range(cfg.checkpoints), desc="ling2023 training"):
        params, metrics = gradient_descent(_loss, params, data, eta, segment, snapshot=_norm_w)
        norms.append(metrics["snapshot"])
        pieces.append(metrics["loss"] if k == 0 else metrics["loss"][1:])
        disagreement.append(_max_disagreement(params, x, keys[k + 1], cfg))
    loss, norm_w = np.concatenate(pieces), np.concatenate(norms)
    bound = theory.ling_loss_bound(float(loss[0]), eta, lam0, len(loss) - 1)
    ratio = loss / bound
    measurements = {
        "lambda0": lam0,
        "eta": eta,
        "eta_lambda0": eta * lam0,
        "max_loss_over_bound": float(ratio.max()),
        "final_loss_ratio": float(loss[-1] / loss[0]),
        "max_norm_W": float(norm_w.max()),
        "equilibrium_disagreement_at_checkpoints": disagreement,
    }
    claims = [
        Claim(f"Φ(t) <= (1 − ηλ₀/2)ᵗ Φ(0) at every step t <= {len(ratio) - 1} (max of Φ(t)/bound)", ratio.max(), 1.0),
        Claim(
            "unique equilibrium during training: max relative gap between solves from 0 and from a far z0",
            max(disagreement),
            cfg.uniqueness_tol,
        ),
    ]
    curves = {"loss": loss, "bound": bound, "norm_W": norm_w}
    return claims, measurements, curves


@timed
def run(cfg: Config = QUICK) -> Results:
    """λ₀ sweep and one training run on binary digits (float64 inside); claims, curves and figures."""
    with jax.enable_x64(True):
        x, y = (jnp.asarray(a) for a in _data.binary_digits(cfg.samples, cfg.seed))
        c1, m1, gram = gram_sweep(x, cfg)
        c2, m2, train = training(x, y, cfg)
    figures = {
        "lambda0_vs_width": _plots.xy_plot(
            cfg.gram_widths,
            {
                "λ₀ (mean over seeds)": gram["lambda0"],
                f"fit {m1['fitted_coeff']:.3g}·m^{m1['fitted_exponent']:.2f}": m1["fitted_coeff"]
                * np.asarray(cfg.gram_widths, np.float64) ** m1["fitted_exponent"],
            },
            "width m",
            "λ₀ = λ_min(Z₀ᵀZ₀)",
            logx=True,
            logy=True,
        ),
        "loss_vs_bound": _plots.log_curves(
            {"Φ(t) measured": train["loss"], "(1 − ηλ₀/2)ᵗ Φ(0)": train["bound"]}, "gradient-descent step", "Φ"
        ),
    }
    return Results(
        "ling2023",
        c1 + c2,
        {"gram": m1, "training": m2},
        {"gram": gram, "training": train},
        dataclasses.asdict(cfg),
        figures,
    )
