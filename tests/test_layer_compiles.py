"""One compile per layer: an un-jitted layer call reuses the executable of the previous call with the same shapes."""

import dataclasses

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from jdeq import implicit
from jdeq.models import MLPCell

TRACES = {"cell": 0, "module": 0}


@dataclasses.dataclass(frozen=True)
class CountingCell(MLPCell):
    """``MLPCell`` that counts how often its map is traced (each compile traces it)."""

    def __call__(self, params, z, u):
        TRACES["cell"] += 1
        return super().__call__(params, z, u)


class CountingModule(linen.Module):
    """A user's own map ``tanh(Dense(z) + x)`` that counts its traces."""

    width: int

    @linen.compact
    def __call__(self, z, x):
        TRACES["module"] += 1
        return jnp.tanh(0.3 * linen.Dense(self.width, use_bias=False, param_dtype=z.dtype)(z) + x)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


SOLVER = jdeq.Anderson(tol=1e-6, max_steps=30)
LAYERS = {
    "cell": (lambda: jdeq.nn.DEQ(CountingCell(8), solver=SOLVER), False),
    "cell_whole_batch": (lambda: jdeq.nn.DEQ(CountingCell(8), solver=SOLVER, per_sample=False), False),
    "module": (lambda: jdeq.nn.DEQ(CountingModule(8), solver=SOLVER), True),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_second_eager_call_of_a_layer_traces_nothing(name):
    make, needs_start = LAYERS[name]
    counter = "module" if needs_start else "cell"
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8)))
    z0 = jnp.zeros_like(x) if needs_start else None
    params = make().init(jax.random.PRNGKey(0), x, z0)
    first = make().apply(params, x, z0)  # a new layer object each call, as a user's eager loop builds one
    traced = TRACES[counter]
    assert traced > 0
    for _ in range(2):
        again = make().apply(params, x + 0.0, z0)
        assert TRACES[counter] == traced  # the same map, shapes and options: the compiled solve is reused
    np.testing.assert_array_equal(again, first)
    make().apply(params, x[:2], None if z0 is None else z0[:2])  # other shapes: one more compile
    assert TRACES[counter] > traced


def test_eager_loop_keeps_resident_memory_and_the_cache_bounded(monkeypatch):
    layer = jdeq.nn.DEQ(MLPCell(16), solver=SOLVER)
    x = jnp.ones((4, 16))
    params = layer.init(jax.random.PRNGKey(0), x)
    for _ in range(3):
        layer.apply(params, x)
    before = _rss_mb()
    rng = np.random.default_rng(1)
    for _ in range(20):  # before one compile per layer, each call kept a new executable (several MB each)
        jax.block_until_ready(layer.apply(params, jnp.asarray(rng.standard_normal((4, 16)))))
    assert _rss_mb() - before < 30
    monkeypatch.setattr(implicit, "SOLVE_CACHE_SIZE", 3)
    for scale in (0.1, 0.2, 0.3, 0.4, 0.5):  # more distinct maps than the cache keeps
        jdeq.fixed_point(lambda z, s=scale: jnp.tanh(s * z), jnp.ones((2,)))
        assert implicit.solve_cache_size() <= 3
    assert implicit.solve_cache_size() == 3


class CountingNNX(nnx.Module):
    """A user's own NNX map ``tanh(scale·Linear(z) + x)``, ``scale`` a non-parameter variable; counts its traces."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        self.linear = nnx.Linear(width, width, use_bias=False, param_dtype=jnp.float64, rngs=rngs)
        self.scale = nnx.Variable(jnp.asarray(0.3))

    def __call__(self, z, x):
        TRACES["nnx"] = TRACES.get("nnx", 0) + 1
        return jnp.tanh(self.scale[...] * self.linear(z) + x)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "whole_batch"])
def test_second_eager_call_of_an_nnx_module_layer_traces_nothing_and_reads_its_variables(per_sample):
    """The module's variables are arguments of the cached solve, not constants of it: a changed non-parameter
    variable changes the output of the next (untraced) call."""
    layer = jdeq.nn.NNXDEQ(CountingNNX(8, nnx.Rngs(0)), (8,), solver=SOLVER, per_sample=per_sample)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8)))
    z0 = jnp.zeros_like(x)
    first = layer(x, z0)
    traced = TRACES["nnx"]
    for _ in range(2):
        np.testing.assert_array_equal(layer(x + 0.0, z0), first)
        assert TRACES["nnx"] == traced  # the same module structure, shapes and options: the compiled solve is reused
    layer.f.scale[...] = jnp.asarray(0.1)
    changed = layer(x, z0)
    assert TRACES["nnx"] == traced
    want = jdeq.fixed_point(lambda z: jnp.tanh(0.1 * layer.f.linear(z) + x), z0, solver=SOLVER).value
    np.testing.assert_allclose(changed, want, atol=1e-5)
    assert float(jnp.max(jnp.abs(changed - first))) > 1e-3
