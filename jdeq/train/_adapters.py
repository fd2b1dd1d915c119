"""Model adapters: a linen or NNX model as :func:`jdeq.train.fit` calls it (parameters, probes, cache, index).

Each adapter gives ``init(seed, x) -> params``, ``apply(params, probes, x, cache=None, index=None,
model_state=None, rng=None, train=False) -> (outputs, forward stats, new cache, new model_state)``, ``probes(x)``,
``fields()`` (what identifies the model in a run config; ``field_values()``: the values behind them, to read the
config of an older jdeq), ``model_state`` (state besides parameters: batch
statistics, NNX rng counters), ``layer_solvers`` (each DEQ layer's forward and backward solvers, for the
convergence report) and ``finish(params, model_state)``. The backward probes and the cache index reach the DEQ layers as Flax state (linen
collections whose layout ``init`` records; NNX variables), never as arguments of the user's ``__call__``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax import nnx

from ..gradients import Implicit
from ..implicit import DEFAULT_SOLVER
from ..nn import (
    CACHE_COLLECTION,
    DEQ,
    INDEX_COLLECTION,
    NNXDEQ,
    PROBE_COLLECTION,
    STATS_COLLECTION,
    BackwardProbe,
    FixedPointCache,
    forward_stats,
    set_cache_index,
)
from ..stats import stats_probe


class LinenModel:
    """A linen model as :func:`fit` uses it: ``params`` from ``init(seed)``, forward stats from ``"intermediates"``,
    per-sample backward probes passed as the ``"deq_probe"`` collection, the fixed-point cache (if any) as the
    mutable ``"deq_cache"`` collection, the samples' indices as the ``"deq_index"`` collection, and the model's
    other collections (``"batch_stats"`` and the like) as its ``model_state``, mutable in training. Each training
    step gets a fresh key for each of ``rng_streams``; ``train_flag`` names a keyword of the model's ``__call__``
    set to True in training and False in evaluation (and at ``init``)."""

    def __init__(self, model: linen.Module, rng_streams: tuple = ("dropout",), train_flag: str | None = None):
        self.model, self.rng_streams, self.train_flag = model, tuple(rng_streams), train_flag
        self.probe_layout: Any = {}  # the "deq_probe" collection's structure, recorded by init
        self.cache: Any = None  # the initial "deq_cache" collection, recorded by init
        self.index_layout: Any = {}  # the "deq_index" collection's structure, recorded by init
        self.model_state: Any = None  # the model's other collections (e.g. "batch_stats"), recorded by init
        self.layer_solvers: list[dict] = []  # each DEQ layer's solvers, recorded by init

    def init(self, seed: int, x: jax.Array) -> Any:
        key = jax.random.PRNGKey(seed)
        rngs = {"params": key, **{stream: jax.random.fold_in(key, i + 1) for i, stream in enumerate(self.rng_streams)}}
        layers = {}

        def record_layer(call, args, kwargs, context):  # the DEQ layers the model calls, by their path
            if isinstance(context.module, DEQ):
                layers[context.module.path] = context.module
            return call(*args, **kwargs)

        with linen.intercept_methods(record_layer):
            variables = self.model.init(rngs, x, **self._flag(False))
        self.probe_layout = variables.get(PROBE_COLLECTION, {})
        self.layer_solvers = layer_solvers(self.probe_layout, layers)
        self.cache = variables.get(CACHE_COLLECTION)
        self.index_layout = variables.get(INDEX_COLLECTION, {})
        own = ("params", PROBE_COLLECTION, CACHE_COLLECTION, INDEX_COLLECTION, STATS_COLLECTION)
        self.model_state = {name: v for name, v in variables.items() if name not in own} or None
        return variables["params"]

    def _flag(self, train: bool) -> dict:
        return {} if self.train_flag is None else {self.train_flag: train}

    def apply(self, params, probes, x, cache=None, index=None, model_state=None, rng=None, train=False) -> tuple:
        """``(outputs, forward stats, new cache, new model_state)``; without a ``cache`` (``None``) a cold start and
        ``None``; ``model_state`` is updated only in training (``train``); ``rng`` seeds the ``rng_streams``."""
        variables = {"params": params, **(model_state or {})}
        if probes is not None:
            variables[PROBE_COLLECTION] = probes
        mutable = [STATS_COLLECTION, *(list(model_state or {}) if train else [])]
        if cache is not None:
            variables[CACHE_COLLECTION] = cache
            variables[INDEX_COLLECTION] = jax.tree_util.tree_map(lambda _: index, self.index_layout)
            mutable.append(CACHE_COLLECTION)
        rngs = {} if rng is None else {s: jax.random.fold_in(rng, i) for i, s in enumerate(self.rng_streams)}
        outputs, sown = self.model.apply(variables, x, mutable=mutable, rngs=rngs, **self._flag(train))
        new_state = {name: sown[name] for name in model_state} if train and model_state else model_state
        return outputs, forward_stats(sown), sown.get(CACHE_COLLECTION) if cache is not None else None, new_state

    def probes(self, x: jax.Array) -> Any:
        """A per-sample probe for each DEQ layer of the model :meth:`init` built (no second trace of ``init``)."""
        return jax.tree_util.tree_map(lambda _: stats_probe(x.shape[:1]), self.probe_layout)

    def fields(self) -> dict:
        return model_fields(self.model)

    def field_values(self) -> dict:
        return field_values(self.model)

    def finish(self, params: Any, model_state: Any = None) -> None:
        """Nothing to do: a linen model holds no parameters."""


NNX_STATE = (nnx.BatchStat, nnx.RngState)
"""The NNX variables besides parameters that training updates: batch statistics and the ``nnx.Rngs`` keys and
counters (so that dropout draws a fresh mask at every step)."""


class NNXModel:
    """An NNX model as :func:`fit` uses it: its own ``nnx.Param`` state is the initial ``params`` (the seed sets
    only the batch order), :class:`jdeq.nn.BackwardProbe` variables get per-sample probes, the
    :class:`jdeq.nn.CacheIndex` variables the samples' indices, its ``nnx.BatchStat`` and ``nnx.RngState``
    variables are the ``model_state`` threaded through each training step; training runs the model in
    ``train()`` mode, evaluation in ``eval()`` mode; the trained parameters and state are written back into the
    model at the end."""

    def __init__(self, model: nnx.Module):
        self.model = model
        self.graphdef, self.params, self.probe_state, cache, state, self.rest = nnx.split(
            model, nnx.Param, BackwardProbe, FixedPointCache, NNX_STATE, ...
        )
        self.cache = cache if jax.tree_util.tree_leaves(cache) else None
        self.model_state = state if jax.tree_util.tree_leaves(state) else None
        layers = {path: node for path, node in nnx.iter_graph(model) if isinstance(node, NNXDEQ)}
        self.layer_solvers = layer_solvers(self.probe_state, layers)

    def init(self, seed: int, x: jax.Array) -> Any:
        return self.params

    def apply(self, params, probes, x, cache=None, index=None, model_state=None, rng=None, train=False) -> tuple:
        """``(outputs, forward stats, new cache, new model_state)``; without a ``cache`` (``None``) the layers'
        ``warm_start`` is switched off (a cold start) and the new cache is ``None``."""
        probes = self.probe_state if probes is None else probes
        caches = () if self.cache is None else (self.cache if cache is None else cache,)
        states = () if self.model_state is None else (self.model_state if model_state is None else model_state,)
        module = nnx.merge(self.graphdef, params, probes, *caches, *states, self.rest, copy=True)  # fresh variables
        if train:
            module.train()
        else:
            module.eval()
        if cache is None:
            module.set_attributes(warm_start=False, raise_if_not_found=False)
        else:
            set_cache_index(module, index)
        outputs = module(x)
        new_state = nnx.state(module, NNX_STATE) if train and self.model_state is not None else model_state
        new_cache = None if cache is None else nnx.state(module, FixedPointCache)
        return outputs, forward_stats(module), new_cache, new_state

    def probes(self, x: jax.Array) -> Any:
        return jax.tree_util.tree_map(lambda _: stats_probe(x.shape[:1]), self.probe_state)

    def fields(self) -> dict:
        shapes = jax.tree_util.tree_map(jnp.shape, self.params)
        cache = {} if self.cache is None else {"model.cache": str(jax.tree_util.tree_map(jnp.shape, self.cache))}
        return {
            "model": type(self.model).__name__,
            "model.params": str(shapes),
            **cache,
            **{key: describe(field.value) for key, field in self.field_values().items()},
        }

    def field_values(self) -> dict:
        """The solver, gradient mode and ``per_sample`` of each DEQ layer (see :func:`nnx_layer_fields`)."""
        return nnx_layer_fields(self.model)

    def finish(self, params: Any, model_state: Any = None) -> None:
        nnx.update(self.model, params, *(() if model_state is None else (model_state,)))


def nnx_layer_fields(model: nnx.Module) -> dict:
    """``{"model.<path>.<option>": FieldValue}`` of the solver, gradient mode and ``per_sample`` of each DEQ layer of
    an NNX ``model`` (a linen model's fields hold them already)."""
    return {
        f"model.{'.'.join(map(str, path))}.{option}": FieldValue(getattr(node, option), False)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, NNXDEQ)
        for option in ("solver", "grad", "per_sample")
    }


