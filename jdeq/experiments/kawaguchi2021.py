"""Reproduction of Kawaguchi 2021 (arXiv 2102.07346): the deep equilibrium linear model.

Measured claims:

1. Gradient descent on the non-convex objective ``L(A, B)`` of ``f_θ(X) = B (I − γσ(A))⁻¹ Φ`` converges
   to the global optimum ``L* = min_W L(W Φ)`` at a linear rate, for square and logistic loss, on digits
   and synthetic data, for widths ``m`` below the output dimension and the number of samples.
   ``L*`` is computed independently (closed-form least squares; L-BFGS on the convex problem in ``W``).
2. Relation to trust-region Newton on the shallow model ``W Φ``: the DEQ's trajectory in function space
   ``W_t = B_t (I − γσ(A_t))⁻¹`` is put beside trust-region Newton steps whose radius is the DEQ's own
   step length ``‖W_{t+1} − W_t‖_F``; the distance between the trajectories is reported.
3. Implicit bias: the DEQ and the shallow linear model, both trained by gradient descent from the same
   initial function to the same training loss, are compared on held-out digits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import plots as _plots
from .. import theory
from ..models import kawaguchi
from . import _data
from ._common import Claim, Results, gradient_descent, timed


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and constants. ``lr = step_scale / λ_max(ΦΦᵀ/n)`` (one scale per loss)."""

    gamma: float = 0.5
    digits_train: int = 300
    digits_widths: tuple[int, ...] = (4, 8)
    synthetic_samples: int = 200
    synthetic_dim: int = 20
    synthetic_widths: tuple[int, ...] = (4,)
    out_dim: int = 10
    label_noise: float = 1.0
    steps: int = 600
    square_step_scale: float = 0.3
    logistic_step_scale: float = 1.0
    gap_threshold: float = 1e-6
    trust_region_width: int = 8
    trust_region_steps: int = 600
    bias_train: int = 50
    bias_test: int = 500
    bias_steps: int = 1000
    bias_target: float = 1e-2
    seed: int = 0


QUICK = Config()
FULL = Config(
    digits_train=1297,
    digits_widths=(2, 4, 8),
    synthetic_samples=1000,
    synthetic_widths=(2, 4, 16),
    steps=3000,
    trust_region_steps=2000,
    bias_train=60,
    bias_steps=10000,
    bias_target=1e-3,
)


def _deq_square(params, data):
    return kawaguchi.square_loss(kawaguchi.predict(params, data["phi"], data["gamma"]), data["y"]), {}


def _deq_logistic(params, data):
    return kawaguchi.logistic_loss(kawaguchi.predict(params, data["phi"], data["gamma"]), data["y"]), {}


def _deq_square_tracking_weight(params, data):
    """Square loss, recording the function-space weight ``W_t`` at every step."""
    value, _ = _deq_square(params, data)
    return value, {"W": kawaguchi.function_weight(params, data["gamma"])}


def _shallow_square(params, data):
    return kawaguchi.square_loss(params["W"] @ data["phi"], data["y"]), {"W": params["W"]}


LOSSES = {
    "square": (_deq_square, theory.least_squares_optimum, "square_step_scale"),
    "logistic": (_deq_logistic, theory.logistic_optimum, "logistic_step_scale"),
}


def _step_size(phi: jax.Array, scale: float) -> float:
    return scale / float(jnp.linalg.eigvalsh(phi @ phi.T / phi.shape[1])[-1])


def _problems(cfg: Config) -> list[tuple[str, int, jax.Array, np.ndarray]]:
    """``(dataset, width, Φ, labels)`` for every run of the convergence sweep."""
    x, labels = _data.digits(cfg.digits_train, cfg.seed)
    xs = _data.gaussian_inputs(cfg.synthetic_samples, cfg.synthetic_dim, cfg.seed)
    ys = _data.teacher_labels(xs, cfg.out_dim, cfg.label_noise, cfg.seed)
    runs = [("digits", m, _data.random_projection(x, m, cfg.seed), labels) for m in cfg.digits_widths]
    runs += [("synthetic", m, _data.random_projection(xs, m, cfg.seed), ys) for m in cfg.synthetic_widths]
    return [(name, m, jnp.asarray(phi), lab) for name, m, phi, lab in runs]


