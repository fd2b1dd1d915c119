"""The ReLU equilibrium shared by the Gao & Gao and Ling et al. models: ``Z = ReLU(M Z + V)``.

``Z`` is the ``m × n`` matrix of the samples' hidden states. ReLU is 1-Lipschitz, so ``‖M‖₂ < 1`` makes
the map a contraction with a unique fixed point (well-posedness).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..implicit import fixed_point
from ..solvers import FixedPoint, Solution, Solver

__all__ = ["CONTRACTION_SOLVER", "gaussian", "relu_equilibrium", "relu_map", "relu_solve"]

CONTRACTION_SOLVER = FixedPoint(tol=1e-12, max_steps=500)
"""The default solver of the ReLU models (Gao & Gao, Ling et al.), not :data:`jdeq.DEFAULT_SOLVER`: their
experiments compare equilibria and gradients with the papers' closed-form quantities to ~1e-12, far below
``DEFAULT_SOLVER``'s relative residual of 1e-5; the maps are contractions (``‖M‖₂ < 1``), so plain iteration
reaches it (linearly, at rate ``‖M‖₂``) within 500 steps."""


def relu_map(z: jax.Array, mixing: jax.Array, injection: jax.Array) -> jax.Array:
    """``Z ↦ ReLU(M Z + V)``."""
    return jax.nn.relu(mixing @ z + injection)


def relu_solve(
    mixing: jax.Array, injection: jax.Array, solver: Solver = CONTRACTION_SOLVER, z0: jax.Array | None = None
) -> Solution:
    """``Z* = ReLU(M Z* + V)`` by :func:`jdeq.fixed_point` from ``z0`` (default zeros): the :class:`Solution`
    (``value`` with implicit gradients, and the solve's ``stats``)."""
    z0 = jnp.zeros_like(injection) if z0 is None else z0
    return fixed_point(relu_map, z0, mixing, injection, solver=solver)


def relu_equilibrium(
    mixing: jax.Array, injection: jax.Array, solver: Solver = CONTRACTION_SOLVER, z0: jax.Array | None = None
) -> jax.Array:
    """``Z* = ReLU(M Z* + V)`` (the value of :func:`relu_solve`)."""
    return relu_solve(mixing, injection, solver, z0).value


def gaussian(key: jax.Array, shape: tuple[int, ...], variance: float, dtype) -> jax.Array:
    """Entries i.i.d. ``N(0, variance)``."""
    return jnp.sqrt(variance) * jax.random.normal(key, shape, dtype)
