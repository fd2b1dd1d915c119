"""Adversarial findings on fit, each a silent wrong answer or a late crash before its fix: epochs validated,
jax.jit(fit) named, per-sample metrics rejected, eval_data validated before training, on_epoch_end scalars
converted (others rejected before any save), NaN in a config compared equal, every changed key named on resume,
the learning rate and NNX solver options part of the run config, resume="allow_changes"."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tiny_classification, user_nnx_map

import jdeq
import jdeq.train as train

SOLVER = jdeq.Anderson(max_steps=40)


class NNXUserModel(nnx.Module):
    def __init__(self, rngs, solver=SOLVER, cache_size=None):
        cache = {} if cache_size is None else dict(cache_size=cache_size, state_shape=(8,), state_dtype=jnp.float32)
        self.deq = jdeq.nn.NNXDEQ(user_nnx_map(rngs), solver=solver, **cache)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.deq(x, jnp.zeros((x.shape[0], 8), x.dtype)))


def fit(model=None, optimizer=None, data=None, **kwargs):
    kwargs = {"epochs": 1, "batch_size": 8, "progress": False, **kwargs}
    model = model or NNXUserModel(nnx.Rngs(0))
    return train.fit(model, optimizer or optax.sgd(1e-2), data or tiny_classification(), **kwargs)


@pytest.mark.parametrize("epochs", [-1, 0, 2.5, True])
def test_epochs_must_be_a_positive_integer(epochs):
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        fit(epochs=epochs)


def test_jit_of_fit_is_a_clear_error():
    with pytest.raises(TypeError, match="cannot be traced"):
        jax.jit(lambda x: fit(epochs=1, config={"x": x}))(jnp.zeros(()))
    with pytest.raises(TypeError, match="cannot be traced"):
        jax.jit(lambda n: fit(epochs=n))(1)


def test_per_sample_metrics_are_rejected():
    def per_sample(outputs, y):
        return {"accuracy": (jnp.argmax(outputs, -1).astype(y.dtype) == y).astype(jnp.float32)}

    with pytest.raises(ValueError, match="metrics_fn must return scalars.*'accuracy'"):
        fit(metrics_fn=per_sample)


@pytest.mark.parametrize(
    "eval_data, match",
    [
        ((np.zeros((4, 4), np.float32), np.array([0, 1, -1, 2], np.int32)), "outside"),
        ((np.zeros((0, 4), np.float32), np.zeros(0, np.int32)), "empty"),
        ((np.zeros((4, 4), np.float32), np.zeros(3, np.int32)), "4 .*inputs but 3 labels"),
    ],
    ids=["label_-1", "empty", "length_mismatch"],
)
def test_eval_data_is_validated_before_training(eval_data, match, tmp_path):
    with pytest.raises(ValueError, match=f"eval_data.*{match}"):
        fit(eval_data=eval_data, checkpoint_dir=tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name != "jdeq.lock"]  # nothing trained, nothing saved


def test_on_epoch_end_scalars_are_converted_others_rejected_before_any_save(tmp_path):
    def add_scalars(epoch, row):
        row.update(np_value=np.float32(0.5), jax_value=jnp.asarray(2, jnp.int32))

    history = fit(epochs=2, on_epoch_end=add_scalars, checkpoint_dir=tmp_path).history
    assert history[-1]["np_value"] == 0.5 and type(history[-1]["np_value"]) is float
    assert history[-1]["jax_value"] == 2 and type(history[-1]["jax_value"]) is int

    def add_array(epoch, row):
        row["vector"] = np.zeros(3)

    other = tmp_path / "other"
    with pytest.raises(ValueError, match="on_epoch_end.*'vector'"):
        fit(epochs=2, on_epoch_end=add_array, checkpoint_dir=other)
    assert not list(other.glob("*tmp*")) and not (other / "1").exists()


def test_config_holding_nan_resumes(tmp_path):
    fit(epochs=1, checkpoint_dir=tmp_path, config={"dropout": float("nan")})
    assert len(fit(epochs=2, checkpoint_dir=tmp_path, config={"dropout": float("nan")}).history) == 2


def test_resume_names_every_changed_key_old_to_new(tmp_path):
    fit(epochs=1, checkpoint_dir=tmp_path, config={"a": 1, "b": "x"})
    with pytest.raises(ValueError, match=r"config\.a: 1 → 2; config\.b: \"x\" → \"y\"") as error:
        fit(epochs=2, checkpoint_dir=tmp_path, config={"a": 2, "b": "y"})
    assert len(str(error.value)) < 400


def test_a_changed_learning_rate_is_a_changed_config(tmp_path):
    fit(epochs=1, optimizer=optax.adam(1e-2), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="optimizer"):
        fit(epochs=2, optimizer=optax.adam(1e-3), checkpoint_dir=tmp_path)


@pytest.mark.parametrize(
    "changed",
    [jdeq.Anderson(max_steps=40, tol=1e-3), jdeq.FixedPoint(max_steps=40)],
    ids=["tol", "solver"],
)
def test_nnx_resume_with_another_solver_is_refused_and_allowed_on_request(tmp_path, changed):
    fit(epochs=1, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="solver"):
        fit(NNXUserModel(nnx.Rngs(0), changed), epochs=2, checkpoint_dir=tmp_path)
    with pytest.warns(UserWarning, match="solver"):
        history = fit(NNXUserModel(nnx.Rngs(0), changed), epochs=2, checkpoint_dir=tmp_path, resume="allow_changes")
    assert len(history.history) == 2


def test_warm_cache_refuses_a_training_set_of_other_content(tmp_path):
    data = tiny_classification()
    fit(NNXUserModel(nnx.Rngs(0), cache_size=16), data=data, checkpoint_dir=tmp_path)
    order = np.random.default_rng(1).permutation(16)
    shuffled = data._replace(x_train=data.x_train[order], y_train=data.y_train[order])
    with pytest.raises(ValueError, match="data.x_train.sha256"):
        fit(NNXUserModel(nnx.Rngs(0), cache_size=16), data=shuffled, epochs=2, checkpoint_dir=tmp_path)


def test_nnx_cache_left_unused_by_warm_start_false_is_said_aloud():
    model = NNXUserModel(nnx.Rngs(0), cache_size=16)
    model.deq.warm_start = False
    with pytest.warns(UserWarning, match="deq hold a fixed-point cache but have warm_start=False"):
        fit(model)


def test_a_lineax_solver_passed_as_a_solver_says_wrap_it_in_jdeq_lineax():
    lineax = pytest.importorskip("lineax")
    with pytest.raises(ValueError, match="wrap it in `jdeq.Lineax`"):
        jdeq.fixed_point(lambda z: 0.5 * z, jnp.ones(2), solver=lineax.GMRES(rtol=1e-6, atol=1e-6))


@pytest.mark.parametrize(
    "build",
    [
        lambda solver: jdeq.Implicit(solver=solver),
        lambda solver: jdeq.Shine(refine=solver),
        lambda solver: jdeq.Newton(linear_solver=solver),
        lambda solver: jdeq.Chord(linear_solver=solver),
    ],
    ids=["Implicit", "Shine", "Newton", "Chord"],
)
def test_a_lineax_solver_inside_a_jdeq_one_is_rejected_at_construction_with_the_same_advice(build):
    lineax = pytest.importorskip("lineax")
    with pytest.raises(ValueError, match="wrap it in `jdeq.Lineax`"):
        build(lineax.GMRES(rtol=1e-6, atol=1e-6))
    build(jdeq.Lineax(lineax.GMRES(rtol=1e-6, atol=1e-6)))  # wrapped, it is accepted
