"""Flax layers (linen and NNX): any Flax module ``f(z, x)``, or a jdeq cell, as an equilibrium map.

``DEQ(f)`` (linen) and ``NNXDEQ(f)`` (NNX) return ``z* = f(z*, x)`` for a batch ``x`` from a start
``z0`` (the jdeq cells build their own zero start). Flax owns the map's parameters as usual
(``params["deq"]["f"]`` in linen, the module's ``nnx.Param`` leaves in NNX); they reach the solver as
explicit arguments, so their gradients come from the implicit rule.

- ``per_sample=True`` (default): each sample is its own fixed-point problem, stopping on its own
  residual (:func:`jdeq.fixed_point_batch`); a Flax module sees one sample as a batch of one, so
  modules written for batches (Conv, GroupNorm) need no change. ``per_sample=False``: the batch is
  one problem (:func:`jdeq.fixed_point`), for maps that couple samples.
- Forward statistics go where Flax keeps intermediates: linen sows them as ``"deq_stats"`` into
  ``"intermediates"`` (apply with ``mutable=["intermediates"]``), the NNX layer keeps the latest in an
  ``nnx.Intermediate``; :func:`forward_stats` reads either.
- Backward statistics: a layer carries a zero probe (linen collection ``"deq_probe"``, NNX variable
  :class:`BackwardProbe`); the gradient of a loss with respect to it, decoded by
  :func:`jdeq.read_backward_stats`, reports the backward solves (counts add up over the batch).
- Warm starts (``cache_size=N``): the layer keeps a per-example fixed-point cache, the last equilibrium
  of each of ``N`` training examples, keyed by the example's index in the dataset; a solve starts from
  its example's cached equilibrium, or from ``z0`` for an example never stored. linen keeps it in the
  ``"deq_cache"`` collection (used when the caller passes it, mutable; left out: a cold start, as for
  evaluation), NNX in :class:`FixedPointCache` variables (switched off by
  ``model.set_attributes(warm_start=False)``). The index arrives as the backward probe does, so a model
  that encloses a cached layer passes nothing on: linen's ``"deq_index"`` collection (recorded by
  ``init``), NNX's :class:`CacheIndex` variable (:func:`set_cache_index`); a hand-written loop may
  also call the layer with ``index=``. See :func:`cached_start` and :func:`updated_cache` (the cache
  itself lives in ``jdeq._warm_cache``, plain JAX).
- Map state other than parameters (BatchNorm's ``batch_stats``) is rejected: a DEQ map must be the
  same map at every iteration, and so is an NNX map that writes to a variable. A linen ``"dropout"`` rng
  draws one key per call, so one solve uses the same mask at every iteration (each sample its own when
  ``per_sample``); an NNX map's rng streams are read once per call (the same mask for every iteration and
  sample) and get a new key (split from their own) at each call.
- A module map under ``per_sample=True`` is checked not to couple the samples, outside the solve (linen at
  ``init``, NNX at its first call; under ``jit`` at trace time): a ValueError names ``per_sample=False`` otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Optional

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._skip import SKIP_LOSS_NAME, check_skip_weight, consistency_loss, skip_start, with_consistency
from ._warm_cache import cached_start, check_cache_size, empty_cache, solve_from_cache, storable, updated_cache
from .gradients import GradientMode
from .implicit import DEFAULT_SOLVER, fixed_point, fixed_point_batch
from .solvers import Solution, Solver, Stats
from .stats import stats_probe

STATS_COLLECTION = "intermediates"
STATS_NAME = "deq_stats"
PROBE_COLLECTION = "deq_probe"
CACHE_COLLECTION = "deq_cache"
INDEX_COLLECTION = "deq_index"

__all__ = [
    "CACHE_COLLECTION",
    "INDEX_COLLECTION",
    "PROBE_COLLECTION",
    "STATS_COLLECTION",
    "DEQ",
    "BackwardProbe",
    "CacheIndex",
    "DEQClassifier",
    "FixedPointCache",
    "NNXDEQ",
    "NNXDEQClassifier",
    "SKIP_LOSS_NAME",
    "cached_start",
    "check_input",
    "consistency_loss",
    "forward_stats",
    "set_cache_index",
    "solve_cell",
    "storable",
    "updated_cache",
]


def check_input(cell: Any, params: Any, x: jax.Array) -> None:
    """ValueError unless ``x`` is a floating batch whose per-sample shape fits ``params``."""
    name = type(cell).__name__
    _check_batch(name, x)
    expected = _param_shapes(cell, tuple(jnp.shape(x)[1:]))
    got = _shapes(params)
    if expected != got:
        misfits = [f"{k} is {got.get(k, 'missing')}, expected {v}" for k, v in expected.items() if got.get(k) != v]
        misfits += [f"{k} is not a parameter of this cell" for k in got if k not in expected]
        raise ValueError(
            f"DEQ({name}) with inputs of per-sample shape {jnp.shape(x)[1:]}: its parameters do not fit "
            f"({'; '.join(misfits)}); were they built for another cell (width, channels) or other inputs?"
        )


def _param_shapes(cell: Any, sample_shape: tuple) -> dict:
    """The parameter shapes ``cell.init`` builds for samples of ``sample_shape`` (memoised for hashable cells:
    tracing ``init`` on every eager call of a layer costs more than the solve)."""
    try:
        return _param_shapes_cached(cell, sample_shape)
    except TypeError:  # an unhashable cell
        return _param_shapes_cached.__wrapped__(cell, sample_shape)


@functools.lru_cache(maxsize=64)
def _param_shapes_cached(cell: Any, sample_shape: tuple) -> dict:
    return _shapes(jax.eval_shape(lambda key: cell.init(key, sample_shape), jax.random.PRNGKey(0)))


def _check_batch(name: str, x: jax.Array) -> None:
    """ValueError unless ``x`` is a floating batch ``(batch, ...)``."""
    dtype, shape = jnp.result_type(x), jnp.shape(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"DEQ({name}) takes floating-point inputs, got dtype {dtype} (convert and scale it first)")
    if len(shape) < 2:
        raise ValueError(f"DEQ({name}) takes a batch of inputs (batch, ...), got shape {shape}")


def _shapes(tree: Any) -> dict:
    return {
        jax.tree_util.keystr(path): tuple(jnp.shape(leaf)) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def solve_cell(
    cell: Any,
    params: Any,
    x: jax.Array,
    *,
    solver: Solver,
    grad: Optional[GradientMode],
    per_sample: bool = True,
    backward_stats: Optional[jax.Array] = None,
    z0: Optional[jax.Array] = None,
) -> Solution:
    """The equilibrium of a jdeq ``cell`` for each sample of the batch ``x``, from ``z0`` (default ``0``).

    The injection ``u = inject(params, x)`` is computed once, then ``z* = cell(params, z*, u)`` solved.
    ``backward_stats``: a :func:`jdeq.stats_probe` (unbatched: the counts add up over the batch).
    """
    check_input(cell, params, x)
    return _solve_cell(
        cell, params, x, z0=z0, solver=solver, grad=grad, per_sample=per_sample, backward_stats=backward_stats
    )


def _solve_cell(cell, params, x, *, z0, **options) -> Solution:
    """:func:`solve_cell` on an input already checked (:func:`check_input`)."""
    u = jax.vmap(cell.inject, in_axes=(None, 0))(params, x)
    return _solve_map(
        _CellSample(cell),
        _CellBatch(cell),
        jnp.zeros_like(u) if z0 is None else z0,
        u,
        params,
        **options,
    )


def _solve_map(one, coupled, z0, x, params, *, solver, grad, per_sample, backward_stats, keys=None) -> Solution:
    """``z = one(z_i, x_i, params[, key_i])`` per sample, or ``z = coupled(params, z, x[, key])`` on the batch."""
    extra = () if keys is None else (keys if per_sample else keys[0],)
    if per_sample:
        axes = (0, None) + ((0,) if keys is not None else ())
        options = dict(in_axes=axes, solver=solver, grad=grad, backward_stats=backward_stats)
        return fixed_point_batch(one, z0, x, params, *extra, **options)
    return fixed_point(
        _StateFirst(coupled),
        z0,
        x,
        params,
        *extra,
        solver=solver,
        grad=grad,
        backward_stats=backward_stats,
    )


def forward_stats(tree: Any) -> list[Stats]:
    """The forward :class:`jdeq.Stats` of every DEQ layer in ``tree``: linen's ``"intermediates"`` (or the
    whole dict that ``apply(..., mutable=...)`` returned), or an NNX module after a call."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Intermediate)
    return [leaf for leaf in jax.tree_util.tree_leaves(tree, is_leaf=_is_stats) if _is_stats(leaf)]


