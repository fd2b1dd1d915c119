"""Deep equilibrium linear model (Kawaguchi 2021, arXiv 2102.07346).

The hidden state of all ``n`` samples is the ``m × n`` matrix ``Z`` solving

    Z = γ σ(A) Z + Φ,        f_θ(X) = B Z* = B (I − γ σ(A))⁻¹ Φ,

with ``Φ = φ(X)`` the ``m × n`` matrix of fixed features, ``σ`` the column-wise softmax (so ``σ(A)`` is
column-stochastic, ``‖γσ(A)‖₁ = γ < 1`` and the map is a contraction) and ``θ = (A, B)``, ``A`` of shape
``m × m``, ``B`` of shape ``m_y × m``. The model is linear in ``Φ``: its function-space weight is
``W(θ) = B (I − γσ(A))⁻¹`` (shape ``m_y × m``), which :func:`function_weight` computes with a fixed-point
solve as well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..implicit import fixed_point
from ..solvers import Anderson, Solution, Solver

__all__ = [
    "EXACT_SOLVER",
    "column_softmax",
    "dense_function_weight",
    "dense_predict",
    "equilibrium",
    "equilibrium_map",
    "function_weight",
    "init",
    "logistic_loss",
    "predict",
    "solve",
    "square_loss",
]

EXACT_SOLVER = Anderson(tol=1e-12, max_steps=200, m=5)
"""This model's default solver, not :data:`jdeq.DEFAULT_SOLVER`: the theory of Kawaguchi (2021) is checked against
closed forms (``Z* = (I − γσ(A))⁻¹Φ``, the function-space weight, the gradient-flow dynamics) to ~1e-12, far
below ``DEFAULT_SOLVER``'s relative residual of 1e-5. The map is linear with ``‖γσ(A)‖₁ = γ < 1``, so Anderson
reaches 1e-12 well within 200 steps."""


def column_softmax(a: jax.Array) -> jax.Array:
    """``σ(A)``: softmax over each column, so every column is a probability vector."""
    return jax.nn.softmax(a, axis=0)


def equilibrium_map(z: jax.Array, phi: jax.Array, a: jax.Array, gamma: float) -> jax.Array:
    """``Z ↦ γ σ(A) Z + Φ`` (one problem for the whole batch: the map is linear and shared)."""
    return gamma * column_softmax(a) @ z + phi


def solve(params: dict, phi: jax.Array, gamma: float, solver: Solver = EXACT_SOLVER) -> Solution:
    """``Z* = (I − γσ(A))⁻¹ Φ`` by :func:`jdeq.fixed_point`: the :class:`Solution` with the solve's ``stats``."""
    return fixed_point(equilibrium_map, jnp.zeros_like(phi), phi, params["A"], gamma, solver=solver)


def equilibrium(params: dict, phi: jax.Array, gamma: float, solver: Solver = EXACT_SOLVER) -> jax.Array:
    """``Z* = (I − γσ(A))⁻¹ Φ`` by :func:`jdeq.fixed_point` (implicit gradients in ``A`` and ``Φ``)."""
    return solve(params, phi, gamma, solver).value


def predict(params: dict, phi: jax.Array, gamma: float, solver: Solver = EXACT_SOLVER) -> jax.Array:
    """``f_θ(X) = B Z*``, shape ``m_y × n``."""
    return params["B"] @ equilibrium(params, phi, gamma, solver)


def function_weight(params: dict, gamma: float, solver: Solver = EXACT_SOLVER) -> jax.Array:
    """``W(θ) = B (I − γσ(A))⁻¹``: the equilibrium with ``Φ = I``, multiplied by ``B``."""
    m = params["A"].shape[0]
    return predict(params, jnp.eye(m, dtype=params["A"].dtype), gamma, solver)


def dense_predict(params: dict, phi: jax.Array, gamma: float) -> jax.Array:
    """Reference ``B (I − γσ(A))⁻¹ Φ`` by a dense linear solve (for checks, not for training)."""
    m = params["A"].shape[0]
    return params["B"] @ jnp.linalg.solve(jnp.eye(m, dtype=phi.dtype) - gamma * column_softmax(params["A"]), phi)


def dense_function_weight(params: dict, gamma: float) -> jax.Array:
    """``W(θ) = B (I − γσ(A))⁻¹`` by a dense solve: the measurements differentiate it (no solver in the way)."""
    return dense_predict(params, jnp.eye(params["A"].shape[0], dtype=params["A"].dtype), gamma)


def init(key: jax.Array, width: int, out_dim: int, scale: float = 1.0, dtype=jnp.float64) -> dict:
    """``A ~ N(0, scale²)`` (``m × m``), ``B ~ N(0, scale²/m)`` (``m_y × m``)."""
    ka, kb = jax.random.split(key)
    return {
        "A": scale * jax.random.normal(ka, (width, width), dtype),
        "B": scale * jax.random.normal(kb, (out_dim, width), dtype) / jnp.sqrt(width),
    }


def square_loss(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """``L = (1/2n) Σᵢ ‖f(xᵢ) − yᵢ‖²`` with samples as columns (``m_y × n``)."""
    return 0.5 * jnp.sum(jnp.square(outputs - targets)) / targets.shape[1]


def logistic_loss(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy of the softmax over the ``m_y`` outputs; ``labels`` one-hot, ``m_y × n``."""
    return -jnp.sum(labels * jax.nn.log_softmax(outputs, axis=0)) / labels.shape[1]
