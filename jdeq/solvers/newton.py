"""Newton's method and the chord method on ``g(z) = f(z) − z``, dense or matrix-free."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsp_linalg
from jax import lax

from ._base import Solver, _check, norm
from ._line_search import advance, check_line_search
from .linear import LinearSolver, solve_linear_fixed_point


def dense_jacobian(fn, x):
    """``∂fn/∂x``: ``(n, n)`` for one problem, ``(B, n, n)`` for a batch ``(B, n)`` that ``fn`` maps row by row.

    ``n`` Jacobian–vector products with the basis vectors; for a batch each product runs ``fn`` once on
    the whole batch (the rows are independent, so the basis vector ``e_j`` in every row gives every
    row's column ``j``).
    """
    _, jvp = jax.linearize(fn, x)
    basis = jnp.eye(x.shape[-1], dtype=x.dtype)
    columns = jax.vmap(lambda e: jvp(jnp.broadcast_to(e, x.shape)))(basis)  # (n, [B,] n): column j first
    return jnp.moveaxis(columns, 0, -1)


def _identity_minus(jacobian):
    """``I − J`` for one ``(n, n)`` or a batch ``(B, n, n)`` of Jacobians (broadcast explicitly: rank promotion may raise)."""
    return jnp.broadcast_to(jnp.eye(jacobian.shape[-1], dtype=jacobian.dtype), jacobian.shape) - jacobian


_lu_factor = jnp.vectorize(
    lambda a: tuple(v.astype(jnp.int32) if i else v for i, v in enumerate(jsp_linalg.lu_factor(a))),
    signature="(n,n)->(n,n),(n)",
)
_lu_solve = jnp.vectorize(lambda lu, pivots, b: jsp_linalg.lu_solve((lu, pivots), b), signature="(n,n),(n),(n)->(n)")


@dataclasses.dataclass(frozen=True)
class _NewtonType(Solver):
    """Fields and the step shared by :class:`Newton` and :class:`Chord`: ``z⁺ = z + α d``, ``(I − J) d = g``.

    With ``g(z) = f(z) − z`` and ``J`` an approximation of ``∂f/∂z``, ``d = (I − J)^{-1} g`` is the
    Newton direction ``−(∂g/∂z)^{-1} g``; nothing is assumed about the sign of the Jacobian.
    ``Stats.num_evals`` counts evaluations of ``f``; the Jacobian products of the linear solves are not
    counted.
    """

    line_search: bool = False
    ls_steps: int = 4
    ls_c: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        check_line_search(self.ls_steps, self.ls_c)

    def step(self, fn, x, fx, state):
        g = fx - x
        direction, state = self._direction(fn, x, g, state)
        x_new, fx_new, used = advance(fn, x, direction, norm(g), self.line_search, self.ls_steps, self.ls_c)
        return x_new, fx_new, state, used

    def batch_step(self, fn, x, fx, state, axes):
        """The step on the whole batch: ``fn`` maps the rows independently, so its Jacobian is block diagonal
        and every linear solve is one solve per row."""
        return self.step(fn, x, fx, state)

    def _direction(self, fn, x, g, state):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Newton(_NewtonType):
    """Newton's method: ``z⁺ = z + α d`` with ``(I − ∂f/∂z) d = f(z) − z`` solved at every step.

    Quadratic convergence near a root where ``I − ∂f/∂z`` is nonsingular (Kantorovich; Dennis & Schnabel,
    *Numerical Methods for Unconstrained Optimization and Nonlinear Equations*, 1996, Thm. 5.2.1), for
    either sign of the Jacobian, so it suits :func:`jdeq.root` where iterating ``z − g`` would expand.

    Attributes:
      linear_solver: ``None`` materialises ``∂f/∂z`` (``n`` Jacobian–vector products per step) and solves
        densely (LU): for small states. A :class:`jdeq.LinearSolver` (:class:`jdeq.GMRES`,
        :class:`jdeq.BiCGStab`, :class:`jdeq.Lineax` with any lineax solver) solves matrix-free with
        Jacobian–vector products (an inexact Newton method: its tolerance bounds the step's accuracy).
      line_search: backtrack ``α = 1, ½, ¼, …`` until ``‖g(z⁺)‖ <= (1 − c α)‖g(z)‖``.
      ls_steps: most backtracking evaluations per step.
      ls_c: sufficient-decrease constant ``c`` in ``(0, 1)``.
    """

    linear_solver: Optional[LinearSolver] = None

    def __post_init__(self):
        super().__post_init__()
        _check(
            self.linear_solver is None or isinstance(self.linear_solver, LinearSolver),
            f"linear_solver must be None (dense) or a jdeq LinearSolver, got {self.linear_solver!r}",
        )

    def init(self, x, fx):
        return ()

    def _direction(self, fn, x, g, state):
        if self.linear_solver is None:
            return jnp.linalg.solve(_identity_minus(dense_jacobian(fn, x)), g[..., None])[..., 0], state
        _, jvp = jax.linearize(fn, x)
        direction, _ = solve_linear_fixed_point(self.linear_solver, lambda d: jvp(d) + g, g)
        return direction, state

    @property
    def unrollable(self) -> bool:
        return self.linear_solver is None and not self.line_search  # Krylov solves and backtracking are loops


class ChordState(NamedTuple):
    lu: jax.Array  # (n, n): LU factors of I − ∂f/∂z at the last refresh
    pivots: jax.Array  # (n,) int32
    count: jax.Array  # steps taken (shared by a batch)


@dataclasses.dataclass(frozen=True)
class Chord(_NewtonType):
    """The chord method: Newton's step with ``∂f/∂z`` from the last refresh, every ``refresh`` steps.

    ``I − ∂f/∂z`` is materialised (``n`` Jacobian–vector products) and LU-factorised at steps
    ``0, refresh, 2·refresh, …``; the steps in between cost one evaluation of ``f`` and two triangular
    solves. Converges linearly near a root, at a rate that shrinks with the distance to the root
    (Kelley, *Iterative Methods for Linear and Nonlinear Equations*, SIAM 1995, Thm. 5.4.1);
    ``refresh=1`` is Newton's method. Dense only: a matrix-free chord step would linearise ``f`` at the
    stored point again every step, which costs what a Newton step costs.

    Attributes:
      refresh: steps between Jacobian refreshes, >= 1.
      line_search, ls_steps, ls_c: as in :class:`Newton`.
    """

    refresh: int = 5

    def __post_init__(self):
        super().__post_init__()
        _check(
            isinstance(self.refresh, int) and self.refresh >= 1, f"refresh must be an int >= 1, got {self.refresh!r}"
        )

    def init(self, x, fx):
        n = x.shape[-1]
        return ChordState(jnp.zeros((n, n), x.dtype), jnp.zeros((n,), jnp.int32), jnp.zeros((), jnp.int32))

    def _direction(self, fn, x, g, state):
        def factorise(_):
            return _lu_factor(_identity_minus(dense_jacobian(fn, x)))

        due = jnp.any(state.count % self.refresh == 0)  # one count for a batch (also when the state is per sample)
        lu, pivots = lax.cond(due, factorise, lambda _: (state.lu, state.pivots), None)
        return _lu_solve(lu, pivots, g), ChordState(lu, pivots, state.count + 1)

    @property
    def batch_axes(self):
        return ChordState(lu=0, pivots=0, count=None)

    @property
    def unrollable(self) -> bool:
        return not self.line_search