def _is_stats(leaf: Any) -> bool:
    return isinstance(leaf, Stats)


def _reject_state(name: str, collections: list[str]) -> None:
    if collections:
        raise ValueError(
            f"DEQ({name}): the map has state besides its parameters ({', '.join(sorted(collections))}); a DEQ map "
            "must be the same map at every iteration: use a stateless normalisation (GroupNorm, LayerNorm) "
            "instead of BatchNorm, and jdeq.spectral_normalize on the map's parameters instead of "
            "linen.SpectralNorm (whose power-iteration state changes the map)"
        )


def _check_per_sample(name: str, call: Callable, z: jax.Array, x: jax.Array, variables: Any) -> None:
    """ValueError naming ``per_sample=False`` when the map couples the samples of a batch: ``call(variables, z, x)``
    (the module on the batch) differs from the module on each sample as a batch of one, vmapped over the samples,
    beyond ``√ε`` of the output's scale.

    Runs outside the solve: on the real values when they are concrete, else (under ``jit``) at trace time on
    concrete stand-ins of their shapes (:func:`_stand_in`), so nothing enters the compiled program. Both
    evaluations run as one compiled program, reused for an equal (hashable) ``call`` and the same shapes; an
    unhashable ``call`` runs op by op. A batch of one has nothing to compare.
    """
    if len(x) < 2:
        return
    with jax.ensure_compile_time_eval():
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((z, x, variables))):
            z, x, variables = _stand_in((z, x, variables))
        try:
            hash(call)
        except TypeError:
            together, alone = _on_batch_and_alone(call, variables, z, x)
        else:
            together, alone = _on_batch_and_alone_compiled(call, variables, z, x)
        _raise_if_coupled(name, together, alone)


