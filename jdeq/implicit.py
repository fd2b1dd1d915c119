"""``fixed_point`` and ``root``: a jitted solve wrapped in a gradient mode (default: implicit).

The implicit function theorem gives, at ``z* = f(z*, θ)``, the vector–Jacobian product
``ḡ_θ = (∂f/∂θ)ᵀ u`` with ``u`` the solution of the adjoint fixed point ``u = (∂f/∂z)ᵀ u + ḡ_z``
(Bai, Kolter & Koltun 2019, arXiv 1909.01377). The gradient modes (``Implicit`` and the others) live
in :mod:`jdeq.gradients`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Optional

import jax

from ._canonical_conv import carry_layout
from ._contract import check_mode_result
from ._errors import raise_on_backward_failure, raise_unless_converged, warn_unless_converged
from ._numerics import lineax_hint, subclass_names
from ._sharding import vary_like
from ._tree import check_same_structure, describe, flat_map, flat_rows
from .gradients import GradientMode, Implicit
from .precision import Precision
from .solvers import Anderson, Broyden, Solution, Solver
from .stats import stats_probe

__all__ = ["DEFAULT_ROOT_SOLVER", "DEFAULT_SOLVER", "fixed_point", "fixed_point_batch", "root"]

DEFAULT_SOLVER = Anderson(return_best=True)
"""The one default of fixed_point, fixed_point_batch, root and the Flax layers: Anderson (m = 5) to a
relative residual of 1e-5 within 50 steps, returning the lowest-residual iterate when it does not
converge (a non-converged last iterate can be worse than an earlier one)."""

DEFAULT_ROOT_SOLVER = Broyden(return_best=True)
"""The default of :func:`root`: Broyden, which estimates the sign and scale of its initial inverse Jacobian from
its first step, so it converges on the common residual ``g(z) = F(z) − z`` of a contraction ``F`` (where
Anderson, iterating ``z − g(z) = 2z − F(z)``, expands)."""


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
      solver: a :class:`Solver` (default :data:`DEFAULT_SOLVER`).
      grad: the :class:`GradientMode` (default ``Implicit()``): :class:`Implicit`, :class:`ImplicitJVP`
        (forward mode), :class:`Shine`, :class:`Phantom`, :class:`Unrolled`, or a user's subclass.
      throw: raise :class:`SolveError` at run time when the solve did not converge, and in the
        backward pass when a backward (adjoint) solve diverged or went nonfinite (a
        ``jax.debug.callback``; under ``jit`` it surfaces as ``JaxRuntimeError``). A backward solve that
        ran out of steps is reported through ``backward_stats``, not raised.
      backward_stats: a :func:`stats_probe` whose gradient receives the backward solve's statistics.
      precision: a :class:`Precision` policy (e.g. f in bfloat16, solver state in float32); ``value``
        then has the policy's state dtype.

    Returns:
      :class:`Solution` with ``value`` (z*), ``stats`` and the solver's final ``state`` (no gradient). One problem per call: use ``jax.vmap`` or
        :func:`fixed_point_batch` for per-sample solves of a batch.
    """
    return _dispatch(f, z0, args, None, solver, grad, throw, backward_stats, precision, "fixed_point")


