"""Linear solvers for the affine fixed points of the backward pass and of Newton's step: ``u = M u + b``.

Every system here is ``(I − M) u = b`` with ``M`` given as a matrix-free product ``matvec(u) = M u``
(the adjoint ``u = (∂f/∂z)ᵀ u + ḡ``, Newton's ``(I − ∂f/∂z) d = g``). A :class:`LinearSolver` works in two
phases, as lineax's do: ``state = init(matvec, b)`` prepares what depends on ``M`` alone (a dense
factorisation for :class:`LU`; nothing for the matrix-free solvers), then ``solve(state, matvec, b, x0)``
solves for one right-hand side, so a solver such as :class:`jdeq.Chord` can keep the state across steps.
The state is a pytree of arrays (it may be a loop carry); the closure ``matvec`` is passed again to ``solve``.

Any adjoint solver, a :class:`LinearSolver` or a root-finder :class:`Solver`, offers
``solve_linear(matvec, b, x0) -> (u, stats)``; the gradient modes call only that.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsp_linalg
from jax import lax

from .._numerics import check, check_stopping, lineax_hint, subclass_names
from .._sharding import vary_like, varying_axes
from ..stats import Result, Stats
from ._base import Solver, per_row, residuals, settle
from ._krylov import bicgstab, gmres

__all__ = [
    "GMRES",
    "LU",
    "BiCGStab",
    "LinearSolver",
    "Lineax",
    "Neumann",
    "check_adjoint_solver",
    "dense_operator",
    "measured_stats",
]

Array = jax.Array
LinearMap = Callable[[Array], Array]


def measured_stats(u: Array, fu: Array, num_steps: Any, code: Any = Result.MAX_STEPS) -> Stats:
    """Stats of ``u`` as a solution of ``u = fn(u)`` measured on ``fu = fn(u)``: residuals, ``code`` unless nonfinite."""
    abs_res, rel_res, _ = residuals(u, fu)
    steps = jnp.broadcast_to(jnp.asarray(num_steps, jnp.int32), abs_res.shape)
    code = jnp.where(jnp.isfinite(abs_res), code, Result.NONFINITE).astype(jnp.int32)
    return Stats(steps, steps + 1, rel_res, abs_res, code == Result.CONVERGED, code)


class LinearSolver(abc.ABC):
    """A solver of ``(I − M) u = b``, i.e. the affine fixed point ``u = M u + b`` (``Implicit(solver=GMRES())``).

    Subclasses implement :meth:`solve` for one system ``b`` of shape ``(n,)``; :meth:`init` prepares a
    state from ``M`` alone (default: none). A batch ``(B, n)``, with ``matvec`` mapping it row by row,
    is solved row by row (:meth:`solve_rows`).
    """

    def init(self, matvec: LinearMap, b: Array) -> Any:
        """What the solves with ``M`` share (a pytree of arrays); ``b`` gives the shape: ``(n,)`` or a batch ``(B, n)``."""
        return ()

    @abc.abstractmethod
    def solve(self, state: Any, matvec: LinearMap, b: Array, x0: Optional[Array] = None) -> tuple[Array, Stats]:
        """Solve ``u = M u + b`` for one ``b`` of shape ``(n,)`` from ``x0`` (default: ``b``); return ``(u, stats)``."""

    def solve_rows(self, state: Any, matvec: LinearMap, b: Array, x0: Optional[Array] = None) -> tuple[Array, Stats]:
        """Solve a batch ``(B, n)`` of independent systems (``matvec`` maps the batch row by row): each row its own solve.

        Default: :meth:`solve` vmapped over the rows with a shared ``state``, ``matvec`` evaluated on the batch.
        """
        row = per_row(matvec, b)
        if x0 is None:
            return jax.vmap(lambda b: self.solve(state, row, b))(b)
        return jax.vmap(lambda b, x0: self.solve(state, row, b, x0))(b, x0)

    def solve_linear(self, matvec: LinearMap, b: Array, x0: Optional[Array] = None) -> tuple[Array, Stats]:
        """:meth:`init` then :meth:`solve` (one system) or :meth:`solve_rows` (a batch): the adjoint-solver interface."""
        state = self.init(matvec, b)
        return (self.solve if b.ndim == 1 else self.solve_rows)(state, matvec, b, x0)

    @property
    def unrollable(self) -> bool:
        """Whether :meth:`solve` is reverse-differentiable (no inner ``while_loop``): ``Unrolled`` through Newton needs it."""
        return False


def dense_operator(matvec: LinearMap, b: Array) -> Array:
    """The matrix of a linear map: ``(n, n)`` for ``b`` of shape ``(n,)``, ``(B, n, n)`` for a batch mapped row by row.

    ``n`` products with the basis vectors; for a batch each product runs ``matvec`` once on the whole
    batch (the rows are independent, so the basis vector ``e_j`` in every row gives every row's column ``j``).
    """
    basis = vary_like(jnp.eye(b.shape[-1], dtype=b.dtype), b)  # inside shard_map: a tangent varies like b
    columns = jax.vmap(lambda e: matvec(jnp.broadcast_to(e, b.shape)))(basis)  # (n, [B,] n): column j first
    return jnp.moveaxis(columns, 0, -1)


_lu_factor = jnp.vectorize(
    lambda a: tuple(v.astype(jnp.int32) if i else v for i, v in enumerate(jsp_linalg.lu_factor(a))),
    signature="(n,n)->(n,n),(n)",
)
_lu_solve = jnp.vectorize(lambda lu, pivots, b: jsp_linalg.lu_solve((lu, pivots), b), signature="(n,n),(n),(n)->(n)")


@dataclasses.dataclass(frozen=True)
class LU(LinearSolver):
    """Dense LU: ``I − M`` materialised (``n`` products with ``M``) and factorised in :meth:`init`; its state is the factors.

    For small states ``n``: the default linear solve of :class:`jdeq.Newton` and :class:`jdeq.Chord` (which
    keeps the factors between refreshes), and an exact adjoint solver (``Implicit(solver=jdeq.LU())``) that
    costs ``n`` vector–Jacobian products and an ``O(n³)`` factorisation per backward pass. A batch ``(B, n)``
    is ``B`` factorisations of ``(n, n)``, batched (``matvec`` runs ``n`` times on the whole batch). The
    stats measure the residual of the returned ``u`` (one more product with ``M``); ``num_steps`` is 1.

    Attributes:
      tol: the solve counts as converged when ``‖u − (M u + b)‖ <= tol·‖M u + b‖``. LU with partial pivoting
        is backward stable (residual ~ ``n·eps`` times the growth factor), so the default ``1e-4`` flags a
        singular or badly scaled system, also in float32, rather than the accuracy of a good one.
    """

    tol: float = 1e-4

    def __post_init__(self):
        check(self.tol > 0, f"tol must be > 0, got {self.tol}")

    def init(self, matvec, b):
        """``(lu, pivots)`` of ``I − M``: ``(n, n)`` and ``(n,)``, with a leading batch axis for a batch."""
        m = dense_operator(matvec, b)
        return _lu_factor(jnp.broadcast_to(jnp.eye(b.shape[-1], dtype=m.dtype), m.shape) - m)

    def solve(self, state, matvec, b, x0=None):
        """``u = (I − M)^{-1} b`` from the factors (``x0`` is not needed by a direct solve); ``b`` may be a batch."""
        lu, pivots = state
        u = _lu_solve(lu, pivots, b)
        abs_res, rel_res, fx_norm = residuals(u, matvec(u) + b)
        code = settle(Result.MAX_STEPS, self.tol, 0.0, abs_res, fx_norm)
        one = jnp.ones(abs_res.shape, jnp.int32)
        return u, Stats(one, one + 1, rel_res, abs_res, code == Result.CONVERGED, code)

    def solve_rows(self, state, matvec, b, x0=None):
        """One batched triangular solve per row's factors."""
        return self.solve(state, matvec, b, x0)

    @property
    def unrollable(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class _Krylov(LinearSolver):
    """A Krylov solve of ``(I − M) u = b``: stops when ``‖b − (I − M) u‖ <= max(atol, tol·‖b‖)``.

    The iterations (``jdeq/solvers/_krylov.py``; their loops also trace inside ``jax.shard_map``) are not
    counted: ``stats.num_steps`` and ``num_evals`` are -1; the residual, ``converged`` and ``result`` are
    measured on the returned ``u`` (one extra application of ``M``).
    """

    tol: float = 1e-6
    atol: float = 0.0
    max_steps: int = 50

    def __post_init__(self):
        check_stopping(self.tol, self.atol, self.max_steps)

    def solve(self, state, matvec, b, x0=None):
        u = self._krylov(lambda v: v - matvec(v), b, x0)
        abs_res, rel_res, fx_norm = residuals(u, matvec(u) + b)
        code = settle(Result.MAX_STEPS, self.tol, self.atol, abs_res, fx_norm)
        unknown = jnp.full(abs_res.shape, -1, jnp.int32)
        return u, Stats(unknown, unknown, rel_res, abs_res, code == Result.CONVERGED, code)

    def solve_rows(self, state, matvec, b, x0=None):
        """A batch ``(B, n)`` as one block-diagonal system, with ``B · max_steps`` Krylov iterations.

        One loop for the batch, each product one evaluation of ``matvec`` on the whole batch: the solve
        stops on the batch's residual norm (``tol`` relative to the whole ``b``); ``stats`` are measured per row.
        """
        return dataclasses.replace(self, max_steps=self.max_steps * b.shape[0]).solve(state, matvec, b, x0)

    @abc.abstractmethod
    def _krylov(self, matvec, b, x0):
        """The solution ``u`` of ``matvec(u) = b`` from ``x0`` (default 0)."""


@dataclasses.dataclass(frozen=True)
class GMRES(_Krylov):
    """Restarted GMRES (Saad & Schultz 1986); ``max_steps`` bounds its Krylov iterations.

    Attributes:
      restart: Krylov subspace size per restart (capped at ``max_steps``).
    """

    restart: int = 20

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.restart, int) and self.restart >= 1, f"restart must be an int >= 1, got {self.restart!r}")

    def _krylov(self, matvec, b, x0):
        return gmres(matvec, b, x0, tol=self.tol, atol=self.atol, restart=self.restart, max_steps=self.max_steps)


