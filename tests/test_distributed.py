"""Data-parallel training on a device mesh gives the loss and parameters of one device.

The multi-device tests need several devices, which on CPU means setting
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported. The main suite imports
jax with one device, so ``test_multidevice_suite_on_eight_cpu_devices`` reruns this file in a fresh
process with eight CPU devices and requires every multi-device test to pass there.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdeq
from jdeq import distributed

WIDTH, IN_DIM, OUT_DIM, BATCH = 16, 4, 2, 32
SOLVER = jdeq.Anderson(m=4, tol=1e-5, max_steps=60)
multidevice = pytest.mark.skipif(
    jax.device_count() < 2, reason="needs >= 2 devices; run by test_multidevice_suite_on_eight_cpu_devices"
)


def cell(z, x, params):
    """The DEQ-MLP map f(z, x) = tanh(W z + U x + b)."""
    return jnp.tanh(params["W"] @ z + params["U"] @ x + params["b"])


def init_params(seed=0):
    kw, ku, kv = jax.random.split(jax.random.key(seed), 3)
    return {
        "W": 0.6 * jax.random.normal(kw, (WIDTH, WIDTH), jnp.float32) * WIDTH**-0.5,
        "U": jax.random.normal(ku, (WIDTH, IN_DIM), jnp.float32) * IN_DIM**-0.5,
        "b": jnp.zeros(WIDTH, jnp.float32),
        "V": jax.random.normal(kv, (OUT_DIM, WIDTH), jnp.float32) * WIDTH**-0.5,
    }


def make_data(seed=1):
    """Inputs at scales 0.1..3 so that samples need different numbers of solver steps."""
    kx, ky = jax.random.split(jax.random.key(seed))
    scales = jnp.linspace(0.1, 3.0, BATCH, dtype=jnp.float32)[:, None]
    x = scales * jax.random.normal(kx, (BATCH, IN_DIM), jnp.float32)
    y = jax.random.normal(ky, (BATCH, OUT_DIM), jnp.float32)
    return {"x": x, "y": y}


def loss_fn(params, batch):
    z0 = jnp.zeros((batch["x"].shape[0], WIDTH), batch["x"].dtype)
    sol = jdeq.fixed_point_batch(cell, z0, batch["x"], params, in_axes=(0, None), solver=SOLVER)
    pred = sol.value @ params["V"].T
    return jnp.mean((pred - batch["y"]) ** 2), sol.stats


def make_train_step(optimizer):
    @jax.jit
    def train_step(params, opt_state, batch):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, stats, jdeq.summarize(stats)

    return train_step


def train(optimizer, params, batch, steps):
    step = make_train_step(optimizer)
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(steps):
        params, opt_state, loss, stats, summary = step(params, opt_state, batch)
        losses.append(float(loss))
    return params, np.array(losses), stats, summary


@multidevice
@pytest.mark.parametrize("optimizer", [optax.sgd(0.1), optax.adam(1e-2)], ids=["sgd", "adam"])
def test_sharded_training_matches_one_device(optimizer, standard_promotion):  # optax.adam is not strict-clean
    mesh = distributed.data_mesh()
    params, batch = init_params(), make_data()
    ref_params, ref_losses, ref_stats, _ = train(optimizer, params, batch, steps=5)

    sharded_batch = distributed.shard_batch(batch, mesh)
    assert len(sharded_batch["x"].addressable_shards) == jax.device_count()
    assert sharded_batch["x"].addressable_shards[0].data.shape == (BATCH // jax.device_count(), IN_DIM)
    new_params, losses, stats, _ = train(optimizer, distributed.replicate(params, mesh), sharded_batch, steps=5)

    assert ref_losses[-1] < ref_losses[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for name in params:
        assert new_params[name].sharding.is_fully_replicated
        np.testing.assert_allclose(new_params[name], ref_params[name], rtol=1e-4, atol=1e-6)
    assert stats.num_steps.sharding.spec == jax.sharding.PartitionSpec(distributed.DATA_AXIS)
    np.testing.assert_array_equal(stats.num_steps, ref_stats.num_steps)
    np.testing.assert_array_equal(stats.result, ref_stats.result)


@multidevice
def test_summaries_are_reduced_over_the_global_batch():
    mesh = distributed.data_mesh()
    params, batch = init_params(), make_data()
    optimizer = optax.sgd(0.1)
    step = make_train_step(optimizer)
    sharded = step(distributed.replicate(params, mesh), optimizer.init(params), distributed.shard_batch(batch, mesh))
    stats, summary = sharded[3], sharded[4]

    steps = np.asarray(stats.num_steps)
    assert len(set(steps.tolist())) > 1, "the data should give samples different step counts"
    assert float(summary["max_steps"]) == steps.max()
    np.testing.assert_allclose(float(summary["mean_steps"]), steps.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(summary["max_residual"]), np.asarray(stats.residual).max(), rtol=1e-6)
    assert float(summary["converged_fraction"]) == np.asarray(stats.converged).mean()
    assert sum(float(summary[f"count_{n}"]) for n in ("converged", "max_steps", "diverged", "nonfinite")) == BATCH
    for value in summary.values():
        assert value.dtype == jnp.float32 and value.sharding.is_fully_replicated


@multidevice
def test_shard_batch_rejects_a_batch_that_does_not_split_evenly():
    mesh = distributed.data_mesh()
    with pytest.raises(ValueError, match="not a multiple"):
        distributed.shard_batch(jnp.zeros((jax.device_count() + 1, 3)), mesh)


def test_shard_batch_rejects_scalars():
    with pytest.raises(ValueError, match="leading batch axis"):
        distributed.shard_batch({"x": jnp.zeros(())}, distributed.data_mesh())


def test_summary_counts_a_nan_residual_as_infinite():
    stats = jdeq.Stats(
        num_steps=jnp.array([3, 7], jnp.int32),
        num_evals=jnp.array([4, 8], jnp.int32),
        residual=jnp.array([1e-6, jnp.nan]),
        abs_residual=jnp.array([1e-6, jnp.nan]),
        converged=jnp.array([True, False]),
        result=jnp.array([jdeq.Result.CONVERGED, jdeq.Result.NONFINITE], jnp.int32),
    )
    summary = jdeq.summarize(stats)
    assert float(summary["max_residual"]) == np.inf
    assert float(summary["count_nonfinite"]) == 1 and float(summary["count_converged"]) == 1
    assert float(summary["mean_steps"]) == 5.0 and float(summary["max_steps"]) == 7.0


@multidevice
def test_every_solver_and_its_gradient_inside_shard_map():
    """Per-device solves under ``jax.shard_map`` (varying manual axes checked) equal the unsharded ones."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    params, batch = init_params(), make_data()
    x = jax.device_put(batch["x"], NamedSharding(mesh, P("data")))
    solvers = [jdeq.FixedPoint(tol=1e-5, max_steps=200), SOLVER, jdeq.Broyden(tol=1e-5), jdeq.Fallback(tol=1e-5)]
    for solver in solvers:

        def solve(x, params, solver=solver):
            z0 = jnp.zeros((x.shape[0], WIDTH), x.dtype)
            return jdeq.fixed_point_batch(cell, z0, x, params, in_axes=(0, None), solver=solver).value

        sharded = jax.shard_map(solve, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
        np.testing.assert_allclose(jax.jit(sharded)(x, params), solve(batch["x"], params), rtol=1e-5, atol=1e-6)
        grads = jax.jit(jax.grad(lambda p, s=sharded: jnp.sum(s(x, p) ** 2)))(params)
        expected = jax.grad(lambda p, s=solve: jnp.sum(s(batch["x"], p) ** 2))(params)
        for name in ("W", "U"):
            np.testing.assert_allclose(grads[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ~70 s: the default suite's 15-minute budget
@pytest.mark.skipif(jax.device_count() >= 2, reason="this process already has several devices")
def test_multidevice_suite_on_eight_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        __file__,
        "-k",
        "not eight_cpu",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "skipped" not in summary and "7 passed" in summary, summary
