"""Any Flax module is an equilibrium map: linen and NNX modules of the user's own, per sample and whole batch.

Every check has a known answer: the returned z is a fixed point of the user's module, implicit
gradients equal backprop through the unrolled iterations and finite differences (float64), a
dropout mask held fixed lets a solve converge to 1e-10 (a mask redrawn per iteration could not).
"""

import functools

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jdeq
from jdeq.nn import DEQ, NNXDEQ, forward_stats

TIGHT = jdeq.FixedPoint(tol=1e-12, max_steps=400)
F64 = dict(param_dtype=jnp.float64)  # float64 parameters: exactness claims (the suite runs with x64)
Dense = functools.partial(linen.Dense, **F64)
Conv = functools.partial(linen.Conv, **F64)
GroupNorm = functools.partial(linen.GroupNorm, num_groups=2, **F64)
WIDTH, FEATURES = 6, 3


class DenseCell(linen.Module):
    """The issue's contract cell, scaled to be a contraction."""

    @linen.compact
    def __call__(self, z, x):
        return jnp.tanh(0.4 * Dense(WIDTH)(z) + Dense(WIDTH)(x))


class ConvCell(linen.Module):
    """An MDEQ-style conv block written with linen's own Conv and GroupNorm (batch-first modules)."""

    @linen.compact
    def __call__(self, z, x):
        y = linen.relu(GroupNorm()(Conv(4, (3, 3))(z)))
        y = GroupNorm()(0.3 * Conv(4, (3, 3))(y) + Conv(4, (3, 3))(x))
        return GroupNorm()(linen.relu(0.5 * z + y))


class DropoutCell(linen.Module):
    @linen.compact
    def __call__(self, z, x):
        return jnp.tanh(linen.Dropout(0.5, deterministic=False)(0.4 * Dense(WIDTH)(z)) + Dense(WIDTH)(x))


class BatchNormCell(linen.Module):
    @linen.compact
    def __call__(self, z, x):
        return jnp.tanh(linen.BatchNorm(use_running_average=False, **F64)(Dense(WIDTH)(z)) + Dense(WIDTH)(x))


class NNXCell(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(WIDTH, WIDTH, rngs=rngs, **F64)
        self.b = nnx.Linear(FEATURES, WIDTH, rngs=rngs, **F64)

    def __call__(self, z, x):
        return jnp.tanh(0.4 * self.a(z) + self.b(x))


def inputs(n=3, shape=(FEATURES,), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, *shape)))


@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "whole_batch"])
def test_linen_module_output_is_its_fixed_point_with_params_where_flax_puts_them(per_sample):
    x, z0 = inputs(), jnp.zeros((3, WIDTH))
    layer = DEQ(DenseCell(), solver=TIGHT, per_sample=per_sample)
    variables = layer.init(jax.random.PRNGKey(0), x, z0)
    assert set(variables["params"]["f"]) == {"Dense_0", "Dense_1"}
    z, inter = layer.apply(variables, x, z0, mutable=["intermediates"])
    assert z.shape == z0.shape and bool(jnp.all(forward_stats(inter)[0].converged))
    np.testing.assert_allclose(DenseCell().apply({"params": variables["params"]["f"]}, z, x), z, atol=1e-10)
    assert "f/Dense_0" in linen.tabulate(layer, jax.random.PRNGKey(0))(x, z0)


def test_linen_conv_groupnorm_module_per_sample_equals_whole_batch(standard_promotion):
    x, z0 = inputs(2, (5, 5, 2)), jnp.zeros((2, 5, 5, 4))
    per_sample = DEQ(ConvCell(), solver=jdeq.Anderson(tol=1e-10, max_steps=200))
    variables = per_sample.init(jax.random.PRNGKey(1), x, z0)
    z = per_sample.apply(variables, x, z0)
    whole = DEQ(ConvCell(), solver=jdeq.Anderson(tol=1e-10, max_steps=200), per_sample=False).apply(variables, x, z0)
    np.testing.assert_allclose(z, whole, atol=1e-8)  # GroupNorm is per sample: the two problems agree
    np.testing.assert_allclose(ConvCell().apply({"params": variables["params"]["f"]}, z, x), z, atol=1e-8)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "whole_batch"])
