"""Pytree plumbing: structure checks at trace time and the flat view the solvers work on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ._sharding import vary_like

__all__ = [
    "cast_floats",
    "check_same_structure",
    "describe",
    "flat_map",
    "flat_rows",
    "frozen",
    "is_float",
    "same_shape_dtypes",
    "shape_dtypes",
    "zero_tangents",
]


def describe(tree: Any) -> str:
    """A short ``structure: shapes/dtypes`` description for error messages."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    specs = ", ".join(f"{leaf.dtype}{list(leaf.shape)}" for leaf in leaves)
    return f"{treedef} with leaves [{specs}]"


def shape_dtypes(tree: Any) -> Any:
    """``tree`` with every leaf replaced by its ``jax.ShapeDtypeStruct`` (TypeError on a leaf that is not an array)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def same_shape_dtypes(a: Any, b: Any) -> bool:
    """Whether the trees ``a`` and ``b`` (of arrays or ``ShapeDtypeStruct``s) have the same structure and their
    leaves the same shapes and dtypes."""
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        (x.shape, x.dtype) == (y.shape, y.dtype)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def check_same_structure(f: Callable, z0: Any, args: tuple, name: str = "f") -> None:
    """Raise ValueError unless ``z0`` is real floating point and ``f(z0, *args)`` matches its structure, shapes and dtypes.

    Complex states are rejected: the solvers' norms and inner products are real (``Σ v²`` of a complex
    ``v`` can vanish for ``v ≠ 0``), so split them into real and imaginary parts.
    """
    z_spec = shape_dtypes(z0)
    if not all(jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in jax.tree_util.tree_leaves(z_spec)):
        raise ValueError(
            f"z0 must hold real floating-point arrays (cast integers; split complex into real and imaginary "
            f"parts), got {describe(z_spec)}"
        )
    out = jax.eval_shape(f, z0, *args)
    if not same_shape_dtypes(out, z_spec):
        raise ValueError(
            f"{name}(z, *args) must return the same pytree structure, shapes and dtypes as z0; "
            f"z0 is {describe(z_spec)} but {name} returned {describe(out)}"
        )


def flat_map(f: Callable, z0: Any) -> tuple[jax.Array, Callable, Callable]:
    """``(x0, unravel, fn)`` with ``x0 = ravel(z0)`` and ``fn(x, args) = ravel(f(unravel(x), *args))``."""
    x0, unravel = ravel_pytree(z0)

    def fn(x, args):
        return ravel_pytree(f(unravel(x), *args))[0]

    return x0, unravel, fn


def flat_rows(f: Callable, z0: Any) -> tuple[jax.Array, Callable, Callable]:
    """:func:`flat_map` for a batch: ``z0``'s leaves have a leading sample axis and ``x0`` is ``(batch, n)``.

    ``f`` maps a batch of ``z`` to a batch; ``fn(x, args)`` maps the rows of ``x`` (one sample each).
    """
    sample = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), z0)
    _, unravel_one = ravel_pytree(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sample))
    ravel_rows = jax.vmap(lambda z: ravel_pytree(z)[0])
    unravel = jax.vmap(unravel_one)

    def fn(x, args):
        return ravel_rows(f(unravel(x), *args))

    return ravel_rows(z0), unravel, fn


def is_float(leaf: Any) -> bool:
    """Whether ``leaf`` is an inexact (floating or complex) array, the leaves that carry gradients."""
    return jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)


def zero_tangents(tree: Any) -> Any:
    """Zero tangents/cotangents for ``tree`` (float0 for integer and boolean leaves), varying like each leaf.

    Inside ``jax.shard_map`` a tangent must vary over the manual mesh axes its primal varies over.
    """

    def zero(a):
        return vary_like(jnp.zeros_like(a) if is_float(a) else jnp.zeros(jnp.shape(a), jax.dtypes.float0), a)

    return jax.tree_util.tree_map(zero, tree)


def frozen(tree: Any) -> Any:
    """``lax.stop_gradient`` on the float leaves of ``tree`` (integer leaves pass through)."""
    return jax.tree_util.tree_map(lambda a: jax.lax.stop_gradient(a) if is_float(a) else a, tree)


def cast_floats(tree: Any, dtype: Any) -> Any:
    """``tree`` with its floating-point leaves cast to ``dtype``; other leaves pass through."""

    def cast(leaf):
        leaf = jnp.asarray(leaf)
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree_util.tree_map(cast, tree)
