"""``fixed_point`` and ``root``: a jitted solve wrapped in a gradient mode (default: implicit).

The implicit function theorem gives, at ``z* = f(z*, θ)``, the vector–Jacobian product
``ḡ_θ = (∂f/∂θ)ᵀ u`` with ``u`` the solution of the adjoint fixed point ``u = (∂f/∂z)ᵀ u + ḡ_z``
(Bai, Kolter & Koltun 2019, arXiv 1909.01377). The gradient modes (``Implicit`` and the others) live
in :mod:`jdeq.gradients`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ._errors import raise_unless_converged
from ._tree import check_same_structure, flat_map
from .gradients import BACKWARD_STATS_FIELDS, GRADIENT_MODES, GradientMode, Implicit
from .precision import Precision
from .solvers import Anderson, Solver, Stats


class Solution(NamedTuple):
    """A solve's result: ``value`` is z* (same pytree as ``z0``), ``stats`` a :class:`Stats`."""

    value: Any
    stats: Stats


class BackwardStats(NamedTuple):
    """Statistics of the backward (adjoint) solve, decoded from a stats probe's gradient."""

    num_steps: jax.Array
    residual: jax.Array
    converged: jax.Array
    result: jax.Array


def stats_probe(batch_shape: tuple[int, ...] = ()) -> jax.Array:
    """A zero array whose gradient carries the backward solve's statistics.

    Pass it as ``fixed_point(..., backward_stats=probe)`` and differentiate the loss with respect to
    it too; decode the gradient with :func:`read_backward_stats`::

        grads, probe_grad = jax.grad(loss, argnums=(0, 1))(params, jdeq.stats_probe())
        jdeq.read_backward_stats(probe_grad).num_steps

    Under ``jax.vmap`` an unbatched probe sums the statistics over the batch; give it a batch dimension
    (``stats_probe((batch,))``, mapped along axis 0) to keep them per sample.
    """
    return jnp.zeros((*batch_shape, len(BACKWARD_STATS_FIELDS)), jnp.float32)


def read_backward_stats(probe_grad: jax.Array) -> BackwardStats:
    """Decode the gradient of a :func:`stats_probe` into :class:`BackwardStats`.

    ``result == Result.RUNNING`` (-1, named "no solve") means no backward solve reported statistics:
    the gradient mode has none (``Phantom``, ``Unrolled``, ``ImplicitJVP``) or the probe was not used.
    """
    num_steps, residual, converged, result = jnp.moveaxis(probe_grad, -1, 0)
    return BackwardStats(num_steps.astype(jnp.int32), residual, converged > 0.5, result.astype(jnp.int32) - 1)


def fixed_point(
    f: Callable,
    z0: Any,
    *args: Any,
    solver: Optional[Solver] = None,
    grad: Optional[GradientMode] = None,
    throw: bool = False,
    backward_stats: Optional[jax.Array] = None,
    precision: Optional[Precision] = None,
) -> Solution:
    """Solve ``z = f(z, *args)`` from ``z0``; differentiable in every array of ``args``.

    Args:
      f: pure map; ``f(z, *args)`` must return the same pytree structure, shapes and dtypes as ``z``
        (checked at trace time: ValueError naming both).
      z0: initial guess (any pytree of arrays). Solutions are assumed unique, so ``z0`` gets a zero
        gradient under ``Implicit``.
      *args: pytrees of arrays (parameters, inputs). Every float array gets a gradient. Arrays that
        ``f`` captures from an enclosing ``jax.grad``/``jit`` trace are hoisted by
        ``jax.closure_convert`` and differentiated too.
      solver: a :class:`Solver` (default ``Anderson()``).
      grad: the gradient mode (default ``Implicit()``): :class:`Implicit`, :class:`ImplicitJVP`
        (forward mode), :class:`Shine`, :class:`Phantom` or :class:`Unrolled`.
      throw: raise :class:`SolveError` at run time when the solve did not converge (a
        ``jax.debug.callback``; under ``jit`` it surfaces as ``JaxRuntimeError``).
      backward_stats: a :func:`stats_probe` whose gradient receives the backward solve's statistics.
      precision: a :class:`Precision` policy (e.g. f in bfloat16, solver state in float32); ``value``
        then has the policy's state dtype.

    Returns:
      :class:`Solution` with ``value`` (z*) and ``stats``. One problem per call: use ``jax.vmap`` or
      :func:`fixed_point_batch` for per-sample solves of a batch.
    """
    solver = Anderson() if solver is None else solver
    grad = Implicit() if grad is None else grad
    if not isinstance(solver, Solver):
        raise ValueError(f"solver must be a jdeq Solver (FixedPoint, Anderson, Broyden, ...), got {solver!r}")
    if not isinstance(grad, GRADIENT_MODES):
        raise ValueError(
            f"grad must be a gradient mode (Implicit, ImplicitJVP, Shine, Phantom, Unrolled), got {grad!r}"
        )
    if precision is not None:
        f, z0 = precision.wrap(f), precision.cast_state(z0)
    check_same_structure(f, z0, args)
    closed, consts = jax.closure_convert(f, z0, *args)

    def f_args(z, args, consts):
        return closed(z, *args, *consts)

    x0, unravel, fn = flat_map(f_args, z0)
    probe = stats_probe() if backward_stats is None else backward_stats
    x, stats = grad.solve(solver, fn, x0, (args, tuple(consts)), probe)
    if throw:
        raise_unless_converged(stats)
    return Solution(unravel(x), stats)


def root(g: Callable, z0: Any, *args: Any, **kwargs: Any) -> Solution:
    """Solve ``g(z, *args) = 0`` as the fixed point of ``f(z) = z − g(z, *args)``.

    Takes the keyword arguments of :func:`fixed_point`; ``stats`` residuals are ``‖g(z)‖`` based.
    """

    def f(z, *a):
        return jax.tree_util.tree_map(lambda zi, gi: zi - gi, z, g(z, *a))

    return fixed_point(f, z0, *args, **kwargs)


def fixed_point_batch(f: Callable, z0: Any, *args: Any, in_axes: Any = None, **kwargs: Any) -> Solution:
    """Per-sample solves of a batch: ``jax.vmap`` of :func:`fixed_point` over axis 0 of ``z0``.

    ``f`` is the per-sample map. ``in_axes`` gives, like ``jax.vmap``, the batch axis of each of
    ``args`` (a tuple, or one value for all; default ``None``: shared by every sample, e.g.
    ``in_axes=(0, None)`` for ``f(z, x, params)``). Each sample stops on its own residual and gets
    its own stats. For a batch-coupled ``f`` (batch statistics), call :func:`fixed_point` on the
    whole batch instead.
    """
    axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    if len(axes) != len(args):
        raise ValueError(f"in_axes has {len(axes)} entries for {len(args)} args")
    probe = kwargs.pop("backward_stats", None)
    probe_axis = None if probe is None or probe.ndim == 1 else 0

    def one(z, probe, *a):
        return fixed_point(f, z, *a, backward_stats=probe, **kwargs)

    return jax.vmap(one, in_axes=(0, probe_axis, *axes))(z0, probe, *args)
