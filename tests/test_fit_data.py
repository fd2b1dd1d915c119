"""fit for any supervised task, with a user's own linen and NNX models: (x, y) arrays with float targets, streams
of batches (a callable data(epoch), a re-iterable, a one-shot generator), steps=N instead of epochs, resuming with
either budget and either form, and clear errors for what it cannot train."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import leaves_equal, tiny_classification, user_nnx_map
from tqdm import tqdm

import jdeq
import jdeq.train as train
from jdeq.train import epoch_batches

SOLVER = jdeq.Anderson(max_steps=40)
RNG = np.random.default_rng(0)
X = RNG.normal(size=(16, 4)).astype(np.float32)
Y = (X @ RNG.normal(size=(4, 2))).astype(np.float32)  # float regression targets


class LinenMap(linen.Module):
    """A user's own linen equilibrium map z ↦ tanh(0.3·A z + B x)."""

    @linen.compact
    def __call__(self, z, x):
        return jnp.tanh(0.3 * linen.Dense(8)(z) + linen.Dense(8)(x))


class LinenRegressor(linen.Module):
    outputs: int = 2

    @linen.compact
    def __call__(self, x):
        z = jdeq.nn.DEQ(LinenMap(), solver=SOLVER)(x, jnp.zeros((x.shape[0], 8), x.dtype))
        return linen.Dense(self.outputs)(z)


class NNXRegressor(nnx.Module):
    def __init__(self, rngs, outputs=2, cache_size=None):
        cache = {} if cache_size is None else dict(cache_size=cache_size, state_shape=(8,), state_dtype=jnp.float32)
        self.deq = jdeq.nn.NNXDEQ(user_nnx_map(rngs), solver=SOLVER, **cache)
        self.head = nnx.Linear(8, outputs, rngs=rngs)

    def __call__(self, x):
        return self.head(self.deq(x, jnp.zeros((x.shape[0], 8), x.dtype)))


class LinenLinear(linen.Module):
    """A user's linen model without a DEQ layer: the data and budget mechanics compile in a fraction of a second."""

    @linen.compact
    def __call__(self, x):
        return linen.Dense(2)(x)


