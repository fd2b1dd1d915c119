"""Spectral quantities of the equilibrium by power iteration: spectral radius of ∂f/∂z, spectral norm of a matrix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from ._numerics import check, norm

__all__ = ["largest_singular_value", "power_iteration", "spectral_norm", "spectral_radius"]


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


def largest_singular_value(w: jax.Array) -> jax.Array:
    """``‖W‖₂`` exactly, from the singular values alone (cheaper than ``jnp.linalg.norm(W, 2)``); not for gradients."""
    return jnp.linalg.svd(w, compute_uv=False)[0]


def spectral_norm(w: jax.Array, num_iters: int = 20, key: jax.Array | None = None) -> jax.Array:
    """Largest singular value ``σ(W) = uᵀ W v`` of a matrix by power iteration on ``WᵀW``.

    ``u`` and ``v`` are treated as constants in the gradient, so ``∂σ/∂W = u vᵀ`` (Miyato et al.,
    arXiv 1802.05957). ``key`` draws the start vector (default: a fixed key).
    """
    key = jax.random.PRNGKey(0) if key is None else key
    check(w.ndim == 2, f"spectral_norm takes a matrix, got shape {w.shape}")
    w_const = lax.stop_gradient(w)
    _, v = power_iteration(lambda v: w_const.T @ (w_const @ v), jax.random.normal(key, w.shape[1:], w.dtype), num_iters)
    u = w_const @ v
    u = u / norm(u).astype(u.dtype)
    return u @ w @ v