def _solve(f, z0, args, axes, solver, grad, throw, backward_stats, precision) -> Solution:
    """:func:`fixed_point` (``axes is None``) or :func:`fixed_point_batch` (``axes``: the args' batch axes)."""
    solver = DEFAULT_SOLVER if solver is None else solver
    grad = Implicit() if grad is None else grad
    if not isinstance(solver, Solver):
        raise ValueError(
            f"solver must be a jdeq Solver ({subclass_names(Solver)}), got {solver!r}{lineax_hint(solver)}"
        )
    if not isinstance(grad, GradientMode):
        raise ValueError(f"grad must be a jdeq GradientMode ({subclass_names(GradientMode)}), got {grad!r}")
    if precision is not None:
        f, z0 = precision.wrap(f), precision.cast_state(z0)
    # Inside jax.shard_map: a constant start varies like the per-device data, and so do replicated parameters, so
    # that no loop mixes the two: their cotangents are summed over the devices once, here, not inside a loop.
    z0 = vary_like(z0, args)
    args = vary_like(args, (z0, args))
    if axes is None:
        check_same_structure(f, z0, args)
        g = f
    else:  # the batch: f runs vmapped over the samples, the rows of the flat x
        check_same_structure(f, *_one_sample(z0, args, axes))
        g = jax.vmap(f, in_axes=(0, *axes))
    closed, consts = jax.closure_convert(g, z0, *args)

    def f_args(z, args, consts):
        return closed(z, *args, *consts)

    layout = carry_layout(f_args, z0, args, tuple(consts), batch=axes is not None)
    if layout is not None:  # CPU: the loop carries z in the layout the convolutions leave it in (no transposes)
        store, load = layout
        f_args = _stored(f_args, store, load)
        z0 = store(z0)
    x0, unravel, fn = flat_map(f_args, z0) if axes is None else flat_rows(f_args, z0)
    if layout is not None:
        unravel = _loaded(unravel, load)
    probe = stats_probe() if backward_stats is None else backward_stats
    problem_args = (args, tuple(consts))
    if throw:
        problem_args, probe = raise_on_backward_failure(problem_args, probe)
    sol = check_mode_result(grad, grad.solve(solver, fn, x0, problem_args, probe), x0, Solution)
    return sol._replace(value=unravel(sol.value))


def _stored(f: Callable, store: Callable, load: Callable) -> Callable:
    """``store ∘ f ∘ load``: the map on the stored carry (:func:`jdeq._canonical_conv.carry_layout`)."""
    return lambda z, *args: store(f(load(z), *args))


def _loaded(unravel: Callable, load: Callable) -> Callable:
    return lambda x: load(unravel(x))


SOLVE_CACHE_SIZE = 32
"""How many compiled solves eager calls keep (one per map, solver, gradient mode and options; least recently used
out first). Each keeps its executables for the input shapes it was called with."""

_solve_cache: collections.OrderedDict = collections.OrderedDict()


def _compiled_solve(statics: dict) -> Callable:
    """The jitted :func:`_solve` for these static arguments, from the bounded cache (``SOLVE_CACHE_SIZE``)."""
    key = tuple(statics.items())
    solve = _solve_cache.pop(key, None)
    if solve is None:
        solve = jax.jit(functools.partial(_solve, **statics))
    _solve_cache[key] = solve
    while len(_solve_cache) > SOLVE_CACHE_SIZE:
        _solve_cache.popitem(last=False)
    return solve


def solve_cache_size() -> int:
    """The number of compiled solves the eager cache holds now (at most ``SOLVE_CACHE_SIZE``)."""
    return len(_solve_cache)


def _dispatch(f, z0, args, axes, solver, grad, throw, backward_stats, precision, name) -> Solution:
    """:func:`_solve`, through one cached ``jax.jit`` when called eagerly (no tracer among the inputs).

    Each call builds fresh closures, so an eager loop (a notebook calling ``fixed_point`` again and
    again) would trace and compile the solve every time, and keep every executable. The cache is keyed
    on ``f`` (by equality: jdeq's layers build their maps from hashable objects, so equal layers share
    an entry), the solver, the gradient mode, the options and the input shapes, and holds at most
    ``SOLVE_CACHE_SIZE`` maps; it is skipped inside a user's transformations (they compile once
    anyway) and for an unhashable ``f``.

    An eager solve that did not converge warns :class:`jdeq.ConvergenceWarning` (raises with ``throw``);
    under a transformation the statistics are the record.
    """
    statics = dict(f=f, axes=axes, solver=solver, grad=grad, throw=throw, precision=precision)
    leaves = jax.tree_util.tree_leaves((z0, args, backward_stats))
    try:
        eager = (
            not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves) and hash(tuple(statics.values())) is not None
        )
    except TypeError:
        eager = False
    if eager:
        sol = _compiled_solve(statics)(z0=z0, args=args, backward_stats=backward_stats)
    else:
        sol = _solve(z0=z0, args=args, backward_stats=backward_stats, **statics)
    if throw:
        raise_unless_converged(sol.stats)
    else:
        warn_unless_converged(sol.stats, DEFAULT_SOLVER if solver is None else solver, name, stacklevel=4)
    return sol


