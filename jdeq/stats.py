"""Solve statistics: result codes, forward :class:`Stats`, backward statistics through a probe, summaries.

Forward statistics are outputs of a solve. The backward (adjoint) solve runs inside the gradient, so
its statistics leave through the cotangent of a *probe*, a zero array passed as
``fixed_point(..., backward_stats=probe)``. The probe's cotangent has an **additive layout**: one
count per result code, the summed step count and the summed residual. Under ``jax.vmap`` an
unbatched probe receives the sum over the batch, which is still meaningful (counts add up to the
number of backward solves); a batched probe keeps one row per sample.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

__all__ = [
    "BackwardStats",
    "PROBE_SIZE",
    "Result",
    "Stats",
    "encode_backward_stats",
    "read_backward_stats",
    "stats_probe",
    "summarize",
]

Array = jax.Array


class Result:
    """Integer result codes stored in :attr:`Stats.result`, in increasing order of severity.

    ``CONVERGED``: the residual met the tolerance. ``MAX_STEPS``: the step budget ran out first.
    ``DIVERGED``: the residual grew past ``divergence`` times its initial value.
    ``NONFINITE``: an input or an iterate held NaN or inf. ``RUNNING`` (-1): the driver's code while a
    solve goes on; in backward statistics it means that no backward solve ran.
    """

    CONVERGED = 0
    MAX_STEPS = 1
    DIVERGED = 2
    NONFINITE = 3
    RUNNING = -1
    NAMES = {0: "converged", 1: "max_steps", 2: "diverged", 3: "nonfinite", -1: "no solve"}
    FINAL = (CONVERGED, MAX_STEPS, DIVERGED, NONFINITE)

    @classmethod
    def name(cls, code) -> str:
        """The name of an integer result code (a Python int or a scalar array)."""
        return cls.NAMES[int(code)]


class Stats(NamedTuple):
    """What a solve did, returned as data (batched like the solve under ``jax.vmap``).

    Attributes:
      num_steps: iterations taken (int32; -1 where the solver does not count them).
      num_evals: evaluations of the map, the initial one included (int32).
      residual: relative residual ``‖f(z) − z‖ / ‖f(z)‖`` of the returned ``z``.
      abs_residual: absolute residual ``‖f(z) − z‖`` of the returned ``z``.
      converged: ``result == Result.CONVERGED``.
      result: a :class:`Result` code.
      trace: relative residual at steps ``0..max_steps`` (NaN after the last step) when the solver
        was built with ``trace=True``, else ``None``.
    """

    num_steps: Array
    num_evals: Array
    residual: Array
    abs_residual: Array
    converged: Array
    result: Array
    trace: Optional[Array] = None


class BackwardStats(NamedTuple):
    """Backward (adjoint) solves reported to one probe row, decoded by :func:`read_backward_stats`.

    Attributes:
      num_solves: backward solves reported (0: no solve ran, e.g. ``Phantom``/``Unrolled``).
      counts: ``(..., 4)`` number of solves per :class:`Result` code (converged, max_steps, diverged,
        nonfinite); they add up to ``num_solves``.
      num_steps: steps summed over the solves (negative when the solver does not count steps).
      residual: mean relative residual over the solves (NaN if any was nonfinite).
      converged: every reported solve converged (and at least one was reported).
      result: the worst code among the solves (``Result.RUNNING`` when none was reported).
    """

    num_solves: Array
    counts: Array
    num_steps: Array
    residual: Array
    converged: Array
    result: Array


PROBE_SIZE = len(Result.FINAL) + 2  # one count per final code, summed steps, summed residual


def stats_probe(batch_shape: tuple[int, ...] = ()) -> Array:
    """A zero array whose gradient carries the backward solves' statistics.

    Pass it as ``fixed_point(..., backward_stats=probe)``, differentiate the loss with respect to it
    too, and decode the gradient with :func:`read_backward_stats`::

        grads, probe_grad = jax.grad(loss, argnums=(0, 1))(params, jdeq.stats_probe())
        jdeq.read_backward_stats(probe_grad).num_steps

    An unbatched probe used by several solves (``jax.vmap``, several layers) receives their sum,
    which decodes to counts per result code and summed steps; give it a batch dimension
    (``stats_probe((batch,))``, mapped along axis 0) to keep one row per sample.
    """
    return jnp.zeros((*batch_shape, PROBE_SIZE), jnp.float32)


def encode_backward_stats(stats: Stats, probe: Array) -> Array:
    """Backward stats in the probe's additive layout ``[one-hot result, steps, residual]``, shaped like ``probe``.

    Per-sample stats ``(B,)`` for an unbatched probe are summed over the samples; one solve's stats
    for a batched probe go to every row.
    """
    dtype = probe.dtype
    codes = jnp.asarray(Result.FINAL, jnp.int32).reshape((1,) * stats.result.ndim + (-1,))
    one_hot = (codes == stats.result[..., None]).astype(dtype)  # explicit ranks: rank promotion may raise
    rest = jnp.stack([stats.num_steps.astype(dtype), stats.residual.astype(dtype)], axis=-1)
    encoded = jnp.concatenate([one_hot, rest], axis=-1)
    extra = encoded.ndim - probe.ndim
    return jnp.broadcast_to(jnp.sum(encoded, axis=tuple(range(extra))) if extra > 0 else encoded, probe.shape)


def read_backward_stats(probe_grad: Array) -> BackwardStats:
    """Decode the gradient of a :func:`stats_probe` (any leading batch shape) into :class:`BackwardStats`."""
    counts = jnp.round(probe_grad[..., : len(Result.FINAL)]).astype(jnp.int32)
    num_solves = jnp.sum(counts, axis=-1, dtype=jnp.int32)
    steps, residual_sum = probe_grad[..., -2], probe_grad[..., -1]
    present = counts > 0
    worst = jnp.max(jnp.where(present, jnp.asarray(Result.FINAL, jnp.int32), Result.RUNNING), axis=-1)
    return BackwardStats(
        num_solves=num_solves,
        counts=counts,
        num_steps=jnp.round(steps).astype(jnp.int32),
        residual=residual_sum / jnp.maximum(num_solves, 1).astype(residual_sum.dtype),
        converged=(num_solves > 0) & (counts[..., Result.CONVERGED] == num_solves),
        result=worst.astype(jnp.int32),
    )


def summarize(stats: Stats, prefix: str = "") -> dict[str, Array]:
    """Scalar float32 summaries of per-sample :class:`Stats` over every sample, for metrics and logs.

    Call it inside the jitted step on the stats of the global batch (any sharding): means and maxima
    are over every sample on every device. A NaN residual counts as ``inf`` in ``max_residual`` so a
    failed sample cannot hide behind ``max``.

    Returns:
      ``{prefix}mean_steps``, ``max_steps``, ``mean_residual``, ``max_residual``,
        ``converged_fraction`` and ``count_<result name>`` for each final :class:`Result` code.
    """
    steps = jnp.ravel(stats.num_steps).astype(jnp.float32)
    residual = jnp.ravel(stats.residual).astype(jnp.float32)
    residual = jnp.where(jnp.isnan(residual), jnp.inf, residual)
    result = jnp.ravel(stats.result)
    summary = {
        "mean_steps": jnp.mean(steps),
        "max_steps": jnp.max(steps, initial=0.0),
        "mean_residual": jnp.mean(residual),
        "max_residual": jnp.max(residual, initial=0.0),
        "converged_fraction": jnp.mean(jnp.ravel(stats.converged).astype(jnp.float32)),
    }
    for code in Result.FINAL:
        summary[f"count_{Result.name(code)}"] = jnp.sum(result == code).astype(jnp.float32)
    return {prefix + key: value for key, value in summary.items()}
