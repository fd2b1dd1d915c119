"""Warm starts across training steps: the per-example fixed-point cache of the linen and NNX DEQ layers.

The implicit gradient does not depend on where the solve starts; a failed solve never overwrites a cache entry;
``fit`` carries the cache in its state, checkpoints it and resumes bit for bit; bad caches and indices are named.
"""

import functools

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import leaves_equal

import jdeq
import jdeq.train as train
from jdeq.data import Dataset, load_digits
from jdeq.models import MLPCell
from jdeq.nn import (
    CACHE_COLLECTION,
    DEQ,
    INDEX_COLLECTION,
    NNXDEQ,
    STATS_COLLECTION,
    DEQClassifier,
    NNXDEQClassifier,
    forward_stats,
)

TIGHT = jdeq.Anderson(m=5, tol=1e-10, max_steps=200)
FIT_SOLVER = jdeq.Anderson(m=4, tol=1e-4, max_steps=30)
PLAIN = jdeq.FixedPoint(tol=1e-6, max_steps=100)  # compiles faster than Anderson; the maps below are contractions
SIZE, WIDTH = 10, 12
DTYPE = jnp.float32  # digits' dtype


def batch(n=4, seed=0, features=7):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, features)))


def warm_apply(layer, params, cache, x, index):
    """``(z, new cache, forward stats)`` of a linen layer applied with its cache."""
    variables = {"params": params, CACHE_COLLECTION: cache}
    z, out = layer.apply(variables, x, index=index, mutable=[CACHE_COLLECTION, STATS_COLLECTION])
    return z, out[CACHE_COLLECTION], forward_stats(out)[0]


jitted_warm_apply = jax.jit(warm_apply, static_argnums=0)  # one compilation per layer and shape, shared by the tests
LAYER = DEQ(MLPCell(WIDTH), solver=TIGHT, grad=jdeq.Implicit(TIGHT), cache_size=SIZE)


def moved(params, factor=1.05):
    """Parameters after a training step, roughly: a nearby point."""
    return jax.tree_util.tree_map(lambda p: factor * p, params)


@pytest.fixture(scope="module")
def initial():
    """``LAYER``'s initial variables for ``batch()``: its parameters and an empty cache (init compiled once)."""
    return jax.jit(LAYER.init)(jax.random.PRNGKey(0), batch())


@pytest.fixture(scope="module")
def small_digits():
    d = load_digits(seed=1)
    return Dataset("digits-small", d.x_train[:200], d.y_train[:200], d.x_test[:50], d.y_test[:50], 10)


def test_implicit_gradient_is_the_same_from_a_cold_and_a_warm_start(initial):
    """float64, tolerance 1e-10: the start only changes the path to z*, not z* or dz*/dθ (to the solver's tolerance)."""
    x, index, variables = batch(), jnp.array([2, 5, 7, 9]), initial
    _, cache, _ = jitted_warm_apply(LAYER, moved(variables["params"]), variables[CACHE_COLLECTION], x, index)

    @jax.jit
    @functools.partial(jax.value_and_grad, has_aux=True)
    def loss(params, cache):
        z, _, stats = warm_apply(LAYER, params, cache, x, index)
        return jnp.sum(jnp.sin(z)), stats

    (cold_value, cold_stats), cold_grad = loss(variables["params"], variables[CACHE_COLLECTION])
    (warm_value, warm_stats), warm_grad = loss(variables["params"], cache)
    assert np.all(warm_stats.num_steps < cold_stats.num_steps)  # the warm start is a different (shorter) path
    np.testing.assert_allclose(warm_value, cold_value, rtol=1e-8)
    for cold, warm in zip(jax.tree_util.tree_leaves(cold_grad), jax.tree_util.tree_leaves(warm_grad)):
        np.testing.assert_allclose(warm, cold, rtol=1e-6, atol=1e-9)