class NNXLinear(nnx.Module):
    def __init__(self, rngs, outputs=2):
        self.dense = nnx.Linear(4, outputs, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


def mse(outputs, y):
    return jnp.mean((outputs - y) ** 2)


def fit(model, data, **kwargs):
    kwargs = {"progress": False, "loss_fn": mse, **kwargs}
    return train.fit(model, optax.adam(1e-2), data, **kwargs)


def stream(epoch):
    """The batches fit draws from (X, Y) in epoch ``epoch`` with seed 0 and batch_size 8, as a stream."""
    return [(X[index], Y[index]) for index in epoch_batches(0, epoch, len(X), 8)]


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_regression_with_float_targets_from_arrays(api):
    model = LinenRegressor() if api == "linen" else NNXRegressor(nnx.Rngs(0))
    result = fit(model, (X, Y), epochs=3, batch_size=8, eval_data=(X[:8], Y[:8]))
    first, last = result.history[0], result.history[-1]
    assert [row["step"] for row in result.history] == [2, 4, 6]
    assert last["loss"] < first["loss"] and "accuracy" not in last  # no default metric for float targets
    assert last["fwd_converged_fraction"] == 1.0
    if api == "nnx":  # the trained model, evaluated on eval_data independently of fit
        outputs = nnx.jit(lambda model, x: model(x))(model, X[:8])
        assert last["test_loss"] == pytest.approx(float(mse(outputs, Y[:8])), rel=1e-5)


def test_the_progress_bar_has_a_total_where_the_stream_has_a_length(capsys):
    fit(LinenLinear(), stream, epochs=2, progress=True)  # data(epoch) returns a list: 2 batches per epoch
    assert "4/4" in capsys.readouterr().err
    fit(LinenLinear(), lambda epoch: (batch for batch in stream(epoch)), epochs=2, progress=True)  # no length: a count
    bar = capsys.readouterr().err
    assert "4step" in bar and "/4" not in bar

    class UnknownLength:  # __len__ that raises, as a loader of unknown size or tqdm without a total has
        def __init__(self, epoch):
            self.batches = stream(epoch)

        def __iter__(self):
            return iter(self.batches)

        def __len__(self):
            raise TypeError("no length")

    for data in (UnknownLength, lambda epoch: tqdm((batch for batch in stream(epoch)), disable=True)):
        assert [row["step"] for row in fit(LinenLinear(), data, epochs=2, progress=True).history] == [2, 4]
        assert "/4" not in capsys.readouterr().err


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_a_stream_of_the_same_batches_trains_exactly_like_the_arrays(api):
    def make():
        return LinenLinear() if api == "linen" else NNXLinear(nnx.Rngs(0))

    arrays = fit(make(), (X, Y), epochs=2, batch_size=8, eval_data=(X[:8], Y[:8]))
    eval_stream = [(X[:5], Y[:5]), (X[5:8], Y[5:8])]  # evaluated in pieces of 5, the last padded
    for data in (stream, [batch for batch in stream(0)]):  # a callable data(epoch); a re-iterable
        streamed = fit(make(), data, epochs=2, eval_data=eval_stream)
        assert [row["step"] for row in streamed.history] == [2, 4]
        if data is stream:
            assert leaves_equal(streamed.state.params, arrays.state.params)
            assert streamed.history[-1]["loss"] == arrays.history[-1]["loss"]
            assert streamed.history[-1]["test_loss"] == pytest.approx(arrays.history[-1]["test_loss"], rel=1e-6)
        # a model without DEQ layers: no solves reported, in training or in evaluation (no "0 steps, all converged")
        assert not [key for row in streamed.history for key in row if "fwd_" in key or "bwd_" in key]
    one_shot = fit(make(), (batch for e in range(2) for batch in stream(e)), steps=4)  # a generator with steps=N
    assert leaves_equal(one_shot.state.params, arrays.state.params)
    assert [row["step"] for row in one_shot.history] == [4]  # a generator is one epoch


def test_steps_budget_cuts_the_last_epoch_and_equals_epochs_when_it_is_a_multiple():
    rows = fit(NNXLinear(nnx.Rngs(0)), (X, Y), steps=3, batch_size=8).history
    assert [(row["epoch"], row["step"]) for row in rows] == [(1, 2), (2, 3)]
    by_steps = fit(NNXLinear(nnx.Rngs(0)), (X, Y), steps=4, batch_size=8)
    by_epochs = fit(NNXLinear(nnx.Rngs(0)), (X, Y), epochs=2, batch_size=8)
    assert leaves_equal(by_steps.state.params, by_epochs.state.params)


@pytest.mark.parametrize("form", ["arrays", "stream"])
def test_a_steps_run_resumed_with_a_larger_budget_replays_the_uninterrupted_run(form, tmp_path):
    data, batch_size = ((X, Y), 8) if form == "arrays" else (stream, None)
    uninterrupted = fit(LinenLinear(), data, epochs=2, batch_size=batch_size)
    first = fit(LinenLinear(), data, steps=3, batch_size=batch_size, checkpoint_dir=tmp_path)
    assert [row["step"] for row in first.history] == [2, 3]
    with pytest.raises(ValueError, match="already trained for 3 steps, more than steps=2: pass steps >= 3"):
        fit(LinenLinear(), data, steps=2, batch_size=batch_size, checkpoint_dir=tmp_path)
    same = fit(LinenLinear(), data, steps=3, batch_size=batch_size, checkpoint_dir=tmp_path)
    assert same.history == first.history and leaves_equal(same.state.params, first.state.params)  # nothing to do
    resumed = fit(LinenLinear(), data, epochs=2, batch_size=batch_size, checkpoint_dir=tmp_path)
    assert leaves_equal(resumed.state.params, uninterrupted.state.params)  # the rest of epoch 2, not a new epoch
    assert [(row["epoch"], row["step"]) for row in resumed.history] == [(1, 2), (2, 3), (2, 4)]


def test_integer_sequence_labels_take_the_default_loss_and_their_range_is_checked():
    class Tagger(linen.Module):  # per-token logits of 3 classes for (batch, 5 tokens, 4 features)
        @linen.compact
        def __call__(self, x):
            return linen.Dense(3)(x)

    x = RNG.normal(size=(16, 5, 4)).astype(np.float32)
    y = RNG.integers(0, 3, (16, 5)).astype(np.int32)
    history = train.fit(Tagger(), optax.adam(1e-2), (x, y), epochs=1, batch_size=8, progress=False).history
    assert 0.0 <= history[-1]["accuracy"] <= 1.0 and np.isfinite(history[-1]["loss"])
    bad = y.copy()
    bad[2, 1] = 3
    with pytest.raises(ValueError, match=r"1 train label\(s\) outside \[0, 3\), e.g. 3 at index \(2, 1\)"):
        train.fit(Tagger(), optax.sgd(0.1), (x, bad), epochs=1, progress=False)


def test_a_one_shot_generator_is_refused_for_a_second_epoch():
    with pytest.raises(ValueError, match="one-shot iterator .* gives one epoch, not epochs=2"):
        fit(NNXLinear(nnx.Rngs(0)), iter(stream(0)), epochs=2)
    with pytest.raises(ValueError, match="one-shot iterator .* cannot give epoch 2"):
        fit(NNXLinear(nnx.Rngs(0)), iter(stream(0)), steps=3)  # 2 batches for a budget of 3


BAD = {
    "both_budgets": (dict(epochs=1, steps=2), ValueError, "exactly one of epochs= .* and steps= .*, got both"),
    "no_budget": (dict(), ValueError, "exactly one of epochs=.*, got neither"),
    "steps_0": (dict(steps=0), ValueError, "steps must be a positive integer, got 0"),
    "steps_float": (dict(steps=2.5), ValueError, "steps must be a positive integer, got 2.5"),
    "float_y_without_loss": (
        dict(epochs=1, loss_fn=None),
        ValueError,
        "targets of dtype float32 .* default loss is softmax cross-entropy against integer class labels; pass loss_fn",
    ),
    "empty_iterable": (dict(epochs=1, data=[]), ValueError, "data gave no batch"),
    "mismatched_lengths": (dict(epochs=1, data=(X, Y[:15])), ValueError, "16 train inputs but 15 labels"),
    "batch_size_of_a_stream": (
        dict(epochs=1, data=stream, batch_size=8),
        ValueError,
        "batch_size applies to in-memory",
    ),
    "epochless_callable": (dict(epochs=1, data=lambda: stream(0)), TypeError, r"called as data\(epoch\)"),
    "not_batches": (dict(epochs=1, data=[X, Y]), ValueError, r"must give \(x, y\) batches; batch 1 of epoch 1 is a"),
    "one_shot_eval_data": (dict(epochs=1, eval_data=iter(stream(0))), ValueError, "eval_data is a one-shot iterator"),
    "eval_data_of_another_shape": (
        dict(epochs=1, eval_data=[(X[:, :3], Y)]),
        ValueError,
        r"eval_data, batch 1: inputs shaped \(3,\) per sample, the training data's \(4,\)",
    ),
    "integer_eval_targets": (
        dict(epochs=1, eval_data=(X, Y.astype(np.int32))),
        ValueError,
        "eval_data: targets of dtype int32, the training data's float32",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_clear_error_before_training(case, tmp_path):
    kwargs, error, match = BAD[case]
    kwargs = {"data": (X, Y), **kwargs}
    with pytest.raises(error, match=match):
        fit(NNXLinear(nnx.Rngs(0)), kwargs.pop("data"), checkpoint_dir=tmp_path, **kwargs)
    assert not [p for p in tmp_path.iterdir() if p.name != "jdeq.lock"]  # nothing trained, nothing saved


def test_a_stream_batch_unlike_the_first_is_named():
    batches = [(X[:8], Y[:8]), (X[8:, :3], Y[8:])]
    with pytest.raises(ValueError, match=r"data, batch 2 of epoch 1: inputs shaped \(3,\) per sample, its first"):
        fit(NNXLinear(nnx.Rngs(0)), batches, epochs=1)
    labels = np.array([0, 1, 2, 3], np.int32)  # 3 logits: label 3 is out of range
    batches = [(X[:4], labels[:3].repeat(2)[:4]), (X[4:8], labels)]
    with pytest.raises(ValueError, match=r"data, batch 2 of epoch 1: 1 train label\(s\) outside \[0, 3\)"):
        train.fit(NNXLinear(nnx.Rngs(0), outputs=3), optax.sgd(0.1), batches, epochs=1, progress=False)


def test_warm_starts_need_in_memory_data():
    data = tiny_classification()
    with pytest.raises(ValueError, match="fixed-point cache .* a stream of batches has none"):
        train.fit(
            NNXRegressor(nnx.Rngs(0), outputs=3, cache_size=16),
            optax.sgd(0.1),
            lambda epoch: [(data.x_train[:8], data.y_train[:8])],
            epochs=1,
            progress=False,
        )


def test_warm_starts_work_with_arrays_of_any_targets():
    result = fit(NNXRegressor(nnx.Rngs(0), cache_size=16), (X, Y), epochs=1, batch_size=8)
    seen = [leaf for leaf in jax.tree_util.tree_leaves(result.state.cache) if leaf.dtype == bool]
    assert len(seen) == 1 and np.all(seen[0])  # 16 examples, 2 full batches: every one stored
