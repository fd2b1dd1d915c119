"""Canonical convolutions inside loops, on CPU: a jaxpr rewrite.

XLA's CPU backend runs a convolution with its fast (Eigen) kernel only when its dimension numbers
are *canonical*: input and output batch-first and feature-last (``NHWC``), kernel ending in
``I, O`` (``HWIO``). Its ``ConvCanonicalization`` pass inserts the transposes that make any other
convolution canonical, but it visits only the entry computation, never the body of a ``while``
loop. The transpose rule of a convolution with respect to its input swaps the kernel's ``I`` and
``O`` (``b01f_01oi->b01f``), so the VJP of even an ``NHWC/HWIO`` convolution inside an adjoint loop,
and every convolution of a map written ``NCHW/OIHW`` inside a forward loop, would run as XLA's
generic loop-nest convolution, an order of magnitude slower.

:func:`canonical_convs` does what that pass does, for the function a loop evaluates: it traces
the function once to a jaxpr and replaces each non-canonical ``conv_general_dilated`` by
transpose → canonical convolution → transpose (the transposed output materialised behind an
``optimization_barrier``, so that XLA does not fuse the transpose into each consumer). The choice is
made per platform with :func:`jax.lax.platform_dependent`, so only CPU programs change; GPU and TPU
lower the original convolution. Functions without convolutions are returned unchanged.

What is rewritten: convolutions at the top level and inside nested ``jit``/``pjit`` calls,
``closed_call``, ``checkpoint``/``remat``, ``while``/``cond``/``scan`` bodies, the primal
computation of ``custom_jvp`` and ``custom_vjp`` functions, and, since a VJP is traced to plain
primitives, the backward pass of a user's ``custom_vjp`` once it is part of a traced VJP. What is
not: the *rules* of a ``custom_jvp``/``custom_vjp`` (the JVP rule, the ``fwd``/``bwd`` functions)
when the rewritten function is itself differentiated later (they are kept as written, so the
derivative is the user's), and convolutions of a rewritten function differentiated afterwards
(e.g. the ``Unrolled`` gradient mode's backward through the loop): their transposes are created
after the rewrite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax.extend import core as jex_core

__all__ = ["canonical_convs", "canonical_spec", "is_canonical"]

_CONV = "conv_general_dilated"


def canonical_spec(num_spatial: int) -> lax.ConvDimensionNumbers:
    """The dimension numbers XLA's CPU backend runs fast: ``(N, S..., C)`` input/output, ``(S..., I, O)`` kernel."""
    n = num_spatial
    spatial = tuple(range(1, n + 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, n + 1, *spatial), rhs_spec=(n + 1, n, *range(n)), out_spec=(0, n + 1, *spatial)
    )


def is_canonical(dimension_numbers: lax.ConvDimensionNumbers) -> bool:
    """Whether a convolution's dimension numbers are already :func:`canonical_spec`."""
    return tuple(dimension_numbers) == tuple(canonical_spec(len(dimension_numbers.lhs_spec) - 2))


def _canonical_conv(lhs, rhs, **params):
    """``conv_general_dilated(lhs, rhs, **params)`` computed as transpose → canonical conv → transpose."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    n = len(lhs_spec) - 2
    lhs_t = lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    rhs_t = lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    out = lax.conv_general_dilated_p.bind(lhs_t, rhs_t, **{**params, "dimension_numbers": canonical_spec(n)})
    # canonical output axes: 0 batch, 1..n spatial, n+1 feature; put each where out_spec wants it.
    perm = [0] * (n + 2)
    perm[out_spec[0]], perm[out_spec[1]] = 0, n + 1
    for i, axis in enumerate(out_spec[2:]):
        perm[axis] = 1 + i
    if perm == sorted(perm):
        return out
    # Materialised, not fused: fused into its consumers (a group norm's reductions and elementwise passes, each
    # recomputing it) the transpose back would make every one of them read the convolution's output with a stride.
    return lax.optimization_barrier(lax.transpose(out, tuple(perm)))


def _conv_on_cpu_canonical(lhs, rhs, **params):
    """The convolution, canonical on CPU and as written on every other platform."""

    def as_written(lhs, rhs):
        return lax.conv_general_dilated_p.bind(lhs, rhs, **params)

    return lax.platform_dependent(lhs, rhs, cpu=functools.partial(_canonical_conv, **params), default=as_written)


def _sub_jaxprs(params: dict) -> list:
    """The (closed or open) jaxprs among an equation's parameters, one level deep."""
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
                found.append(item)
    return found