def test_a_solve_starts_from_its_examples_last_equilibrium_and_unseen_ones_start_cold(initial):
    x = batch()
    params, empty = initial["params"], initial[CACHE_COLLECTION]
    assert not np.any(empty["seen"]) and empty["z"].shape == (SIZE, WIDTH)
    z, cache, cold_stats = jitted_warm_apply(LAYER, params, empty, x, jnp.array([0, 1, 2, 3]))
    np.testing.assert_array_equal(cache["seen"], np.arange(SIZE) < 4)
    np.testing.assert_array_equal(cache["z"][:4], z)
    _, _, stats = jitted_warm_apply(LAYER, params, cache, x, jnp.array([0, 1, 6, 3]))  # sample 2 is example 6: unseen
    np.testing.assert_array_equal(stats.num_steps, [0, 0, cold_stats.num_steps[2], 0])
    cold = jax.jit(LAYER.apply)({"params": params}, x)  # evaluation: no collection, a cold start
    np.testing.assert_allclose(cold, z, rtol=1e-12, atol=1e-12)


def test_a_failed_solve_keeps_the_previous_entry_and_spares_the_other_samples(initial):
    """Policy: a sample whose solve diverged or went nonfinite keeps its previous entry (and seen flag)."""
    x, index, params = batch(), jnp.array([0, 1, 2, 3]), initial["params"]
    for layer in (LAYER, LAYER.clone(per_sample=False)):
        per_sample = layer.per_sample
        _, before, _ = jitted_warm_apply(layer, params, initial[CACHE_COLLECTION], x, index)
        z, after, stats = jitted_warm_apply(layer, moved(params), before, x.at[1, 0].set(jnp.nan), index)
        assert np.all(np.isfinite(after["z"])) and np.all(after["seen"] == before["seen"])
        np.testing.assert_array_equal(after["z"][1], before["z"][1])
        if per_sample:  # the other samples stored their new equilibria
            assert stats.result[1] == jdeq.Result.NONFINITE
            np.testing.assert_array_equal(after["z"][np.array([0, 2, 3])], z[np.array([0, 2, 3])])
        else:  # one problem: its result is the whole batch's, so nothing is stored
            np.testing.assert_array_equal(after["z"], before["z"])


def test_users_linen_module_with_a_batch_of_one_and_an_index_out_of_range_under_jit(
    standard_promotion,
):  # float64 data, float32 Dense
    layer = DEQ(LinenMap(), solver=PLAIN, cache_size=SIZE)
    x = batch(n=1)
    z0 = jnp.zeros((1, WIDTH), x.dtype)
    variables = jax.jit(layer.init)(jax.random.PRNGKey(0), x, z0)
    assert variables[CACHE_COLLECTION]["z"].shape == (SIZE, WIDTH)

    @jax.jit
    def apply(cache, index):
        z, out = layer.apply(
            {"params": variables["params"], CACHE_COLLECTION: cache}, x, z0, index, mutable=[CACHE_COLLECTION]
        )
        return z, out[CACHE_COLLECTION]

    z, cache = apply(variables[CACHE_COLLECTION], jnp.array([SIZE - 1]))
    assert cache["seen"].tolist() == [False] * (SIZE - 1) + [True]
    np.testing.assert_array_equal(cache["z"][-1], z[0])
    _, dropped = apply(cache, jnp.array([SIZE]))  # cannot raise under jit: a cold start, nothing stored
    assert leaves_equal(dropped, cache)


