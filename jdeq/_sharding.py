"""Helpers for code that runs inside ``jax.shard_map``: a loop carry that varies like the data, a summed cotangent.

Both are no-ops outside ``shard_map``. The varying manual mesh axes of an array are read from
``jax.typeof(x)`` (``.manual_axis_type.varying``; ``.vma`` before jax 0.9).
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

__all__ = ["sum_like", "vary_like", "varying_axes"]


def _varying_axes(x: jax.Array) -> frozenset:
    """The manual mesh axes ``x`` varies over."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return mat.varying if mat is not None else getattr(aval, "vma", frozenset())


def varying_axes(tree: Any) -> frozenset:
    """The manual mesh axes any leaf of ``tree`` varies over (empty outside ``jax.shard_map``)."""
    return frozenset().union(*map(_varying_axes, jax.tree_util.tree_leaves(tree)))


def vary_like(tree: Any, ref: Any) -> Any:
    """``tree`` with every leaf varying over the manual mesh axes any leaf of ``ref`` varies over.

    Inside ``jax.shard_map`` a loop carry must keep its type, and a constant (a zero start, a counter,
    a zero memory) combined with per-device data must vary like it. A no-op outside ``shard_map``.
    """
    axes = varying_axes(ref)
    if not axes:
        return tree

    def vary(leaf):
        missing = tuple(sorted(axes - _varying_axes(leaf)))
        if not missing:
            return leaf
        if hasattr(lax, "pcast"):  # jax >= 0.9; earlier: lax.pvary
            return lax.pcast(leaf, missing, to="varying")
        return lax.pvary(leaf, missing)

    return jax.tree_util.tree_map(vary, tree)


def sum_like(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """``cotangent`` summed (``psum``) over the manual mesh axes it varies over and ``primal`` does not.

    The cotangent of an input replicated across a ``jax.shard_map`` is the sum of every device's
    contribution (e.g. backward statistics counted on each device's shard of the batch).
    """
    extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
    return lax.psum(cotangent, extra) if extra else cotangent
