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
- Map state other than parameters (BatchNorm's ``batch_stats``) is rejected: a DEQ map must be the
  same map at every iteration. A linen ``"dropout"`` rng draws one key per call, so one solve uses
  the same mask at every iteration (each sample its own when ``per_sample``).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax import nnx

from .gradients import GradientMode
from .implicit import DEFAULT_SOLVER, fixed_point, fixed_point_batch
from .solvers import Solution, Solver, Stats
from .stats import stats_probe

STATS_COLLECTION = "intermediates"
STATS_NAME = "deq_stats"
PROBE_COLLECTION = "deq_probe"


def check_input(cell: Any, params: Any, x: jax.Array) -> None:
    """ValueError unless ``x`` is a floating batch whose per-sample shape fits ``params``."""
    x = jnp.asarray(x)
    name = type(cell).__name__
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"DEQ({name}) takes floating-point inputs, got dtype {x.dtype} (convert and scale it first)")
    if x.ndim < 2:
        raise ValueError(f"DEQ({name}) takes a batch of inputs (batch, ...), got shape {x.shape}")
    expected = _shapes(jax.eval_shape(lambda key: cell.init(key, x.shape[1:]), jax.random.PRNGKey(0)))
    got = _shapes(params)
    if expected != got:
        misfits = [f"{k} is {got.get(k, 'missing')}, expected {v}" for k, v in expected.items() if got.get(k) != v]
        misfits += [f"{k} is not a parameter of this cell" for k in got if k not in expected]
        raise ValueError(
            f"DEQ({name}) with inputs of per-sample shape {x.shape[1:]}: its parameters do not fit "
            f"({'; '.join(misfits)}); were they built for another cell (width, channels) or other inputs?"
        )


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
) -> Solution:
    """The equilibrium of a jdeq ``cell`` for each sample of the batch ``x``, from ``z0 = 0``.

    The injection ``u = inject(params, x)`` is computed once, then ``z* = cell(params, z*, u)`` solved.
    ``backward_stats``: a :func:`jdeq.stats_probe` (unbatched: the counts add up over the batch).
    """
    check_input(cell, params, x)
    u = jax.vmap(cell.inject, in_axes=(None, 0))(params, x)
    return _solve_map(
        lambda z, u, p: cell(p, z, u),
        jax.vmap(cell, in_axes=(None, 0, 0)),
        jnp.zeros_like(u),
        u,
        params,
        solver=solver,
        grad=grad,
        per_sample=per_sample,
        backward_stats=backward_stats,
    )


def _solve_map(one, coupled, z0, x, params, *, solver, grad, per_sample, backward_stats, keys=None) -> Solution:
    """``z = one(z_i, x_i, params[, key_i])`` per sample, or ``z = coupled(params, z, x[, key])`` on the batch."""
    extra = () if keys is None else (keys if per_sample else keys[0],)
    if per_sample:
        axes = (0, None) + ((0,) if keys is not None else ())
        options = dict(in_axes=axes, solver=solver, grad=grad, backward_stats=backward_stats)
        return fixed_point_batch(one, z0, x, params, *extra, **options)
    return fixed_point(
        lambda z, x, p, *k: coupled(p, z, x, *k),
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
            "instead of BatchNorm"
        )


def _missing_start(name: str) -> ValueError:
    return ValueError(
        f"DEQ({name}): pass z0, the start of the solve shaped like the state (batch, ...); a Flax module "
        "does not say the shape of its state (only the jdeq cells build their own zero start)"
    )


def _one_of_batch(module_call):
    """``module_call(z, x, ...)`` on one sample, as a batch of one (modules written for batches work)."""
    return lambda z, x, *rest: module_call(z[None], x[None], *rest)[0]


class DEQ(linen.Module):
    """A linen DEQ layer: ``z* = f(z*, x)`` for a batch ``x``.

    Attributes:
      f: any linen module called as ``f(z, x)``, or a jdeq cell (:class:`jdeq.models.MLPCell`,
        :class:`jdeq.models.ConvCell`, or any object with ``init`` / ``inject`` / ``__call__``).
      solver: the forward solver (default :data:`jdeq.DEFAULT_SOLVER`).
      grad: the gradient mode (default ``Implicit()``).
      per_sample: each sample its own problem (default), or the batch as one.
      cell: ``f`` by its former name (``DEQ(cell=MLPCell(64))``).

    Call as ``layer(x, z0)``; ``z0`` may be omitted for a jdeq cell. Returns the equilibrium, shaped
    like ``z0``. A jdeq cell's parameters live under ``params["cell"]``, a module's under ``params["f"]``
    (or under its parent's name for it, when the module is created inside a parent's compact method).
    """

    f: Any = None
    solver: Solver = DEFAULT_SOLVER
    grad: Optional[GradientMode] = None
    per_sample: bool = True
    cell: Any = None

    @linen.compact
    def __call__(self, x: jax.Array, z0: Optional[jax.Array] = None) -> jax.Array:
        if (self.f is None) == (self.cell is None):
            raise ValueError("DEQ takes one map: DEQ(f) with a linen module or a jdeq cell (or DEQ(cell=...))")
        options = dict(
            solver=self.solver, grad=self.grad, per_sample=self.per_sample, backward_stats=_layer_probe(self)
        )
        f = self.f if self.f is not None else self.cell
        if isinstance(f, linen.Module):
            sol = _solve_linen_module(self, f, x, z0, options)
        else:
            sol = _solve_linen_cell(self, f, x, options)
        if not self.is_initializing():  # init returns parameters only, no stale statistics
            self.sow(STATS_COLLECTION, STATS_NAME, sol.stats)
        return sol.value


