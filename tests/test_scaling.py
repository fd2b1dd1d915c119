"""The width-scaling measurements (jdeq.experiments._scaling) on cases whose answer is known."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdeq import theory
from jdeq.experiments import _scaling
from jdeq.models import ling


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def test_gram_min_eigenvalue_of_a_matrix_with_known_singular_values():
    rng = np.random.default_rng(0)
    left, _ = np.linalg.qr(rng.standard_normal((12, 5)))
    right, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    singular = np.array([3.0, 2.0, 1.5, 0.7, 0.2])
    z = left @ np.diag(singular) @ right.T
    assert float(theory.gram_min_eigenvalue(jnp.asarray(z))) == pytest.approx(0.04, rel=1e-10)


def test_bound_from_half_step_factors_with_constant_rate_is_the_closed_form():
    bound = theory.bound_from_factors(3.0, theory.half_step_factors(np.full(50, 0.1), np.full(50, 0.4)))
    np.testing.assert_allclose(bound, 3.0 * 0.98 ** np.arange(51), rtol=1e-12)


def test_first_order_factors_are_the_slowest_mode_of_linearised_gradient_descent():
    # GD on ½‖Kθ' − y‖² in the kernel's eigenbasis: r ← (I − ηK) r, so ½ r_min² shrinks by (1 − ηλ_min)² per step
    lambdas, eta = np.array([0.2, 1.0, 3.0]), 0.25
    residual = np.array([1.0, 1.0, 1.0])
    for _ in range(200):
        residual = (1 - eta * lambdas) * residual
    slow = 0.5 * residual[0] ** 2
    assert slow == pytest.approx(0.5 * np.prod(theory.first_order_factors(np.full(200, eta), np.full(200, 0.2))))


def test_relu_expectation_closed_forms():
    cov = jnp.array([[2.0, 0.0, 2.0], [0.0, 1.0, 0.0], [2.0, 0.0, 2.0]])
    expected = np.array(
        [
            [1.0, math.sqrt(2) / (2 * math.pi), 1.0],
            [math.sqrt(2) / (2 * math.pi), 0.5, math.sqrt(2) / (2 * math.pi)],
            [1.0, math.sqrt(2) / (2 * math.pi), 1.0],
        ]
    )
    np.testing.assert_allclose(_scaling.relu_expectation(cov), expected, rtol=1e-12)


def test_gram_limit_without_recurrence_on_orthonormal_inputs_has_the_arc_cosine_spectrum():
    x = jnp.eye(6)[:, :4]  # four orthonormal inputs in d = 6
    gram = _scaling.relu_gram_limit(x, sigma_w=0.0)
    scale = 2.0 / 6  # U ~ N(0, 2/d)
    assert float(jnp.linalg.eigvalsh(gram)[0]) == pytest.approx(scale * (0.5 - 0.5 / math.pi), rel=1e-12)


@pytest.mark.slow
def test_gram_limit_matches_wide_random_deq_and_its_untied_counterpart():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 5)))
    x = x / jnp.linalg.norm(x, axis=0)
    limit = _scaling.relu_gram_limit(x, sigma_w=0.3)
    width = 4096
    params = ling.init(jax.random.PRNGKey(0), width, 8, sigma_w=0.3)
    tied = ling.equilibrium(params, x)
    untied = _scaling.untied_features(jax.random.PRNGKey(1), x, width, depth=10, sigma_w=0.3)
    # entries of ZᵀZ/m average m i.i.d.-like terms: relative fluctuations ~ 1/√m ≈ 1.6 %
    for z in (tied, untied):
        assert float(jnp.linalg.norm(z.T @ z / width - limit) / jnp.linalg.norm(limit)) < 0.05


def test_gram_limit_rejects_an_expanding_recurrence():
    with pytest.raises(ValueError, match="2σ_w² < 1"):
        _scaling.relu_gram_limit(jnp.eye(3), sigma_w=0.8)


def test_relative_drift():
    w0 = jnp.array([[3.0, 0.0], [0.0, 4.0]])
    assert _scaling.relative_drift(w0 + jnp.array([[0.0, 1.0], [0.0, 0.0]]), w0) == pytest.approx(0.2)


def test_valid_spreads_leave_out_runs_whose_equilibrium_did_not_converge():
    runs = [{"valid": True, "x": 1.0}, {"valid": False, "x": float("nan")}, {"valid": True, "x": 3.0}]
    spreads = _scaling.valid_spreads(runs, ["x"])
    assert spreads["x"] == {"min": 1.0, "median": 2.0, "max": 3.0, "seeds": 2} and spreads["invalid_runs"] == 1
    assert _scaling.valid_spreads(runs[1:2], ["x"])["x"]["seeds"] == 0
