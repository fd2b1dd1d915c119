"""Restarted GMRES and BiCGStab for ``A u = b`` with a matrix-free ``A``, loops whose carries vary like ``b``.

``jax.scipy.sparse.linalg`` starts its loop carries from constants (a zero Hessenberg matrix, ``ρ = α = ω = 1``),
which inside ``jax.shard_map`` do not vary over the mesh axes that the per-device ``b`` varies over, so the loops
fail to trace there. These start every carry varying like ``b`` (:func:`jdeq._sharding.vary_like`) and work on
the flattened ``b`` (a batch ``(B, n)`` is one block-diagonal system). Both stop when
``‖b − A u‖ <= max(atol, tol·‖b‖)`` (the recursively updated residual; callers measure the true one).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from .._sharding import vary_like

__all__ = ["bicgstab", "gmres"]

Array = jax.Array


def _flat(matvec: Callable[[Array], Array], b: Array, x0: Array | None):
    """``(A on flat vectors, flat b, flat x0 (default 0), unflatten)``."""
    shape = b.shape
    x0 = jnp.zeros_like(b) if x0 is None else x0
    return lambda v: matvec(v.reshape(shape)).ravel(), b.ravel(), x0.ravel(), lambda v: v.reshape(shape)


def _threshold(b: Array, tol: float, atol: float) -> Array:
    return jnp.maximum(jnp.asarray(atol, b.dtype), tol * jnp.linalg.norm(b))


def _safe_divide(num: Array, den: Array) -> Array:
    """``num / den``, 0 where ``den == 0`` (a breakdown ends the iteration instead of making NaN)."""
    return jnp.where(den == 0, jnp.zeros_like(num), num / jnp.where(den == 0, jnp.ones_like(den), den))


def gmres(matvec, b, x0=None, *, tol: float, atol: float, restart: int, max_steps: int) -> Array:
    """Restarted GMRES(``restart``) (Saad & Schultz 1986): at most ``max_steps`` Krylov iterations.

    Each cycle builds an orthonormal Krylov basis ``V`` of ``restart`` vectors by Arnoldi with classical
    Gram–Schmidt applied twice, then minimises ``‖β e₁ − H y‖`` over the ``(restart + 1) × restart``
    Hessenberg matrix ``H`` and updates ``u ← u + V y``. A cycle ends early on no breakdown: a zero
    new vector (the Krylov space is invariant) leaves a zero column, which the least squares ignores.
    """
    a, b, x, unflatten = _flat(matvec, b, x0)
    restart = min(restart, max_steps)
    cycles = -(-max_steps // restart)
    threshold = _threshold(b, tol, atol)

    def arnoldi(j, basis_h):
        basis, h = basis_h
        w = a(basis[j])
        coefficients = jnp.zeros(restart + 1, b.dtype)
        for _ in range(2):  # CGS2: classical Gram–Schmidt, once more for orthogonality in floating point
            c = basis @ w  # rows beyond j are zero
            w = w - c @ basis
            coefficients = coefficients + c
        w_norm = jnp.linalg.norm(w)
        coefficients = coefficients.at[j + 1].set(w_norm)
        basis = basis.at[j + 1].set(_safe_divide(w, w_norm))
        return basis, h.at[:, j].set(coefficients)

    def cycle(carry):
        x, r, k = carry
        beta = jnp.linalg.norm(r)
        basis = jnp.zeros((restart + 1, b.shape[0]), b.dtype).at[0].set(_safe_divide(r, beta))
        h = jnp.zeros((restart + 1, restart), b.dtype)
        basis, h = lax.fori_loop(0, restart, arnoldi, vary_like((basis, h), b))
        rhs = jnp.zeros(restart + 1, b.dtype).at[0].set(beta)
        y = jnp.linalg.lstsq(h, rhs)[0]
        x = x + y @ basis[:restart]
        return x, b - a(x), k + 1

    def unfinished(carry):
        _, r, k = carry
        return (k < cycles) & (jnp.linalg.norm(r) > threshold)

    start = vary_like((x, b - a(x), jnp.zeros((), jnp.int32)), b)
    return unflatten(lax.while_loop(unfinished, cycle, start)[0])


def bicgstab(matvec, b, x0=None, *, tol: float, atol: float, max_steps: int) -> Array:
    """BiCGStab (van der Vorst 1992), unpreconditioned: at most ``max_steps`` iterations (two products each).

    Stops early on a breakdown (``ρ = ⟨r̂, r⟩ = 0`` or ``⟨r̂, v⟩ = 0``): the iterate so far is returned.
    """
    a, b, x, unflatten = _flat(matvec, b, x0)
    threshold = _threshold(b, tol, atol)
    r = b - a(x)
    one = jnp.ones((), b.dtype)

    def step(carry):
        x, r, p, v, rho, alpha, omega, k, _ = carry
        rho_new = jnp.vdot(r_hat, r)
        beta = _safe_divide(rho_new, rho) * _safe_divide(alpha, omega)
        p = r + beta * (p - omega * v)
        v = a(p)
        r_hat_v = jnp.vdot(r_hat, v)
        alpha = _safe_divide(rho_new, r_hat_v)
        s = r - alpha * v
        t = a(s)
        omega = _safe_divide(jnp.vdot(t, s), jnp.vdot(t, t))
        x = x + alpha * p + omega * s
        broke = (rho_new == 0) | (r_hat_v == 0)
        return x, s - omega * t, p, v, rho_new, alpha, omega, k + 1, broke

    def unfinished(carry):
        _, r, *_, k, broke = carry
        return (k < max_steps) & ~broke & (jnp.linalg.norm(r) > threshold)

    r_hat = r
    zero = jnp.zeros_like(b)
    start = (x, r, zero, zero, one, one, one, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    return unflatten(lax.while_loop(unfinished, step, vary_like(start, b))[0])