def convergence(cfg: Config) -> tuple[list[Claim], dict, dict]:
    """Claim 1: ``L(θ_t) − L*`` decays linearly to below ``gap_threshold`` of its initial value."""
    claims, measurements, curves = [], {}, {}
    for dataset, m, phi, labels in _problems(cfg):
        n = phi.shape[1]
        for loss_name, (loss, optimum, scale_field) in LOSSES.items():
            targets = jnp.asarray(_data.one_hot(labels, cfg.out_dim))
            best = optimum(phi, targets)
            params = kawaguchi.init(jax.random.PRNGKey(cfg.seed), m, cfg.out_dim)
            lr = _step_size(phi, getattr(cfg, scale_field))
            key = f"{dataset}/{loss_name}/m={m}"
            data = {"phi": phi, "y": targets, "gamma": cfg.gamma}
            final, metrics = gradient_descent(loss, params, data, lr, cfg.steps, desc=key)
            gap = metrics["loss"] - float(best.value)
            relative_gap = gap / gap[0]
            fit = theory.fit_linear_rate(np.abs(relative_gap), floor=1e-12)
            curves[key] = relative_gap
            measurements[key] = {
                "L_star": float(best.value),
                "L_star_grad_norm": float(best.grad_norm),
                "lr": lr,
                "fitted_rate_per_step": fit.rate,
                "fit_r2": fit.r2,
                "min_gap": float(gap.min()),
                "equilibrium_vs_dense": float(
                    jnp.abs(
                        kawaguchi.predict(final, phi, cfg.gamma) - kawaguchi.dense_predict(final, phi, cfg.gamma)
                    ).max()
                ),
            }
            claims.append(
                Claim(
                    f"{key} (m={m}, m_y={cfg.out_dim}, n={n}): (L_T − L*)/(L_0 − L*) after {cfg.steps} GD steps",
                    float(np.abs(relative_gap[-1])),
                    cfg.gap_threshold,
                )
            )
    worst_dense = max(v["equilibrium_vs_dense"] for v in measurements.values())
    claims.append(Claim("jdeq.fixed_point equilibrium matches the dense solve (max abs difference)", worst_dense, 1e-9))
    return claims, measurements, curves


def _trust_region_path(phi, targets, start, radii):
    """Trust-region Newton on ``L(W) = (1/2n)‖WΦ − Y‖²`` from ``start`` with the given radii per step."""
    shape = start.shape

    def loss(w_flat):
        return kawaguchi.square_loss(w_flat.reshape(shape) @ phi, targets)

    hess = jax.hessian(loss)(start.ravel())

    def step(w, radius):
        w = w + theory.trust_region_step(jax.grad(loss)(w), hess, radius)
        return w, w

    _, path = lax.scan(step, start.ravel(), radii)
    return jnp.concatenate([start.ravel()[None], path]).reshape(-1, *shape)


def trust_region_relation(cfg: Config) -> tuple[list[Claim], dict, dict]:
    """Claim 2: the DEQ's function-space path beside trust-region Newton with matched step lengths."""
    x, labels = _data.digits(cfg.digits_train, cfg.seed)
    phi = jnp.asarray(_data.random_projection(x, cfg.trust_region_width, cfg.seed))
    targets = jnp.asarray(_data.one_hot(labels, cfg.out_dim))
    best = theory.least_squares_optimum(phi, targets)
    params = kawaguchi.init(jax.random.PRNGKey(cfg.seed), cfg.trust_region_width, cfg.out_dim)
    data = {"phi": phi, "y": targets, "gamma": cfg.gamma}
    lr = _step_size(phi, cfg.square_step_scale)
    _, deq = gradient_descent(
        _deq_square_tracking_weight, params, data, lr, cfg.trust_region_steps, desc="DEQ (function space)"
    )
    _, shallow = gradient_descent(_shallow_square, {"W": deq["W"][0]}, data, lr, cfg.trust_region_steps)
    w_deq = jnp.asarray(deq["W"])
    radii = jnp.linalg.norm((w_deq[1:] - w_deq[:-1]).reshape(cfg.trust_region_steps, -1), axis=1)
    w_tr = _trust_region_path(phi, targets, w_deq[0], radii)
    scale = float(jnp.linalg.norm(best.weight))

    def distance(a, b):
        return np.asarray(jnp.linalg.norm((a - b).reshape(a.shape[0], -1), axis=1)) / scale

    curves = {
        "deq_vs_trust_region": distance(w_deq, w_tr),
        "deq_vs_shallow_gd": distance(w_deq, jnp.asarray(shallow["W"])),
        "deq_to_optimum": distance(w_deq, best.weight[None]),
        "trust_region_to_optimum": distance(w_tr, best.weight[None]),
    }
    measurements = {
        "max_distance_deq_trust_region": float(curves["deq_vs_trust_region"].max()),
        "max_distance_deq_shallow_gd": float(curves["deq_vs_shallow_gd"].max()),
        "final_distance_deq_trust_region": float(curves["deq_vs_trust_region"][-1]),
        "lr": lr,
    }
    claims = [
        Claim(
            "DEQ GD and trust-region Newton (matched step lengths) end at the same W: ‖W_T^DEQ − W_T^TR‖/‖W*‖ "
            "(threshold √gap_threshold: a loss gap scales as the squared distance)",
            measurements["final_distance_deq_trust_region"],
            np.sqrt(cfg.gap_threshold),
        ),
        Claim(
            "the DEQ's function-space path is closer to trust-region Newton than to shallow GD (max-distance ratio)",
            measurements["max_distance_deq_trust_region"] / measurements["max_distance_deq_shallow_gd"],
            1.0,
        ),
    ]
    return claims, measurements, curves


