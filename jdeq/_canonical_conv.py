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
the function once to a jaxpr and evaluates it with each non-canonical ``conv_general_dilated``
replaced by transpose → canonical convolution, its output left in the canonical layout. Each value
is carried as ``(stored, perm)``, ``value = transpose(stored, perm)``, through the operations whose
layout can follow without moving data: elementwise ops (operands brought to one layout), reductions
(over the same stored axes, one run of adjacent stored axes at a time: XLA's CPU backend reduces
non-adjacent axes at once about 3× slower), reshapes that merge or split axes stored contiguously
(a group norm's ``(N, C, H, W) → (N, G, C/G, H, W)``), squeezes, unit-axis broadcasts, transposes
(free), nested ``jit`` calls (inline) and ``custom_jvp`` functions (primal in the stored layout, the
user's JVP rule on the values); any other operation gets its operands transposed back. A map
written ``NCHW`` thus runs ``NHWC`` from its first convolution to its output, as if written so.
:func:`carry_layout` goes one step further for jdeq's loops: it stores the loop's carry in the
layout the rewritten map leaves its output in, so the transposes at the loop boundary cancel
(``jdeq.implicit``). The choice is made per platform with :func:`jax.lax.platform_dependent`, so
only CPU programs change; GPU and TPU evaluate the function as traced. Functions without
non-canonical convolutions are returned unchanged.

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
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

__all__ = ["canonical_convs", "canonical_spec", "carry_layout", "is_canonical"]

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


class _Lazy(NamedTuple):
    """A value held in another memory layout: ``value = transpose(phys, perm)`` (``perm=None``: ``phys`` itself)."""

    phys: Any
    perm: Optional[tuple] = None


def _inverse(perm: tuple) -> tuple:
    inverse = [0] * len(perm)
    for i, axis in enumerate(perm):
        inverse[axis] = i
    return tuple(inverse)


def _layout(v: _Lazy, perm: Optional[tuple]):
    """``v``'s value stored in layout ``perm`` (``None``: as the value itself), one transpose or none."""
    n = jnp.ndim(v.phys)
    have, want = v.perm or tuple(range(n)), _inverse(perm or tuple(range(n)))
    order = tuple(have[want[j]] for j in range(n))
    return v.phys if order == tuple(range(n)) else lax.transpose(v.phys, order)


def _value(v: _Lazy):
    return _layout(v, None)


def _lazy(phys, perm) -> _Lazy:
    return _Lazy(phys, None if perm is None or tuple(perm) == tuple(range(len(perm))) else tuple(perm))


def _conv(eqn, lhs: _Lazy, rhs: _Lazy) -> list:
    """The convolution computed canonically; its output left in the canonical layout (transposed lazily)."""
    params = eqn.params
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    n = len(lhs_spec) - 2
    # the canonical input is value.transpose(lhs_spec[0], *lhs_spec[2:], lhs_spec[1]): its layout is the inverse
    lhs_t = _layout(lhs, _inverse((lhs_spec[0], *lhs_spec[2:], lhs_spec[1])))
    rhs_t = _layout(rhs, _inverse((*rhs_spec[2:], rhs_spec[1], rhs_spec[0])))
    out = lax.conv_general_dilated_p.bind(lhs_t, rhs_t, **{**params, "dimension_numbers": canonical_spec(n)})
    # canonical output axes: 0 batch, 1..n spatial, n+1 feature; value axis out_spec[k] is canonical axis k.
    perm = [0] * (n + 2)
    perm[out_spec[0]], perm[out_spec[1]] = 0, n + 1
    for i, axis in enumerate(out_spec[2:]):
        perm[axis] = 1 + i
    return [_lazy(out, perm)]


def _elementwise(eqn, *args: _Lazy) -> list:
    """An elementwise op on operands of one layout (that of its first transposed full-rank operand)."""
    rank = len(eqn.outvars[0].aval.shape)
    perm = next((a.perm for a in args if a.perm is not None and jnp.ndim(a.phys) == rank), None)
    if perm is None or any(jnp.ndim(a.phys) not in (0, rank) for a in args):
        return _as_written(eqn, *args)
    phys = [_layout(a, perm) if jnp.ndim(a.phys) == rank else _value(a) for a in args]
    return [_lazy(eqn.primitive.bind(*phys, **eqn.params), perm)]


def _reduce(eqn, x: _Lazy) -> list:
    """A reduction over some axes: over the same axes of the stored layout, one run of adjacent stored axes at a
    time (the largest first; XLA's CPU backend reduces non-adjacent axes at once about 3× slower); the kept axes
    keep their stored order."""
    if x.perm is None:
        return _as_written(eqn, x)
    shape, axes = jnp.shape(x.phys), tuple(eqn.params["axes"])
    kept = [i for i in range(len(x.perm)) if i not in axes]
    runs = []  # runs of adjacent stored axes, unit axes joining either side
    for a in sorted(x.perm[i] for i in axes):
        if runs and all(shape[b] == 1 for b in range(runs[-1][-1] + 1, a)):
            runs[-1].append(a)
        else:
            runs.append([a])
    out, alive = x.phys, list(range(len(shape)))  # alive: the stored axes ``out`` still has
    for run in sorted(runs, key=lambda r: -math.prod(shape[a] for a in r)):
        # as (before, run, after) -> (before, after), reshaped between runs (XLA would merge chained reductions)
        first, last = alive.index(run[0]), alive.index(run[-1])
        before, after = alive[:first], alive[last + 1 :]
        sizes = [math.prod(shape[a] for a in block) for block in (before, run, after)]
        out = eqn.primitive.bind(lax.reshape(out, tuple(sizes)), **{**eqn.params, "axes": (1,)})
        alive = before + after
        out = lax.reshape(out, tuple(shape[a] for a in alive))
    stored = sorted(x.perm[i] for i in kept)
    return [_lazy(out, [stored.index(x.perm[i]) for i in kept])]


def _reshape(eqn, x: _Lazy) -> list:
    """A reshape (or squeeze, or a broadcast that only inserts unit axes) of a transposed value, done on the stored
    layout when each group of axes it merges or splits is stored contiguous and in order; else as written."""
    in_shape, out_shape = tuple(jnp.shape(x.phys)), tuple(eqn.outvars[0].aval.shape)
    if x.perm is not None:
        in_shape = tuple(in_shape[x.perm[i]] for i in range(len(in_shape)))  # the value's shape
    if x.perm is None or 0 in in_shape or (eqn.primitive.name == "reshape" and eqn.params["dimensions"] is not None):
        return _as_written(eqn, x)
    ins, outs = [i for i, s in enumerate(in_shape) if s != 1], [j for j, s in enumerate(out_shape) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ins):  # the finest partition into (input axes, output axes) of equal sizes
        gi, go, pi, po = [ins[i]], [outs[j]], in_shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                gi.append(ins[i])
                pi, i = pi * in_shape[ins[i]], i + 1
            else:
                go.append(outs[j])
                po, j = po * out_shape[outs[j]], j + 1
        groups.append((gi, go))
    stored = sorted(ins, key=lambda a: x.perm[a])  # the non-unit value axes in stored order
    order = []
    for gi, go in sorted(groups, key=lambda g: stored.index(g[0][0])):
        start = stored.index(gi[0])
        if stored[start : start + len(gi)] != gi:
            return _as_written(eqn, x)
        order += go
    order = [j for j, s in enumerate(out_shape) if s == 1] + order
    out = lax.reshape(x.phys, tuple(out_shape[j] for j in order))
    return [_lazy(out, [order.index(j) for j in range(len(out_shape))])]


def _broadcast(eqn, x: _Lazy) -> list:
    """``broadcast_in_dim`` that only inserts unit axes is a reshape; any other broadcast runs as written."""
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    operand = jnp.shape(x.phys) if x.perm is None else tuple(jnp.shape(x.phys)[p] for p in x.perm)
    inserts_units = all(shape[d] == s for d, s in zip(dims, operand)) and all(
        shape[k] == 1 for k in range(len(shape)) if k not in dims
    )
    if x.perm is None or not inserts_units or list(dims) != sorted(dims) or eqn.params.get("sharding") is not None:
        return _as_written(eqn, x)
    return _reshape(eqn, x)


def _transpose(eqn, x: _Lazy) -> list:
    """A transpose: only the layout changes (no data moves until a consumer needs the value)."""
    perm = x.perm or tuple(range(jnp.ndim(x.phys)))
    return [_lazy(x.phys, [perm[p] for p in eqn.params["permutation"]])]


def _call(eqn, *args: _Lazy) -> list:
    """A nested ``jit``: evaluated inline, its values kept in their layouts."""
    closed = eqn.params["jaxpr"]
    return _evaluate(closed.jaxpr, closed.consts, *args)


def _custom_jvp(eqn, *args: _Lazy) -> list:
    """A ``custom_jvp`` function on transposed operands: its primal evaluated in their layout, its derivative the
    user's rule on the values (transposed in and out), so the derivative stays the user's."""
    perm = next((a.perm for a in args if a.perm is not None), None)
    if perm is None:
        return _as_written(eqn, *args)

    def layout_of(aval):
        return perm if len(aval.shape) == len(perm) else None

    in_perms = [layout_of(v.aval) for v in eqn.invars]
    out_perms = [layout_of(v.aval) for v in eqn.outvars]
    closed = eqn.params["call_jaxpr"]

    @jax.custom_jvp
    def stored(*phys):
        outs = _evaluate(closed.jaxpr, closed.consts, *map(_lazy, phys, in_perms))
        return [_layout(o, p) for o, p in zip(outs, out_perms)]

    @stored.defjvp
    def stored_jvp(primals, tangents):
        values = [_value(_lazy(x, p)) for x, p in zip(primals, in_perms)]
        dvalues = [_value(_lazy(t, p)) for t, p in zip(tangents, in_perms)]
        outs, douts = jax.jvp(lambda *v: _bind(eqn, eqn.params, v), values, dvalues)
        return [_layout(_Lazy(o), p) for o, p in zip(outs, out_perms)], [
            _layout(_Lazy(t), p) for t, p in zip(douts, out_perms)
        ]

    outs = stored(*(_layout(a, p) for a, p in zip(args, in_perms)))
    return list(map(_lazy, outs, out_perms))


def _cond(eqn, index: _Lazy, *args: _Lazy) -> list:
    """A ``platform_dependent`` choice (a ``cond`` with ``branches_platforms``): inside the CPU evaluation, CPU's
    branch (or the default), evaluated inline, as lowering for CPU would pick it; any other ``cond`` as written."""
    groups = eqn.params.get("branches_platforms")
    if groups is None:
        return _as_written(eqn, index, *args)
    cpu = next((i for i, g in enumerate(groups) if g is not None and "cpu" in g), None)
    branch = eqn.params["branches"][groups.index(None) if cpu is None else cpu]
    return _evaluate(branch.jaxpr, branch.consts, *args)


def _bind(eqn, params: dict, values) -> list:
    bind_params = eqn.primitive.get_bind_params(params)
    # older jax (0.8, the lowest pin) returns (subfuns, params), newer jax the params alone
    subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    outs = eqn.primitive.bind(*subfuns, *values, **bind_params)
    return outs if eqn.primitive.multiple_results else [outs]


def _as_written(eqn, *args: _Lazy) -> list:
    """Any other equation: on the values (transposed back), its nested jaxprs rewritten."""
    params = eqn.params
    if any(_needs_rewrite(sub) for sub in _sub_jaxprs(params)):
        params = {name: _rewrite_param(value) for name, value in params.items()}
    return [_Lazy(o) for o in _bind(eqn, params, [_value(a) for a in args])]


_ELEMENTWISE = frozenset(
    "abs add add_any and atan2 ceil clamp convert_element_type copy cos cosh div eq erf erf_inv exp exp2 expm1 floor ge gt "
    "imag integer_pow is_finite le log log1p logistic lt max min mul ne neg nextafter not or pow real rem round "
    "rsqrt select_n sign sin sinh sqrt square sub tan tanh xor".split()
)
_RULES: dict = {
    **dict.fromkeys(_ELEMENTWISE, _elementwise),
    **dict.fromkeys(("reduce_sum", "reduce_max", "reduce_min", "reduce_prod"), _reduce),
    "reshape": _reshape,
    "squeeze": _reshape,
    "broadcast_in_dim": _broadcast,
    "transpose": _transpose,
    "jit": _call,
    "pjit": _call,
    "custom_jvp_call": _custom_jvp,
    "cond": _cond,
    _CONV: _conv,
}


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
    rewritten = jax.make_jaxpr(functools.partial(_evaluate_values, closed.jaxpr, closed.consts))(*avals)
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


def _evaluate(jaxpr: jex_core.Jaxpr, consts, *args: _Lazy) -> list:
    """Evaluate ``jaxpr`` on (possibly transposed) values, every convolution canonical, each value kept in the layout
    its producer left it in as long as the rules above can follow it (CPU only: the layouts are XLA CPU's)."""
    env: dict = {}

    def read(v) -> _Lazy:
        return _Lazy(v.val) if isinstance(v, jex_core.Literal) else env[v]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = _Lazy(value)
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            outvals = _RULES.get(eqn.primitive.name, _as_written)(eqn, *invals)
        env.update(zip(eqn.outvars, outvals))
    return [read(v) for v in jaxpr.outvars]


def _evaluate_values(jaxpr: jex_core.Jaxpr, consts, *args) -> list:
    """:func:`_evaluate` on plain values, returning plain values (each output transposed back once)."""
    return [_value(v) for v in _evaluate(jaxpr, consts, *map(_Lazy, args))]


def canonical_convs(fn: Callable) -> Callable:
    """``fn`` with every non-canonical convolution made canonical on CPU (the same values everywhere).

    ``fn`` takes and returns pytrees of arrays. Each call traces ``fn`` once to a jaxpr (at the
    argument shapes); a jaxpr without non-canonical convolutions is evaluated as traced, so maps
    without convolutions bind the same primitives. Otherwise, on CPU (:func:`jax.lax.platform_dependent`;
    other platforms evaluate the jaxpr as traced), the jaxpr is evaluated with every convolution
    canonical and each value left in the layout its producer gave it (see the module docstring).
    ``fn``'s Python runs once per trace, as without the rewrite. Call it where a loop body is traced
    (the rewrite happens at trace time).
    """

    @functools.wraps(fn)
    def rewritten(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        flat_args = jax.tree_util.tree_leaves(args)
        as_traced = jex_core.jaxpr_as_fun(closed)
        if _needs_rewrite(closed):
            cpu = functools.partial(_evaluate_values, closed.jaxpr, closed.consts)
            flat_out = lax.platform_dependent(*flat_args, cpu=cpu, default=as_traced)
        else:
            flat_out = as_traced(*flat_args)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), flat_out)

    return rewritten


def _output_layouts(f: Callable, *args) -> Optional[list]:
    """The layouts :func:`canonical_convs` leaves ``f``'s outputs in before transposing them back, one per output
    leaf (``None``: as the value); ``None`` when ``f`` has no non-canonical convolution."""
    closed = jax.make_jaxpr(f)(*args)
    if not _needs_rewrite(closed):
        return None
    found = []

    def evaluate(*flat):
        outs = _evaluate(closed.jaxpr, closed.consts, *map(_Lazy, flat))
        found[:] = [o.perm for o in outs]
        return [_value(o) for o in outs]

    jax.make_jaxpr(evaluate)(*(jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(args)))
    return found


def carry_layout(f: Callable, z0: Any, *args, batch: bool = False) -> Optional[tuple[Callable, Callable]]:
    """``(store, load)`` for a loop ``z ← f(z, *args)`` whose carry should be kept, on CPU, in the layout the
    rewritten ``f`` leaves its output in (e.g. ``NHWC`` for a map written ``NCHW``), or ``None``.

    ``store(z)`` holds each leaf's entries in that layout's order, under the leaf's own shape (a transpose
    reshaped back), ``load`` undoes it; iterating ``store ∘ f ∘ load`` on ``store(z0)`` then needs no transpose
    at the loop boundary: :func:`canonical_convs` cancels ``load``'s transpose against the convolutions' and
    ``store``'s against the output's. Entries are only reordered, so norms, inner products and elementwise
    updates of the flat carry are those of the loop on ``z`` (up to summation order). On other platforms both
    are the identity (:func:`jax.lax.platform_dependent`). ``batch``: axis 0 of every leaf indexes the
    samples and must stay first. ``None`` when ``f`` has no non-canonical convolution or no output leaf is
    left transposed; a layout that is not the one ``f`` would leave a stored input in only costs transposes.
    """
    layouts = _output_layouts(f, z0, *args)
    leaves, treedef = jax.tree.flatten(z0)
    if layouts is None or len(layouts) != len(leaves):
        return None
    layouts = [p if p is not None and (not batch or p[0] == 0) else None for p in layouts]
    if all(p is None for p in layouts):
        return None

    def store_leaf(leaf, perm):
        return lax.reshape(lax.transpose(leaf, _inverse(perm)), jnp.shape(leaf))

    def load_leaf(leaf, perm):
        stored_shape = tuple(jnp.shape(leaf)[p] for p in _inverse(perm))
        return lax.transpose(lax.reshape(leaf, stored_shape), perm)

    def on_cpu(per_leaf):
        def cpu(*flat):
            return [leaf if p is None else per_leaf(leaf, p) for leaf, p in zip(flat, layouts)]

        def apply(z):
            out = lax.platform_dependent(*jax.tree.leaves(z), cpu=cpu, default=lambda *flat: list(flat))
            return jax.tree.unflatten(treedef, out)

        return apply

    return on_cpu(store_leaf), on_cpu(load_leaf)
