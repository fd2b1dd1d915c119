"""Linear solvers for the affine fixed points of the backward pass: ``u = M u + b``, i.e. ``(I − M) u = b``.

The implicit backward pass solves ``u = (∂f/∂z)ᵀ u + ḡ``. Every :class:`LinearSolver` takes the affine
map ``affine(u) = M u + b`` (matrix-free) and returns ``(u, stats)``; the nonlinear :class:`Solver`
root-finders solve the same fixed point by iterating the map (:func:`solve_linear_fixed_point`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg as jsp_linalg
from jax import lax

from ..stats import Result, Stats
from ._base import Solver, _check, check_stopping, per_row, residuals, run, settle, subclass_names

Array = jax.Array
AffineMap = Callable[[Array], Array]


def measured_stats(u: Array, fu: Array, num_steps: Any, code: Any = Result.MAX_STEPS) -> Stats:
    """Stats of ``u`` as a solution of ``u = fn(u)`` measured on ``fu = fn(u)``: residuals, ``code`` unless nonfinite."""
    abs_res, rel_res, _ = residuals(u, fu)
    steps = jnp.broadcast_to(jnp.asarray(num_steps, jnp.int32), abs_res.shape)
    code = jnp.where(jnp.isfinite(abs_res), code, Result.NONFINITE).astype(jnp.int32)
    return Stats(steps, steps + 1, rel_res, abs_res, code == Result.CONVERGED, code)


class LinearSolver(abc.ABC):
    """A solver of the affine fixed point ``u = affine(u) = M u + b`` (e.g. ``Implicit(solver=GMRES())``)."""

    @abc.abstractmethod
    def solve_fixed_point(self, affine: AffineMap, b: Array, x0: Optional[Array] = None) -> tuple[Array, Stats]:
        """Solve ``u = affine(u)`` from ``x0`` (default: ``b``); return ``(u, stats)``."""

    def solve_rows(self, affine: AffineMap, b: Array, x0: Optional[Array] = None) -> tuple[Array, Stats]:
        """Solve a batch ``(B, n)`` of independent systems (``affine`` maps the batch row by row): each row its own solve.

        Default: :meth:`solve_fixed_point` vmapped over the rows, ``affine`` evaluated on the batch.
        """
        row = per_row(affine, b)
        if x0 is None:
            return jax.vmap(lambda b: self.solve_fixed_point(row, b))(b)
        return jax.vmap(lambda b, x0: self.solve_fixed_point(row, b, x0))(b, x0)


@dataclasses.dataclass(frozen=True)
class _Krylov(LinearSolver):
    """A ``jax.scipy`` Krylov solve of ``(I − M) u = b``: stops when ``‖b − (I − M) u‖ <= max(atol, tol·‖b‖)``.

    ``jax.scipy`` does not report iteration counts, so ``stats.num_steps`` and ``num_evals`` are -1;
    the residual, ``converged`` and ``result`` are measured on the returned ``u`` (one extra
    application of ``M``).
    """

    tol: float = 1e-6
    atol: float = 0.0
    max_steps: int = 50

    def __post_init__(self):
        check_stopping(self.tol, self.atol, self.max_steps)

    def solve_fixed_point(self, affine, b, x0=None):
        u, _ = self._krylov(lambda v: v - (affine(v) - b), b, x0)
        abs_res, rel_res, fx_norm = residuals(u, affine(u))
        code = settle(Result.MAX_STEPS, self.tol, self.atol, abs_res, fx_norm)
        unknown = jnp.full(abs_res.shape, -1, jnp.int32)
        return u, Stats(unknown, unknown, rel_res, abs_res, code == Result.CONVERGED, code)

    def solve_rows(self, affine, b, x0=None):
        """A batch ``(B, n)`` as one block-diagonal system, with ``B · max_steps`` Krylov iterations.

        ``jax.scipy``'s solvers transpose their operator, which a row map that evaluates ``f`` on the
        whole batch cannot be, so they do not run per row: one solve stops on the batch's residual
        norm (``tol`` relative to the whole ``b``); ``stats`` are measured per row.
        """
        return dataclasses.replace(self, max_steps=self.max_steps * b.shape[0]).solve_fixed_point(affine, b, x0)

    @abc.abstractmethod
    def _krylov(self, matvec, b, x0):
        """``jax.scipy.sparse.linalg`` solve of ``matvec(u) = b`` from ``x0``."""


@dataclasses.dataclass(frozen=True)
class GMRES(_Krylov):
    """Restarted GMRES (``jax.scipy.sparse.linalg.gmres``); ``max_steps`` bounds its Krylov iterations.

    Attributes:
      restart: Krylov subspace size per restart (capped at ``max_steps``).
    """

    restart: int = 20

    def __post_init__(self):
        super().__post_init__()
        _check(
            isinstance(self.restart, int) and self.restart >= 1, f"restart must be an int >= 1, got {self.restart!r}"
        )

    def _krylov(self, matvec, b, x0):
        restart = min(self.restart, self.max_steps)
        restarts = -(-self.max_steps // restart)
        return jsp_linalg.gmres(matvec, b, x0, tol=self.tol, atol=self.atol, restart=restart, maxiter=restarts)


@dataclasses.dataclass(frozen=True)
class BiCGStab(_Krylov):
    """BiCGStab (``jax.scipy.sparse.linalg.bicgstab``); ``max_steps`` bounds its iterations."""

    def _krylov(self, matvec, b, x0):
        return jsp_linalg.bicgstab(matvec, b, x0, tol=self.tol, atol=self.atol, maxiter=self.max_steps)


@dataclasses.dataclass(frozen=True)
class Neumann(LinearSolver):
    """Truncated Neumann series for the adjoint: ``u = Σ_{i<k} Mⁱ b ≈ (I − M)^{-1} b``.

    Use as the adjoint solver of :class:`jdeq.Implicit` (``Implicit(solver=Neumann(k))``). It costs
    ``k − 1`` vector–Jacobian products (plus one to measure the residual for the backward stats) and
    converges to the implicit gradient as ``k → ∞`` when the spectral radius of ``M = (∂f/∂z)ᵀ`` is
    below one, with error ``O(ρ^k)``. ``k = 1`` is the Jacobian-free gradient ``u = ḡ`` (Fung et al.,
    arXiv 2103.12803); see Geng et al., arXiv 2111.05177 for the analysis of such approximations.
    From a start ``x0`` it takes ``k`` steps ``u ← M u + b``, i.e. ``Mᵏ x0 + Σ_{i<k} Mⁱ b``.

    Attributes:
      k: number of series terms, >= 1.
    """

    k: int

    def __post_init__(self):
        _check(isinstance(self.k, int) and self.k >= 1, f"Neumann k must be an int >= 1, got {self.k!r}")

    def solve_fixed_point(self, affine, b, x0=None):
        steps = self.k - 1 if x0 is None else self.k
        u = lax.fori_loop(0, steps, lambda _, u: affine(u), b if x0 is None else x0)
        return u, measured_stats(u, affine(u), steps)


@dataclasses.dataclass(frozen=True)
class Lineax(LinearSolver):
    """Any `lineax <https://github.com/patrick-kidger/lineax>`_ solver on ``(I − M) u = b`` (lineax is optional).

    ``Implicit(solver=jdeq.Lineax(lineax.GMRES(rtol=1e-6, atol=1e-8)))``. The operator is matrix-free
    (``lineax.FunctionLinearOperator``); direct solvers (``lineax.LU()``) materialise it. ``converged``
    is lineax's own success flag on a finite residual; ``num_steps`` is lineax's count where it
    reports one, else -1.

    Attributes:
      solver: a ``lineax.AbstractLinearSolver``.
    """

    solver: Any

    def solve_rows(self, affine, b, x0=None):
        """Each row its own solve, for lineax's matrix-free iterative solvers (a direct solver would
        materialise the operator with ``jax.jacfwd``, which a row map evaluating ``f`` on the batch cannot)."""
        import lineax

        iterative = (lineax.GMRES, lineax.BiCGStab, lineax.CG, lineax.LSMR)
        _check(
            isinstance(self.solver, iterative),
            f"Lineax({type(self.solver).__name__}) cannot solve per row in a batch solve (fixed_point_batch, the "
            "layers): use one of lineax's iterative solvers (GMRES, BiCGStab, CG, LSMR)",
        )
        return super().solve_rows(affine, b, x0)

    def solve_fixed_point(self, affine, b, x0=None):
        import lineax

        operator = lineax.FunctionLinearOperator(lambda v: v - (affine(v) - b), jax.eval_shape(lambda: b))
        options = {} if x0 is None else {"y0": x0}
        sol = lineax.linear_solve(operator, b, self.solver, options=options, throw=False)
        ok = sol.result == lineax.RESULTS.successful
        steps = sol.stats.get("num_steps", -1)
        return sol.value, measured_stats(
            sol.value, affine(sol.value), steps, jnp.where(ok, Result.CONVERGED, Result.MAX_STEPS)
        )


AdjointSolver = Union[Solver, LinearSolver]


def check_adjoint_solver(solver: Any, owner: str) -> None:
    """ValueError unless ``solver`` is a :class:`Solver`, a :class:`LinearSolver`, or None (reuse the forward solver)."""
    if solver is not None and not isinstance(solver, (Solver, LinearSolver)):
        raise ValueError(
            f"{owner}(solver=...) takes a jdeq Solver or LinearSolver ({subclass_names(Solver)}, {subclass_names(LinearSolver)}), "
            f"got {solver!r}"
        )


def solve_linear_fixed_point(
    solver: AdjointSolver, affine: AffineMap, b: Array, x0: Optional[Array] = None
) -> tuple[Array, Stats]:
    """Solve ``u = affine(u) = M u + b`` from ``x0`` (default ``b``, which saves the product ``M·0``); ``(u, stats)``.

    A :class:`LinearSolver` solves it its own way (a batch ``(B, n)`` row by row, each row its own
    solve); a :class:`Solver` iterates the affine map (a batch with the batch driver of :func:`run`).
    """
    if isinstance(solver, LinearSolver):
        solve = solver.solve_fixed_point if b.ndim == 1 else solver.solve_rows
        return solve(affine, b, x0)
    sol = run(solver, affine, b if x0 is None else x0)
    return sol.value, sol.stats