def _needs_rewrite(jaxpr) -> bool:
    """Whether ``jaxpr`` (or a jaxpr nested in it) holds a non-canonical convolution."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == _CONV and not is_canonical(eqn.params["dimension_numbers"]):
            return True
        if any(_needs_rewrite(sub) for sub in _sub_jaxprs(eqn.params)):
            return True
    return False


def _rewrite_closed(closed: jex_core.ClosedJaxpr) -> jex_core.ClosedJaxpr:
    """``closed`` with its non-canonical convolutions rewritten (same inputs, outputs and consts)."""
    if not _needs_rewrite(closed):
        return closed
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type) for v in closed.jaxpr.invars]
    rewritten = jax.make_jaxpr(functools.partial(_evaluate, closed.jaxpr, closed.consts))(*avals)
    return rewritten


def _rewrite_param(value: Any) -> Any:
    if isinstance(value, jex_core.ClosedJaxpr):
        return _rewrite_closed(value)
    if isinstance(value, jex_core.Jaxpr):
        if value.constvars or not _needs_rewrite(value):
            return value  # an open jaxpr with free constants cannot be re-closed here; left as written
        rewritten = _rewrite_closed(jex_core.ClosedJaxpr(value, []))
        return rewritten.jaxpr if not rewritten.consts else value
    if isinstance(value, (tuple, list)) and any(isinstance(v, (jex_core.ClosedJaxpr, jex_core.Jaxpr)) for v in value):
        return type(value)(_rewrite_param(v) for v in value)
    return value


def _evaluate(jaxpr: jex_core.Jaxpr, consts, *args):
    """Evaluate ``jaxpr`` (like ``jax.core.eval_jaxpr``), rewriting every non-canonical convolution."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        params = eqn.params
        with eqn.ctx.manager:
            if eqn.primitive.name == _CONV and not is_canonical(params["dimension_numbers"]):
                outvals = [_conv_on_cpu_canonical(*invals, **params)]
            else:
                if any(_needs_rewrite(sub) for sub in _sub_jaxprs(params)):
                    params = {name: _rewrite_param(value) for name, value in params.items()}
                bind_params = eqn.primitive.get_bind_params(params)
                # older jax (0.8, the lowest pin) returns (subfuns, params), newer jax the params alone
                subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
                outvals = eqn.primitive.bind(*subfuns, *invals, **bind_params)
                if not eqn.primitive.multiple_results:
                    outvals = [outvals]
        for var, value in zip(eqn.outvars, outvals):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def canonical_convs(fn: Callable) -> Callable:
    """``fn`` with every non-canonical convolution made canonical on CPU (the same values everywhere).

    ``fn`` takes and returns pytrees of arrays. Each call traces ``fn`` once to a jaxpr (at the
    argument shapes) and evaluates that jaxpr with the convolutions rewritten (``fn``'s Python runs
    once per trace, as without the rewrite); a jaxpr without non-canonical convolutions is evaluated
    as traced, so maps without convolutions bind the same primitives. Call it where a loop body is
    traced (the rewrite happens at trace time).
    """

    @functools.wraps(fn)
    def rewritten(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        flat_args = jax.tree_util.tree_leaves(args)
        flat_out = _evaluate(closed.jaxpr, closed.consts, *flat_args)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), flat_out)

    return rewritten
