"""Newton's method and the chord method on ``g(z) = f(z) − z``, with any :class:`~jdeq.LinearSolver` (default dense LU)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._numerics import check, lineax_hint, norm
from ._line_search import LineSearchSolver
from .linear import LU, LinearSolver, dense_operator

__all__ = ["Chord", "ChordState", "Newton", "dense_jacobian"]


def dense_jacobian(fn, x):
    """``∂fn/∂x``: ``(n, n)`` for one problem, ``(B, n, n)`` for a batch ``(B, n)`` that ``fn`` maps row by row."""
    _, jvp = jax.linearize(fn, x)
    return dense_operator(jvp, x)


@dataclasses.dataclass(frozen=True)
class _NewtonType(LineSearchSolver):
    """Fields and the step shared by :class:`Newton` and :class:`Chord`: ``z⁺ = z + α d``, ``(I − J) d = g``.

    With ``g(z) = f(z) − z`` and ``J`` an approximation of ``∂f/∂z``, ``d = (I − J)^{-1} g`` is the
    Newton direction ``−(∂g/∂z)^{-1} g``; nothing is assumed about the sign of the Jacobian. The linear
    system ``d = J d + g`` is solved by ``linear_solver`` (its :meth:`~jdeq.LinearSolver.init` on the
    Jacobian–vector product ``J``, then :meth:`~jdeq.LinearSolver.solve`). ``Stats.num_evals`` counts
    evaluations of ``f``; the Jacobian products of the linear solves are not counted.
    """

    linear_solver: LinearSolver = LU()

    def __post_init__(self):
        super().__post_init__()
        check(
            isinstance(self.linear_solver, LinearSolver),
            f"linear_solver must be a jdeq LinearSolver (LU, GMRES, BiCGStab, Lineax, ...), got {self.linear_solver!r}"
            + lineax_hint(self.linear_solver),
        )

    def check_state_dtype(self, x):
        """ValueError at trace time for a half-precision iterate: the linear solves (LU's dense factorisation,
        the Krylov solvers' dot products) have no bfloat16/float16 path."""
        check(
            jnp.finfo(x.dtype).bits >= 32,
            f"{type(self).__name__} cannot iterate on a {x.dtype} state (its linear solves need float32 or wider): "
            f"pass precision=jdeq.Precision({x.dtype}) to fixed_point/root, which runs f in {x.dtype} and the "
            "solver in float32",
        )

    def step(self, fn, x, fx, state):
        g = fx - x
        direction, state = self._direction(fn, x, g, state)
        x_new, fx_new, used = self.advance(fn, x, direction, norm(g))
        return x_new, fx_new, state, used

    def batch_step(self, fn, x, fx, state, axes):
        """The step on the whole batch: ``fn`` maps the rows independently, so its Jacobian is block diagonal
        and every linear solve is one solve per row."""
        return self.step(fn, x, fx, state)

    def _solve(self, solver_state, jvp, g):
        solve = self.linear_solver.solve if g.ndim == 1 else self.linear_solver.solve_rows
        return solve(solver_state, jvp, g)[0]

    def _direction(self, fn, x, g, state):
        raise NotImplementedError

    @property
    def unrollable(self) -> bool:
        return super().unrollable and self.linear_solver.unrollable  # Krylov solves and backtracking are loops


@dataclasses.dataclass(frozen=True)
class Newton(_NewtonType):
    """Newton's method: ``z⁺ = z + α d`` with ``(I − ∂f/∂z) d = f(z) − z`` solved at every step.

    Quadratic convergence near a root where ``I − ∂f/∂z`` is nonsingular (Kantorovich; Dennis & Schnabel,
    *Numerical Methods for Unconstrained Optimization and Nonlinear Equations*, 1996, Thm. 5.2.1), for
    either sign of the Jacobian, so it suits :func:`jdeq.root` where iterating ``z − g`` would expand.

    Attributes:
      linear_solver: :class:`jdeq.LU` (default) materialises ``∂f/∂z`` (``n`` Jacobian–vector products per
        step) and solves densely: for small states. A matrix-free :class:`jdeq.LinearSolver`
        (:class:`jdeq.GMRES`, :class:`jdeq.BiCGStab`, :class:`jdeq.Lineax` with any lineax solver) solves with
        Jacobian–vector products (an inexact Newton method: its tolerance bounds the step's accuracy).
      line_search, ls_steps, ls_c: the backtracking of :class:`~jdeq.solvers._line_search.LineSearchSolver`.
    """

    def init(self, x, fx):
        self.check_state_dtype(x)
        return ()

    def _direction(self, fn, x, g, state):
        _, jvp = jax.linearize(fn, x)
        return self._solve(self.linear_solver.init(jvp, g), jvp, g), state


class ChordState(NamedTuple):
    point: jax.Array  # (n,): the iterate of the last refresh, where ∂f/∂z is taken
    solver_state: Any  # the linear solver's state for I − ∂f/∂z there (LU: its factors)
    count: jax.Array  # steps taken (shared by a batch)


@dataclasses.dataclass(frozen=True)
class Chord(_NewtonType):
    """The chord method: Newton's step with ``∂f/∂z`` from the last refresh, every ``refresh`` steps.

    At steps ``0, refresh, 2·refresh, …`` the linear solver's state is rebuilt at the current iterate
    (:meth:`~jdeq.LinearSolver.init`) and kept in between. With :class:`jdeq.LU` (the default) that is the LU
    factorisation of ``I − ∂f/∂z`` (``n`` Jacobian–vector products), so the steps in between cost one
    evaluation of ``f`` and two triangular solves. Converges linearly near a root, at a rate that shrinks
    with the distance to the root (Kelley, *Iterative Methods for Linear and Nonlinear Equations*, SIAM
    1995, Thm. 5.4.1); ``refresh=1`` is Newton's method. A matrix-free solver has no state to keep: its
    products are taken at the stored refresh point, which linearises ``f`` there again each step, so a
    step costs what a Newton step with that solver costs.

    Attributes:
      refresh: steps between Jacobian refreshes, >= 1.
      linear_solver, line_search, ls_steps, ls_c: as in :class:`Newton`.
    """

    refresh: int = 5

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.refresh, int) and self.refresh >= 1, f"refresh must be an int >= 1, got {self.refresh!r}")

    def init(self, x, fx):
        """Zeros shaped like the state of a refresh (step 0 refreshes before any use)."""
        self.check_state_dtype(x)
        shapes = jax.eval_shape(lambda x: self.linear_solver.init(lambda v: v, x), x)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return ChordState(jnp.zeros_like(x), zeros, jnp.zeros((), jnp.int32))

    def _direction(self, fn, x, g, state):
        def refresh(_):
            _, jvp = jax.linearize(fn, x)
            return x, self.linear_solver.init(jvp, g)

        due = jnp.any(state.count % self.refresh == 0)  # one count for a batch (also when the state is per sample)
        point, solver_state = lax.cond(due, refresh, lambda _: (state.point, state.solver_state), None)
        _, jvp = jax.linearize(fn, point)  # unused (and compiled away) by a solver whose state holds the operator
        return self._solve(solver_state, jvp, g), ChordState(point, solver_state, state.count + 1)

    @property
    def batch_axes(self):
        return ChordState(point=0, solver_state=0, count=None)
