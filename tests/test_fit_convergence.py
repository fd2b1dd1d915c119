"""Non-convergence is never silent: eager solves (fixed_point, fixed_point_batch, root, the Flax layers) warn
jdeq.ConvergenceWarning, jitted ones keep the stats as the record; fit warns once per epoch and DEQ layer, raises
SolveError after saving the epoch's checkpoint, or ignores it, as on_nonconvergence says; root's default solver
reaches a root of F(z) - z."""

import re
import warnings

import flax.linen as linen
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from helpers import tiny_classification

import jdeq
import jdeq.train as train

W = jax.random.normal(jax.random.PRNGKey(3), (16, 16)) * 0.9 / 4.0
X = jax.random.normal(jax.random.PRNGKey(4), (16,))
SHORT = jdeq.FixedPoint(tol=1e-6, max_steps=2)  # too few steps for any of these maps


def contraction(z, w, x):
    return jnp.tanh(w @ z + x)


def test_convergence_warning_is_a_top_level_user_warning():
    assert issubclass(jdeq.ConvergenceWarning, UserWarning)


def test_eager_fixed_point_warns_with_fraction_steps_residual_and_advice():
    with pytest.warns(jdeq.ConvergenceWarning) as record:
        jdeq.fixed_point(contraction, jnp.zeros(16), W, X, solver=SHORT)
    message = str(record[0].message)
    assert "0.0% of the solves converged" in message and "max_steps=2" in message and "tol=1e-06" in message
    assert "spectral normalisation" in message and record[0].filename == __file__


def test_eager_converged_solve_and_jitted_solve_are_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error", jdeq.ConvergenceWarning)
        assert jdeq.fixed_point(contraction, jnp.zeros(16), W, X).stats.converged
        stats = jax.jit(lambda w: jdeq.fixed_point(contraction, jnp.zeros(16), w, X, solver=SHORT).stats)(W)
    assert not stats.converged  # inside jit the stats are the record


def test_eager_batch_and_root_warn():
    with pytest.warns(jdeq.ConvergenceWarning, match="fixed_point_batch: 0.0%"):
        jdeq.fixed_point_batch(contraction, jnp.zeros((3, 16)), W, jnp.stack([X] * 3), in_axes=(None, 0), solver=SHORT)
    with pytest.warns(jdeq.ConvergenceWarning, match="root: "):
        jdeq.root(lambda z: jnp.tanh(z) + 2.0, jnp.zeros(1))  # no root


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_root_default_solver_finds_the_root_of_the_common_residual(sign):
    """g(z) = F(z) - z of a contraction F: Anderson on z - g(z) = 2z - F(z) expands and stopped at max_steps
    (|g| = 0.73) before root's default became Broyden."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", jdeq.ConvergenceWarning)
        sol = jdeq.root(lambda z: sign * (contraction(z, W, X) - z), jnp.zeros(16))
    assert sol.stats.converged
    assert float(jnp.linalg.norm(contraction(sol.value, W, X) - sol.value)) < 1e-4


class UserMap(linen.Module):
    """A user's own map (two steps are too few for it to converge)."""

    scale: float = 1.0

    @linen.compact
    def __call__(self, z, x):
        return jnp.tanh(self.scale * linen.Dense(8)(z) + linen.Dense(8)(x))


class UserModel(linen.Module):
    layers: int = 1
    solver: jdeq.Solver = SHORT
    scale: float = 1.0

    @linen.compact
    def __call__(self, x):
        z = jnp.zeros((x.shape[0], 8), x.dtype)
        for _ in range(self.layers):
            z = jdeq.nn.DEQ(UserMap(self.scale), solver=self.solver)(x, z)
        return linen.Dense(3)(z)


def test_eager_linen_layer_warns():
    x = jnp.ones((2, 4), jnp.float32)
    model = UserModel()
    variables = model.init(jax.random.PRNGKey(0), x)
    with pytest.warns(jdeq.ConvergenceWarning):
        model.apply(variables, x)


