"""State besides parameters in fit, with a user's own linen and NNX models: NNX dropout draws a fresh mask at every
step and its Rngs are written back, evaluation runs in eval mode, BatchNorm outside the DEQ is updated and
checkpointed (linen and NNX), linen dropout and any other rng stream get keys."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import leaves_equal, tiny_classification, user_nnx_map

import jdeq
import jdeq.train as train
from jdeq.train._loop import init_state

SOLVER = jdeq.Anderson(max_steps=40)


class NNXDropoutModel(nnx.Module):
    """A user's NNX model: a DEQ, then BatchNorm and dropout outside it."""

    def __init__(self, rngs):
        self.deq = jdeq.nn.NNXDEQ(user_nnx_map(rngs), solver=SOLVER)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(self.norm(self.deq(x, jnp.zeros((x.shape[0], 8), x.dtype)))))


def test_nnx_dropout_draws_a_fresh_mask_every_step():
    data = tiny_classification()
    trainable = train.as_trainable(NNXDropoutModel(nnx.Rngs(0)))
    optimizer = optax.sgd(0.0)  # parameters unchanged: only the mask can change the loss
    step = train.make_train_step(trainable, optimizer)
    state = init_state(trainable, optimizer, data, 0)
    losses = []
    for _ in range(3):
        state, metrics, _ = step(state, data.x_train[:8], data.y_train[:8], jnp.zeros((), bool))
        losses.append(float(metrics["loss"]))
    assert len(set(losses)) == 3


def test_nnx_fit_writes_back_rngs_and_batch_stats_and_evaluates_in_eval_mode():
    data = tiny_classification()
    model = NNXDropoutModel(nnx.Rngs(0))
    counts = [int(leaf) for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.RngCount))]
    result = train.fit(model, optax.adam(1e-2), data, epochs=1, batch_size=8, progress=False, eval_batch_size=8)
    after = [int(leaf) for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.RngCount))]
    assert after != counts  # the model's Rngs advanced by the steps
    assert not np.allclose(model.norm.mean[...], 0.0)  # running mean updated outside the DEQ
    model.eval()
    logits = model(jnp.asarray(data.x_test))
    loss = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(data.y_test))))
    assert result.history[-1]["test_loss"] == pytest.approx(loss, rel=1e-5)


class LinenUserMap(linen.Module):
    @linen.compact
    def __call__(self, z, x):
        return jnp.tanh(0.3 * linen.Dense(8)(z) + linen.Dense(8)(x))


class LinenDropoutModel(linen.Module):
    """A user's linen model: a DEQ, then BatchNorm, dropout and a noise stream of its own outside it."""

    @linen.compact
    def __call__(self, x, train: bool):
        z = jdeq.nn.DEQ(LinenUserMap(), solver=SOLVER)(x, jnp.zeros((x.shape[0], 8), x.dtype))
        z = linen.BatchNorm(use_running_average=not train)(z)
        z = linen.Dropout(0.5, deterministic=not train)(z)
        if train:
            z = z + 0.01 * jax.random.normal(self.make_rng("noise"), z.shape, z.dtype)
        return linen.Dense(3)(z)


def test_linen_dropout_other_streams_and_batch_stats_train_and_checkpoint(tmp_path):
    data = tiny_classification()
    options = dict(epochs=1, batch_size=8, progress=False, train_flag="train", rng_streams=("dropout", "noise"))
    result = train.fit(LinenDropoutModel(), optax.adam(1e-2), data, checkpoint_dir=tmp_path, **options)
    stats = result.state.model_state["batch_stats"]
    assert not np.allclose(jax.tree_util.tree_leaves(stats)[0], 0.0) or not np.allclose(
        jax.tree_util.tree_leaves(stats)[1], 1.0
    )
    resumed = train.fit(
        LinenDropoutModel(), optax.adam(1e-2), data, checkpoint_dir=tmp_path, **{**options, "epochs": 1}
    )
    assert leaves_equal(resumed.state.model_state, result.state.model_state)  # restored from the checkpoint
