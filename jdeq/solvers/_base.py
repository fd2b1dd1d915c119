"""The solver protocol, solver statistics and the one driver loop every solver runs in.

Solvers work on a flat vector ``x`` (the raveled pytree ``z``) and the map ``fn(x) = ravel(f(z))``.
Each iteration evaluates ``fn`` once (Broyden's optional line search may add a few evaluations,
counted in ``Stats.num_evals``). The driver keeps every array at a fixed shape across steps, so the
loop compiles to one ``lax.while_loop`` with no host synchronisation and no allocation growth.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

from .._canonical_conv import canonical_convs
from .._contract import check_step_result
from .._numerics import at_least_float32, check, check_stopping, norm, relative
from .._sharding import vary_like, varying_axes
from ..stats import Result, Stats

__all__ = ["FlatMap", "RESIDUAL_SCALES", "Solution", "Solver", "per_row", "residuals", "run", "settle"]

Array = jax.Array
FlatMap = Callable[[Array], Array]


class Solution(NamedTuple):
    """A solve's result: ``value`` (z*, same pytree as ``z0``), its :class:`Stats`, and the solver's final ``state``.

    ``state`` is the solver's own pytree after the last step (e.g. Broyden's inverse-Jacobian
    estimate); ``fixed_point`` returns it without gradient.
    """

    value: Any
    stats: Stats
    state: Any = None


RESIDUAL_SCALES = ("image", "initial")


@dataclasses.dataclass(frozen=True)
class Solver:
    """Fields shared by every root-finder; subclasses add their own and implement ``init``/``step``.

    Attributes:
      tol: relative tolerance: stop when ``‖f(z) − z‖ <= max(atol, tol·s)``, ``s`` the scale ``relative_to`` names.
      atol: absolute tolerance (0 disables it; use it when the solution may be exactly zero).
      max_steps: iteration budget.
      divergence: stop with ``Result.DIVERGED`` once the residual exceeds this multiple of the
        initial residual (``inf`` disables it).
      return_best: when not converged, return the iterate with the lowest absolute residual seen
        (a finite one even when the solve ended nonfinite). Otherwise a ``Result.NONFINITE`` solve
        returns NaN in every entry of the value and in its residuals, so it cannot pass for a solution.
      trace: record the relative residual of every step in ``Stats.trace``.
      relative_to: the scale ``s`` of the relative residual: ``"image"``, ``‖f(z)‖`` (fixed points), or
        ``"initial"``, the initial residual ``‖f(z₀) − z₀‖``, a scale that cannot grow with ``z`` (the rule of
        :func:`jdeq.root`, where ``f(z) − z = −g(z)`` and ``‖f(z)‖`` grows with a runaway ``z``).
    """

    tol: float = 1e-5
    atol: float = 0.0
    max_steps: int = 50
    divergence: float = 1e6
    return_best: bool = False
    trace: bool = False
    relative_to: str = "image"

    def __post_init__(self):
        check_stopping(self.tol, self.atol, self.max_steps)
        check(
            self.relative_to in RESIDUAL_SCALES,
            f"relative_to must be one of {RESIDUAL_SCALES}, got {self.relative_to!r}",
        )
        check(self.divergence > 1, f"divergence must be > 1, got {self.divergence}")

    def init(self, x: Array, fx: Array) -> Any:
        """The solver's own state (a pytree of fixed shapes) for iterate ``x`` with ``fx = fn(x)``."""
        raise NotImplementedError

    def step(self, fn: FlatMap, x: Array, fx: Array, state: Any) -> tuple[Array, Array, Any, Array]:
        """One iteration: returns ``(x_new, fn(x_new), state_new, evals_used)``.

        Default: :meth:`propose`, then one evaluation ``fn(x_new)``.
        """
        x_new, state = self.propose(x, fx, state)
        return x_new, fn(x_new), state, jnp.ones((), jnp.int32)

    def propose(self, x: Array, fx: Array, state: Any) -> tuple[Array, Any]:
        """``(x_new, state_new)`` from ``(x, fn(x), state)`` without evaluating ``fn``.

        For a solver whose step evaluates ``fn`` once, at ``x_new``, and whose new state does not depend on that
        evaluation (fixed-point iteration, Anderson): implementing it gives the default :meth:`step`, and lets
        :class:`jdeq.Fallback` evaluate ``f`` once per step for all its stages (see :attr:`proposes`).
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither step nor propose")

    @property
    def proposes(self) -> bool:
        """Whether :meth:`step` is :meth:`propose` followed by one evaluation of ``fn`` (the default ``step``)."""
        cls = type(self)
        return cls.step is Solver.step and cls.propose is not Solver.propose

    def for_batch(self) -> Solver:
        """The solver whose :meth:`step` a batch solve's default :meth:`batch_step` vmaps (default: ``self``)."""
        return self

    @property
    def batch_axes(self) -> Any:
        """``jax.vmap`` axes of the state in a batch solve (a pytree prefix): 0 batches a leaf, ``None`` shares it.

        Shared leaves (e.g. a step counter that every sample advances together) keep memory writes at
        one slot of the batch, in place; default: every leaf per sample.
        """
        return 0

    def batch_step(self, fn: FlatMap, x: Array, fx: Array, state: Any, axes: Any) -> tuple[Array, Array, Any, Array]:
        """:meth:`step` for a batch ``(B, n)`` of independent problems, ``fn`` mapping the batch row by row.

        Default: ``step`` vmapped over the rows (state axes ``axes``), ``f`` evaluated once on the
        batch per evaluation (:func:`per_row`). Override it only where vmapping ``step`` cannot work.
        """
        row, solver = per_row(fn, x), self.for_batch()

        def step(x, fx, s):
            return check_step_result(self, solver.step(row, x, fx, s), x, fx, s)

        vmapped = jax.vmap(step, in_axes=(0, 0, axes), out_axes=(0, 0, axes, 0))
        return vmapped(x, fx, state)

    @property
    def unrollable(self) -> bool:
        """Whether ``step`` is differentiable by reverse-mode autodiff (no inner ``while_loop``): ``Unrolled`` needs it."""
        return True

    @property
    def has_inverse_jacobian(self) -> bool:
        """Whether the state keeps an estimate ``H ≈ (∂f/∂z − I)^{-1}`` (``Shine`` needs one)."""
        return False

    def inverse_jacobian_transpose(self, state: Any, v: Array) -> Array:
        """``Hᵀ v`` for the estimate ``H ≈ (∂f/∂z − I)^{-1}`` kept in ``state`` (when ``has_inverse_jacobian``)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no inverse-Jacobian estimate")

    def solve_linear(self, matvec: FlatMap, b: Array, x0: Optional[Array] = None) -> tuple[Array, Stats]:
        """Solve the affine fixed point ``u = M u + b`` (``matvec(u) = M u``) by iterating it from ``x0`` (default ``b``).

        The adjoint-solver interface that :class:`jdeq.LinearSolver` shares: any root-finder solves the
        backward pass's ``u = (∂f/∂z)ᵀ u + ḡ`` this way, a batch ``(B, n)`` with the batch driver of :func:`run`.
        """
        sol = run(self, lambda u: matvec(u) + b, b if x0 is None else x0)
        return sol.value, sol.stats


def settle(code, tol, atol, abs_res, fx_norm, scale=None) -> Array:
    """Override ``code`` with CONVERGED when ``abs_res <= max(atol, tol·scale)``, NONFINITE on NaN/inf.

    ``scale`` defaults to ``fx_norm`` (``‖f‖``); NONFINITE is decided on ``abs_res`` and ``fx_norm``.
    """
    scale = fx_norm if scale is None else scale
    code = jnp.where(abs_res <= jnp.maximum(atol, tol * scale), Result.CONVERGED, code)
    return jnp.where(jnp.isfinite(abs_res) & jnp.isfinite(fx_norm), code, Result.NONFINITE).astype(jnp.int32)


def residuals(x: Array, fx: Array) -> tuple[Array, Array, Array]:
    """``(‖f − x‖, ‖f − x‖/‖f‖, ‖f‖)`` in at least float32."""
    abs_res, fx_norm = _two_norms(fx - x, fx)
    return abs_res, relative(abs_res, fx_norm), fx_norm


def _two_norms(r: Array, f: Array) -> tuple[Array, Array]:
    """``(‖r‖, ‖f‖)`` over the last axis in one read of ``r`` and ``f``: ``√Σr²`` and ``√Σf²``.

    Exact to rounding wherever every sum is finite and at least ``n·tiny/ε`` (then the squares that
    underflowed add less than ``ε`` of the sum); otherwise (overflow, underflow, zero, NaN or inf) the
    two-pass, overflow-safe :func:`norm`, under a ``lax.cond`` so that it costs nothing when unused.
    """
    dtype = at_least_float32(r.dtype)
    r, f = r.astype(dtype), f.astype(dtype)
    sum_r, sum_f = jnp.sum(jnp.square(r), axis=-1), jnp.sum(jnp.square(f), axis=-1)
    info = jnp.finfo(dtype)
    floor = r.shape[-1] * float(info.tiny) / float(info.eps)
    smallest = jnp.where(jnp.isfinite(sum_r + sum_f), jnp.minimum(sum_r, sum_f), -1.0)  # -1: inf or NaN
    plain = jnp.min(smallest, initial=jnp.inf) >= floor
    return lax.cond(plain, _norms_from_sums, _norms_two_pass, sum_r, sum_f, r, f)


# The branches are module-level functions of explicit operands, not closures: their traced jaxprs are then cached,
# so that an eager call (e.g. a solve under an un-jitted ``jax.grad``) reuses its compiled ``cond`` instead of
# lowering a new one for every solve.
def _norms_from_sums(sum_r: Array, sum_f: Array, r: Array, f: Array) -> tuple[Array, Array]:
    return jnp.sqrt(sum_r), jnp.sqrt(sum_f)


def _norms_two_pass(sum_r: Array, sum_f: Array, r: Array, f: Array) -> tuple[Array, Array]:
    return norm(r), norm(f)


class _Start(NamedTuple):
    """What a solve's tests compare against: the initial residual (``inf`` when zero) and image norm ``‖f(z₀)‖``."""

    res0: Array
    image0: Array