def implicit_bias(cfg: Config) -> tuple[list[Claim], dict, dict]:
    """Claim 3: at equal training loss, the DEQ and the shallow model differ on held-out digits."""
    x, labels = _data.digits(cfg.bias_train + cfg.bias_test, cfg.seed)
    phi, phi_test = jnp.asarray(x[: cfg.bias_train].T), jnp.asarray(x[cfg.bias_train :].T)
    y = jnp.asarray(_data.one_hot(labels[: cfg.bias_train], cfg.out_dim))
    y_test = jnp.asarray(_data.one_hot(labels[cfg.bias_train :], cfg.out_dim))
    params = kawaguchi.init(jax.random.PRNGKey(cfg.seed), phi.shape[0], cfg.out_dim)
    data = {"phi": phi, "y": y, "gamma": cfg.gamma}
    lr = _step_size(phi, cfg.square_step_scale)
    _, deq = gradient_descent(_deq_square_tracking_weight, params, data, lr, cfg.bias_steps, desc="implicit bias: DEQ")
    _, shallow = gradient_descent(
        _shallow_square, {"W": deq["W"][0]}, data, lr, cfg.bias_steps, desc="implicit bias: shallow"
    )
    target = cfg.bias_target * float(deq["loss"][0])
    curves, measurements = {}, {"target_train_loss": target, "lr": lr}
    for name, run in (("deq", deq), ("shallow", shallow)):
        test = np.asarray(jax.vmap(lambda w: kawaguchi.square_loss(w @ phi_test, y_test))(jnp.asarray(run["W"])))
        reached = np.flatnonzero(run["loss"] <= target)
        step = int(reached[0]) if reached.size else -1
        curves[f"{name}_train"], curves[f"{name}_test"] = run["loss"], test
        measurements[f"{name}_step_at_target"] = step
        measurements[f"{name}_test_loss_at_target"] = float(test[step]) if step >= 0 else float("nan")
    ratio = measurements["deq_test_loss_at_target"] / measurements["shallow_test_loss_at_target"]
    claims = [
        Claim(
            f"at equal training loss ({cfg.bias_target:g}·L_0), DEQ test loss / shallow test loss on held-out digits",
            ratio,
            1.0,
        )
    ]
    return claims, measurements, curves


@timed
def run(cfg: Config = QUICK) -> Results:
    """Run the three measurements (float64 inside) and draw their figures."""
    with jax.enable_x64(True):
        c1, m1, conv = convergence(cfg)
        c2, m2, tr = trust_region_relation(cfg)
        c3, m3, bias = implicit_bias(cfg)
    curves = {"convergence": conv, "trust_region": tr, "implicit_bias": bias}
    return Results(
        name="kawaguchi2021",
        claims=c1 + c2 + c3,
        measurements={"convergence": m1, "trust_region": m2, "implicit_bias": m3},
        curves=curves,
        config=dataclasses.asdict(cfg),
        figures={
            "convergence": _plots.log_curves(conv, "gradient-descent step", "(L(θ_t) − L*) / (L(θ_0) − L*)"),
            "trust_region": _plots.log_curves(tr, "step", "‖W_t − W'_t‖_F / ‖W*‖_F"),
            "implicit_bias": _plots.log_curves(bias, "gradient-descent step", "square loss"),
        },
    )
