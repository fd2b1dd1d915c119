"""Opt-in raising of failed solves from inside ``jax.jit`` (``fixed_point(..., throw=True)``)."""

from __future__ import annotations

import jax
import numpy as np

from .solvers import Result


class SolveError(RuntimeError):
    """A solve called with ``throw=True`` did not converge."""


def _raise_unless_converged(result, residual, num_steps) -> None:
    result, residual, num_steps = map(np.asarray, (result, residual, num_steps))
    failed = result != Result.CONVERGED
    if np.any(failed):
        i = int(np.flatnonzero(failed.ravel())[0])
        raise SolveError(
            f"{int(failed.sum())} of {failed.size} fixed-point solve(s) did not converge; first failure: "
            f"result={Result.name(result.ravel()[i])}, residual={residual.ravel()[i]:.3e}, "
            f"steps={num_steps.ravel()[i]}"
        )


def raise_unless_converged(stats) -> None:
    """Raise :class:`SolveError` at run time if any solve failed.

    Runs as a ``jax.debug.callback`` so it works under ``jit`` and ``vmap``; under ``jit`` JAX re-raises
    it as a ``JaxRuntimeError`` (an ``XlaRuntimeError``) whose message contains the SolveError text.
    """
    jax.debug.callback(_raise_unless_converged, stats.result, stats.residual, stats.num_steps)