def _scale(solver: Solver, abs_res: Array, fx_norm: Array, start: _Start) -> tuple[Array, Array]:
    """``(relative residual, scale of the relative test)`` for the scale ``solver.relative_to`` names."""
    scale = fx_norm
    if solver.relative_to == "initial":
        scale = jnp.where(jnp.isfinite(start.res0), start.res0, 0.0).astype(abs_res.dtype)
    return relative(abs_res, scale), scale


def _exploded(fx_norm: Array, start: _Start, dtype) -> Array:
    """Whether the image ran away: ``‖f(z)‖ > 2‖f(z₀)‖`` and its rounding ``ε‖f(z)‖`` alone reaches the initial residual.

    There a residual (even 0: ``z + 1 + ½ sin z`` rounds to ``z`` at ``|z| = 10¹⁶``) says nothing about a fixed
    point, so it cannot count as convergence.
    """
    eps = jnp.asarray(jnp.finfo(dtype).eps, fx_norm.dtype)  # x's rounding, in the norms' (float32+) dtype
    return (fx_norm > 2 * start.image0) & (eps * fx_norm >= start.res0)


def _measure(solver: Solver, step, x, fx, start: _Start):
    """Residuals of ``x`` and the result code after ``step`` iterations (RUNNING to go on); not differentiated.

    ``start.res0`` is the divergence test's reference, and the scale of the relative residual when
    ``solver.relative_to == "initial"`` (a zero initial residual makes any nonzero residual infinitely
    large relative to it). A runaway iterate (:func:`_exploded`) never counts as converged.
    """
    abs_res, _, fx_norm = residuals(*lax.stop_gradient((x, fx)))
    rel_res, scale = _scale(solver, abs_res, fx_norm, start)
    code = jnp.where(step >= solver.max_steps, Result.MAX_STEPS, Result.RUNNING)
    code = jnp.where(abs_res > solver.divergence * start.res0, Result.DIVERGED, code)
    settled = settle(code, solver.tol, solver.atol, abs_res, fx_norm, scale)
    settled = jnp.where((settled == Result.CONVERGED) & _exploded(fx_norm, start, x.dtype), code, settled)
    return abs_res, rel_res, settled