def test_linen_module_gradients_match_unrolled_and_finite_differences(per_sample):
    x, z0 = inputs(2, seed=3), jnp.zeros((2, WIDTH))
    implicit = DEQ(DenseCell(), solver=TIGHT, per_sample=per_sample)
    unrolled = DEQ(DenseCell(), solver=TIGHT, grad=jdeq.Unrolled(), per_sample=per_sample)
    params = implicit.init(jax.random.PRNGKey(2), x, z0)["params"]

    def loss(layer):
        return lambda p, x: jnp.sum(jnp.sin(layer.apply({"params": p}, x, z0)))

    got = jax.grad(loss(implicit), argnums=(0, 1))(params, x)
    want = jax.grad(loss(unrolled), argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-10)
    check_grads(loss(implicit), (params, x), order=1, modes=["rev"], eps=1e-5)


def test_user_module_passed_as_cell_works_too():
    x, z0 = inputs(), jnp.zeros((3, WIDTH))
    layer = DEQ(cell=DenseCell(), solver=TIGHT)  # was a NameInUseError
    variables = layer.init(jax.random.PRNGKey(0), x, z0)
    assert set(variables["params"]) == {"cell"}
    assert layer.apply(variables, x, z0).shape == (3, WIDTH)


def test_dropout_mask_is_the_same_at_every_iteration_of_one_solve():
    x, z0 = inputs(4), jnp.zeros((4, WIDTH))
    layer = DEQ(DropoutCell(), solver=jdeq.FixedPoint(tol=1e-10, max_steps=300))
    variables = layer.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x, z0)
    z, inter = layer.apply(variables, x, z0, rngs={"dropout": jax.random.PRNGKey(5)}, mutable=["intermediates"])
    assert bool(jnp.all(forward_stats(inter)[0].converged))  # a mask redrawn per iteration never settles to 1e-10
    other = layer.apply(variables, x, z0, rngs={"dropout": jax.random.PRNGKey(6)})
    assert float(jnp.max(jnp.abs(z - other))) > 1e-3  # another call, another mask
    assert len({tuple(np.round(np.asarray(row), 8)) for row in z}) == 4  # each sample its own mask


def test_stateful_modules_and_a_missing_start_are_clear_errors(standard_promotion):
    x, z0 = inputs(), jnp.zeros((3, WIDTH))
    with pytest.raises(ValueError, match=r"state besides its parameters \(batch_stats\).*GroupNorm"):
        DEQ(BatchNormCell()).init(jax.random.PRNGKey(0), x, z0)
    with pytest.raises(ValueError, match=r"DEQ\(DenseCell\): pass z0"):
        DEQ(DenseCell()).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="DEQ takes one map"):
        DEQ(DenseCell(), cell=DenseCell()).init(jax.random.PRNGKey(0), x, z0)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "whole_batch"])
def test_nnx_module_gradients_match_unrolled(per_sample):
    x, z0 = inputs(2, seed=4), jnp.zeros((2, WIDTH))
    implicit = NNXDEQ(NNXCell(nnx.Rngs(0)), solver=TIGHT, per_sample=per_sample)
    unrolled = NNXDEQ(NNXCell(nnx.Rngs(0)), solver=TIGHT, grad=jdeq.Unrolled(), per_sample=per_sample)
    z = implicit(x, z0)
    np.testing.assert_allclose(implicit.f(z, x), z, atol=1e-10)
    assert bool(jnp.all(forward_stats(implicit)[0].converged))

    def loss(layer):
        return jnp.sum(jnp.sin(layer(x, z0)))

    got, want = nnx.grad(loss)(implicit), nnx.grad(loss)(unrolled)
    leaves = [jax.tree_util.tree_leaves(nnx.state(g, nnx.Param)) for g in (got, want)]
    assert len(leaves[0]) == 4
    for g, w in zip(*leaves):
        np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-10)


def test_nnx_backward_probe_reports_the_backward_solves():
    x, z0 = inputs(3), jnp.zeros((3, WIDTH))
    layer = NNXDEQ(NNXCell(nnx.Rngs(0)), solver=TIGHT)
    grads = nnx.grad(lambda m: jnp.sum(m(x, z0) ** 2), argnums=nnx.DiffState(0, jdeq.nn.BackwardProbe))(layer)
    stats = jdeq.read_backward_stats(grads.probe[...])
    assert int(stats.num_solves) == 3 and bool(stats.converged)


def test_init_under_jit_leaks_no_tracer_and_equals_eager_init():
    x, z0 = inputs(), jnp.zeros((3, WIDTH))
    layer = DEQ(DenseCell(), solver=TIGHT)
    with jax.checking_leaks():
        jitted = jax.jit(layer.init)(jax.random.PRNGKey(0), x, z0)
    eager = layer.init(jax.random.PRNGKey(0), x, z0)
    assert jax.tree_util.tree_structure(jitted) == jax.tree_util.tree_structure(eager)
    for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)):
        np.testing.assert_array_equal(a, b)