def layer_solvers(probes: Any, layers: dict) -> list[dict]:
    """``{"fwd_": forward solver, "bwd_": backward solver or None}`` of each DEQ layer, in the order of the layers'
    backward ``probes`` (the order of their statistics in a history row); ``layers`` maps each layer's path in the
    model to the layer (its ``solver`` and ``grad``), the longest path that starts a probe's path is its layer."""
    solvers = []
    for key_path, _ in jax.tree_util.tree_flatten_with_path(probes)[0]:
        names = tuple(key.key for key in key_path if isinstance(key, jax.tree_util.DictKey))
        layer = next((layers[names[:i]] for i in range(len(names), -1, -1) if names[:i] in layers), None)
        if layer is None:  # a probe outside any layer found: no solver to name
            return []
        forward = DEFAULT_SOLVER if layer.solver is None else layer.solver
        solvers.append({"fwd_": forward, "bwd_": backward_solver(forward, layer.grad)})
    return solvers


def backward_solver(forward: Any, grad: Any) -> Any:
    """The solver of a gradient mode's backward solve: its ``solver`` (``None``: the ``forward`` one, as
    :class:`jdeq.Implicit` reuses it) or its ``refine`` solver (:class:`jdeq.Shine`), ``None`` without one."""
    grad = Implicit() if grad is None else grad
    if hasattr(grad, "solver"):
        return forward if grad.solver is None else grad.solver
    return getattr(grad, "refine", None)


