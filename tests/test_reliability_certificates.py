"""Certificates that hold: the ‖A‖∞ projection in half precision."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdeq
import jdeq.models.splitting
from jdeq.models import InfNormCell, MonotoneCell, ScaledCell, SoftmaxCell


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_project_inf_norm_meets_its_bound_in_the_parameter_dtype(dtype, scale):
    kappa = 0.95
    params = {"A": (scale * jax.random.normal(jax.random.PRNGKey(0), (16, 16))).astype(dtype)}
    grads = {"A": jax.random.normal(jax.random.PRNGKey(1), (16, 16)).astype(dtype)}
    optimizer = optax.chain(optax.sgd(0.3), jdeq.optim.project_inf_norm(kappa))
    state = optimizer.init(params)
    for _ in range(4):
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert params["A"].dtype == dtype
        largest = np.max(np.sum(np.abs(np.asarray(params["A"].astype(jnp.float32), np.float64)), axis=1))
        assert kappa * 0.9 <= largest <= kappa, largest  # on the boundary (not far inside), never past it


def three_lipschitz(h):
    return 3.0 * jnp.tanh(h)


@pytest.mark.parametrize("cell", [InfNormCell, SoftmaxCell])
def test_a_cell_with_an_activation_of_unknown_lipschitz_constant_is_refused(cell):
    with pytest.raises(ValueError, match="lipschitz="):
        cell(4, activation=three_lipschitz)


@pytest.mark.parametrize("cell", [InfNormCell, SoftmaxCell])
def test_a_stated_lipschitz_constant_is_folded_into_the_certificate(cell):
    small = {"kappa": 0.3} if cell is InfNormCell else {"gamma": 0.3}  # 3 · 0.3 < 1: still certified
    base, scaled = cell(4, **small), cell(4, activation=three_lipschitz, lipschitz=3.0, **small)
    params = base.init(jax.random.PRNGKey(0), (3,))
    np.testing.assert_allclose(scaled.well_posedness(params), 3.0 * base.well_posedness(params), rtol=1e-6)


@pytest.mark.parametrize(
    "build",
    [
        lambda: InfNormCell(4, activation=three_lipschitz, lipschitz=3.0),  # 3 · 0.95 >= 1
        lambda: SoftmaxCell(4, activation=three_lipschitz, lipschitz=3.0, gamma=0.5),
        lambda: InfNormCell(4, lipschitz=float("nan")),
    ],
)
def test_a_certificate_that_cannot_hold_is_refused_at_construction(build):
    with pytest.raises(ValueError, match="lipschitz"):
        build()


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: MonotoneCell(4, m=float("inf")), "m="),
        (lambda: MonotoneCell(4, w_scale=float("nan")), "w_scale"),
        (lambda: ScaledCell(4, gamma=float("inf")), "gamma"),
    ],
)
def test_nonfinite_cell_hyperparameters_are_refused(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_known_activations_keep_the_certificate():
    for activation in (jax.nn.relu, jnp.tanh, jax.nn.sigmoid, jax.nn.softplus):
        InfNormCell(4, activation=activation)


@pytest.mark.parametrize("splitting", [jdeq.models.splitting.ForwardBackward, jdeq.models.splitting.PeacemanRachford])
def test_an_infinite_splitting_step_is_refused(splitting):
    with pytest.raises(ValueError, match="alpha"):
        splitting(alpha=float("inf"))