def _on_batch_and_alone(call: Callable, variables: Any, z: jax.Array, x: jax.Array) -> tuple[Any, Any]:
    """``call(variables, z, x)`` on the batch, and on each sample as a batch of one (vmapped)."""
    alone = jax.vmap(_OneOfBatch(_StateFirst(call)), in_axes=(0, 0, None))(z, x, variables)
    return call(variables, z, x), alone


_on_batch_and_alone_compiled = jax.jit(_on_batch_and_alone, static_argnums=0)


def _raise_if_coupled(name: str, together: Any, alone: Any) -> None:
    tol = float(jnp.finfo(jnp.result_type(together)).eps) ** 0.5  # rounding of two evaluation orders
    together, alone = np.asarray(together, np.float64), np.asarray(alone, np.float64)
    gap = float(np.max(np.abs(together - alone)))
    if not gap <= tol * (1.0 + float(np.max(np.abs(alone)))):
        raise ValueError(
            f"DEQ({name}) with per_sample=True: the map couples the samples of a batch (its output on the batch "
            f"differs from its output on each sample alone by {gap:.3g}, e.g. a normalisation over the batch axis), "
            "so per-sample solves would solve another equation: pass per_sample=False to solve the batch as one "
            "problem, or make the map per-sample"
        )


def _missing_start(name: str) -> ValueError:
    return ValueError(
        f"DEQ({name}): pass z0, the start of the solve shaped like the state (batch, ...); a Flax module "
        "does not say the shape of its state (only the jdeq cells build their own zero start)"
    )


# The maps a layer solves are built from hashable objects (the cell, the module, their hyperparameters):
# equal for equal layers, so an un-jitted call of a layer reuses the solve compiled by the previous call
# (jdeq's compiled-solve cache is keyed on the map), instead of tracing and compiling a new closure.


@dataclasses.dataclass(frozen=True)
class _CellSample:
    """``f(z, u, params) = cell(params, z, u)`` on one sample."""

    cell: Any

    def __call__(self, z, u, params):
        return self.cell(params, z, u)


@dataclasses.dataclass(frozen=True)
class _CellBatch:
    """``f(params, z, u)``: ``cell`` on a batch (``jax.vmap`` over the samples of ``z`` and ``u``)."""

    cell: Any

    def __call__(self, params, z, u):
        return jax.vmap(self.cell, in_axes=(None, 0, 0))(params, z, u)


@dataclasses.dataclass(frozen=True)
class _StateFirst:
    """``f(z, x, params, *key) = coupled(params, z, x, *key)``: the state first, as jdeq's solvers call a map."""

    coupled: Callable

    def __call__(self, z, x, params, *key):
        return self.coupled(params, z, x, *key)


@dataclasses.dataclass(frozen=True)
class _OneOfBatch:
    """``module_call(z, x, ...)`` on one sample, as a batch of one (modules written for batches work)."""

    module_call: Callable

    def __call__(self, z, x, *rest):
        return self.module_call(z[None], x[None], *rest)[0]