class NNXUserMap(nnx.Module):
    def __init__(self, rngs):
        self.a, self.b = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(4, 8, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(self.a(z) + self.b(x))


class NNXUserModel(nnx.Module):
    def __init__(self, rngs):
        self.deq = jdeq.nn.NNXDEQ(NNXUserMap(rngs), solver=SHORT)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.deq(x, jnp.zeros((x.shape[0], 8), x.dtype)))


def fit(model, **kwargs):
    return train.fit(model, optax.sgd(1e-2), tiny_classification(), epochs=2, batch_size=8, progress=False, **kwargs)


@pytest.mark.parametrize("layers", [1, 2])
def test_fit_warns_once_per_epoch_and_layer(layers):
    with pytest.warns(jdeq.ConvergenceWarning) as record:
        result = fit(UserModel(layers))
    messages = [str(w.message) for w in record if w.category is jdeq.ConvergenceWarning]
    forward = [m for m in messages if "forward solves of" in m and "evaluation" not in m]
    assert len(forward) == 2 * layers  # each epoch, each layer
    assert all("of the solves converged" in m and "steps mean 2.0, max 2" in m for m in forward)
    assert any("epoch 2, evaluation (forward) solves" in m for m in messages)
    assert result.history[-1]["fwd_converged_fraction"] == 0.0
    assert result.history[-1]["test_fwd_converged_fraction"] == 0.0
    if layers == 2:
        assert "fwd_layer1_converged_fraction" in result.history[-1]


class TwoSolverModel(linen.Module):
    """Two DEQ layers with their own solvers; the second with a backward solver of its own."""

    @linen.compact
    def __call__(self, x):
        z = jnp.zeros((x.shape[0], 8), x.dtype)
        z = jdeq.nn.DEQ(UserMap(), solver=SHORT)(x, z)
        adjoint = jdeq.Implicit(jdeq.FixedPoint(tol=1e-8, max_steps=2))
        z = jdeq.nn.DEQ(UserMap(), solver=jdeq.FixedPoint(tol=1e-7, max_steps=3), grad=adjoint)(x, z)
        return linen.Dense(3)(z)


def test_fit_warning_names_each_linen_layers_own_max_steps_and_tol():
    with pytest.warns(jdeq.ConvergenceWarning) as record:
        train.fit(TwoSolverModel(), optax.sgd(1e-2), tiny_classification(), epochs=1, batch_size=8, progress=False)
    messages = {str(w.message).split(":")[0]: str(w.message) for w in record}
    limits = {
        "epoch 1, forward solves of layer 0": "max 2 of max_steps=2; largest relative residual .* \\(tol=1e-06\\)",
        "epoch 1, forward solves of layer 1": "max 3 of max_steps=3; largest relative residual .* \\(tol=1e-07\\)",
        "epoch 1, backward solves of layer 1": "max 2 of max_steps=2; largest relative residual .* \\(tol=1e-08\\)",
    }
    for what, limit in limits.items():
        assert re.search(limit, messages.get(what, "")), list(messages)


def test_fit_nnx_warns_and_ignore_is_silent():
    with pytest.warns(
        jdeq.ConvergenceWarning, match="epoch 1, forward solves of the DEQ layers: 0.0%.* of max_steps=2"
    ):
        fit(NNXUserModel(nnx.Rngs(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", jdeq.ConvergenceWarning)
        history = fit(NNXUserModel(nnx.Rngs(0)), on_nonconvergence="ignore").history
    assert history[-1]["fwd_converged_fraction"] == 0.0


def test_fit_raise_keeps_the_epoch_checkpoint(tmp_path):
    with pytest.raises(jdeq.SolveError, match="epoch 1, forward solves"):
        fit(UserModel(), checkpoint_dir=tmp_path, on_nonconvergence="raise")
    assert (tmp_path / "1").is_dir() and not list(tmp_path.glob("*tmp*"))


def test_fit_rejects_an_unknown_on_nonconvergence():
    with pytest.raises(ValueError, match="on_nonconvergence"):
        fit(UserModel(), on_nonconvergence="silent")


def test_converged_training_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error", jdeq.ConvergenceWarning)
        history = fit(UserModel(solver=jdeq.Anderson(max_steps=60), scale=0.3)).history
    assert history[-1]["fwd_converged_fraction"] == 1.0 and history[-1]["test_fwd_converged_fraction"] == 1.0
