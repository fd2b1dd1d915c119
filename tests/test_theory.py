"""The papers' models and quantities at tiny sizes, against dense / numpy references (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq
from jdeq import theory
from jdeq.experiments._common import rate_record, seed_spread, steps_to_threshold, worst_bound_step
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


def test_fit_tail_rate_fits_the_tail_before_the_floor():
    # a fast start, then an exact geometric tail at 0.95, then a round-off plateau below the floor
    values = np.concatenate([0.5 ** np.arange(10), 0.5**9 * 0.95 ** np.arange(1, 91), np.full(20, 1e-30)])
    fit, first, last = theory.fit_tail_rate(values, floor=1e-20, tail=0.5)
    assert (first, last) == (49, 99)  # the last half of steps 0..99
    assert fit.rate == pytest.approx(0.95, rel=1e-12) and fit.r2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="tail"):
        theory.fit_tail_rate(values, tail=0.0)
    with pytest.raises(ValueError, match="at least 3"):
        theory.fit_tail_rate(np.array([1.0, 0.5, 0.0]), floor=0.1)


def test_rate_record_predicts_the_geometric_mean_of_the_factors_over_the_fitted_steps():
    values = 0.9 ** np.arange(41)
    factors = np.where(np.arange(40) < 20, 0.5, 0.8)  # the fit covers steps 20..40: only the 0.8 factors
    record = rate_record(values, factors, tail=0.5)
    assert (record.first, record.last) == (20, 40)
    assert record.fitted == pytest.approx(0.9) and record.predicted == pytest.approx(0.8)
    assert np.isnan(rate_record(values).predicted)


def test_worst_bound_step_spread_and_steps_to_threshold():
    values, bound = np.array([1.0, 0.5, 0.3, 1e-20]), np.array([1.0, 0.6, 0.2, 1e-30])
    assert worst_bound_step(values, bound) == (pytest.approx(1e10), 3)  # the round-off step dominates
    assert worst_bound_step(values, bound, floor=1e-15) == (pytest.approx(1.5), 2)
    blown_up = np.array([1.0, 0.5, np.nan, np.inf])
    assert worst_bound_step(blown_up, np.ones(4)) == (np.inf, 2)  # a blow-up violates the bound where it starts
    assert np.isnan(worst_bound_step(np.array([1.0, 0.0]), np.ones(2), floor=0.5)[0])
    with pytest.raises(ValueError, match="same shape"):
        worst_bound_step(values, bound[:2])
    assert seed_spread([3.0, 1.0, 2.0, 10.0, 0.5]) == {"min": 0.5, "median": 2.0, "max": 10.0, "seeds": 5}
    assert np.isnan(seed_spread([1.0, np.nan])["max"])
    assert steps_to_threshold(values, 0.4) == 2 and steps_to_threshold(values, 0.0) == -1


def test_rate_record_fits_a_geometric_sequence_up_to_its_blow_up():
    values = 2.0 * 0.9 ** np.arange(40)
    values[30:] = np.nan  # the run blew up at step 30
    record = rate_record(values, np.full(40, 0.95))
    assert record.fitted == pytest.approx(0.9, rel=1e-12) and record.r2 == pytest.approx(1.0)
    assert record.predicted == pytest.approx(0.95) and record.last == 29
    assert np.isnan(rate_record(np.array([1.0, np.inf, 1.0]), np.ones(3)).fitted)


def test_square_loss_pl_constant_is_attained_along_the_weakest_direction():
    rng = np.random.default_rng(0)
    n, singular = 30, np.array([3.0, 2.0, 0.5])
    q, _ = np.linalg.qr(rng.standard_normal((n, 3)))
    phi = np.diag(singular) @ q.T  # ΦΦᵀ/n = diag(s²)/n
    kappa = theory.square_loss_pl_constant(jnp.asarray(phi))
    assert kappa == pytest.approx(0.25 / n)
    y = rng.standard_normal((2, n))
    best = theory.least_squares_optimum(jnp.asarray(phi), jnp.asarray(y))

    def pl_ratio(w):
        grad = jax.grad(lambda v: kawaguchi.square_loss(v @ phi, y))(w)
        return float(jnp.sum(grad**2) / (2 * (kawaguchi.square_loss(w @ phi, y) - best.value)))

    weakest = best.weight + jnp.outer(jnp.array([1.0, -2.0]), jnp.eye(3)[2])
    assert pl_ratio(weakest) == pytest.approx(float(kappa), rel=1e-8)
    assert pl_ratio(best.weight + jax.random.normal(jax.random.PRNGKey(0), (2, 3))) >= kappa
    # a rank-deficient Φ (more features than samples): the smallest *nonzero* eigenvalue
    wide = jnp.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # ΦΦᵀ/n = diag(2, 0.5, 0)
    assert theory.square_loss_pl_constant(wide) == pytest.approx(0.5)


def test_function_space_kernel_is_the_identity_at_gamma_zero_and_above_its_lower_bound(kawaguchi_problem):
    params, _, _ = kawaguchi_problem
    # γ = 0: W = B, so K = ∂vec B/∂θ (∂vec B/∂θ)ᵀ = I and the lower bound 1/σ_max(I)² = 1 is exact
    np.testing.assert_allclose(theory.function_space_kernel(params, 0.0), np.eye(15), atol=1e-12)
    assert theory.kernel_lower_bound(params, 0.0) == pytest.approx(1.0)
    kernel = theory.function_space_kernel(params, 0.8)
    u = np.eye(5) - 0.8 * np.asarray(kawaguchi.column_softmax(params["A"]))
    inv = np.linalg.inv(u)
    b_block = np.kron(np.eye(3), inv.T @ inv)  # K = (B block) + (A block ⪰ 0), W row-major
    assert np.linalg.eigvalsh(np.asarray(kernel) - b_block)[0] > -1e-10
    lower = theory.kernel_lower_bound(params, 0.8)
    assert lower == pytest.approx(np.linalg.eigvalsh(b_block)[0]) and lower <= np.linalg.eigvalsh(kernel)[0]


def test_pl_bound_and_rate_factors_match_the_closed_form():
    bound = theory.pl_bound(2.0, 0.1, 0.5, np.full(10, 0.3))
    np.testing.assert_allclose(bound, 2.0 * np.exp(-2 * 0.1 * 0.5 * 0.3 * np.arange(11)), rtol=1e-13)
    np.testing.assert_allclose(theory.pl_rate_factors(0.1, 0.5, [0.3, 0.0]), [np.exp(-0.03), 1.0])


def test_preconditioned_step_is_the_trust_region_newton_step_of_the_preconditioned_model():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((6, 6))
    kernel, grad_w, lr = jnp.asarray(q @ q.T + 0.5 * np.eye(6)), jnp.asarray(rng.standard_normal((2, 3))), 0.05
    step = theory.preconditioned_step(grad_w, kernel, lr)
    np.testing.assert_allclose(step.ravel(), -lr * np.asarray(kernel) @ np.asarray(grad_w).ravel(), rtol=1e-12)
    # the minimiser of ∇Lᵀv + (1/2η) vᵀK⁻¹v inside a radius that does not bind
    newton = theory.trust_region_step(grad_w.ravel(), jnp.linalg.inv(kernel) / lr, 10 * jnp.linalg.norm(step))
    np.testing.assert_allclose(newton, step.ravel(), rtol=1e-8)


def test_hessian_condition_ignores_flat_directions():
    d = jnp.array([4.0, 0.5, 0.0, 2.0])
    assert theory.hessian_condition(lambda w: 0.5 * jnp.sum(d * w.ravel() ** 2), jnp.ones((2, 2))) == pytest.approx(8.0)


def test_gram_ntk_and_bound():
    z = jax.random.normal(jax.random.PRNGKey(0), (20, 6))
    assert theory.gram_min_eigenvalue(z) == pytest.approx(np.linalg.eigvalsh(np.asarray(z.T @ z))[0])
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
    np.testing.assert_allclose(theory.ntk(lambda w: w @ x, jnp.ones(4)), x.T @ x, atol=1e-12)
    assert jdeq.linalg.largest_singular_value(z) == pytest.approx(np.linalg.norm(np.asarray(z), 2))


def test_power_law_fit_recovers_an_exact_law_and_covers_a_noisy_one():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    exact = theory.power_law_fit(x, 3.0 * x**1.5)
    assert (exact.exponent, exact.coeff) == (pytest.approx(1.5), pytest.approx(3.0))
    assert exact.high - exact.low == pytest.approx(0.0, abs=1e-8)
    rng = np.random.default_rng(0)
    xs = np.repeat([16.0, 32.0, 64.0, 128.0], 20)
    covered = 0
    for _ in range(200):
        fit = theory.power_law_fit(xs, xs**-0.5 * np.exp(0.2 * rng.standard_normal(xs.size)))
        covered += fit.low <= -0.5 <= fit.high
    assert 0.9 <= covered / 200 <= 0.99  # a 95 % interval covers the true exponent ~95 % of the time
    assert np.isinf(theory.power_law_fit(np.array([1.0, 2.0]), np.array([1.0, 2.0])).high)


def test_binomial_interval_has_the_clopper_pearson_closed_forms():
    low, high = theory.binomial_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 20))
    low, high = theory.binomial_interval(20, 20)
    assert low == pytest.approx(0.025 ** (1 / 20)) and high == 1.0
    low, high = theory.binomial_interval(10, 20)
    assert low < 0.5 < high and low == pytest.approx(1 - high)
    with pytest.raises(ValueError):
        theory.binomial_interval(3, 2)


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
