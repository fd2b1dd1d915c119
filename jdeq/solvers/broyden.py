"""Limited-memory ("good") Broyden's method in low-rank form, with an optional line search."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from .._numerics import at_least_float32, check, norm
from ._line_search import LineSearchSolver

__all__ = ["Broyden", "BroydenState", "apply_inverse", "apply_inverse_transpose", "secant_scale"]


class BroydenState(NamedTuple):
    us: jax.Array  # (m, n): H = γI + Σ_{i<k} u_i v_iᵀ, the inverse-Jacobian estimate of g(x) = f(x) − x
    vs: jax.Array  # (m, n)
    hg: jax.Array  # H g at the current iterate (the next step is −H g)
    count: jax.Array  # steps taken; rows i < count mod (m + 1) are in use (none: H = γI)
    gamma: jax.Array  # γ, the scale of the initial inverse Jacobian (x's dtype)


def max_abs(v):
    """``‖v‖_∞``: one pass, no overflow for finite ``v`` (the skip test's scale)."""
    return jnp.max(jnp.abs(v), initial=jnp.zeros((), v.dtype))


def _in_use(count, m):
    """Mask of the memory rows that make up H: the ``count mod (m + 1)`` written since the last restart."""
    return jnp.arange(m, dtype=count.dtype) < count % (m + 1)


def apply_inverse(state: BroydenState, g):
    """``H g`` for ``H = γI + Σ u_i v_iᵀ`` over the rows in use."""
    return state.gamma * g + ((state.vs @ g) * _in_use(state.count, state.us.shape[0]).astype(g.dtype)) @ state.us


def apply_inverse_transpose(state: BroydenState, s):
    """``Hᵀ s`` for ``H = γI + Σ u_i v_iᵀ`` over the rows in use."""
    return state.gamma * s + ((state.us @ s) * _in_use(state.count, state.us.shape[0]).astype(s.dtype)) @ state.vs


def secant_scale(s, y):
    """``γ = sᵀy / yᵀy``, the scalar ``γ`` with ``γ y ≈ s`` in least squares (Barzilai & Borwein 1988); −1 when undefined.

    From the first step ``s = x₁ − x₀``, ``y = g(x₁) − g(x₀)``, ``γI`` is the scalar estimate of the inverse
    Jacobian of ``g`` along that step, with its sign: ``−1`` for ``∂f/∂z ≈ 0`` (a contraction), ``+1`` for
    the residual ``g = z − F(z)`` of a root problem with ``∂F/∂z ≈ 0`` written as ``f = z − g``.
    """
    yy = jnp.vdot(y, y)
    gamma = jnp.vdot(s, y) / jnp.where(yy > 0, yy, 1.0)
    return jnp.where((yy > 0) & jnp.isfinite(gamma) & (gamma != 0), gamma, -1.0).astype(s.dtype)


@dataclasses.dataclass(frozen=True)
class Broyden(LineSearchSolver):
    """Broyden's "good" method on ``g(z) = f(z) − z`` with a bounded low-rank inverse Jacobian.

    The inverse Jacobian estimate is ``H_k = γI + Σ u_i v_iᵀ`` (Broyden 1965; the form used for
    DEQs by Bai et al., arXiv 1909.01377, with ``γ = −1``). The first step is taken with ``H₀ = −I``
    (a fixed-point step); then, unless ``gamma`` fixes it, ``γ`` is estimated from that step
    (:func:`secant_scale`, ``γ = sᵀy/yᵀy``), so the method does not assume the sign or scale of the
    Jacobian: a root problem ``g = 0`` solved as ``f = z − g`` with ``∂g/∂z ≈ −I`` gets ``γ ≈ +1``. A step is ``z⁺ = z − α H g(z)`` and the update, with
    ``s = z⁺ − z``, ``y = g(z⁺) − g(z)`` and ``v = Hᵀs``, is ``H⁺ = H + (s − H y) vᵀ / (vᵀ y)``, which
    keeps the secant condition ``H⁺ y = s``. When ``m`` rank-one terms fill the memory, the next step
    restarts H from ``γI`` (dropping only the oldest term would break the secant conditions of the others).
    Updates with ``|vᵀ y|`` below ``1e-12·‖s‖_∞‖H y‖_∞`` are skipped (a zero term is written). ``H g`` is
    carried from step to step (``H⁺ g⁺ = H g⁺ + u (v·g⁺)``), so a step makes 4 passes over the memory:
    ``H g⁺`` and ``Hᵀ s``.

    Attributes:
      m: number of rank-one terms kept, >= 1.
      gamma: the initial inverse Jacobian ``γI`` after the first step (finite, nonzero); ``None``
        estimates it from the first step.
      line_search, ls_steps, ls_c: the backtracking of :class:`~jdeq.solvers._line_search.LineSearchSolver`.
    """

    m: int = 20
    gamma: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.m, int) and self.m >= 1, f"m must be an int >= 1, got {self.m!r}")
        check(
            self.gamma is None or (math.isfinite(self.gamma) and self.gamma != 0),
            f"gamma must be None or a finite nonzero number, got {self.gamma!r}",
        )

    def init(self, x, fx):
        zeros = jnp.zeros((self.m, x.shape[0]), x.dtype)
        minus_one = -jnp.ones((), x.dtype)  # the first step is a fixed-point step: H g = −(f − x)
        return BroydenState(zeros, zeros, x - fx, jnp.zeros((), jnp.int32), minus_one)

    def step(self, fn, x, fx, state):
        g = fx - x
        x_new, fx_new, used = self.advance(fn, x, -state.hg, norm(g))
        g_new = fx_new - x_new
        s = x_new - x
        y = g_new - g
        first = state.count == 0
        if self.gamma is None:  # estimated once: a cond (shared step count) skips the two dots on later steps
            state = state._replace(gamma=lax.cond(first, secant_scale, lambda s, y: state.gamma, s, y))
        else:
            state = state._replace(gamma=jnp.where(first, jnp.asarray(self.gamma, x.dtype), state.gamma))
        hg = jnp.where(first, state.gamma * g, state.hg)  # H g under the (new) γ; no rows are in use yet
        hg_new = apply_inverse(state, g_new)
        h_y = hg_new - hg
        v = apply_inverse_transpose(state, s)
        denom = jnp.vdot(v, y)
        terms = state.count % (self.m + 1)
        restart = terms == self.m  # the memory is full: H⁺ = −I, the rows fall out of use
        wide = at_least_float32(denom.dtype)  # the test in float32 or wider (1e-12 underflows float16)
        ok = (jnp.abs(denom).astype(wide) > 1e-12 * max_abs(s).astype(wide) * max_abs(h_y).astype(wide)) & ~restart
        u = jnp.where(ok, (s - h_y) / jnp.where(ok, denom, 1.0), 0.0)
        v = jnp.where(ok, v, 0.0)
        slot = terms % self.m
        hg_next = jnp.where(restart, state.gamma * g_new, hg_new + u * jnp.vdot(v, g_new))
        state = BroydenState(state.us.at[slot].set(u), state.vs.at[slot].set(v), hg_next, state.count + 1, state.gamma)
        return x_new, fx_new, state, used

    @property
    def batch_axes(self):
        return BroydenState(us=0, vs=0, hg=0, count=None, gamma=0)

    @property
    def has_inverse_jacobian(self) -> bool:
        return True

    def inverse_jacobian_transpose(self, state, v):
        return apply_inverse_transpose(state, v)