def _layer_probe(layer: DEQ) -> Optional[jax.Array]:
    """The layer's backward-stats probe: created at init, read when the caller passes the collection."""
    if layer.is_initializing() or layer.has_variable(PROBE_COLLECTION, "backward"):
        return layer.variable(PROBE_COLLECTION, "backward", stats_probe).value
    return None


def _solve_linen_cell(layer: DEQ, cell: Any, x: jax.Array, options: dict) -> Solution:
    if layer.has_variable("params", "cell"):  # name a misfit input before flax's own shape check does
        check_input(cell, layer.get_variable("params", "cell"), x)
    params = layer.param("cell", lambda key: cell.init(key, jnp.shape(x)[1:]))
    return solve_cell(cell, params, x, **options)


def _solve_linen_module(layer: DEQ, module: linen.Module, x: jax.Array, z0: Optional[jax.Array], options) -> Solution:
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

    def call(p, z, x, *key):
        rngs = {"dropout": key[0]} if key else None
        return pure.apply({"params": p}, z, x, rngs=rngs)

    one = _one_of_batch(lambda z, x, p, *key: call(p, z, x, *key))
    return _solve_map(one, call, z0, x, variables.get("params", {}), keys=keys, **options)


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

    Keeps the latest call's forward :class:`jdeq.Stats` as an ``nnx.Intermediate`` (read with
    :func:`forward_stats`).
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
    ):
        self.solver, self.grad, self.per_sample = solver, grad, per_sample
        self.probe = BackwardProbe(stats_probe())
        self.deq_stats = nnx.Intermediate(None)
        if isinstance(f, nnx.Module):
            self.f, self.cell = f, None
        else:
            if x_shape is None or rngs is None:
                raise ValueError(f"NNXDEQ({type(f).__name__}): a jdeq cell needs x_shape and rngs to build parameters")
            self.f, self.cell = None, f
            self.params = nnx.data(jax.tree_util.tree_map(nnx.Param, f.init(rngs.params(), tuple(x_shape))))

    def __call__(self, x: jax.Array, z0: Optional[jax.Array] = None) -> jax.Array:
        options = dict(solver=self.solver, grad=self.grad, per_sample=self.per_sample, backward_stats=self.probe[...])
        if self.cell is not None:
            params = jax.tree_util.tree_map(
                lambda v: v[...], self.params, is_leaf=lambda v: isinstance(v, nnx.Variable)
            )
            sol = solve_cell(self.cell, params, x, **options)
        else:
            sol = self._solve_module(x, z0, options)
        _set_value(self.deq_stats, sol.stats)  # the latest call's, replaced (not appended) at each call
        return sol.value

    def _solve_module(self, x: jax.Array, z0: Optional[jax.Array], options: dict) -> Solution:
        name = type(self.f).__name__
        if z0 is None:
            raise _missing_start(name)
        graphdef, params, batch_stats, rest = nnx.split(self.f, nnx.Param, nnx.BatchStat, ...)
        _reject_state(name, ["batch_stats"] if jax.tree_util.tree_leaves(batch_stats) else [])

        def call(p, z, x):
            return nnx.merge(graphdef, p, rest)(z, x)

        return _solve_map(_one_of_batch(lambda z, x, p: call(p, z, x)), call, z0, x, params, **options)


class NNXDEQClassifier(nnx.Module):
    """``logits = Linear(pool(deq(x)))`` in NNX: an :class:`NNXDEQ` layer whose state has ``features`` channels,
    global average pooling over spatial axes, a linear head."""

    def __init__(self, deq: NNXDEQ, features: int, num_classes: int, *, rngs: nnx.Rngs):
        self.deq, self.head = deq, nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, z0: Optional[jax.Array] = None) -> jax.Array:
        z = self.deq(x, z0)
        return self.head(jnp.mean(z, axis=tuple(range(1, z.ndim - 1))))
