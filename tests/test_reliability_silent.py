"""No silent wrong answers: the driver verifies convergence itself, exploding iterates, infinite tolerances."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq
from jdeq.solvers import FixedPoint


@dataclasses.dataclass(frozen=True)
class StaleImage(FixedPoint):
    """A faulty solver: steps to ``f(x)`` but reports the image of the old iterate, ``f(x_old)``, as ``f(x_new)``."""

    def step(self, fn, x, fx, state):
        return fx, fx, state, jnp.ones((), jnp.int32)


def test_a_stale_image_solver_is_not_reported_converged():
    def f(z, a):
        return jnp.cos(z) + a

    sol = jdeq.fixed_point(f, jnp.zeros(2), jnp.array([0.3, 0.7]), solver=StaleImage(tol=1e-6, max_steps=5))
    true_residual = float(jnp.linalg.norm(f(sol.value, jnp.array([0.3, 0.7])) - sol.value))
    assert true_residual > 1e-3
    assert not bool(sol.stats.converged) and int(sol.stats.result) != jdeq.Result.CONVERGED
    np.testing.assert_allclose(float(sol.stats.abs_residual), true_residual, rtol=1e-5)


def test_a_stale_image_solver_in_a_batch_is_not_reported_converged():
    def f(z, a):
        return jnp.cos(z) + a

    a = jnp.array([[0.3, 0.7], [0.1, 0.2]])
    sol = jdeq.fixed_point_batch(f, jnp.zeros((2, 2)), a, in_axes=0, solver=StaleImage(tol=1e-6, max_steps=5))
    assert not bool(jnp.any(sol.stats.converged))


def test_a_relative_test_met_by_an_exploding_iterate_is_not_convergence():
    """``f(z) = z + 1 + ½ sin z`` has no fixed point; ``‖f(z) − z‖ / ‖f(z)‖`` shrinks as ``|z|`` runs away."""
    solver = jdeq.Broyden(tol=1e-15, atol=1e-12, max_steps=100, divergence=jnp.inf)
    sol = jdeq.fixed_point(lambda z: z + 1 + 0.5 * jnp.sin(z), jnp.array([0.3]), solver=solver)
    assert not bool(sol.stats.converged), (sol.value, sol.stats)


def test_a_good_solve_still_converges_and_reports_the_verified_residual():
    def f(z, a):
        return jnp.cos(z) + a

    a = jnp.array([0.3, 0.7])
    for solver in (jdeq.FixedPoint(tol=1e-8, max_steps=200), jdeq.Anderson(tol=1e-8), jdeq.Broyden(tol=1e-8)):
        sol = jdeq.fixed_point(f, jnp.zeros(2), a, solver=solver)
        assert bool(sol.stats.converged)
        np.testing.assert_allclose(
            float(sol.stats.abs_residual), float(jnp.linalg.norm(f(sol.value, a) - sol.value)), rtol=1e-4, atol=1e-14
        )


@pytest.mark.parametrize("field", ["tol", "atol", "divergence_nan"])
@pytest.mark.parametrize("cls", [jdeq.FixedPoint, jdeq.Anderson, jdeq.Broyden, jdeq.Newton])
def test_nonfinite_tolerances_are_rejected(cls, field):
    kwargs = {"tol": {"tol": jnp.inf}, "atol": {"atol": float("inf")}, "divergence_nan": {"divergence": float("nan")}}
    with pytest.raises(ValueError, match=field.split("_")[0]):
        cls(**kwargs[field])


def test_max_steps_beyond_int32_is_rejected():
    with pytest.raises(ValueError, match="max_steps"):
        jdeq.FixedPoint(max_steps=2**31)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_anderson_ridge_must_be_finite(value):
    with pytest.raises(ValueError, match="ridge"):
        jdeq.Anderson(ridge=value)


@pytest.mark.parametrize("solver", [jdeq.Newton(), jdeq.Chord()], ids=["newton", "chord"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_newton_type_solvers_with_a_half_precision_state_point_to_precision(solver, dtype):
    with pytest.raises(ValueError, match=f"{type(solver).__name__}.*Precision"):
        jdeq.fixed_point(lambda z: jnp.tanh(0.5 * z + 1), jnp.zeros(3, dtype), solver=solver)
    sol = jdeq.fixed_point(
        lambda z: jnp.tanh(0.5 * z + 1), jnp.zeros(3, dtype), solver=solver, precision=jdeq.Precision(dtype)
    )
    assert bool(sol.stats.converged)  # f in the half dtype, the solver in float32


# --- Unrolled through Anderson on jaxopt's test problem (test_simple_grads): x = cos(x) + θ ------------------------


@pytest.mark.parametrize("cholesky", [False, True], ids=["lapack", "cholesky"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_unrolled_anderson_gradient_is_finite_and_near_the_implicit_one(dtype, cholesky):
    """The second component starts at its fixed point (x = π/2), so the residual history is degenerate there.

    Before: NaN in float32 on the Cholesky path (batch solves, accelerators): a non-positive pivot. The unrolled
    gradient is the derivative of the 7-step computation, not of z*: here the primal converges before its tangent
    does (∂f/∂z = −1 on the second component), 5.1 % off in float64 (measured: 0.5257 against 0.5).
    """

    def f(x, theta):
        return jnp.cos(x) + theta

    x0 = theta = jnp.array([0.0, jnp.pi / 2], dtype)
    solver = jdeq.Anderson(m=5, ridge=1e-5, atol=1e-6, max_steps=100, cholesky=cholesky)

    def jacobian(grad):
        return jax.jacrev(lambda t: jdeq.fixed_point(f, x0, t, solver=solver, grad=grad).value)(theta)

    implicit, unrolled = jacobian(jdeq.Implicit()), jacobian(jdeq.Unrolled())
    np.testing.assert_allclose(implicit, jnp.diag(jnp.array([0.5975, 0.5], dtype)), atol=1e-4)
    assert bool(jnp.all(jnp.isfinite(unrolled)))
    if dtype == jnp.float64:
        np.testing.assert_allclose(unrolled, implicit, rtol=0.06, atol=1e-6)