def _one_sample(z0: Any, args: tuple, axes: tuple) -> tuple[Any, tuple]:
    """Shapes and dtypes of one sample's ``z`` and ``args`` (ValueError naming ``in_axes`` when they do not fit)."""
    try:
        batched = jax.eval_shape(lambda z, *a: jax.vmap(lambda *t: t, in_axes=(0, *axes))(z, *a), z0, *args)
    except ValueError as error:
        raise ValueError(
            f"fixed_point_batch: in_axes={axes} does not fit z0 (batch axis 0) and args "
            f"({', '.join(describe(a) for a in args)}): {error}"
        ) from None
    one = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), batched)
    return one[0], one[1:]


def root(g: Callable, z0: Any, *args: Any, solver: Optional[Solver] = None, **kwargs: Any) -> Solution:
    """Solve ``g(z, *args) = 0`` as the fixed point of ``f(z) = z − g(z, *args)`` (default solver:
    :data:`DEFAULT_ROOT_SOLVER`, Broyden).

    Takes the keyword arguments of :func:`fixed_point`. A root-finder's stopping rule tests ``g`` itself:
    the solve converges when ``‖g(z)‖ <= max(atol, tol·‖g(z₀)‖)``, relative to the initial residual (the
    solver's ``relative_to="initial"``), a scale that cannot grow with ``z``; ``stats.residual`` is
    ``‖g(z)‖/‖g(z₀)‖`` and ``stats.abs_residual`` is ``‖g(z)‖``. The sign of ``∂g/∂z`` matters to the
    iterations of :class:`FixedPoint` and :class:`Anderson` (they iterate ``z − g``, which expands when
    ``∂g/∂z`` has eigenvalues outside the disc of radius 1 around 1); :class:`Newton`, :class:`Chord` and
    :class:`Broyden` (which estimates its initial inverse Jacobian from the first step) do not assume it.
    Outside ``jax.jit`` a solve that did not converge warns :class:`jdeq.ConvergenceWarning`.
    """

    check_same_structure(g, z0, args, name="g")
    solver = dataclasses.replace(DEFAULT_ROOT_SOLVER if solver is None else solver, relative_to="initial")
    return _dispatch(_MinusResidual(g), z0, args, None, solver, *_options(**kwargs), "root")


def _options(grad=None, throw=False, backward_stats=None, precision=None) -> tuple:
    """:func:`fixed_point`'s keyword options in :func:`_dispatch`'s order."""
    return grad, throw, backward_stats, precision


@dataclasses.dataclass(frozen=True)
class _MinusResidual:
    """``f(z) = z − g(z, *args)``, equal (and hashing equal) for the same ``g``: repeated eager calls of
    :func:`root` with one ``g`` hit the compiled-solve cache of :func:`fixed_point`."""

    g: Callable

    def __call__(self, z, *args):
        return jax.tree_util.tree_map(lambda zi, gi: zi - gi, z, self.g(z, *args))


def fixed_point_batch(
    f: Callable,
    z0: Any,
    *args: Any,
    in_axes: Any = None,
    solver: Optional[Solver] = None,
    grad: Optional[GradientMode] = None,
    throw: bool = False,
    backward_stats: Optional[jax.Array] = None,
    precision: Optional[Precision] = None,
) -> Solution:
    """Per-sample solves of a batch: the same values and stats as ``jax.vmap`` of :func:`fixed_point`.

    ``f`` is the per-sample map and ``z0`` the batch of initial guesses (axis 0 of every leaf).
    ``in_axes`` gives, like ``jax.vmap``, the batch axis of each of ``args`` (a tuple, or one value for
    all; default ``None``: shared by every sample, e.g. ``in_axes=(0, None)`` for ``f(z, x, params)``).
    Each sample stops on its own residual and gets its own stats; ``backward_stats`` is a probe with
    one row per sample (``stats_probe((batch,))``) or one shared row (counts summed over the batch).

    The solve runs on the batch-native driver (:func:`jdeq.solvers.run` with a ``(batch, n)`` start):
    one loop, the solver step vmapped inside it, ``f`` evaluated once per step on the whole batch,
    solver memory written in place. For a batch-coupled ``f`` (batch statistics), call
    :func:`fixed_point` on the whole batch instead.
    """
    axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    if len(axes) != len(args):
        raise ValueError(f"fixed_point_batch: in_axes has {len(axes)} entries for {len(args)} args")
    return _dispatch(f, z0, args, axes, solver, grad, throw, backward_stats, precision, "fixed_point_batch")