def unused_caches(model: Any) -> list[str]:
    """The paths of an NNX ``model``'s DEQ layers that hold a fixed-point cache but have ``warm_start=False``
    (the cache is then neither read nor filled)."""
    if not isinstance(model, nnx.Module):
        return []
    return [
        ".".join(map(str, path)) or "model"
        for path, node in nnx.iter_graph(model)
        if isinstance(node, NNXDEQ) and node.cached_states is not None and not node.warm_start
    ]


def as_trainable(model: Any, rng_streams: tuple = ("dropout",), train_flag: str | None = None) -> LinenModel | NNXModel:
    """The adapter of a linen or NNX ``model`` (``rng_streams`` and ``train_flag``: linen only, see
    :class:`LinenModel`); TypeError for anything else."""
    if isinstance(model, nnx.Module):
        return NNXModel(model)
    if isinstance(model, linen.Module):
        return LinenModel(model, rng_streams, train_flag)
    raise TypeError(f"fit trains a flax linen Module or an nnx.Module, got {type(model).__name__}")


class FieldValue(NamedTuple):
    """The value behind one ``model.<path>`` field of a run config, and whether it sits at a dataclass default (its
    own field's, or that of a field it is nested in)."""

    value: Any
    default: bool


def field_values(value: Any, prefix: str = "model", default: bool = False) -> dict:
    """``{"model.<field path>": FieldValue}`` of a (linen) dataclass's fields, nested ones flattened."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            key: field
            for f in dataclasses.fields(value)
            if f.name != "parent"
            for key, field in field_values(
                getattr(value, f.name), f"{prefix}.{f.name}", default or at_default(value, f)
            ).items()
        }
    return {prefix: FieldValue(value, default)}


def model_fields(value: Any, prefix: str = "model") -> dict:
    """``{"model.<field path>": repr}`` of a (linen) dataclass's fields, nested ones flattened, addresses dropped."""
    return {key: describe(field.value) for key, field in field_values(value, prefix).items()}


def at_default(value: Any, field: dataclasses.Field) -> bool:
    """Whether dataclass ``value``'s ``field`` holds its default (compared as :func:`describe` texts)."""
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return False
    return describe(getattr(value, field.name)) == describe(default)


def describe(value: Any, keep: Callable[[str], bool] | None = None, omitted: list | None = None) -> str:
    """``repr(value)`` without memory addresses; with ``keep``, the dataclass fields (at any depth, in tuples, lists
    and dicts too) that hold their default and whose name ``keep`` rejects are left out, as a version of jdeq that
    predates them wrote the text, each appended to ``omitted`` as ``"Class.field=repr"``. A dataclass with a repr of
    its own is described by that repr, whole."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))
    if type(value) in (tuple, list):
        parts = ", ".join(describe(item, keep, omitted) for item in value)
        return f"[{parts}]" if type(value) is list else f"({parts}{',' if len(value) == 1 else ''})"
    if type(value) is dict:
        return "{" + ", ".join(f"{describe(k)}: {describe(v, keep, omitted)}" for k, v in value.items()) + "}"
    if not (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        return text
    name = type(value).__qualname__

    def spelled(fields: list, keep: Callable[[str], bool] | None = None) -> str:  # as the dataclass's own repr
        return f"{name}({', '.join(f'{f.name}={describe(getattr(value, f.name), keep, omitted)}' for f in fields)})"

    shown = [f for f in dataclasses.fields(value) if f.repr]
    if keep is None or text != spelled(shown):  # nothing to leave out, or a repr of its own
        return text
    left_out = {f.name for f in shown if not keep(f.name) and at_default(value, f)}
    if omitted is not None:
        omitted.extend(f"{name}.{field}={describe(getattr(value, field))}" for field in sorted(left_out))
    return spelled([f for f in shown if f.name not in left_out], keep)
