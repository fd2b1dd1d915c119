"""Opt-in raising of failed solves from inside ``jax.jit`` (``fixed_point(..., throw=True)``)."""

from __future__ import annotations

import jax
import numpy as np

from .stats import Result, read_backward_stats

__all__ = ["SolveError", "raise_on_backward_failure", "raise_unless_converged"]


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


def _raise_if_backward_failed(probe_cotangent) -> None:
    stats = read_backward_stats(np.asarray(probe_cotangent))
    counts = np.asarray(stats.counts).reshape(-1, len(Result.FINAL)).sum(axis=0)
    bad = int(counts[Result.DIVERGED] + counts[Result.NONFINITE])
    if bad:
        raise SolveError(
            f"{bad} of {int(counts.sum())} backward (adjoint) solve(s) diverged or went nonfinite "
            f"(counts per result: {dict(zip(map(Result.name, Result.FINAL), counts.tolist()))}): the gradient is "
            "not usable; a contraction (spectral radius of ∂f/∂z below 1) or another adjoint solver is needed"
        )


@jax.custom_vjp
def raise_on_backward_failure(args, probe):
    """Identity on ``(args, probe)``; its backward raises :class:`SolveError` if the probe's cotangent
    (the backward solves' statistics, which arrive once the parameter cotangents are computed) reports
    a diverged or nonfinite backward solve."""
    return args, probe


def _identity_forward(args, probe):
    return (args, probe), None


def _check_backward(_, cotangents):
    jax.debug.callback(_raise_if_backward_failed, cotangents[1])
    return cotangents


raise_on_backward_failure.defvjp(_identity_forward, _check_backward)
