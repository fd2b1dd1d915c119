"""Pytree plumbing: structure checks at trace time and the flat view the solvers work on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.flatten_util import ravel_pytree


def describe(tree: Any) -> str:
    """A short ``structure: shapes/dtypes`` description for error messages."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    specs = ", ".join(f"{leaf.dtype}{list(leaf.shape)}" for leaf in leaves)
    return f"{treedef} with leaves [{specs}]"


def check_same_structure(f: Callable, z0: Any, args: tuple) -> None:
    """Raise ValueError unless ``f(z0, *args)`` has exactly the structure, shapes and dtypes of ``z0``."""
    out = jax.eval_shape(f, z0, *args)
    z_spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), z0)
    same_tree = jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(z_spec)
    same_leaves = same_tree and all(
        (a.shape, a.dtype) == (b.shape, b.dtype)
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(z_spec))
    )
    if not same_leaves:
        raise ValueError(
            "f(z, *args) must return the same pytree structure, shapes and dtypes as z0; "
            f"z0 is {describe(z_spec)} but f returned {describe(out)}"
        )


def flat_map(f: Callable, z0: Any) -> tuple[jax.Array, Callable, Callable]:
    """``(x0, unravel, fn)`` with ``x0 = ravel(z0)`` and ``fn(x, args) = ravel(f(unravel(x), *args))``."""
    x0, unravel = ravel_pytree(z0)

    def fn(x, args):
        return ravel_pytree(f(unravel(x), *args))[0]

    return x0, unravel, fn
