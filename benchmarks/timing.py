"""Timing and memory helpers: warm up, then the median of repeated, synchronised wall-clock runs."""

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


def median_ms(call: Callable[[], object], sync: Callable[[object], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time in milliseconds of ``sync(call())`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        sync(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def jax_sync(out):
    return jax.block_until_ready(out)


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
