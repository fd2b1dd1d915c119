"""Anderson acceleration (type II) with a ring-buffer memory and an incremental Gram matrix."""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from .._numerics import at_least_float32, check, finite
from ._base import Solver

__all__ = ["Anderson", "AndersonState", "cholesky_solve"]


class AndersonState(NamedTuple):
    gs: jax.Array  # (m, n) past residuals g_i = f(x_i) − x_i
    fs: jax.Array  # (m, n) past images f(x_i)
    gram: jax.Array  # (m, m) Gram matrix of the residuals, float32 or wider
    count: jax.Array  # number of (g, f) pairs stored so far


def cholesky_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a⁻¹ b`` for a small symmetric positive-definite ``a``, by a Cholesky factorisation written entry by entry.

    ``L_jj = √(a_jj − Σ_{p<j} L_jp²)``, ``L_ij = (a_ij − Σ_{p<j} L_ip L_jp) / L_jj``, then ``L y = b`` and
    ``Lᵀ x = y`` by substitution, each entry its own scalar expression: batched under ``jax.vmap`` or
    inside a GPU loop the whole solve is elementwise arithmetic on ``(batch,)`` vectors, which XLA fuses
    into a few kernels, with no per-matrix LAPACK/cuSOLVER call, no dot and no scatter into a matrix.

    A squared pivot at or below rounding (``<= ε a_jj``, reached when residuals agree to rounding) is raised to
    ``ε a_jj``: the solve and its derivative stay finite (a NaN pivot, or the infinite derivative of ``√0``,
    would make reverse-mode autodiff through the step NaN even where the caller's safeguard discards the
    coefficients, as ``0·NaN = NaN``); the large coefficients it gives are caught by that safeguard.
    """
    (k,) = b.shape
    eps = jnp.finfo(a.dtype).eps
    low = [[None] * k for _ in range(k)]
    for j in range(k):
        pivot = jnp.sqrt(jnp.maximum(a[j, j] - sum(low[j][p] * low[j][p] for p in range(j)), eps * a[j, j]))
        low[j][j] = pivot
        for i in range(j + 1, k):
            low[i][j] = (a[i, j] - sum(low[i][p] * low[j][p] for p in range(j))) / pivot
    y = []
    for i in range(k):
        y.append((b[i] - sum(low[i][p] * y[p] for p in range(i))) / low[i][i])
    x = [None] * k
    for i in reversed(range(k)):
        x[i] = (y[i] - sum(low[p][i] * x[p] for p in range(i + 1, k))) / low[i][i]
    return jnp.stack(x)


def _total(terms):
    """``Σ_i terms[i]`` over the leading axis (length m) as a chain of ``m − 1`` additions.

    Batched (``jax.vmap``) this is elementwise arithmetic that XLA fuses with its producers and consumers,
    where ``jnp.sum`` over a short axis is a reduction kernel of its own.
    """
    return functools.reduce(operator.add, [terms[i] for i in range(len(terms))])


@dataclasses.dataclass(frozen=True)
class Anderson(Solver):
    """Anderson acceleration (Walker & Ni 2011; as used for DEQs by Bai et al., arXiv 1909.01377).

    With the last ``m`` iterates ``x_i`` and residuals ``g_i = f(x_i) − x_i``, solve
    ``α = argmin ‖Σ α_i g_i‖² + λ‖α‖²`` subject to ``Σ α_i = 1`` and step to
    ``x_{k+1} = β Σ α_i f(x_i) + (1 − β) Σ α_i x_i``.

    The memory holds residuals and images, so ``x_{k+1} = Σ α_i f_i − (1 − β) Σ α_i g_i`` needs no
    extra pass. The Gram matrix ``G Gᵀ`` is updated one row per step (O(m·n) work, no O(m²·n)
    rebuild) and the small system is solved in at least float32. Safeguard: when the regularised system is so
    ill-conditioned that the coefficients are non-finite or ``Σ|α_i| > max_coef``, the step falls
    back to the damped iteration ``x + β g`` for that step.

    Attributes:
      m: memory (number of past iterates), >= 1; capped at ``n + 1`` for a state of size ``n``.
      beta: mixing parameter in ``(0, 1]``.
      ridge: ridge regularisation λ, relative to the squared norm of the newest residual ``‖g_k‖²``
        (old, large residuals in a long memory would otherwise inflate it and slow convergence).
      max_coef: safeguard bound on ``Σ|α_i|``.
      cholesky: solve the small system by the unrolled Cholesky factorisation (:func:`cholesky_solve`),
        which fuses into a few elementwise kernels batched or on an accelerator, instead of one LAPACK
        call. ``None`` (default): LAPACK for one problem on CPU, Cholesky in batch solves and elsewhere.
    """

    m: int = 5
    beta: float = 1.0
    ridge: float = 1e-4
    max_coef: float = 1e4
    cholesky: Optional[bool] = None

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.m, int) and self.m >= 1, f"m must be an int >= 1, got {self.m!r}")
        check(0.0 < self.beta <= 1.0, f"beta must be in (0, 1], got {self.beta}")
        check(finite(self.ridge) and self.ridge >= 0, f"ridge must be finite and >= 0, got {self.ridge}")
        check(finite(self.max_coef) and self.max_coef > 1, f"max_coef must be finite and > 1, got {self.max_coef}")

    def init(self, x, fx):
        (n,) = x.shape
        wide = at_least_float32(x.dtype)
        rows = min(self.m, n + 1)  # n + 1 iterates span the state space; more only make the system singular
        zeros = jnp.zeros((rows, n), x.dtype)
        return AndersonState(zeros, zeros, jnp.zeros((rows, rows), wide), jnp.zeros((), jnp.int32))

    def propose(self, x, fx, state):
        slot = state.count % state.gs.shape[0]
        g = fx - x
        gs = state.gs.at[slot].set(g)
        fs = state.fs.at[slot].set(fx)
        wide = state.gram.dtype
        row = gs.astype(wide) @ g.astype(wide)
        gram = state.gram.at[slot, :].set(row).at[:, slot].set(row)
        count = state.count + 1
        alpha = self.coefficients(gram, count)
        ok = _total(jnp.abs(alpha)) <= self.max_coef  # False where a coefficient is NaN or infinite
        alpha = jnp.where(ok, alpha, 0.0).astype(x.dtype)
        # Σ α_i (f_i − (1 − β) g_i) slot by slot: elementwise work that fuses with the select below into one kernel
        # (as ``alpha @ fs``, a batch solve runs one small matrix product per sample)
        terms = fs if self.beta == 1 else fs - (1 - self.beta) * gs
        x_acc = _total([alpha[i] * terms[i] for i in range(terms.shape[0])])
        x_new = jnp.where(ok, x_acc, x + self.beta * g)
        return x_new, AndersonState(gs, fs, gram, count)

    def _small_solve(self, a, b):
        if self.cholesky is None:
            return lax.platform_dependent(a, b, cpu=jnp.linalg.solve, default=cholesky_solve)
        return cholesky_solve(a, b) if self.cholesky else jnp.linalg.solve(a, b)

    def for_batch(self):
        """With ``cholesky=None``, the unrolled Cholesky solve (batched LAPACK calls are slower than its fused kernels)."""
        return self if self.cholesky is not None else dataclasses.replace(self, cholesky=True)

    @property
    def batch_axes(self):
        return AndersonState(gs=0, fs=0, gram=0, count=None)

    @property
    def has_inverse_jacobian(self) -> bool:
        return True

    def inverse_jacobian_transpose(self, state, v):
        """``Hᵀ v`` for Anderson's (type II) multisecant inverse Jacobian of ``g(z) = f(z) − z``.

        ``H = −βI + (ΔX + βΔG)(ΔGᵀΔG + λI)^{-1}ΔGᵀ`` (Fang & Saad 2009) over the differences of the
        stored iterates ``ΔX`` and residuals ``ΔG``, taken relative to the newest stored pair.
        """
        rows = state.gs.shape[0]
        last = (state.count - 1) % rows
        slots = jnp.arange(rows, dtype=state.count.dtype)
        valid = (slots < state.count) & (slots != last)
        xs = state.fs - state.gs  # the memory holds images f_i and residuals g_i; x_i = f_i − g_i
        dx = jnp.where(valid[:, None], xs - xs[last][None], 0.0)
        dg = jnp.where(valid[:, None], state.gs - state.gs[last][None], 0.0)
        gram = dg @ dg.T
        filled = jnp.maximum(jnp.sum(valid), 1).astype(gram.dtype)
        lam = self.ridge * jnp.sum(jnp.diag(gram)) / filled + jnp.finfo(gram.dtype).tiny
        system = gram + jnp.diag(jnp.where(valid, lam, 1.0))
        return -self.beta * v + dg.T @ jnp.linalg.solve(system, (dx + self.beta * dg) @ v)

    def coefficients(self, gram, count):
        """Solve the constrained least squares for α over the filled slots of the memory."""
        rows = gram.shape[0]
        valid = jnp.arange(rows, dtype=count.dtype) < count
        both = valid[:, None] & valid[None, :]
        newest = (count - 1) % rows
        lam = self.ridge * gram[newest, newest] + jnp.finfo(gram.dtype).tiny  # scaled by ‖g_k‖², not old residuals
        system = jnp.where(both, gram, 0.0) + jnp.diag(jnp.where(valid, lam, 1.0))
        weights = self._small_solve(system, valid.astype(gram.dtype))
        return weights / _total(weights)
