"""Model adapters: a linen or NNX model as :func:`jdeq.train.fit` calls it (parameters, probes, cache, index).

Each adapter gives ``init(seed, x) -> params``, ``apply(params, probes, x, cache=None, index=None) -> (outputs,
forward stats, new cache)``, ``probes(x)``, ``fields()`` (what identifies the model in a run config) and
``finish(params)``. The backward probes and the cache index reach the DEQ layers as Flax state (linen
collections whose layout ``init`` records; NNX variables), never as arguments of the user's ``__call__``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax import nnx

from ..nn import (
    CACHE_COLLECTION,
    INDEX_COLLECTION,
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
    mutable ``"deq_cache"`` collection and the samples' indices as the ``"deq_index"`` collection."""

    def __init__(self, model: linen.Module):
        self.model = model
        self.probe_layout: Any = {}  # the "deq_probe" collection's structure, recorded by init
        self.cache: Any = None  # the initial "deq_cache" collection, recorded by init
        self.index_layout: Any = {}  # the "deq_index" collection's structure, recorded by init

    def init(self, seed: int, x: jax.Array) -> Any:
        variables = self.model.init(jax.random.PRNGKey(seed), x)
        self.probe_layout = variables.get(PROBE_COLLECTION, {})
        self.cache = variables.get(CACHE_COLLECTION)
        self.index_layout = variables.get(INDEX_COLLECTION, {})
        return variables["params"]

    def apply(self, params: Any, probes: Any, x: jax.Array, cache: Any = None, index: Any = None) -> tuple:
        """``(outputs, forward stats, new cache)``; without a ``cache`` (``None``) a cold start and ``None``."""
        variables = {"params": params} if probes is None else {"params": params, PROBE_COLLECTION: probes}
        if cache is None:
            outputs, sown = self.model.apply(variables, x, mutable=[STATS_COLLECTION])
            return outputs, forward_stats(sown), None
        variables[CACHE_COLLECTION] = cache
        variables[INDEX_COLLECTION] = jax.tree_util.tree_map(lambda _: index, self.index_layout)
        outputs, sown = self.model.apply(variables, x, mutable=[STATS_COLLECTION, CACHE_COLLECTION])
        return outputs, forward_stats(sown), sown[CACHE_COLLECTION]

    def probes(self, x: jax.Array) -> Any:
        """A per-sample probe for each DEQ layer of the model :meth:`init` built (no second trace of ``init``)."""
        return jax.tree_util.tree_map(lambda _: stats_probe(x.shape[:1]), self.probe_layout)

    def fields(self) -> dict:
        return model_fields(self.model)

    def finish(self, params: Any) -> None:
        """Nothing to do: a linen model holds no parameters."""


class NNXModel:
    """An NNX model as :func:`fit` uses it: its own ``nnx.Param`` state is the initial ``params`` (the seed sets
    only the batch order), :class:`jdeq.nn.BackwardProbe` variables get per-sample probes, the
    :class:`jdeq.nn.CacheIndex` variables the samples' indices, and the trained parameters are written back into
    the model at the end."""

    def __init__(self, model: nnx.Module):
        self.model = model
        self.graphdef, self.params, self.probe_state, cache, self.rest = nnx.split(
            model, nnx.Param, BackwardProbe, FixedPointCache, ...
        )
        self.cache = cache if jax.tree_util.tree_leaves(cache) else None

    def init(self, seed: int, x: jax.Array) -> Any:
        return self.params

    def apply(self, params: Any, probes: Any, x: jax.Array, cache: Any = None, index: Any = None) -> tuple:
        """``(outputs, forward stats, new cache)``; without a ``cache`` (``None``) the layers' ``warm_start`` is
        switched off (a cold start) and the new cache is ``None``."""
        probes = self.probe_state if probes is None else probes
        caches = () if self.cache is None else (self.cache if cache is None else cache,)
        module = nnx.merge(self.graphdef, params, probes, *caches, self.rest, copy=True)  # fresh variables
        if cache is None:
            module.set_attributes(warm_start=False, raise_if_not_found=False)
            return module(x), forward_stats(module), None
        set_cache_index(module, index)
        outputs = module(x)
        return outputs, forward_stats(module), nnx.state(module, FixedPointCache)

    def probes(self, x: jax.Array) -> Any:
        return jax.tree_util.tree_map(lambda _: stats_probe(x.shape[:1]), self.probe_state)

    def fields(self) -> dict:
        shapes = jax.tree_util.tree_map(jnp.shape, self.params)
        cache = {} if self.cache is None else {"model.cache": str(jax.tree_util.tree_map(jnp.shape, self.cache))}
        return {"model": type(self.model).__name__, "model.params": str(shapes), **cache}

    def finish(self, params: Any) -> None:
        nnx.update(self.model, params)


def as_trainable(model: Any) -> LinenModel | NNXModel:
    """The adapter of a linen or NNX ``model``; TypeError for anything else."""
    if isinstance(model, nnx.Module):
        return NNXModel(model)
    if isinstance(model, linen.Module):
        return LinenModel(model)
    raise TypeError(f"fit trains a flax linen Module or an nnx.Module, got {type(model).__name__}")


def model_fields(value: Any, prefix: str = "model") -> dict:
    """``{"model.<field path>": repr}`` of a (linen) dataclass's fields, nested ones flattened, addresses dropped."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            key: text
            for field in dataclasses.fields(value)
            if field.name != "parent"
            for key, text in model_fields(getattr(value, field.name), f"{prefix}.{field.name}").items()
        }
    return {prefix: re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))}
