"""Failed solves made visible: :class:`ConvergenceWarning` for eager solves that did not converge, and opt-in
raising from inside ``jax.jit`` (``fixed_point(..., throw=True)``)."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np

from .stats import Result, read_backward_stats

__all__ = [
    "ConvergenceWarning",
    "SolveError",
    "convergence_report",
    "raise_on_backward_failure",
    "raise_unless_converged",
    "warn_unless_converged",
]

WHAT_TO_TRY = (
    "try more max_steps, a looser tol, weight or spectral normalisation of the map (jdeq.WeightNorm, "
    "jdeq.spectral_normalize), a lower learning rate, or another solver"
)


class SolveError(RuntimeError):
    """A solve called with ``throw=True`` did not converge (or a ``fit(..., on_nonconvergence="raise")`` run)."""


class ConvergenceWarning(UserWarning):
    """A fixed-point or root solve did not converge: its value is not an equilibrium (or root) to the tolerance.

    Warned by :func:`jdeq.fixed_point`, :func:`jdeq.root`, :func:`jdeq.fixed_point_batch` and the Flax layers
    when called outside ``jax.jit`` (inside it the :class:`jdeq.Stats` and ``throw=True`` are the record), and by
    :func:`jdeq.train.fit` after each epoch (``on_nonconvergence``). Make it an error with
    ``warnings.simplefilter("error", jdeq.ConvergenceWarning)``.
    """


def convergence_report(
    what: str,
    fraction: float,
    mean_steps: float,
    max_steps: float,
    residual: float,
    *,
    step_cap: Any = None,
    tol: Any = None,
) -> str:
    """One line: ``what`` converged ``fraction`` of its solves, steps (mean, max) against the step cap, the residual
    reached against the tolerance, and what to try."""
    cap = "" if step_cap is None else f" of max_steps={step_cap}"
    target = "" if tol is None else f" (tol={tol:g})"
    return (
        f"{what}: {fraction:.1%} of the solves converged; steps mean {mean_steps:.1f}, max {max_steps:.0f}{cap}; "
        f"largest relative residual {residual:.3e}{target}; {WHAT_TO_TRY}"
    )


def warn_unless_converged(stats, solver: Any, what: str = "fixed_point", stacklevel: int = 3) -> None:
    """Warn :class:`ConvergenceWarning` if a concrete (not traced) solve's ``stats`` report a failed solve."""
    leaves = (stats.converged, stats.num_steps, stats.residual)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return
    converged, steps, residual = (np.asarray(leaf) for leaf in leaves)
    if converged.all():
        return
    residual = np.where(np.isnan(residual), np.inf, residual).astype(np.float64)
    message = convergence_report(
        what,
        float(converged.mean()),
        float(steps.mean()),
        float(steps.max()),
        float(residual.max()),
        step_cap=getattr(solver, "max_steps", None),
        tol=getattr(solver, "tol", None),
    )
    warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel)


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