VERIFY_SLACK = 1.01


def _verify(solver: Solver, fn: FlatMap, x: Array, start: _Start, result: Array) -> tuple[Array, Array, Array]:
    """The residuals of the returned ``x`` from the driver's own evaluation ``fn(x)``, and the result code it confirms.

    The stop was decided on the image the solver's ``step`` returned; a faulty step (e.g. one returning the
    image of the previous iterate) could claim a residual that ``x`` does not have. A claimed convergence
    that the driver's residual does not confirm (within a factor ``VERIFY_SLACK`` of the tolerance, for
    rounding between two evaluations of ``f``) becomes ``MAX_STEPS`` (``NONFINITE`` when ``fn(x)`` is not
    finite). Costs one evaluation of ``f`` per solve, counted in ``Stats.num_evals``.
    """
    x = lax.stop_gradient(x)
    abs_res, _, fx_norm = residuals(x, lax.stop_gradient(fn(x)))
    rel_res, scale = _scale(solver, abs_res, fx_norm, start)
    confirmed = settle(
        jnp.full_like(result, Result.MAX_STEPS),
        solver.tol * VERIFY_SLACK,
        solver.atol * VERIFY_SLACK,
        abs_res,
        fx_norm,
        scale,
    )
    confirmed = jnp.where(_exploded(fx_norm, start, x.dtype), Result.MAX_STEPS, confirmed)
    unconfirmed = jnp.where(confirmed == Result.NONFINITE, Result.NONFINITE, Result.MAX_STEPS)
    result = jnp.where((result == Result.CONVERGED) & (confirmed != Result.CONVERGED), unconfirmed, result)
    return abs_res, rel_res, result.astype(jnp.int32)


