"""Krylov solvers for the linear adjoint system ``(I − Jᵀ) u = g`` of the implicit backward pass."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import jax.scipy.sparse.linalg as jsp_linalg

from ._base import Result, Stats, _check, check_stopping, residuals, settle


@dataclasses.dataclass(frozen=True)
class _Krylov:
    """Tolerances of a Krylov solve: stop when ``‖b − A u‖ <= max(atol, tol·‖b‖)``."""

    tol: float = 1e-6
    atol: float = 0.0
    max_steps: int = 50

    def __post_init__(self):
        check_stopping(self.tol, self.atol, self.max_steps)

    def solve_fixed_point(self, fn, b):
        """Solve ``u = fn(u)`` for the affine map ``fn(u) = Jᵀu + b``, i.e. ``(I − Jᵀ) u = b``.

        Returns ``(u, stats)``. ``jax.scipy`` does not report iteration counts, so
        ``stats.num_steps`` and ``num_evals`` are -1; the residual, ``converged`` and ``result`` are
        measured here on the returned ``u`` (one extra application of ``Jᵀ``).
        """
        u, _ = self._krylov(lambda v: v - (fn(v) - b), b)
        abs_res, rel_res, fx_norm = residuals(u, fn(u))
        code = settle(Result.MAX_STEPS, self.tol, self.atol, abs_res, fx_norm)
        unknown = jnp.full((), -1, jnp.int32)
        return u, Stats(unknown, unknown, rel_res, abs_res, code == Result.CONVERGED, code)


@dataclasses.dataclass(frozen=True)
class GMRES(_Krylov):
    """Restarted GMRES (``jax.scipy.sparse.linalg.gmres``); ``max_steps`` counts restarts.

    Attributes:
      restart: Krylov subspace size per restart.
    """

    restart: int = 20

    def __post_init__(self):
        super().__post_init__()
        _check(
            isinstance(self.restart, int) and self.restart >= 1, f"restart must be an int >= 1, got {self.restart!r}"
        )

    def _krylov(self, matvec, b):
        return jsp_linalg.gmres(matvec, b, tol=self.tol, atol=self.atol, restart=self.restart, maxiter=self.max_steps)


@dataclasses.dataclass(frozen=True)
class BiCGStab(_Krylov):
    """BiCGStab (``jax.scipy.sparse.linalg.bicgstab``); ``max_steps`` bounds its iterations."""

    def _krylov(self, matvec, b):
        return jsp_linalg.bicgstab(matvec, b, tol=self.tol, atol=self.atol, maxiter=self.max_steps)
