"""Timing and memory helpers: warm up, then the median of repeated, synchronised wall-clock runs."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import jax


def set_cpu_threads(threads: int) -> None:
    """Limit XLA's CPU backend to ``threads`` intra-op threads; call before JAX first uses the CPU backend."""
    os.environ["XLA_FLAGS"] = (
        f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
        f"intra_op_parallelism_threads={threads} " + os.environ.get("XLA_FLAGS", "")
    )


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