@dataclasses.dataclass(frozen=True)
class _LinenMap:
    """A linen module as ``f(params, z, x[, dropout key])``."""

    module: linen.Module

    def __call__(self, params, z, x, *key):
        rngs = {"dropout": key[0]} if key else None
        return self.module.apply({"params": params}, z, x, rngs=rngs)


def _cell_start(cell: Any, params: Any, x: jax.Array) -> jax.Array:
    """A jdeq cell's cold start for the batch ``x``: zeros shaped like its injection ``inject(params, x_i)``."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    signature = (tree, tuple((jnp.shape(a), jnp.result_type(a)) for a in (*leaves, x)))
    try:
        shape, dtype = _injection_shape(cell, signature)
    except TypeError:  # an unhashable cell
        shape, dtype = _injection_shape.__wrapped__(cell, signature)
    return jnp.zeros(shape, dtype)


@functools.lru_cache(maxsize=64)
def _injection_shape(cell: Any, signature: tuple) -> tuple:
    """``(shape, dtype)`` of ``vmap(cell.inject)`` on arguments of ``signature`` (the params' tree, then every
    leaf's and ``x``'s shape and dtype), memoised like :func:`_param_shapes`."""
    tree, shapes = signature
    params = jax.tree_util.tree_unflatten(tree, [jax.ShapeDtypeStruct(s, d) for s, d in shapes[:-1]])
    state = jax.eval_shape(jax.vmap(cell.inject, in_axes=(None, 0)), params, jax.ShapeDtypeStruct(*shapes[-1]))
    return state.shape, state.dtype


class DEQ(linen.Module):
    """A linen DEQ layer: ``z* = f(z*, x)`` for a batch ``x``.

    Attributes:
      f: any linen module called as ``f(z, x)``, or a jdeq cell (:class:`jdeq.models.MLPCell`,
        :class:`jdeq.models.ConvCell`, or any object with ``init`` / ``inject`` / ``__call__``).
      solver: the forward solver (default :data:`jdeq.DEFAULT_SOLVER`).
      grad: the gradient mode (default ``Implicit()``).
      per_sample: each sample its own problem (default), or the batch as one.
      cell: ``f`` by its former name (``DEQ(cell=MLPCell(64))``).
      cache_size: the number of examples of the per-example fixed-point cache (the training set's size), or
        ``None`` (default): no cache. ``init`` creates it in the ``"deq_cache"`` collection (``"z"``: the
        last equilibrium of each example, ``"seen"``: whether it has one) and records the layer's place in the
        ``"deq_index"`` collection (an empty ``"index"``).
      skip: a linen module ``g`` mapping the input batch ``x`` to a start shaped like the state (SkipDEQ, Pal,
        Edelman & Rackauckas 2022, arXiv 2201.12240): each solve starts from ``g(x)`` instead of ``z0``, and ``g``
        is trained jointly through the consistency loss ``skip_weight · mean_b ‖g(x)_b − stop_gradient(z*_b)‖²``,
        whose gradient the layer's backward pass adds (the loss the output enters needs no extra term); its value
        is sown as ``"skipdeq_loss"`` in ``"intermediates"``. ``None`` (default): no skip module.
      skip_weight: the consistency loss's weight (default 1).

    Call as ``layer(x, z0, index=None)``; ``z0`` may be omitted for a jdeq cell. Returns the equilibrium,
    shaped like ``z0``. A jdeq cell's parameters live under ``params["cell"]``, a module's under
    ``params["f"]`` (or under its parent's name for it, when the module is created inside a parent's compact
    method). With the ``"deq_cache"`` collection passed (and mutable), each sample's index in the dataset is
    required, as ``index`` or, through any enclosing model, as the ``"deq_index"`` collection (each layer's
    ``"index"`` leaf set to it: ``tree_map(lambda _: index, variables["deq_index"])``, as
    :func:`jdeq.train.fit` does): each solve starts from :func:`cached_start` and the cache is updated
    (:func:`updated_cache`); without the cache collection the solve starts cold from ``z0``.
    """

    f: Any = None
    solver: Solver = DEFAULT_SOLVER
    grad: Optional[GradientMode] = None
    per_sample: bool = True
    cell: Any = None
    cache_size: Optional[int] = None
    skip: Any = None
    skip_weight: float = 1.0

    @linen.compact
    def __call__(self, x: jax.Array, z0: Optional[jax.Array] = None, index: Optional[jax.Array] = None) -> jax.Array:
        if (self.f is None) == (self.cell is None):
            raise ValueError("DEQ takes one map: DEQ(f) with a linen module or a jdeq cell (or DEQ(cell=...))")
        check_cache_size(self.cache_size)
        check_skip_weight(self.skip_weight)
        options = dict(
            solver=self.solver, grad=self.grad, per_sample=self.per_sample, backward_stats=_layer_probe(self)
        )
        f = self.f if self.f is not None else self.cell
        if isinstance(f, linen.Module):
            z_cold, solve = _linen_module_solver(self, f, x, z0, options)
        else:
            z_cold, solve = _linen_cell_solver(self, f, x, options)
        if self.skip is not None:
            z_cold = skip_start(type(f).__name__, self.skip(x), z_cold)
        sol = _solve_linen(self, type(f).__name__, solve, z_cold, index)
        if self.is_initializing():  # init returns parameters only, no stale statistics
            return sol.value
        self.sow(STATS_COLLECTION, STATS_NAME, sol.stats)
        if self.skip is None:
            return sol.value
        self.sow(STATS_COLLECTION, SKIP_LOSS_NAME, consistency_loss(z_cold, sol.value))
        return with_consistency(sol.value, z_cold, self.skip_weight)


def _layer_probe(layer: DEQ) -> Optional[jax.Array]:
    """The layer's backward-stats probe: created at init, read when the caller passes the collection."""
    if layer.is_initializing() or layer.has_variable(PROBE_COLLECTION, "backward"):
        return layer.variable(PROBE_COLLECTION, "backward", stats_probe).value
    return None


def _layer_cache(layer: DEQ, z_cold: jax.Array) -> Optional[tuple]:
    """The layer's ``"deq_cache"`` variables ``(z, seen)``: created at init, used when the caller passes them."""
    if layer.cache_size is None or not (layer.is_initializing() or layer.has_variable(CACHE_COLLECTION, "z")):
        return None

    def empty(part: int) -> jax.Array:
        return empty_cache(layer.cache_size, z_cold)[part]

    return tuple(layer.variable(CACHE_COLLECTION, name, empty, part) for part, name in enumerate(("z", "seen")))


def _layer_index(layer: DEQ) -> Optional[jax.Array]:
    """The samples' indices passed in the ``"deq_index"`` collection, or ``None``: the variable is created empty
    at init (its place recorded, like the probe's) and filled by the caller (``fit`` does)."""
    if layer.is_initializing() or layer.has_variable(INDEX_COLLECTION, "index"):
        index = layer.variable(INDEX_COLLECTION, "index", _no_index).value
        return None if jnp.shape(index) == (0,) else index
    return None


def _no_index() -> jax.Array:
    """The placeholder of a layer's cache index: no sample (a call that finds it asks for an index)."""
    return jnp.zeros((0,), jnp.int32)


def _solve_linen(layer: DEQ, name: str, solve: Callable, z_cold: jax.Array, index: Optional[jax.Array]) -> Solution:
    """``solve`` from the layer's cache (``solve_from_cache``) when the caller passed it, else from ``z_cold``; the
    index is ``index`` if given, else the ``"deq_index"`` collection's."""
    variables = _layer_cache(layer, z_cold)  # created at init, where the solve starts cold
    if variables is None:
        return solve(z_cold)
    passed = _layer_index(layer)  # created at init too
    if layer.is_initializing():
        return solve(z_cold)
    if not layer.is_mutable_collection(CACHE_COLLECTION):
        raise ValueError(
            f"DEQ({name}): the 'deq_cache' collection was passed but is not mutable: apply with "
            "mutable=['deq_cache'] to keep the new equilibria, or leave it out for a cold start"
        )
    index = passed if index is None else index
    sol, new = solve_from_cache(name, solve, z_cold, index, tuple(v.value for v in variables))
    for variable, value in zip(variables, new):
        variable.value = value
    return sol


def _linen_cell_solver(layer: DEQ, cell: Any, x: jax.Array, options: dict) -> tuple[jax.Array, Callable]:
    """``(cold start, solve(start) -> Solution)`` for a jdeq cell, its parameters created at init; the input is
    checked here, once (before flax's own shape check of the parameters, to name a misfit input)."""
    if layer.has_variable("params", "cell"):
        check_input(cell, layer.get_variable("params", "cell"), x)
    else:  # init: the parameters are built for x
        _check_batch(type(cell).__name__, x)
    params = layer.param("cell", lambda key: cell.init(key, jnp.shape(x)[1:]))
    return _cell_solver(cell, params, x, options)


def _cell_solver(cell: Any, params: Any, x: jax.Array, options: dict) -> tuple[jax.Array, Callable]:
    """``(cold start, solve(start) -> Solution)`` for a jdeq cell with ``params``, ``x`` already checked."""
    return _cell_start(cell, params, x), lambda start: _solve_cell(cell, params, x, z0=start, **options)


def _linen_module_solver(layer: DEQ, module: linen.Module, x: jax.Array, z0: Optional[jax.Array], options):
    """``(z0, solve(start) -> Solution)`` for a linen module, its parameters created at init."""
    name = type(module).__name__
    if z0 is None:
        raise _missing_start(name)
    if layer.is_initializing():
        module(z0[:1], x[:1])  # creates the parameters, one sample as a batch of one
    variables = module.variables
    _reject_state(name, [c for c in variables if c not in ("params", "intermediates")])
    pure = module.clone(parent=None)
    keys = None
    if layer.has_rng("dropout"):  # one key per call: the same mask at every iteration of the solve
        keys = jax.random.split(layer.make_rng("dropout"), len(x))

    call = _LinenMap(pure)
    one = _OneOfBatch(_StateFirst(call))
    if layer.is_initializing() and layer.per_sample and keys is None:  # once, at init (masks differ with dropout)
        _check_per_sample(name, call, z0, x, variables.get("params", {}))
    return z0, lambda start: _solve_map(one, call, start, x, variables.get("params", {}), keys=keys, **options)


class DEQClassifier(linen.Module):
    """``logits = Dense(pool(deq(x)))``: a :class:`DEQ` layer, global average pooling over spatial axes, a
    linear head."""

    deq: DEQ
    num_classes: int

    @linen.compact
    def __call__(self, x: jax.Array, z0: Optional[jax.Array] = None) -> jax.Array:
        z = self.deq(x, z0)
        pooled = jnp.mean(z, axis=tuple(range(1, z.ndim - 1)))
        return linen.Dense(self.num_classes, param_dtype=pooled.dtype)(pooled)  # no implicit promotion


def _set_value(variable: nnx.Variable, value: Any) -> None:
    """``variable.set_value(value)``; flax 0.12.0 (our lower bound) has only the ``.value`` setter, deprecated later."""
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


class BackwardProbe(nnx.Variable):
    """An NNX layer's zero probe: differentiate with respect to it (``nnx.DiffState``) for backward stats."""


class FixedPointCache(nnx.Variable):
    """An NNX layer's per-example fixed-point cache (the states and their ``seen`` flags); not a parameter."""


class CacheIndex(nnx.Variable):
    """An NNX layer's cache index: the samples' indices in the dataset for the next call (set by
    :func:`set_cache_index`; empty: none set)."""


def set_cache_index(module: nnx.Module, index: jax.Array) -> None:
    """Set the :class:`CacheIndex` of every NNX DEQ layer in ``module`` to ``index`` (each sample's index in the
    dataset), so that a model enclosing cached layers passes nothing on (:func:`jdeq.train.fit` does this)."""
    index = jnp.asarray(index)
    nnx.update(module, jax.tree_util.tree_map(lambda _: index, nnx.state(module, CacheIndex)))


def _nnx_cache(name: str, cache_size: Optional[int], state_shape, state_dtype) -> tuple:
    """The two :class:`FixedPointCache` variables of an NNX layer with ``cache_size``, or ``(None, None)``."""
    if cache_size is None:
        return None, None
    if state_shape is None:
        raise ValueError(
            f"NNXDEQ({name}) with cache_size needs state_shape, one sample's shape of z (a Flax module does not "
            "say the shape of its state)"
        )
    template = jnp.zeros((1, *state_shape), state_dtype or jnp.zeros(()).dtype)
    return tuple(FixedPointCache(value) for value in empty_cache(cache_size, template))


class NNXDEQ(nnx.Module):
    """An NNX DEQ layer: ``z* = f(z*, x)`` for a batch ``x``; calling it returns the equilibrium.

    Args:
      f: any ``nnx.Module`` called as ``f(z, x)``, or a jdeq cell (its parameters are built from
        ``x_shape`` and ``rngs`` as ``nnx.Param`` leaves).
      x_shape: one sample's input shape (a jdeq cell only).
      rngs: the ``nnx.Rngs`` that build a jdeq cell's parameters (a jdeq cell only).
      solver: as in :class:`DEQ`.
      grad: as in :class:`DEQ`.
      per_sample: as in :class:`DEQ`.
      cache_size: as in :class:`DEQ`: the cache is two :class:`FixedPointCache` variables, ``cached_states``
        and ``cached_seen``; the attribute ``warm_start`` (``True`` when there is a cache) switches it off
        for evaluation: ``model.set_attributes(warm_start=False)``. The samples' indices come as ``index`` or
        from the layer's :class:`CacheIndex` variable, which :func:`set_cache_index` sets through any
        enclosing model.
      state_shape: one sample's state shape, for the cache of a Flax module's layer (a jdeq cell's is known).
      state_dtype: the state's dtype for that cache (default: JAX's default float).
      skip: an ``nnx.Module`` mapping the input batch to a start shaped like the state, trained jointly by the
        consistency loss, as in :class:`DEQ` (its latest value kept in the ``nnx.Intermediate`` ``skip_loss``).
      skip_weight: as in :class:`DEQ`.

    Call as ``layer(x, z0, index=None)``; with a cache and ``warm_start``, each sample's index in the
    dataset is required (``index``, or the :class:`CacheIndex` set by :func:`set_cache_index`). Keeps the
    latest call's forward :class:`jdeq.Stats` as an ``nnx.Intermediate`` (read with :func:`forward_stats`).
    """

    def __init__(
        self,
        f: Any,
        x_shape: Optional[tuple] = None,
        *,
        rngs: Optional[nnx.Rngs] = None,
        solver: Solver = DEFAULT_SOLVER,
        grad: Optional[GradientMode] = None,
        per_sample: bool = True,
        cache_size: Optional[int] = None,
        state_shape: Optional[tuple] = None,
        state_dtype: Any = None,
        skip: Optional[nnx.Module] = None,
        skip_weight: float = 1.0,
    ):
        check_cache_size(cache_size)
        check_skip_weight(skip_weight)
        self.skip, self.skip_weight, self.skip_loss = skip, skip_weight, nnx.Intermediate(None)
        self.solver, self.grad, self.per_sample = solver, grad, per_sample
        self.checked_per_sample = False  # whether a module map was checked not to couple samples (on real values)
        self.probe = BackwardProbe(stats_probe())
        self.deq_stats = nnx.Intermediate(None)
        if isinstance(f, nnx.Module):
            self.f, self.cell = f, None
        else:
            if x_shape is None or rngs is None:
                raise ValueError(f"NNXDEQ({type(f).__name__}): a jdeq cell needs x_shape and rngs to build parameters")
            self.f, self.cell = None, f
            self.params = nnx.data(jax.tree_util.tree_map(nnx.Param, f.init(rngs.params(), tuple(x_shape))))
            state = jax.eval_shape(f.inject, self._cell_params(), jnp.zeros(tuple(x_shape)))
            state_shape, state_dtype = state.shape, state.dtype
        self.warm_start = cache_size is not None
        self.cached_states, self.cached_seen = _nnx_cache(type(f).__name__, cache_size, state_shape, state_dtype)
        self.cache_index = None if cache_size is None else CacheIndex(_no_index())

    def __call__(self, x: jax.Array, z0: Optional[jax.Array] = None, index: Optional[jax.Array] = None) -> jax.Array:
        options = dict(solver=self.solver, grad=self.grad, per_sample=self.per_sample, backward_stats=self.probe[...])
        if self.cell is not None:
            check_input(self.cell, self._cell_params(), x)
            z_cold, solve = _cell_solver(self.cell, self._cell_params(), x, options)
        else:
            z_cold, solve = self._module_solver(x, z0, options)
        if self.skip is not None:
            z_cold = skip_start(type(self.f or self.cell).__name__, self.skip(x), z_cold)
        use_cache = self.warm_start and self.cached_states is not None
        cache = (self.cached_states[...], self.cached_seen[...]) if use_cache else None
        if use_cache and index is None and jnp.shape(self.cache_index[...]) != (0,):
            index = self.cache_index[...]
        sol, new = solve_from_cache(type(self.f or self.cell).__name__, solve, z_cold, index, cache)
        if new is not None:
            _set_value(self.cached_states, new[0])
            _set_value(self.cached_seen, new[1])
        _set_value(self.deq_stats, sol.stats)  # the latest call's, replaced (not appended) at each call
        if self.skip is None:
            return sol.value
        _set_value(self.skip_loss, consistency_loss(z_cold, sol.value))
        return with_consistency(sol.value, z_cold, self.skip_weight)

    def _cell_params(self) -> Any:
        return jax.tree_util.tree_map(lambda v: v[...], self.params, is_leaf=lambda v: isinstance(v, nnx.Variable))

    def _module_solver(self, x: jax.Array, z0: Optional[jax.Array], options: dict) -> tuple[jax.Array, Callable]:
        """``(z0, solve(start) -> Solution)`` for the layer's ``nnx.Module``."""
        name = type(self.f).__name__
        if z0 is None:
            raise _missing_start(name)
        graphdef, params, batch_stats, rngs, rest = nnx.split(self.f, nnx.Param, nnx.BatchStat, nnx.RngState, ...)
        _reject_state(name, ["batch_stats"] if jax.tree_util.tree_leaves(batch_stats) else [])
        _advance_streams(self.f)  # the next call's solve sees new masks
        call = _NNXMap(name, graphdef)
        variables = (params, rngs, rest)
        random = bool(jax.tree_util.tree_leaves(rngs))  # masks drawn on a batch and on one sample differ
        if self.per_sample and not self.checked_per_sample and not random:  # once per layer, or per trace
            _check_per_sample(name, call, z0, x, variables)
            concrete = not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((x, params)))
            self.checked_per_sample = concrete  # set inside nnx.jit, it would change the graph and retrace
        return z0, lambda start: _solve_map(_OneOfBatch(_StateFirst(call)), call, start, x, variables, **options)