def test_bad_cache_use_is_named(initial):
    """Each raises before the solve is traced (cheap); the index's values are checked outside jit."""
    x, variables = batch(), initial
    params, cache = variables["params"], variables[CACHE_COLLECTION]
    with pytest.raises(ValueError, match=r"fixed-point cache of 10 examples: pass index="):
        warm_apply(LAYER, params, cache, x, None)
    with pytest.raises(ValueError, match=r"1 index\(es\) outside \[0, 10\).*e.g. 10"):
        warm_apply(LAYER, params, cache, x, jnp.array([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"index must hold one integer per sample, shape \(4,\)"):
        warm_apply(LAYER, params, cache, x, jnp.array([0, 1]))
    shapes = jax.eval_shape(DEQ(MLPCell(WIDTH + 1), cache_size=SIZE).init, jax.random.PRNGKey(0), x)
    other = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[CACHE_COLLECTION])
    with pytest.raises(ValueError, match=r"holds states \(10, 13\).*this layer's state is \(12,\)"):
        warm_apply(LAYER, params, other, x, jnp.arange(4))
    with pytest.raises(ValueError, match="not mutable"):
        LAYER.apply(variables, x, index=jnp.arange(4))
    assert variables[INDEX_COLLECTION]["index"].shape == (0,)  # init records the place of the index, empty
    with pytest.raises(ValueError, match=r"fixed-point cache of 10 examples: pass index="):
        LAYER.apply(variables, x, mutable=[CACHE_COLLECTION])  # the empty index init recorded is no index
    with pytest.raises(ValueError, match="cache_size must be None"):
        DEQ(MLPCell(WIDTH), cache_size=0).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="needs state_shape"):
        NNXDEQ(NNXMap(nnx.Rngs(0)), cache_size=SIZE)


