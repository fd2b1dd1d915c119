"""The extension points' contracts, checked while JAX traces: a :class:`jdeq.Solver`'s ``step`` and a
:class:`jdeq.GradientMode`'s ``solve`` (an :class:`jdeq.AdjointMode`'s ``adjoint``).

A user's solver or mode that breaks its contract would otherwise fail deep inside ``lax.while_loop`` or
``jax.custom_vjp`` with an error that names neither. These checks read tree structures, shapes and dtypes
only, at trace time (nothing is added to the compiled program), and raise a ValueError naming the class,
what it returned and what was expected.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._tree import describe, same_shape_dtypes, shape_dtypes
from .stats import Stats

__all__ = ["check_adjoint_result", "check_mode_result", "check_step_result"]

STEP_RETURNS = "(x_new, fn(x_new), state_new, evals_used)"


def _mismatch(got: Any, expected: Any) -> bool:
    """Whether ``got`` differs from ``expected`` in tree structure, a leaf's shape or a leaf's dtype."""
    try:
        return not same_shape_dtypes(shape_dtypes(got), shape_dtypes(expected))
    except TypeError:  # a leaf that is not an array (a string, an object)
        return True


def _shown(tree: Any) -> str:
    """:func:`describe` of ``tree``, or its repr where a leaf is not an array."""
    try:
        return describe(shape_dtypes(tree))
    except TypeError:
        return repr(tree)


def _broken(owner: Any, method: str, what: str, got: Any, expected: Any, hint: str) -> ValueError:
    return ValueError(
        f"{type(owner).__name__}.{method} breaks its contract: {what} is {_shown(got)}, expected {_shown(expected)} "
        f"({hint})"
    )


def check_step_result(solver: Any, out: Any, x: jax.Array, fx: jax.Array, state: Any, method: str = "step") -> tuple:
    """``out``, a solver step's return, after checking it is ``(x_new, fn(x_new), state_new, evals_used)`` with
    ``x_new``/``fn(x_new)`` shaped and typed like ``x``/``fx``, ``state_new`` like ``state`` and ``evals_used`` an
    integer count (a scalar, or one per row of a batch)."""
    name = type(solver).__name__
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        count = f"{len(out)} values" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}"
        raise ValueError(f"{name}.{method} breaks its contract: it returned {count}, expected 4: {STEP_RETURNS}")
    x_new, fx_new, state_new, used = out
    same = "the driver keeps every array at a fixed shape and dtype across steps"
    for what, got, expected in (("x_new", x_new, x), ("fn(x_new)", fx_new, fx)):
        if _mismatch(got, expected):
            raise _broken(solver, method, f"the {what} it returned", got, expected, same)
    if _mismatch(state_new, state):
        raise _broken(solver, method, "the state it returned", state_new, state, f"the state of init; {same}")
    counts = (jnp.shape(x)[:-1], ())
    if _mismatch(used, jnp.zeros(jnp.shape(used), jnp.int32)) or jnp.shape(used) not in counts:
        expected = jax.ShapeDtypeStruct(jnp.shape(x)[:-1], jnp.int32)
        raise _broken(solver, method, "evals_used", used, expected, "the number of evaluations of fn, an int32 count")
    return tuple(out)


def check_mode_result(mode: Any, sol: Any, x0: jax.Array, solution_type: type) -> Any:
    """``sol``, a gradient mode's ``solve`` return, after checking it is a ``solution_type`` (:class:`jdeq.Solution`,
    passed in: the solvers import this module) whose value is shaped and typed like the flat start ``x0``."""
    if not isinstance(sol, solution_type):
        raise ValueError(
            f"{type(mode).__name__}.solve breaks its contract: it returned {_shown(sol)}, expected a "
            "jdeq.Solution (e.g. the one jdeq.solvers.run returns, with its value replaced)"
        )
    if _mismatch(sol.value, x0):
        raise _broken(mode, "solve", "the Solution's value", sol.value, x0, "the flat start x0 it was given")
    return sol


def check_adjoint_result(mode: Any, out: Any, g: jax.Array) -> tuple[jax.Array, Stats]:
    """``out``, an adjoint mode's ``adjoint`` return, after checking it is ``(u, stats)`` with the cotangent ``u``
    shaped and typed like ``g`` and ``stats`` a :class:`jdeq.Stats`."""
    name = type(mode).__name__
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        count = f"{len(out)} values" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}"
        raise ValueError(f"{name}.adjoint breaks its contract: it returned {count}, expected 2: (u, stats)")
    u, stats = out
    if _mismatch(u, g):
        raise _broken(mode, "adjoint", "the cotangent u", u, g, "u solves u = vjp_z(u) + g, shaped like g")
    if not isinstance(stats, Stats):
        raise ValueError(
            f"{name}.adjoint breaks its contract: its stats are a {type(stats).__name__}, expected jdeq.Stats "
            "(as solve_linear returns them)"
        )
    return u, stats