def per_row(fn: FlatMap, batch: Array) -> FlatMap:
    """A map on one row ``x`` of a batch that, when ``jax.vmap``-ed over the rows, calls ``fn`` on the whole batch.

    ``fn`` maps a batch shaped like ``batch`` (``(size, n)``) row by row. Inside ``jax.vmap`` (the batch
    driver's vmapped solver step, a per-row linear solve) the row map becomes one call of ``fn`` on
    the batch (``jax.custom_batching.custom_vmap``), so solver code is written for one problem while
    ``f`` runs batched. Called outside ``jax.vmap`` it is sample 0's map (only traced, for shapes).
    The arrays ``fn`` closes over are passed explicitly (``jax.closure_convert``), so the row map can
    sit in loops and differentiated programs.
    """

    size = batch.shape[0]
    closed, consts = jax.closure_convert(fn, batch)

    @custom_vmap
    def row(x, consts):
        return closed(jnp.broadcast_to(x, (size, *x.shape)), *consts)[0]

    @row.def_vmap
    def row_batched(axis_size, in_batched, x, consts):
        check(
            axis_size == size and not any(jax.tree_util.tree_leaves(in_batched[1])),
            f"a row map of a batch of {size} was vmapped over an axis of size {axis_size} or with its own arrays "
            "batched: inside a batch solve, a solver step may vmap only over the samples",
        )
        return closed(x if in_batched[0] else jnp.broadcast_to(x, (axis_size, *x.shape)), *consts), True

    return lambda x: row(x, consts)


