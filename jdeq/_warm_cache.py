"""The per-example fixed-point cache of the DEQ layers (warm starts), in plain JAX: no Flax here.

A cache of ``N`` examples is a pair ``(cached, seen)``: ``cached[i]`` the last equilibrium stored for example
``i`` of the training set, ``seen[i]`` whether there is one. A solve of a batch whose samples are examples
``index`` starts from :func:`cached_start` and writes back :func:`updated_cache`; an entry is written only by a
:func:`storable` solve. :mod:`jdeq.nn` keeps the pair in its layers' variables (linen ``"deq_cache"``, NNX
``FixedPointCache``) and calls :func:`solve_from_cache`. Internal: the public names are re-exported by
:mod:`jdeq.nn`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .solvers import Solution
from .stats import Result


def check_cache(name: str, cached: jax.Array, seen: jax.Array, z_cold: jax.Array) -> None:
    """ValueError unless the cache ``(cached, seen)`` holds states shaped and typed like one sample of ``z_cold``."""
    expected = (len(seen), *z_cold.shape[1:])
    if seen.ndim != 1 or seen.dtype != jnp.bool_ or cached.shape != expected or cached.dtype != z_cold.dtype:
        raise ValueError(
            f"DEQ({name}): the fixed-point cache holds states {cached.shape} {cached.dtype} (seen: {seen.shape} "
            f"{seen.dtype}), but this layer's state is {z_cold.shape[1:]} {z_cold.dtype}, so the cache should be "
            f"{expected} {z_cold.dtype} (seen: ({len(seen)},) bool); was it built for another layer, input or dtype?"
        )


def check_index(name: str, index: Optional[jax.Array], batch: int, size: int) -> None:
    """ValueError unless ``index`` is ``batch`` integers, each in ``[0, size)`` (a value check only outside jit)."""
    if index is None:
        raise ValueError(
            f"DEQ({name}) has a fixed-point cache of {size} examples: pass index=, each sample's index in the "
            "dataset, to the layer or through the model (linen: the 'deq_index' collection; NNX: "
            "jdeq.nn.set_cache_index(model, index)); jdeq.train.fit does this itself. Or leave the cache out for a "
            "cold start (linen: apply without the 'deq_cache' collection; NNX: model.set_attributes(warm_start=False))"
        )
    if jnp.shape(index) != (batch,) or not jnp.issubdtype(jnp.result_type(index), jnp.integer):
        raise ValueError(
            f"DEQ({name}): index must hold one integer per sample, shape ({batch},), got shape {jnp.shape(index)} "
            f"dtype {jnp.result_type(index)}"
        )
    if isinstance(index, jax.core.Tracer):
        return
    values = np.asarray(index)
    outside = values[(values < 0) | (values >= size)]
    if outside.size:
        raise ValueError(
            f"DEQ({name}): {outside.size} index(es) outside [0, {size}) (the cache size), e.g. {outside[0]}; build "
            "the layer with cache_size=len(training set)"
        )


def _slots(index: jax.Array, keep: jax.Array, size: int) -> jax.Array:
    """``index`` where ``keep`` and in range, else ``size`` (past the end: a read fills, a write drops)."""
    return jnp.where(keep & (index >= 0) & (index < size), index, size)


def cached_start(cached: jax.Array, seen: jax.Array, index: jax.Array, z_cold: jax.Array) -> jax.Array:
    """Each sample's start: ``cached[index_i]`` if example ``index_i`` has an entry (``seen``), else ``z_cold_i``.

    An index outside ``[0, len(seen))`` (possible under jit, where it cannot raise) starts cold.
    """
    slots = _slots(index, True, len(seen))
    hit = seen.at[slots].get(mode="fill", fill_value=False)
    hit = hit.reshape(hit.shape + (1,) * (z_cold.ndim - 1))
    return jnp.where(hit, cached.at[slots].get(mode="fill", fill_value=0), z_cold)


def storable(sol: Solution) -> jax.Array:
    """Per sample: whether its solve's end point is worth keeping as a start, i.e. it converged or ran out of
    steps (a finite iterate) and every entry is finite; a diverged or nonfinite solve is not stored."""
    batch = len(sol.value)
    result = jnp.broadcast_to(sol.stats.result, (batch,))  # one problem (per_sample=False): one code for all
    ended = (result == Result.CONVERGED) | (result == Result.MAX_STEPS)
    return ended & jnp.all(jnp.isfinite(sol.value.reshape(batch, -1)), axis=1)


def updated_cache(cached: jax.Array, seen: jax.Array, index: jax.Array, sol: Solution) -> tuple[jax.Array, jax.Array]:
    """``(cached, seen)`` with each :func:`storable` sample's equilibrium written at its index; the other
    entries (other examples, and the samples whose solve failed) keep their previous value."""
    slots = _slots(index, storable(sol), len(seen))
    value = jax.lax.stop_gradient(sol.value).astype(cached.dtype)
    return cached.at[slots].set(value, mode="drop"), seen.at[slots].set(True, mode="drop")


def solve_from_cache(
    name: str, solve: Callable[[jax.Array], Solution], z_cold: jax.Array, index: Optional[jax.Array], cache
) -> tuple[Solution, Optional[tuple]]:
    """``(solve(start), new cache)``: without a ``cache`` (``None``) a cold start from ``z_cold`` and ``None``;
    with ``cache = (cached, seen)`` the start is :func:`cached_start` and the new cache :func:`updated_cache`."""
    if cache is None:
        return solve(z_cold), None
    cached, seen = cache
    check_cache(name, cached, seen, z_cold)
    check_index(name, index, len(z_cold), len(seen))
    index = jnp.asarray(index)
    sol = solve(cached_start(cached, seen, index, z_cold))
    return sol, updated_cache(cached, seen, index, sol)


def empty_cache(size: int, z_cold: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A cache of ``size`` examples with no entry: zero states shaped like one sample of ``z_cold``, none seen."""
    return jnp.zeros((size, *z_cold.shape[1:]), z_cold.dtype), jnp.zeros((size,), bool)


def check_cache_size(cache_size: Optional[int]) -> None:
    """ValueError unless ``cache_size`` is ``None`` or a positive int."""
    if cache_size is not None and not (isinstance(cache_size, (int, np.integer)) and cache_size >= 1):
        raise ValueError(
            f"cache_size must be None (no cache) or an int >= 1 (the training set size), got {cache_size!r}"
        )
