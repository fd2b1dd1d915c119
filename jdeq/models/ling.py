"""Over-parameterised deep equilibrium model (Ling, Xie, Wang, Zhang & Lin 2023, arXiv 2205.13814).

    Z = ReLU(W Z + U X),        ŷ = aᵀ Z*,        Φ(θ) = ½ ‖ŷ − y‖²,

with ``X`` the ``d × n`` inputs, ``W`` of shape ``m × m``, ``U`` of shape ``m × d``, ``a`` of length ``m``.
Gaussian initialisation with the paper's scalings, kept configurable: ``W ~ N(0, 2σ_w²/m)`` with a small
``σ_w`` (default 0.1, so ``‖W₀‖₂ ≈ 2√2·σ_w ≈ 0.28``), ``U ~ N(0, 2/d)`` and ``a ~ N(0, 1/m)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..solvers import Solution, Solver
from ._relu import CONTRACTION_SOLVER, gaussian, relu_solve

__all__ = ["DEFAULT_SIGMA_W", "equilibrium", "init", "predict", "quadratic_loss", "quadratic_loss_and_stats", "solve"]

DEFAULT_SIGMA_W = 0.1


def init(
    key: jax.Array,
    width: int,
    in_dim: int,
    sigma_w: float = DEFAULT_SIGMA_W,
    u_variance: float = 2.0,
    out_variance: float = 1.0,
    dtype=jnp.float64,
) -> dict:
    """``W ~ N(0, 2σ_w²/m)``, ``U ~ N(0, u_variance/d)``, ``a ~ N(0, out_variance/m)``."""
    kw, ku, ka = jax.random.split(key, 3)
    return {
        "W": gaussian(kw, (width, width), 2 * sigma_w**2 / width, dtype),
        "U": gaussian(ku, (width, in_dim), u_variance / in_dim, dtype),
        "a": gaussian(ka, (width,), out_variance / width, dtype),
    }


def solve(params: dict, x: jax.Array, solver: Solver = CONTRACTION_SOLVER, z0=None) -> Solution:
    """``Z* = ReLU(W Z* + U X)`` (``m × n``) by :func:`jdeq.fixed_point` from ``z0`` (default zeros), with ``stats``."""
    return relu_solve(params["W"], params["U"] @ x, solver, z0)


def equilibrium(params: dict, x: jax.Array, solver: Solver = CONTRACTION_SOLVER, z0=None) -> jax.Array:
    """``Z* = ReLU(W Z* + U X)`` (``m × n``), the value of :func:`solve`."""
    return solve(params, x, solver, z0).value


def predict(params: dict, x: jax.Array, solver: Solver = CONTRACTION_SOLVER) -> jax.Array:
    """``ŷ = aᵀ Z*`` (length ``n``)."""
    return params["a"] @ equilibrium(params, x, solver)


def quadratic_loss(params: dict, x: jax.Array, y: jax.Array, solver: Solver = CONTRACTION_SOLVER) -> jax.Array:
    """``Φ(θ) = ½ ‖ŷ − y‖²`` (a sum over samples, as in the paper's bound)."""
    return quadratic_loss_and_stats(params, x, y, solver)[0]


def quadratic_loss_and_stats(params: dict, x: jax.Array, y: jax.Array, solver: Solver = CONTRACTION_SOLVER):
    """``(Φ(θ), stats)``: the loss and the equilibrium solve's :class:`jdeq.Stats`."""
    sol = solve(params, x, solver)
    return 0.5 * jnp.sum(jnp.square(params["a"] @ sol.value - y)), sol.stats
