"""The ground floor: array helpers, norms and argument checks that every other module may import.

It imports nothing from jdeq, so any module can use it without an import running back up a level.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "MAX_INT32",
    "at_least_float32",
    "check",
    "check_stopping",
    "finite",
    "map_rows",
    "norm",
    "relative",
    "subclass_names",
]

Array = jax.Array


def check(ok: bool, message: str) -> None:
    """ValueError with ``message`` unless ``ok`` (the argument checks of every public constructor and function)."""
    if not ok:
        raise ValueError(message)


MAX_INT32 = 2**31 - 1


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite real number (a Python or NumPy scalar, or a 0-d array)."""
    try:
        return bool(math.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def check_stopping(tol: float, atol: float, max_steps: int) -> None:
    """ValueError unless ``tol`` is finite and > 0, ``atol`` finite and >= 0 and ``max_steps`` an int in [1, 2³¹)."""
    check(finite(tol) and tol > 0, f"tol must be finite and > 0, got {tol}")
    check(finite(atol) and atol >= 0, f"atol must be finite and >= 0, got {atol}")
    check(
        isinstance(max_steps, int) and 1 <= max_steps <= MAX_INT32,
        f"max_steps must be an int in [1, 2**31), got {max_steps!r}",
    )


def at_least_float32(dtype) -> jnp.dtype:
    """``dtype`` if it has 32 bits or more, else float32 (no implicit promotion: works under strict promotion)."""
    return jnp.dtype(dtype) if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def norm(v: Array) -> Array:
    """Euclidean norm over the last axis, in at least float32 (safe for bfloat16/float16 iterates).

    Scaled by ``max|v|`` before squaring, so a finite ``v`` has a finite norm (``Σ v²`` of an
    entry of 1e19 overflows float32); NaN and inf entries give NaN and inf.
    """
    v = v.astype(at_least_float32(v.dtype))
    scale = jnp.max(jnp.abs(v), axis=-1, initial=jnp.zeros((), v.dtype))
    safe = jnp.where((scale > 0) & jnp.isfinite(scale), scale, jnp.ones_like(scale))
    return safe * jnp.sqrt(jnp.sum(jnp.square(v / safe[..., None]), axis=-1))


def relative(abs_res: Array, scale: Array) -> Array:
    """``abs_res / scale`` with 0/0 = 0, r/0 = inf, and NaN when either is NaN."""
    safe = jnp.where(scale > 0, scale, 1.0)
    ratio = jnp.where(scale > 0, abs_res / safe, jnp.where(abs_res > 0, jnp.inf, 0.0))
    return jnp.where(jnp.isnan(abs_res) | jnp.isnan(scale), jnp.nan, ratio)


def map_rows(f: Callable, *xs: Any) -> Any:
    """``f(*xs)`` for one problem (1-D last argument), ``jax.vmap(f)(*xs)`` over the rows of a batch (2-D)."""
    return jax.vmap(f)(*xs) if jnp.ndim(xs[-1]) == 2 else f(*xs)


def lineax_hint(value: Any) -> str:
    """For a lineax object passed where a jdeq solver is expected, the advice to wrap it in ``jdeq.Lineax``
    (appended to the error message); ``""`` for anything else."""
    if type(value).__module__.split(".")[0] != "lineax":
        return ""
    return (
        ": a lineax solver solves linear systems, wrap it in `jdeq.Lineax` and pass it as a linear solver "
        "(Implicit(solver=jdeq.Lineax(...)), Newton(linear_solver=jdeq.Lineax(...)))"
    )


def subclass_names(base: type) -> str:
    """Names of the public concrete subclasses of ``base`` defined so far (for error messages).

    A class is public when neither its name nor its module's own name starts with ``_``.
    """
    found, stack = set(), list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        private = cls.__name__.startswith("_") or cls.__module__.rpartition(".")[2].startswith("_")
        if not private and not getattr(cls, "__abstractmethods__", None):
            found.add(cls.__name__)
    return ", ".join(sorted(found))
