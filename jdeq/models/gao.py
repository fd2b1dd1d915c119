"""ReLU implicit network (Gao & Gao 2022, arXiv 2205.07463).

    Z = ReLU(γ A Z + U X),        ŷ = uᵀ Z*,

with ``X`` the ``d × n`` inputs, ``A`` of shape ``m × m``, ``U`` of shape ``m × d``, ``u`` of length ``m``
and a fixed scalar ``γ``. The equilibrium is well posed while ``γ‖A‖₂ < 1`` (ReLU is 1-Lipschitz); the
paper keeps ``γ`` fixed and shows gradient descent converges linearly when the width is ``m = Ω(N)``.

Initialisation (the paper's constants are configurable arguments): ``A ~ N(0, 1/m)`` so
``‖A₀‖₂ ≈ 2`` and ``γ = 0.2`` gives ``γ‖A₀‖₂ ≈ 0.4``; ``U ~ N(0, 2/d)``; ``u ~ N(0, 1/m)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..linalg import largest_singular_value
from ..solvers import Solution, Solver
from ._relu import CONTRACTION_SOLVER, gaussian, relu_solve

__all__ = ["DEFAULT_GAMMA", "equilibrium", "init", "predict", "quadratic_loss_and_stats", "solve", "well_posedness"]

DEFAULT_GAMMA = 0.2


def init(
    key: jax.Array,
    width: int,
    in_dim: int,
    a_variance: float = 1.0,
    u_variance: float = 2.0,
    out_variance: float = 1.0,
    dtype=jnp.float64,
) -> dict:
    """``A ~ N(0, a_variance/m)``, ``U ~ N(0, u_variance/d)``, ``u ~ N(0, out_variance/m)``."""
    ka, ku, ko = jax.random.split(key, 3)
    return {
        "A": gaussian(ka, (width, width), a_variance / width, dtype),
        "U": gaussian(ku, (width, in_dim), u_variance / in_dim, dtype),
        "u": gaussian(ko, (width,), out_variance / width, dtype),
    }


def solve(
    params: dict, x: jax.Array, gamma: float = DEFAULT_GAMMA, solver: Solver = CONTRACTION_SOLVER, z0=None
) -> Solution:
    """``Z* = ReLU(γ A Z* + U X)`` (``m × n``) by :func:`jdeq.fixed_point`: the :class:`Solution` with its ``stats``."""
    return relu_solve(gamma * params["A"], params["U"] @ x, solver, z0)


def equilibrium(params: dict, x: jax.Array, gamma: float = DEFAULT_GAMMA, solver: Solver = CONTRACTION_SOLVER, z0=None):
    """``Z* = ReLU(γ A Z* + U X)`` (``m × n``), the value of :func:`solve`."""
    return solve(params, x, gamma, solver, z0).value


def predict(params: dict, x: jax.Array, gamma: float = DEFAULT_GAMMA, solver: Solver = CONTRACTION_SOLVER) -> jax.Array:
    """``ŷ = uᵀ Z*`` (length ``n``)."""
    return params["u"] @ equilibrium(params, x, gamma, solver)


def quadratic_loss_and_stats(
    params: dict, x: jax.Array, y: jax.Array, gamma: float = DEFAULT_GAMMA, solver=CONTRACTION_SOLVER
):
    """``(½‖uᵀZ* − y‖², stats)``: the loss and the equilibrium solve's :class:`jdeq.Stats`."""
    sol = solve(params, x, gamma, solver)
    return 0.5 * jnp.sum(jnp.square(params["u"] @ sol.value - y)), sol.stats


def well_posedness(params: dict, gamma: float = DEFAULT_GAMMA) -> jax.Array:
    """``γ‖A‖₂``: below 1 the equilibrium exists and is unique."""
    return gamma * largest_singular_value(params["A"])
