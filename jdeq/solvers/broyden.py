"""Limited-memory ("good") Broyden's method in low-rank form, with an optional line search."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._base import Solver, _check, norm


class BroydenState(NamedTuple):
    us: jax.Array  # (m, n): H = −I + Σ u_i v_iᵀ, the inverse-Jacobian estimate of g(x) = f(x) − x
    vs: jax.Array  # (m, n)
    count: jax.Array  # rank-one updates applied so far


def apply_inverse(us, vs, g):
    """``H g`` for ``H = −I + Uᵀ V`` (rows of ``us``/``vs`` are ``u_i``/``v_i``)."""
    return -g + (vs @ g) @ us


def apply_inverse_transpose(us, vs, s):
    """``Hᵀ s`` for ``H = −I + Uᵀ V``."""
    return -s + (us @ s) @ vs


@dataclasses.dataclass(frozen=True)
class Broyden(Solver):
    """Broyden's "good" method on ``g(z) = f(z) − z`` with a bounded low-rank inverse Jacobian.

    The inverse Jacobian estimate is ``H_k = −I + Σ_{i<m} u_i v_iᵀ`` (Broyden 1965; the form used for
    DEQs by Bai et al., arXiv 1909.01377). A step is ``z⁺ = z − α H g(z)`` and the update, with
    ``s = z⁺ − z`` and ``y = g(z⁺) − g(z)``, is ``H⁺ = H + (s − H y) sᵀH / (sᵀ H y)``. Memory holds at
    most ``m`` rank-one terms in a ring buffer: the oldest term is overwritten when it is full.
    Updates with ``|sᵀ H y|`` below ``1e-12·‖s‖‖H y‖`` are skipped.

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
        return BroydenState(zeros, zeros, jnp.zeros((), jnp.int32))

    def step(self, fn, x, fx, state):
        g = fx - x
        direction = -apply_inverse(state.us, state.vs, g)
        x_new, fx_new, used = self._advance(fn, x, direction, norm(g))
        s, y = x_new - x, (fx_new - x_new) - g
        h_y = apply_inverse(state.us, state.vs, y)
        v = apply_inverse_transpose(state.us, state.vs, s)
        denom = jnp.vdot(s, h_y)
        ok = jnp.abs(denom) > 1e-12 * norm(s) * norm(h_y)
        u = (s - h_y) / jnp.where(ok, denom, 1.0)
        slot = state.count % self.m
        us = jnp.where(ok, state.us.at[slot].set(u), state.us)
        vs = jnp.where(ok, state.vs.at[slot].set(v), state.vs)
        return x_new, fx_new, BroydenState(us, vs, state.count + ok.astype(jnp.int32)), used

    @property
    def unrollable(self) -> bool:
        return not self.line_search  # the backtracking is a while_loop

    @property
    def has_inverse_jacobian(self) -> bool:
        return True

    def inverse_jacobian_transpose(self, state, v):
        return apply_inverse_transpose(state.us, state.vs, v)

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
