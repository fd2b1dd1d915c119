"""Measurements of the width scalings of the ReLU implicit networks (Gao & Gao 2022, Ling et al. 2023).

* :func:`kernel_extremes`: ``(λ_min, λ_max)`` of the empirical neural tangent kernel ``K = J Jᵀ``.
* :func:`relu_gram_limit`: the infinite-width Gram matrix of the DEQ's equilibria (arc-cosine kernel fixed point).
* :func:`untied_features`: the equilibrium's weight-untied, finite-depth counterpart.
* :func:`relative_drift`: ``‖W_t − W_0‖_F / ‖W_0‖_F``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from .. import theory
from ..models._relu import gaussian, relu_map
from ._common import seed_spread


def kernel_extremes(predict: Callable, params) -> jax.Array:
    """``[λ_min(K), λ_max(K)]`` of the empirical neural tangent kernel ``K = J Jᵀ`` of ``predict(params)``."""
    evals = jnp.linalg.eigvalsh(theory.ntk(predict, params))
    return jnp.stack([evals[0], evals[-1]])


def valid_spreads(summaries: list[dict], keys: Sequence[str]) -> dict:
    """``{key: seed_spread}`` over the runs whose ``summary["valid"]`` is true, plus ``invalid_runs`` (their count).

    A run with a non-converged equilibrium measures nothing and is left out of every spread (NaN when none is valid).
    """
    valid = [s for s in summaries if s["valid"]]
    nothing = {"min": float("nan"), "median": float("nan"), "max": float("nan"), "seeds": 0}
    spreads = {k: seed_spread([s[k] for s in valid]) if valid else nothing for k in keys}
    return spreads | {"invalid_runs": len(summaries) - len(valid)}


def relu_expectation(cov: jax.Array) -> jax.Array:
    """``E[ReLU(h_i) ReLU(h_j)]`` for ``h ~ N(0, Σ)``: the degree-1 arc-cosine kernel (Cho & Saul 2009).

    ``√(Σ_ii Σ_jj)/(2π) · (sin θ + (π − θ) cos θ)`` with ``cos θ = Σ_ij / √(Σ_ii Σ_jj)``.
    """
    scale = jnp.sqrt(jnp.outer(jnp.diag(cov), jnp.diag(cov)))
    cos = jnp.clip(cov / scale, -1.0, 1.0)
    theta = jnp.arccos(cos)
    return scale / (2 * jnp.pi) * (jnp.sin(theta) + (jnp.pi - theta) * cos)


def relu_gram_limit(
    x: jax.Array, sigma_w: float, u_variance: float = 2.0, tol: float = 1e-14, max_steps: int = 1000
) -> jax.Array:
    """The limit ``G* = lim_{m→∞} Z₀ᵀZ₀ / m`` for ``Z = ReLU(W Z + U X)``, ``W ~ N(0, 2σ_w²/m)``, ``U ~ N(0, u_variance/d)``.

    A neuron's pre-activation ``h = wᵀz + uᵀx`` has covariance ``Σ = 2σ_w² G + (u_variance/d) XᵀX``
    across samples, so ``G*`` is the fixed point of ``G ↦ E[ReLU(h) ReLU(h)ᵀ]`` (:func:`relu_expectation`),
    a contraction for ``2σ_w² < 1``, iterated from ``G = 0``. ``x`` is ``d × n``; returns ``n × n``.
    ``λ* = λ_min(G*)`` is the infinite-width value of ``λ₀/m`` (Ling et al. 2023, arXiv 2205.13814).
    """
    if not 0 <= 2 * sigma_w**2 < 1:
        raise ValueError(f"the Gram fixed point needs 2σ_w² < 1, got σ_w = {sigma_w}")
    inputs = u_variance / x.shape[0] * (x.T @ x)
    gram = jnp.zeros_like(inputs)
    for _ in range(max_steps):
        new = relu_expectation(2 * sigma_w**2 * gram + inputs)
        if float(jnp.abs(new - gram).max()) <= tol * float(jnp.abs(new).max()):
            return new
        gram = new
    raise RuntimeError(f"the Gram fixed point did not converge in {max_steps} steps")


def untied_features(key: jax.Array, x: jax.Array, width: int, depth: int, sigma_w: float, u_variance: float = 2.0):
    """``z_{l+1} = ReLU(W_l z_l + U X)`` for ``l < depth`` from ``z_0 = 0``, a fresh ``W_l ~ N(0, 2σ_w²/m)`` per layer.

    The weight-untied, finite-depth model that Ling et al. compare the DEQ with; returns ``Z_depth`` (``m × n``).
    """
    keys = jax.random.split(key, depth + 1)
    injection = gaussian(keys[0], (width, x.shape[0]), u_variance / x.shape[0], x.dtype) @ x
    z = jnp.zeros((width, x.shape[1]), x.dtype)
    for k in keys[1:]:
        z = relu_map(z, gaussian(k, (width, width), 2 * sigma_w**2 / width, x.dtype), injection)
    return z


def relative_drift(w_t: jax.Array, w_0: jax.Array) -> float:
    """``‖W_t − W_0‖_F / ‖W_0‖_F``: how far training moved a weight matrix from its initialisation."""
    return float(jnp.linalg.norm(w_t - w_0) / jnp.linalg.norm(w_0))
