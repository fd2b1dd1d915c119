"""The papers' models and quantities at tiny sizes, against dense / numpy references (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq
from jdeq import theory
from jdeq.models import gao, kawaguchi, ling


@pytest.fixture
def kawaguchi_problem():
    params = kawaguchi.init(jax.random.PRNGKey(0), width=5, out_dim=3)
    phi = jax.random.normal(jax.random.PRNGKey(1), (5, 40))
    targets = jax.random.normal(jax.random.PRNGKey(2), (3, 40))
    return params, phi, targets


@pytest.mark.parametrize("gamma", [0.3, 0.9])
def test_kawaguchi_equilibrium_matches_dense_solve(kawaguchi_problem, gamma):
    params, phi, _ = kawaguchi_problem
    np.testing.assert_allclose(
        kawaguchi.predict(params, phi, gamma), kawaguchi.dense_predict(params, phi, gamma), atol=1e-10
    )
    dense_weight = params["B"] @ jnp.linalg.inv(jnp.eye(5) - gamma * kawaguchi.column_softmax(params["A"]))
    np.testing.assert_allclose(kawaguchi.function_weight(params, gamma), dense_weight, atol=1e-10)


def test_kawaguchi_implicit_gradient_matches_dense_gradient(kawaguchi_problem):
    params, phi, targets = kawaguchi_problem

    def loss(p, predict):
        return kawaguchi.square_loss(predict(p, phi, 0.7), targets)

    implicit = jax.grad(loss)(params, kawaguchi.predict)
    dense = jax.grad(loss)(params, kawaguchi.dense_predict)
    for name in params:
        np.testing.assert_allclose(implicit[name], dense[name], rtol=1e-8, atol=1e-10)


def test_column_softmax_is_column_stochastic():
    s = kawaguchi.column_softmax(jax.random.normal(jax.random.PRNGKey(0), (6, 6)))
    np.testing.assert_allclose(s.sum(0), np.ones(6), atol=1e-12)
    assert (s > 0).all()


@pytest.mark.parametrize("model", ["gao", "ling"])
def test_relu_equilibria_are_fixed_points_and_unique(model):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 10))
    if model == "gao":
        params = gao.init(jax.random.PRNGKey(1), 12, 4)
        mixing, solve = gao.DEFAULT_GAMMA * params["A"], lambda z0: gao.equilibrium(params, x, z0=z0)
        assert gao.well_posedness(params) < 1
    else:
        params = ling.init(jax.random.PRNGKey(1), 12, 4)
        mixing, solve = params["W"], lambda z0: ling.equilibrium(params, x, z0=z0)
    z = solve(None)
    np.testing.assert_allclose(jax.nn.relu(mixing @ z + params["U"] @ x), z, atol=1e-11)
    np.testing.assert_allclose(solve(100.0 * jax.random.normal(jax.random.PRNGKey(3), z.shape)), z, atol=1e-10)


def test_least_squares_optimum_matches_numpy():
    rng = np.random.default_rng(0)
    phi, y = rng.standard_normal((4, 30)), rng.standard_normal((2, 30))
    best = theory.least_squares_optimum(jnp.asarray(phi), jnp.asarray(y))
    w = np.linalg.lstsq(phi.T, y.T, rcond=None)[0].T
    np.testing.assert_allclose(best.weight, w, atol=1e-10)
    np.testing.assert_allclose(best.value, 0.5 * np.sum((w @ phi - y) ** 2) / 30, rtol=1e-12)


def test_logistic_optimum_is_stationary_and_minimal():
    rng = np.random.default_rng(0)
    phi = jnp.asarray(rng.standard_normal((3, 60)))
    labels = jnp.asarray(np.eye(3)[rng.integers(0, 3, 60)].T)  # random labels: not separable
    best = theory.logistic_optimum(phi, labels)
    assert best.grad_norm < 1e-9
    for seed in range(5):
        w = best.weight + 0.1 * jax.random.normal(jax.random.PRNGKey(seed), best.weight.shape)
        assert kawaguchi.logistic_loss(w @ phi, labels) > best.value


@pytest.mark.parametrize("radius", [0.05, 0.3, 10.0])
def test_trust_region_step_solves_the_subproblem(radius):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((5, 5))
    hess, grad = jnp.asarray(q @ q.T + 0.1 * np.eye(5)), jnp.asarray(rng.standard_normal(5))
    v = theory.trust_region_step(grad, hess, radius)
    newton = -jnp.linalg.solve(hess, grad)
    if jnp.linalg.norm(newton) <= radius:
        np.testing.assert_allclose(v, newton, atol=1e-10)
    else:
        np.testing.assert_allclose(jnp.linalg.norm(v), radius, rtol=1e-8)

    def model(u):
        return grad @ u + 0.5 * u @ hess @ u

    others = rng.standard_normal((200, 5))
    others = others * (radius * rng.uniform(0, 1, (200, 1)) / np.linalg.norm(others, axis=1, keepdims=True))
    assert all(model(v) <= model(jnp.asarray(u)) + 1e-12 for u in others)


def test_fit_linear_rate_recovers_a_geometric_sequence():
    fit = theory.fit_linear_rate(3.0 * 0.9 ** np.arange(50))
    assert fit.rate == pytest.approx(0.9, rel=1e-10) and fit.r2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 3"):
        theory.fit_linear_rate(np.array([1.0, 0.0, 0.0]), floor=0.5)


def test_gram_ntk_and_bound():
    z = jax.random.normal(jax.random.PRNGKey(0), (20, 6))
    assert theory.gram_min_eigenvalue(z) == pytest.approx(np.linalg.eigvalsh(np.asarray(z.T @ z))[0])
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
    np.testing.assert_allclose(theory.ntk(lambda w: w @ x, jnp.ones(4)), x.T @ x, atol=1e-12)
    bound = theory.ling_loss_bound(2.0, 0.1, 1.0, 10)
    assert bound[0] == 2.0 and np.all(np.diff(bound) < 0)
    assert jdeq.linalg.largest_singular_value(z) == pytest.approx(np.linalg.norm(np.asarray(z), 2))
    alpha, c = theory.power_law_exponent(np.array([1.0, 2.0, 4.0]), 3.0 * np.array([1.0, 2.0, 4.0]) ** 1.5)
    assert (alpha, c) == (pytest.approx(1.5), pytest.approx(3.0))


def test_models_use_jdeq_fixed_point(monkeypatch):
    calls = []
    original = jdeq.implicit.fixed_point

    def spy(*args, **kwargs):
        calls.append(args[0].__name__)
        return original(*args, **kwargs)

    for module in (kawaguchi, jdeq.models._relu):
        monkeypatch.setattr(module, "fixed_point", spy)
    params = kawaguchi.init(jax.random.PRNGKey(0), 3, 2)
    kawaguchi.predict(params, jnp.ones((3, 4)), 0.5)
    ling.predict(ling.init(jax.random.PRNGKey(0), 5, 2), jnp.ones((2, 4)))
    assert calls == ["equilibrium_map", "relu_map"]
