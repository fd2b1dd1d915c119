"""fit trains the user's own models: a linen module (Conv + GroupNorm) and an NNX module as the DEQ map, per
sample and whole batch, with their own loss and metrics; metrics reach the host every log_every steps; a halted
nonfinite step stops the run at once even between fetches; NNX runs resume bit for bit."""

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
import jdeq.train._fit
from jdeq.data import Dataset, load_digits

SOLVER = jdeq.Anderson(m=4, tol=1e-4, max_steps=30)
WIDTH = 16


@pytest.fixture(scope="module")
def digits():
    d = load_digits(seed=1)
    return Dataset("digits-small", d.x_train[:256], d.y_train[:256], d.x_test[:64], d.y_test[:64], 10)


@pytest.fixture(scope="module")
def digit_images():
    d = load_digits(seed=1, flatten=False)
    return Dataset("digits-8x8", d.x_train[:128], d.y_train[:128], d.x_test[:32], d.y_test[:32], 10)


class ConvMap(linen.Module):
    """An MDEQ-style map in linen's own layers, on 8x8 images with 8 channels."""

    @linen.compact
    def __call__(self, z, x):
        y = linen.relu(linen.GroupNorm(num_groups=2)(linen.Conv(8, (3, 3))(z)))
        y = linen.GroupNorm(num_groups=2)(0.5 * linen.Conv(8, (3, 3))(y) + linen.Conv(8, (3, 3))(x))
        return linen.GroupNorm(num_groups=2)(linen.relu(0.5 * z + y))


class ConvClassifier(linen.Module):
    per_sample: bool = True

    @linen.compact
    def __call__(self, x):
        z0 = jnp.zeros((*x.shape[:-1], 8), x.dtype)
        z = jdeq.nn.DEQ(ConvMap(), solver=SOLVER, per_sample=self.per_sample)(x, z0)
        return linen.Dense(10)(jnp.mean(z, axis=(1, 2)))


class NNXMap(nnx.Module):
    def __init__(self, rngs):
        self.a, self.b = nnx.Linear(WIDTH, WIDTH, rngs=rngs), nnx.Linear(64, WIDTH, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(0.4 * self.a(z) + self.b(x))


class NNXClassifier(nnx.Module):
    def __init__(self, rngs, per_sample=True):
        self.deq = jdeq.nn.NNXDEQ(NNXMap(rngs), solver=SOLVER, per_sample=per_sample)
        self.head = nnx.Linear(WIDTH, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(self.deq(x, jnp.zeros((x.shape[0], WIDTH), x.dtype)))


def smoothed_loss(outputs, y):
    """A user's own loss: label-smoothed cross-entropy."""
    targets = optax.smooth_labels(jax.nn.one_hot(y, 10, dtype=outputs.dtype), 0.1)
    return jnp.mean(optax.softmax_cross_entropy(outputs, targets))


def top2(outputs, y):
    """A user's own metric."""
    best = jnp.argsort(outputs, axis=-1)[:, -2:]
    return {"top2": jnp.mean(jnp.any(best.astype(y.dtype) == y[:, None], axis=-1))}


@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "whole_batch"])
def test_linen_conv_module_trains_with_a_custom_loss(digit_images, per_sample):
    result = train.fit(
        ConvClassifier(per_sample),
        optax.adam(3e-3),
        digit_images,
        epochs=2,
        batch_size=32,
        loss_fn=smoothed_loss,
        metrics_fn=top2,
        log_every=3,
        progress=False,
    )
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"] and {"top2", "test_top2", "test_loss"} <= set(last)
    assert 0 <= last["test_top2"] <= 1 and 0 <= last["fwd_converged_fraction"] <= 1
    # every sample's backward solve is counted once per step (4 steps of 32), with no probe threaded by the user
    counts = sum(last[f"bwd_count_{r}"] for r in ("converged", "max_steps", "diverged", "nonfinite"))
    assert counts == 4 * 32


def nnx_fit(digits, model, **kwargs):
    return train.fit(
        model, optax.adam(1e-2), digits, epochs=3, batch_size=64, loss_fn=smoothed_loss, progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def nnx_runs(digits):
    """``get(per_sample) -> (model, its initial parameters, fit result)``: each uninterrupted NNX run made once,
    on first use, and shared by the tests that only read it."""
    runs = {}

    def get(per_sample):
        if per_sample not in runs:
            model = NNXClassifier(nnx.Rngs(0), per_sample)
            before = [np.array(leaf) for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))]  # a copy
            runs[per_sample] = model, before, nnx_fit(digits, model)
        return runs[per_sample]

    return get


@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "whole_batch"])
def test_nnx_model_trains_in_place_with_a_custom_loss(nnx_runs, per_sample):
    model, before, result = nnx_runs(per_sample)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[-1]["test_accuracy"] > 0.5 and result.history[-1]["bwd_mean_steps"] >= 1
    assert leaves_equal(nnx.state(model, nnx.Param), result.state.params)  # the model holds the trained params
    assert not leaves_equal(before, result.state.params)


def test_nnx_run_resumes_bit_for_bit(digits, nnx_runs, tmp_path, interrupted_training):
    uninterrupted = nnx_runs(True)[2]
    with interrupted_training(2, 1), pytest.raises(KeyboardInterrupt):
        nnx_fit(digits, NNXClassifier(nnx.Rngs(0)), checkpoint_dir=tmp_path)
    resumed = nnx_fit(digits, NNXClassifier(nnx.Rngs(0)), checkpoint_dir=tmp_path)
    assert leaves_equal(resumed.state.params, uninterrupted.state.params)
    assert resumed.history == uninterrupted.history
    model = NNXClassifier(nnx.Rngs(1))  # other initial values, same shapes: load fills in the trained ones
    train.load(tmp_path, model)
    assert leaves_equal(nnx.state(model, nnx.Param), uninterrupted.state.params)


def test_a_nonfinite_step_halts_the_run_between_metric_fetches(digits, monkeypatch):
    """With log_every=4 the host sees step 2's NaN only after step 4: steps 3 and 4 must not have moved the state."""
    calls = []
    original = jdeq.train._fit.train_epoch

    def spy(train_step, state, *args):
        def step(state, x, y, halted, index, rng):
            x = jnp.asarray(x).at[0, 0].set(jnp.nan) if len(calls) == 1 else x  # the second step's batch holds a NaN
            calls.append(state)
            return train_step(state, x, y, halted, index, rng)

        return original(step, state, *args)

    monkeypatch.setattr(jdeq.train._fit, "train_epoch", spy)
    with pytest.raises(train.NonfiniteError, match=r"at epoch 1, step 2 "):
        train.fit(NNXClassifier(nnx.Rngs(0)), optax.adam(1e-2), digits, epochs=1, log_every=4, progress=False)
    assert len(calls) == 4  # the host noticed at the fetch after step 4
    assert leaves_equal(calls[1], calls[2]) and leaves_equal(calls[2], calls[3])  # steps 2 to 4 changed nothing


def test_fit_rejects_what_it_cannot_train(digits):
    with pytest.raises(TypeError, match="linen Module or an nnx.Module, got function"):
        train.fit(lambda x: x, optax.sgd(0.1), digits, epochs=1, progress=False)
    with pytest.raises(ValueError, match="log_every must be an int >= 1"):
        train.fit(NNXClassifier(nnx.Rngs(0)), optax.sgd(0.1), digits, epochs=1, log_every=0, progress=False)