class NNXMap(nnx.Module):
    """A user's own NNX map."""

    def __init__(self, rngs, features=64):
        self.a, self.b = nnx.Linear(WIDTH, WIDTH, rngs=rngs), nnx.Linear(features, WIDTH, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(0.4 * self.a(z) + self.b(x))


class NNXModel(nnx.Module):
    """A user's own NNX model: the DEQ layer over its own map; no index anywhere in it."""

    def __init__(self, rngs, cache_size, solver=FIT_SOLVER):
        layer = NNXDEQ(NNXMap(rngs), solver=solver, cache_size=cache_size, state_shape=(WIDTH,), state_dtype=DTYPE)
        self.deq, self.head = layer, nnx.Linear(WIDTH, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(self.deq(x, jnp.zeros((len(x), WIDTH), DTYPE)))


class LinenMap(linen.Module):
    @linen.compact
    def __call__(self, z, x):
        return jnp.tanh(0.4 * linen.Dense(WIDTH)(z) + linen.Dense(WIDTH)(x))


class LinenModel(linen.Module):
    """A user's own linen model: the DEQ layer over its own map; no index anywhere in it."""

    cache_size: int
    solver: jdeq.Solver = FIT_SOLVER

    @linen.compact
    def __call__(self, x):
        layer = DEQ(LinenMap(), solver=self.solver, cache_size=self.cache_size)
        return linen.Dense(10)(layer(x, jnp.zeros((len(x), WIDTH), x.dtype)))


def test_nnx_layer_warms_up_and_switches_off_for_evaluation():
    """The index reaches the layer inside the user's model through its CacheIndex variable (set_cache_index)."""
    model = NNXModel(nnx.Rngs(0), SIZE, PLAIN)
    x, index = batch(features=64).astype(DTYPE), jnp.arange(4)

    @nnx.jit
    def call(model, x):
        return model(x), forward_stats(model)[0].num_steps

    jdeq.nn.set_cache_index(model, index)
    cold = call(model, x)[1]
    np.testing.assert_array_equal(call(model, x)[1], 0)  # same parameters: each start is already z*
    cache = nnx.state(model, jdeq.nn.FixedPointCache)
    model.set_attributes(warm_start=False)
    jdeq.nn.set_cache_index(model, jnp.zeros((0,), jnp.int32))  # no index needed, the cache untouched
    np.testing.assert_array_equal(call(model, x)[1], cold)
    assert leaves_equal(nnx.state(model, jdeq.nn.FixedPointCache), cache)
    model.set_attributes(warm_start=True)
    with pytest.raises(ValueError, match="pass index="):
        model(x)


@pytest.mark.slow
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_fit_fills_the_cache_of_a_users_own_model(small_digits, api):
    n = len(small_digits.x_train)
    model = LinenModel(n) if api == "linen" else NNXModel(nnx.Rngs(0), n)
    result = train.fit(model, optax.adam(1e-2), small_digits, epochs=2, batch_size=50, progress=False)
    seen = [leaf for leaf in jax.tree_util.tree_leaves(result.state.cache) if leaf.dtype == bool]
    assert len(seen) == 1 and np.all(seen[0])  # 200 examples, 4 full batches: every one stored
    assert result.history[1]["fwd_mean_steps"] < result.history[0]["fwd_mean_steps"]


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_fit_warm_starts_a_users_module_that_takes_no_index(small_digits, api):
    """The user's model is written with no index argument at all: fit gives the cached layer each sample's index
    as Flax state, the cache fills, and epoch 2 starts from the stored equilibria (fewer forward steps)."""
    data = small_digits._replace(x_train=small_digits.x_train[:100], y_train=small_digits.y_train[:100])
    model = LinenModel(100, PLAIN) if api == "linen" else NNXModel(nnx.Rngs(0), 100, PLAIN)
    result = train.fit(model, optax.adam(1e-2), data, epochs=2, batch_size=50, progress=False)
    seen = [leaf for leaf in jax.tree_util.tree_leaves(result.state.cache) if leaf.dtype == bool]
    assert len(seen) == 1 and np.all(seen[0])  # 100 examples, 2 full batches: every one stored
    assert result.history[1]["fwd_mean_steps"] < result.history[0]["fwd_mean_steps"]
    if api == "nnx":  # the user's model is left as it was given: its index placeholder empty
        assert jnp.shape(model.deq.cache_index[...]) == (0,)


def test_fit_names_a_cache_that_does_not_fit_the_data(small_digits):
    model = DEQClassifier(DEQ(MLPCell(WIDTH), solver=PLAIN, cache_size=150), 10)
    with pytest.raises(ValueError, match=r"cache holds 150 examples, the training set 200"):
        train.fit(model, optax.adam(1e-2), small_digits, epochs=1, batch_size=50, progress=False)


@pytest.mark.slow  # with the test above, several fit runs: ~50 s of CPU
def test_resumed_warm_run_restores_the_cache_and_matches_the_uninterrupted_run(
    small_digits, tmp_path, interrupted_training
):
    def run(**kwargs):
        rngs = nnx.Rngs(0)
        deq = NNXDEQ(MLPCell(WIDTH), (64,), rngs=rngs, solver=FIT_SOLVER, cache_size=len(small_digits.x_train))
        model = NNXDEQClassifier(deq, WIDTH, 10, rngs=rngs)
        return train.fit(model, optax.adam(1e-2), small_digits, epochs=3, batch_size=50, progress=False, **kwargs)

    uninterrupted = run()
    with interrupted_training(2, 1), pytest.raises(KeyboardInterrupt):
        run(checkpoint_dir=tmp_path)
    resumed = run(checkpoint_dir=tmp_path)
    assert leaves_equal(resumed.state, uninterrupted.state)  # parameters, optimizer state and cache
    assert resumed.history == uninterrupted.history


@pytest.mark.slow
def test_cold_vs_warm_benchmark_runs_the_same_first_epoch(small_digits):
    """benchmarks.training: epoch 1 is all cold starts in both runs, so the two runs are the same until then."""
    from benchmarks import training

    def model_for(cache_size):
        return DEQClassifier(DEQ(MLPCell(WIDTH), solver=FIT_SOLVER, cache_size=cache_size), 10)

    rows = training.cold_vs_warm(model_for, optax.adam(1e-2), small_digits, epochs=2, batch_size=50)
    assert [(r["variant"], r["epoch"]) for r in rows] == [("cold", 1), ("warm", 1), ("cold", 2), ("warm", 2)]
    cold, warm = rows[0], rows[1]
    assert cold["fwd_mean_steps"] == warm["fwd_mean_steps"] and cold["loss"] == warm["loss"]
    summary = training.summary(rows)
    assert summary["cold"]["epochs_timed"] == 1 and 0 < summary["cold"]["test_accuracy"] <= 1
