"""Timing and memory helpers: variants timed interleaved, per-process CPU time on CPU, min/median/max.

On a shared CPU machine wall time measures the neighbours as much as the code; the CPU time of this
process (``time.process_time``: every thread of the process, nothing else) does not, as long as XLA
and PyTorch each run one thread (:func:`set_cpu_threads`). On a GPU the clock is wall time around a
synchronised call. Variants are timed round-robin (one call of each per round) so that a slow phase
of the machine falls on all of them alike.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import jax


def set_cpu_threads(threads: int) -> None:
    """Run this process on ``threads`` CPU cores; call before JAX first uses the CPU backend.

    XLA's CPU backend has no thread-count flag (``intra_op_parallelism_threads`` is not an XLA flag and
    is ignored in ``XLA_FLAGS``): with one thread, ``--xla_cpu_multi_thread_eigen=false`` keeps its
    Eigen kernels single-threaded; for any count the process's CPU affinity is pinned to that many
    cores, which bounds XLA's and PyTorch's thread pools alike.
    """
    if threads == 1:
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false " + os.environ.get("XLA_FLAGS", "")
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:threads])


def clock_for(device: str) -> Callable[[], float]:
    """Per-process CPU time on CPU, wall time on an accelerator (whose work is not this process's CPU)."""
    return time.process_time if device == "cpu" else time.perf_counter


def spread_ms(seconds: list[float]) -> dict:
    """``{"min", "median", "max", "repeats"}`` of ``seconds`` in milliseconds."""
    ms = [1e3 * s for s in seconds]
    return {"min": min(ms), "median": statistics.median(ms), "max": max(ms), "repeats": len(ms)}


def bwd_over_fwd(fwd_ms: dict, fwd_bwd_ms: dict) -> float:
    """Of two :func:`spread_ms` spreads, the backward's median time over the forward's: ``(fwd+bwd − fwd) / fwd``."""
    return (fwd_bwd_ms["median"] - fwd_ms["median"]) / fwd_ms["median"]


def interleaved_ms(
    calls: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float], budget_s: float = 60.0
) -> dict[str, dict]:
    """Time every call round-robin after one warm-up call each; ``{name: spread_ms(...)}``.

    Each call must return only when its work is done (synchronise inside it). A variant whose first
    timed call took longer than ``budget_s / repeats`` gets fewer repeats (at least 3) so that one slow
    peer does not hold the whole run; its ``repeats`` says how many it got.
    """
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    quota = dict.fromkeys(calls, 1)
    round_ = 0
    while round_ < max(quota.values(), default=0):
        for name, call in calls.items():
            if round_ < quota[name]:
                start = clock()
                call()
                times[name].append(clock() - start)
        if round_ == 0:
            quota = {name: max(3, min(repeats, int(budget_s / max(t[0], 1e-9)))) for name, t in times.items()}
        round_ += 1
    return {name: spread_ms(t) for name, t in times.items()}


def jax_call(fn: Callable, *args) -> Callable[[], object]:
    """A zero-argument call of ``fn(*args)`` that returns once the device is done."""
    return lambda: jax.block_until_ready(fn(*args))


def compiled_memory_mb(jitted: Callable, *args) -> float | None:
    """XLA's own account of a compiled function's memory: arguments + outputs + temporaries, in MB."""
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # some backends do not report it
        return None
    if analysis is None:
        return None
    total = analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    return total / 2**20