@dataclasses.dataclass(frozen=True)
class _NNXMap:
    """An NNX module as ``f((params, rngs, rest), z, x)``: the module rebuilt from ``graphdef`` on fresh copies of
    the variables it is passed at every evaluation (the same rng state, so the same dropout mask), refusing a module
    that writes to its variables (:func:`_reject_updates`). Its variables are arguments, not closed over, so equal
    layers give equal maps and an un-jitted call reuses the previous call's compiled solve."""

    name: str
    graphdef: Any

    def __call__(self, variables, z, x):
        params, rngs, rest = variables
        module = nnx.merge(self.graphdef, params, rngs, rest, copy=True)
        out = module(z, x)
        _reject_updates(self.name, rest, nnx.split(module, nnx.Param, nnx.BatchStat, nnx.RngState, ...)[-1])
        return out


def _stand_in(tree: Any) -> Any:
    """Concrete values shaped like the leaves of ``tree`` (standard normal floats, zero integers; NumPy arrays, so
    no JAX program runs to make them): inputs for a check made while tracing, where the real values are tracers."""
    rng = np.random.default_rng(0)

    def like(leaf):
        shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.floating):
            return rng.standard_normal(shape).astype(dtype)
        return np.zeros(shape, dtype)

    return jax.tree_util.tree_map(like, tree)