@dataclasses.dataclass(frozen=True)
class BiCGStab(_Krylov):
    """BiCGStab (van der Vorst 1992), unpreconditioned; ``max_steps`` bounds its iterations."""

    def _krylov(self, matvec, b, x0):
        return bicgstab(matvec, b, x0, tol=self.tol, atol=self.atol, max_steps=self.max_steps)


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
        check(isinstance(self.k, int) and self.k >= 1, f"Neumann k must be an int >= 1, got {self.k!r}")

    def solve(self, state, matvec, b, x0=None):
        steps = self.k - 1 if x0 is None else self.k
        u = lax.fori_loop(0, steps, lambda _, u: matvec(u) + b, b if x0 is None else x0)
        return u, measured_stats(u, matvec(u) + b, steps)


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

    def solve_rows(self, state, matvec, b, x0=None):
        """Each row its own solve, for lineax's matrix-free iterative solvers (a direct solver would
        materialise the operator with ``jax.jacfwd``, which a row map evaluating ``f`` on the batch cannot)."""
        import lineax

        iterative = (lineax.GMRES, lineax.BiCGStab, lineax.CG, lineax.LSMR)
        check(
            isinstance(self.solver, iterative),
            f"Lineax({type(self.solver).__name__}) cannot solve per row in a batch solve (fixed_point_batch, the "
            "layers): use one of lineax's iterative solvers (GMRES, BiCGStab, CG, LSMR)",
        )
        return super().solve_rows(state, matvec, b, x0)

    def solve(self, state, matvec, b, x0=None):
        import lineax

        check(
            not varying_axes(b),
            f"Lineax({type(self.solver).__name__}) cannot solve inside jax.shard_map with per-device data (lineax "
            f"traces its operator on arrays without the varying mesh axes {sorted(varying_axes(b))}): use "
            "jdeq.GMRES, jdeq.BiCGStab, jdeq.LU or jdeq.Neumann there",
        )
        operator = lineax.FunctionLinearOperator(lambda v: v - matvec(v), jax.eval_shape(lambda: b))
        options = {} if x0 is None else {"y0": x0}
        sol = lineax.linear_solve(operator, b, self.solver, options=options, throw=False)
        ok = sol.result == lineax.RESULTS.successful
        steps = sol.stats.get("num_steps", -1)
        return sol.value, measured_stats(
            sol.value, matvec(sol.value) + b, steps, jnp.where(ok, Result.CONVERGED, Result.MAX_STEPS)
        )


AdjointSolver = Any  # a LinearSolver or a Solver: anything with solve_linear(matvec, b, x0) -> (u, stats)


def check_adjoint_solver(solver: Any, owner: str) -> None:
    """ValueError unless ``solver`` is None (reuse the forward solver) or offers ``solve_linear`` (see :class:`LinearSolver`)."""
    check(
        solver is None or callable(getattr(solver, "solve_linear", None)),
        f"{owner}(solver=...) takes a jdeq Solver or LinearSolver ({subclass_names(Solver)}, "
        f"{subclass_names(LinearSolver)}), got {solver!r}{lineax_hint(solver)}",
    )
