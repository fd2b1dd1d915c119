"""Linear algebra of the equilibrium: Neumann-series adjoints and power iteration for spectral quantities."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from .solvers import Result, Stats
from .solvers._base import _check, norm, residuals


def measured_stats(u: jax.Array, fu: jax.Array, num_steps: int) -> Stats:
    """Stats of an approximate solve of ``u = fn(u)`` that ran a fixed budget: its residual, never "converged".

    The result is ``Result.MAX_STEPS``: the method ran its budget and has no tolerance to meet.
    """
    abs_res, rel_res, _ = residuals(u, fu)
    steps = jnp.full((), num_steps, jnp.int32)
    code = jnp.where(jnp.isfinite(abs_res), Result.MAX_STEPS, Result.NONFINITE).astype(jnp.int32)
    return Stats(steps, steps + 1, rel_res, abs_res, jnp.zeros((), bool), code)


@dataclasses.dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series for the adjoint: ``u = Σ_{i<k} (Jᵀ)^i ḡ ≈ (I − Jᵀ)^{-1} ḡ``.

    Use as the adjoint solver of :class:`jdeq.Implicit` (``Implicit(solver=Neumann(k))``). It costs
    ``k − 1`` vector–Jacobian products (plus one to measure the residual for the backward stats) and
    converges to the implicit gradient as ``k → ∞`` when the spectral radius of ``J = ∂f/∂z`` is below
    one, with error ``O(ρ(J)^k)``. ``k = 1`` is the Jacobian-free gradient ``u = ḡ`` (Fung et al.,
    arXiv 2103.12803); see Geng et al., arXiv 2111.05177 for the analysis of such approximations.

    Attributes:
      k: number of series terms, >= 1.
    """

    k: int

    def __post_init__(self):
        _check(isinstance(self.k, int) and self.k >= 1, f"Neumann k must be an int >= 1, got {self.k!r}")

    def solve_fixed_point(self, fn: Callable, b: jax.Array) -> tuple[jax.Array, Stats]:
        """``u_{i+1} = fn(u_i) = Jᵀ u_i + b`` from ``u_1 = b``, ``k − 1`` times; returns ``(u_k, stats)``."""
        u = lax.fori_loop(1, self.k, lambda _, u: fn(u), b)
        return u, measured_stats(u, fn(u), self.k - 1)


def power_iteration(matvec: Callable, v0: jax.Array, num_iters: int) -> tuple[jax.Array, jax.Array]:
    """``num_iters`` steps of ``v ← A v / ‖A v‖``; returns ``(‖A v‖, v)`` for the final unit vector ``v``.

    ``‖A v‖`` converges to the modulus of the dominant eigenvalue when it is unique in modulus (a real
    dominant eigenvalue, or any symmetric ``A``); the rate is ``|λ₂/λ₁|`` per step.
    """

    def step(_, v):
        av = matvec(v)
        return av / norm(av).astype(av.dtype)

    v = lax.fori_loop(0, num_iters, step, v0 / norm(v0).astype(v0.dtype))
    return norm(matvec(v)), v


def spectral_radius(f: Callable, z: Any, *args: Any, key: jax.Array, num_iters: int = 50) -> jax.Array:
    """Spectral radius of ``∂f/∂z`` at ``z`` (e.g. ``z*``) by power iteration on Jacobian–vector products.

    ``ρ(∂f/∂z) < 1`` at the equilibrium makes it locally attractive for the fixed-point iteration and
    the adjoint Neumann series converge. Exact for a dominant eigenvalue unique in modulus (see
    :func:`power_iteration`); ``key`` draws the start vector.
    """
    x, unravel = ravel_pytree(z)
    _, jvp = jax.linearize(lambda x: ravel_pytree(f(unravel(x), *args))[0], x)
    radius, _ = power_iteration(jvp, jax.random.normal(key, x.shape, x.dtype), num_iters)
    return radius


def spectral_norm(w: jax.Array, num_iters: int = 20, key: jax.Array | None = None) -> jax.Array:
    """Largest singular value ``σ(W) = uᵀ W v`` of a matrix by power iteration on ``WᵀW``.

    ``u`` and ``v`` are treated as constants in the gradient, so ``∂σ/∂W = u vᵀ`` (Miyato et al.,
    arXiv 1802.05957). ``key`` draws the start vector (default: a fixed key).
    """
    key = jax.random.PRNGKey(0) if key is None else key
    _check(w.ndim == 2, f"spectral_norm takes a matrix, got shape {w.shape}")
    w_const = lax.stop_gradient(w)
    _, v = power_iteration(lambda v: w_const.T @ (w_const @ v), jax.random.normal(key, w.shape[1:], w.dtype), num_iters)
    u = w_const @ v
    u = u / norm(u).astype(u.dtype)
    return u @ w @ v
