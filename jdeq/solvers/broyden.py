"""Limited-memory ("good") Broyden's method in low-rank form, with an optional line search."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._base import Solver, _check, at_least_float32, norm


class BroydenState(NamedTuple):
    us: jax.Array  # (m, n): H = −I + Σ_{i<k} u_i v_iᵀ, the inverse-Jacobian estimate of g(x) = f(x) − x
    vs: jax.Array  # (m, n)
    hg: jax.Array  # H g at the current iterate (the next step is −H g)
    count: jax.Array  # steps taken; rows i < count mod (m + 1) are in use (none: H = −I)


def _in_use(count, m):
    """Mask of the memory rows that make up H: the ``count mod (m + 1)`` written since the last restart."""
    return jnp.arange(m, dtype=count.dtype) < count % (m + 1)


def apply_inverse(us, vs, count, g):
    """``H g`` for ``H = −I + Σ u_i v_iᵀ`` over the rows in use."""
    return -g + ((vs @ g) * _in_use(count, us.shape[0]).astype(g.dtype)) @ us


def apply_inverse_transpose(us, vs, count, s):
    """``Hᵀ s`` for ``H = −I + Σ u_i v_iᵀ`` over the rows in use."""
    return -s + ((us @ s) * _in_use(count, us.shape[0]).astype(s.dtype)) @ vs


@dataclasses.dataclass(frozen=True)
class Broyden(Solver):
    """Broyden's "good" method on ``g(z) = f(z) − z`` with a bounded low-rank inverse Jacobian.

    The inverse Jacobian estimate is ``H_k = −I + Σ u_i v_iᵀ`` (Broyden 1965; the form used for
    DEQs by Bai et al., arXiv 1909.01377). A step is ``z⁺ = z − α H g(z)`` and the update, with
    ``s = z⁺ − z``, ``y = g(z⁺) − g(z)`` and ``v = Hᵀs``, is ``H⁺ = H + (s − H y) vᵀ / (vᵀ y)``, which
    keeps the secant condition ``H⁺ y = s``. When ``m`` rank-one terms fill the memory, the next step
    restarts H from ``−I`` (dropping only the oldest term would break the secant conditions of the others).
    Updates with ``|vᵀ y|`` below ``1e-12·‖s‖‖H y‖`` are skipped (a zero term is written). ``H g`` is
    carried from step to step (``H⁺ g⁺ = H g⁺ + u (v·g⁺)``), so a step makes 4 passes over the memory:
    ``H g⁺`` and ``Hᵀ s``.

    Attributes:
      m: number of rank-one terms kept, >= 1.
      line_search: backtrack ``α = 1, ½, ¼, …`` until ``‖g(z⁺)‖ <= (1 − c α)‖g(z)‖``.
      ls_steps: most backtracking evaluations per step (each costs one evaluation of f).
      ls_c: sufficient-decrease constant ``c`` in ``(0, 1)``.
    """

    m: int = 20
    line_search: bool = False
    ls_steps: int = 4
    ls_c: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        _check(isinstance(self.m, int) and self.m >= 1, f"m must be an int >= 1, got {self.m!r}")
        _check(
            isinstance(self.ls_steps, int) and self.ls_steps >= 1,
            f"ls_steps must be an int >= 1, got {self.ls_steps!r}",
        )
        _check(0.0 < self.ls_c < 1.0, f"ls_c must be in (0, 1), got {self.ls_c}")

    def init(self, x, fx):
        zeros = jnp.zeros((self.m, x.shape[0]), x.dtype)
        return BroydenState(zeros, zeros, x - fx, jnp.zeros((), jnp.int32))  # H = −I: H g = −(f − x)

    def step(self, fn, x, fx, state):
        g = fx - x
        x_new, fx_new, used = self._advance(fn, x, -state.hg, norm(g))
        g_new = fx_new - x_new
        s = x_new - x
        hg_new = apply_inverse(state.us, state.vs, state.count, g_new)
        h_y = hg_new - state.hg
        v = apply_inverse_transpose(state.us, state.vs, state.count, s)
        denom = jnp.vdot(v, g_new - g)
        terms = state.count % (self.m + 1)
        restart = terms == self.m  # the memory is full: H⁺ = −I, the rows fall out of use
        wide = at_least_float32(denom.dtype)  # norm's dtype: compared without implicit promotion
        ok = (jnp.abs(denom).astype(wide) > 1e-12 * norm(s) * norm(h_y)) & ~restart
        u = jnp.where(ok, (s - h_y) / jnp.where(ok, denom, 1.0), 0.0)
        v = jnp.where(ok, v, 0.0)
        slot = terms % self.m
        hg_next = jnp.where(restart, -g_new, hg_new + u * jnp.vdot(v, g_new))
        state = BroydenState(state.us.at[slot].set(u), state.vs.at[slot].set(v), hg_next, state.count + 1)
        return x_new, fx_new, state, used

    @property
    def batch_axes(self):
        return BroydenState(us=0, vs=0, hg=0, count=None)

    @property
    def unrollable(self) -> bool:
        return not self.line_search  # the backtracking is a while_loop

    @property
    def has_inverse_jacobian(self) -> bool:
        return True

    def inverse_jacobian_transpose(self, state, v):
        return apply_inverse_transpose(state.us, state.vs, state.count, v)

    def _advance(self, fn, x, direction, g_norm):
        """Full step, or backtracking from it when ``line_search`` is on; returns ``(x⁺, f(x⁺), evals)``."""
        x_new = x + direction
        fx_new = fn(x_new)
        one = jnp.ones((), jnp.int32)
        if not self.line_search:
            return x_new, fx_new, one

        def insufficient(c):
            alpha, x_try, fx_try, k = c
            return (k < self.ls_steps) & ~(norm(fx_try - x_try) <= (1 - self.ls_c * alpha) * g_norm)

        def halve(c):
            alpha, _, _, k = c
            alpha = alpha / 2
            x_try = x + alpha.astype(x.dtype) * direction  # alpha is float32: keep x's dtype
            return alpha, x_try, fn(x_try), k + 1

        start = (jnp.ones((), g_norm.dtype), x_new, fx_new, one)
        _, x_new, fx_new, evals = lax.while_loop(insufficient, halve, start)
        return x_new, fx_new, evals
