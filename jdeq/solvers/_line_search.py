"""Backtracking on the residual ``‖f(z) − z‖``, shared by the quasi-Newton and Newton solvers.

:class:`LineSearchSolver` declares the line-search fields once; :class:`jdeq.Broyden`, :class:`jdeq.Newton`
and :class:`jdeq.Chord` inherit them and take their steps with :meth:`LineSearchSolver.advance`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from .._numerics import check, norm
from ._base import Solver, per_row

__all__ = ["LineSearchSolver", "advance"]


@dataclasses.dataclass(frozen=True)
class LineSearchSolver(Solver):
    """A :class:`Solver` whose step ``z⁺ = z + α d`` may backtrack on the residual.

    Attributes:
      line_search: backtrack ``α = 1, ½, ¼, …`` until ``‖g(z⁺)‖ <= (1 − c α)‖g(z)‖``, ``g(z) = f(z) − z``.
      ls_steps: most backtracking evaluations per step (each costs one evaluation of f).
      ls_c: sufficient-decrease constant ``c`` in ``(0, 1)``.
    """

    line_search: bool = False
    ls_steps: int = 4
    ls_c: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        check(
            isinstance(self.ls_steps, int) and self.ls_steps >= 1,
            f"ls_steps must be an int >= 1, got {self.ls_steps!r}",
        )
        check(0.0 < self.ls_c < 1.0, f"ls_c must be in (0, 1), got {self.ls_c}")

    def advance(self, fn, x, direction, g_norm):
        """:func:`advance` with this solver's line-search fields."""
        return advance(fn, x, direction, g_norm, self.line_search, self.ls_steps, self.ls_c)

    @property
    def unrollable(self) -> bool:
        return not self.line_search  # the backtracking is a while_loop


def advance(fn, x, direction, g_norm, line_search: bool, ls_steps: int, ls_c: float):
    """``x⁺ = x + α d``: ``α = 1``, or backtracking ``α = 1, ½, ¼, …`` until ``‖g(x⁺)‖ <= (1 − c α)‖g(x)‖``.

    ``g(x) = fn(x) − x`` and ``g_norm = ‖g(x)‖``; at most ``ls_steps`` evaluations. Returns
    ``(x⁺, fn(x⁺), evals)``. For a batch ``(B, n)`` (``fn`` mapping it row by row; ``g_norm`` of shape
    ``(B,)``) each row backtracks on its own.
    """
    x_new = x + direction
    fx_new = fn(x_new)
    one = jnp.ones(x.shape[:-1], jnp.int32)
    if not line_search:
        return x_new, fx_new, one
    if x.ndim == 2:
        row = per_row(fn, x)
        return jax.vmap(lambda *a: _backtrack(row, *a, ls_steps, ls_c))(x, direction, g_norm, x_new, fx_new)
    return _backtrack(fn, x, direction, g_norm, x_new, fx_new, ls_steps, ls_c)


def _backtrack(fn, x, direction, g_norm, x_new, fx_new, ls_steps, ls_c):
    """Halve the step from the full step ``(x_new, fx_new)`` until sufficient decrease (one problem)."""

    def insufficient(c):
        alpha, x_try, fx_try, k = c
        return (k < ls_steps) & ~(norm(fx_try - x_try) <= (1 - ls_c * alpha) * g_norm)

    def halve(c):
        alpha, _, _, k = c
        alpha = alpha / 2
        x_try = x + alpha.astype(x.dtype) * direction  # alpha is float32 or wider: keep x's dtype
        return alpha, x_try, fn(x_try), k + 1

    start = (jnp.ones((), g_norm.dtype), x_new, fx_new, jnp.ones((), jnp.int32))
    _, x_new, fx_new, evals = lax.while_loop(insufficient, halve, start)
    return x_new, fx_new, evals