def _advance_streams(module: nnx.Module) -> None:
    """Give every ``nnx.RngStream`` of ``module`` a new key, split from its own: the next call draws keys unrelated
    to this call's, however many draws one evaluation of the map makes."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.RngStream):
            _set_value(node.key, jax.random.split(node.key[...])[0])


def _reject_updates(name: str, before: nnx.State, after: nnx.State) -> None:
    """ValueError when an NNX map assigned a variable other than its parameters and rng streams during a call (at
    trace time: the leaves of ``after`` are the very arrays of ``before`` unless the map replaced them)."""
    old, new = (
        {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
        for state in (before, after)
    )
    changed = [path for path in {**old, **new} if old.get(path) is not new.get(path)]  # added or replaced
    if changed:
        raise ValueError(
            f"NNXDEQ({name}): the map updates its state ({', '.join(changed)}) when called; a DEQ map must be the "
            "same map at every iteration, so a map may not write to its variables (counters, sown intermediates, "
            "running statistics): keep such state outside the map, or compute it from the equilibrium afterwards"
        )


class NNXDEQClassifier(nnx.Module):
    """``logits = Linear(pool(deq(x)))`` in NNX: an :class:`NNXDEQ` layer whose state has ``features`` channels,
    global average pooling over spatial axes, a linear head."""

    def __init__(self, deq: NNXDEQ, features: int, num_classes: int, *, rngs: nnx.Rngs):
        # the head's parameters in JAX's default float dtype, that of a jdeq cell's state (no implicit promotion)
        self.deq, self.head = deq, nnx.Linear(features, num_classes, param_dtype=jnp.zeros(()).dtype, rngs=rngs)

    def __call__(self, x: jax.Array, z0: Optional[jax.Array] = None) -> jax.Array:
        z = self.deq(x, z0)
        return self.head(jnp.mean(z, axis=tuple(range(1, z.ndim - 1))))