def _select(keep_new: Array, new: Any, old: Any) -> Any:
    """``new`` where the scalar ``keep_new`` holds, else ``old`` (leaf by leaf; ``None`` leaves stay ``None``)."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(keep_new, n, o), new, old)


class _Carry(NamedTuple):
    it: Array  # iterations of the loop (the batch's slowest sample)
    step: Array  # per-sample iterations
    extra_evals: Array  # evaluations beyond one per step (a Broyden line search's); constant 0 is optimised away
    x: Array
    fx: Array
    start: _Start
    best_x: Optional[Array]
    best_abs: Array
    trace: Optional[Array]
    result: Array
    state: Any


def run(solver: Solver, fn: FlatMap, x0: Array, *, unroll: bool = False, freeze_state: bool = False) -> Solution:
    """Iterate ``solver`` on ``fn`` from ``x0`` inside one ``lax.while_loop``; return a :class:`Solution`.

    ``x0`` is one problem's flat vector ``(n,)``, or a batch ``(B, n)`` of independent problems with
    ``fn`` mapping the batch row by row (the batch-native driver). A batch runs one unbatched loop
    until its slowest sample stops; the solver's step is ``jax.vmap``-ed inside it (``f`` itself runs
    once on the batch per step, see :func:`per_row`); each sample stops on its own residual, and its
    iterate, image and statistics freeze there, exactly as ``jax.vmap`` of single solves would give.
    The solver state is not frozen per sample: leaves that :meth:`Solver.batch_axes` marks as shared
    (step counters) stay unbatched, so memory writes go to one slot of the batch in place; a sample
    that has stopped keeps stepping its own memory, unused. ``freeze_state=True`` masks the whole
    state per sample instead (its final ``state`` is then each sample's own at its stop, as ``Shine``
    needs).

    ``unroll=True`` runs the same body as a ``lax.scan`` over ``max_steps`` (steps after the stop are
    skipped by ``lax.cond``) so that reverse-mode autodiff can go through the iterations; memory then
    grows with ``max_steps``. Inside ``jax.shard_map`` with per-device data the devices stop after
    different numbers of steps, and a ``lax.cond`` on a device's own predicate would put the backward
    pass's collectives (the ``psum`` of a replicated parameter's cotangent) in a branch that some
    devices skip: they would wait for each other forever. There every step runs on every device and a
    stopped device keeps its carry by a select, so the value, the stats and the gradient are the same.
    """
    fn = canonical_convs(fn)  # CPU: XLA leaves non-canonical convolutions in loop bodies slow
    batched = x0.ndim == 2
    if batched and x0.shape[0] == 0:  # an empty batch: nothing runs; vmap gives the outputs' empty shapes
        return jax.vmap(lambda x: run(solver, lambda y: y, x, unroll=unroll))(x0)
    if batched:
        axes = 0 if freeze_state else solver.batch_axes
        init = jax.vmap(solver.init, out_axes=axes)
        step, step_name = functools.partial(solver.batch_step, fn, axes=axes), "batch_step"
    else:
        init = solver.init
        step, step_name = functools.partial(solver.step, fn), "step"
    fx0 = fn(x0)
    zero = jnp.zeros(x0.shape[:-1], jnp.int32)
    abs0, _, image0 = residuals(*lax.stop_gradient((x0, fx0)))
    start = _Start(jnp.where(abs0 > 0, abs0, jnp.inf), image0)
    _, rel0, code0 = _measure(solver, zero, x0, fx0, start)
    trace = None
    if solver.trace:
        trace = jnp.full((*x0.shape[:-1], solver.max_steps + 1), jnp.nan, rel0.dtype).at[..., 0].set(rel0)
    carry = _Carry(
        it=jnp.zeros((), jnp.int32),
        step=zero,
        extra_evals=zero,
        x=x0,
        fx=fx0,
        start=start,
        best_x=x0 if solver.return_best else None,
        best_abs=jnp.where(jnp.isfinite(abs0), abs0, jnp.inf),
        trace=trace,
        result=code0,
        state=init(x0, fx0),
    )
    carry = vary_like(carry, (x0, fx0))

    def body(c: _Carry) -> _Carry:
        x, fx, state, used = check_step_result(solver, step(c.x, c.fx, c.state), c.x, c.fx, c.state, step_name)
        active = c.result == Result.RUNNING  # always true for one problem

        def keep(new, old):  # per-sample freeze of a stopped sample (a no-op for one problem)
            if not batched:
                return new
            return jnp.where(jnp.reshape(active, active.shape + (1,) * (jnp.ndim(new) - active.ndim)), new, old)

        steps = c.step + active.astype(jnp.int32)
        x, fx = keep(x, c.x), keep(fx, c.fx)
        abs_res, rel_res, code = _measure(solver, steps, x, fx, c.start)
        better = abs_res < c.best_abs
        return _Carry(
            it=c.it + 1,
            step=steps,
            extra_evals=c.extra_evals + keep(used - 1, jnp.zeros_like(used)),
            x=x,
            fx=fx,
            start=c.start,
            best_x=jnp.where(better[..., None], x, c.best_x) if solver.return_best else None,
            best_abs=jnp.where(better, abs_res, c.best_abs),
            trace=None if c.trace is None else c.trace.at[..., c.it + 1].set(jnp.where(active, rel_res, jnp.nan)),
            result=keep(code, c.result),
            state=jax.tree_util.tree_map(keep, state, c.state) if batched and freeze_state else state,
        )

    def running(c: _Carry) -> Array:
        return jnp.any(c.result == Result.RUNNING)

    if unroll and varying_axes(carry):  # per-device data: every device runs every step (see the docstring)
        c, _ = lax.scan(lambda c, _: (_select(running(c), body(c), c), None), carry, length=solver.max_steps)
    elif unroll:
        c, _ = lax.scan(lambda c, _: (lax.cond(running(c), body, lambda c: c, c), None), carry, length=solver.max_steps)
    else:
        c = lax.while_loop(running, body, carry)
    claimed = c.result == Result.CONVERGED
    use_best = (~claimed & jnp.isfinite(c.best_abs)) if solver.return_best else jnp.zeros_like(claimed)
    x = jnp.where(use_best[..., None], c.best_x, c.x) if solver.return_best else c.x
    # a nonfinite solve returns NaN (value and residuals), unless return_best found a finite iterate
    failed = (c.result == Result.NONFINITE) & ~use_best
    x = jnp.where(failed[..., None], jnp.nan, x)
    abs_res, rel_res, result = _verify(solver, fn, x, c.start, c.result)
    abs_res = jnp.where(failed, jnp.nan, abs_res)
    rel_res = jnp.where(failed, jnp.nan, rel_res)
    stats = Stats(
        num_steps=c.step,
        num_evals=c.step + c.extra_evals + 2,  # f(x0), one per step and the extras, the verification
        residual=rel_res,
        abs_residual=abs_res,
        converged=result == Result.CONVERGED,
        result=result,
        trace=c.trace,
    )
    return Solution(x, stats, c.state)
