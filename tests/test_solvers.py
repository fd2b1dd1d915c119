"""One suite over every solver: exact linear solutions, contractive maps, hard maps, result codes, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SOLVERS, TOL
from helpers import linear_map, random_matrix, tanh_map, true_relative_residual

import jdeq
from jdeq import Result


def test_linear_map_matches_exact_solution(solver):
    a, b = random_matrix(0, 12, 0.7), jnp.linspace(-1.0, 2.0, 12)
    sol = jdeq.fixed_point(linear_map, jnp.zeros(12), a, b, solver=solver)
    exact = jnp.linalg.solve(jnp.eye(12) - a, b)
    assert bool(sol.stats.converged), Result.name(sol.stats.result)
    np.testing.assert_allclose(sol.value, exact, rtol=1e-9, atol=1e-9)


def test_contractive_tanh_converges_and_stats_agree_with_true_residual(solver):
    w, x = random_matrix(1, 16, 0.9), jnp.sin(jnp.arange(16.0))
    sol = jdeq.fixed_point(tanh_map, jnp.zeros(16), x, w, solver=solver)
    true_res = true_relative_residual(tanh_map, sol.value, x, w)
    assert bool(sol.stats.converged)
    assert true_res <= TOL
    np.testing.assert_allclose(float(sol.stats.residual), true_res, rtol=1e-6, atol=1e-15)
    assert 1 <= int(sol.stats.num_steps) <= int(sol.stats.num_evals) - 1


def test_pytree_state_is_solved_leafwise(solver):
    a = random_matrix(2, 5, 0.5)

    def f(z, a):
        return {"u": jnp.tanh(a @ z["v"].ravel()[:5] + 1.0), "v": 0.5 * jnp.cos(z["u"]).reshape(5, 1)}

    z0 = {"u": jnp.zeros(5), "v": jnp.zeros((5, 1))}
    sol = jdeq.fixed_point(f, z0, a, solver=solver)
    assert bool(sol.stats.converged)
    out = f(sol.value, a)
    for k in ("u", "v"):
        np.testing.assert_allclose(out[k], sol.value[k], atol=1e-9)


def expanding_linear_problem(n=8):
    """f(z) = A z + b with eigenvalues of A in [-1.5, 0.6]: plain iteration diverges, 1 − A is invertible."""
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((n, n)))
    a = q @ np.diag(np.linspace(-1.5, 0.6, n)) @ q.T
    return jnp.asarray(a), jnp.ones(n)


def test_noncontractive_map_plain_iteration_fails_anderson_and_broyden_converge():
    a, b = expanding_linear_problem()
    exact = jnp.linalg.solve(jnp.eye(8) - a, b)
    plain = jdeq.fixed_point(linear_map, jnp.zeros(8), a, b, solver=jdeq.FixedPoint(tol=1e-10, max_steps=200))
    assert not bool(plain.stats.converged)
    assert int(plain.stats.result) == Result.DIVERGED
    for solver in (jdeq.Anderson(tol=1e-10, max_steps=100, m=10), jdeq.Broyden(tol=1e-10, max_steps=100, m=30)):
        sol = jdeq.fixed_point(linear_map, jnp.zeros(8), a, b, solver=solver)
        assert bool(sol.stats.converged), type(solver).__name__
        np.testing.assert_allclose(sol.value, exact, atol=1e-8)


def test_nonfinite_input_is_reported_not_converged(solver):
    z0 = jnp.zeros(4).at[2].set(jnp.nan)
    sol = jdeq.fixed_point(lambda z: 0.5 * z + 1.0, z0, solver=solver)
    assert int(sol.stats.result) == Result.NONFINITE
    assert not bool(sol.stats.converged)
    assert int(sol.stats.num_steps) == 0


def test_map_producing_nan_midway_is_reported_nonfinite(solver):
    def f(z):  # the first step lands past z = 0.5, where the square root is NaN
        return jnp.sqrt(0.5 - z) + z + 0.2

    sol = jdeq.fixed_point(f, jnp.zeros(3), solver=solver)
    assert int(sol.stats.result) == Result.NONFINITE
    assert not bool(sol.stats.converged)


def test_budget_exhaustion_is_max_steps_and_residual_is_honest():
    w, x = random_matrix(4, 10, 0.99), jnp.ones(10)
    for solver in (jdeq.FixedPoint(tol=1e-12, max_steps=3), jdeq.Anderson(tol=1e-12, max_steps=3)):
        sol = jdeq.fixed_point(tanh_map, jnp.zeros(10), x, w, solver=solver)
        assert int(sol.stats.result) == Result.MAX_STEPS
        assert int(sol.stats.num_steps) == 3
        assert not bool(sol.stats.converged)
        np.testing.assert_allclose(
            float(sol.stats.residual), true_relative_residual(tanh_map, sol.value, x, w), rtol=1e-6
        )


def test_trace_records_each_step_and_pads_with_nan():
    w, x = random_matrix(5, 10, 0.8), jnp.ones(10)
    sol = jdeq.fixed_point(tanh_map, jnp.zeros(10), x, w, solver=jdeq.FixedPoint(tol=1e-8, max_steps=100, trace=True))
    trace, n = np.asarray(sol.stats.trace), int(sol.stats.num_steps)
    assert trace.shape == (101,)
    assert np.all(np.isfinite(trace[: n + 1])) and np.all(np.isnan(trace[n + 1 :]))
    assert trace[n] == pytest.approx(float(sol.stats.residual))
    assert trace[0] > trace[n]


def test_return_best_returns_lowest_residual_iterate():
    a, b = expanding_linear_problem()
    kwargs = dict(tol=1e-12, max_steps=30)
    last = jdeq.fixed_point(linear_map, jnp.zeros(8), a, b, solver=jdeq.FixedPoint(**kwargs))
    best = jdeq.fixed_point(linear_map, jnp.zeros(8), a, b, solver=jdeq.FixedPoint(**kwargs, return_best=True))
    assert not bool(best.stats.converged)
    z, residuals = jnp.zeros(8), []
    for _ in range(31):  # plain iteration by hand: the lowest absolute residual among z_0..z_30
        residuals.append(float(jnp.linalg.norm(linear_map(z, a, b) - z)))
        z = linear_map(z, a, b)
    best_abs = float(jnp.linalg.norm(linear_map(best.value, a, b) - best.value))
    assert best_abs == pytest.approx(min(residuals), rel=1e-9)
    assert float(best.stats.abs_residual) == pytest.approx(best_abs, rel=1e-9)
    assert float(best.stats.residual) == pytest.approx(true_relative_residual(linear_map, best.value, a, b), rel=1e-9)
    assert best_abs < float(last.stats.abs_residual)


def test_absolute_tolerance_handles_zero_solution():
    sol = jdeq.fixed_point(lambda z: 0.5 * z, jnp.ones(3), solver=jdeq.FixedPoint(tol=1e-6, atol=1e-8, max_steps=100))
    assert bool(sol.stats.converged)
    assert float(sol.stats.abs_residual) <= 1e-8


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: jdeq.FixedPoint(tol=0.0), "tol"),
        (lambda: jdeq.FixedPoint(tol=-1.0), "tol"),
        (lambda: jdeq.FixedPoint(atol=-1.0), "atol"),
        (lambda: jdeq.FixedPoint(max_steps=0), "max_steps"),
        (lambda: jdeq.FixedPoint(max_steps=2.5), "max_steps"),
        (lambda: jdeq.FixedPoint(damping=1.0), "damping"),
        (lambda: jdeq.FixedPoint(linear_m=-1), "linear_m"),
        (lambda: jdeq.FixedPoint(divergence=0.5), "divergence"),
        (lambda: jdeq.Anderson(m=0), "m must"),
        (lambda: jdeq.Anderson(beta=0.0), "beta"),
        (lambda: jdeq.Anderson(ridge=-1.0), "ridge"),
        (lambda: jdeq.Broyden(m=0), "m must"),
        (lambda: jdeq.Broyden(ls_c=1.5), "ls_c"),
        (lambda: jdeq.GMRES(restart=0), "restart"),
        (lambda: jdeq.BiCGStab(tol=0), "tol"),
        (lambda: jdeq.Implicit(solver="broyden"), "Implicit"),
    ],
)
def test_bad_hyperparameters_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_solvers_are_immutable():
    with pytest.raises(AttributeError):
        jdeq.Anderson().m = 3


@pytest.mark.parametrize(
    "f, z0",
    [
        (lambda z: z[:2], jnp.zeros(3)),
        (lambda z: z.astype(jnp.float32), jnp.zeros(3)),
        (lambda z: (z, z), jnp.zeros(3)),
        (lambda z: {"a": z["b"], "c": z["b"]}, {"a": jnp.zeros(2), "b": jnp.zeros(2)}),
    ],
)
def test_structure_mismatch_raises_at_trace_time_naming_both(f, z0):
    with pytest.raises(ValueError, match="z0 is .* but f returned"):
        jax.jit(lambda z: jdeq.fixed_point(f, z).value)(z0)


def test_solver_argument_must_be_a_solver():
    with pytest.raises(ValueError, match="solver must be"):
        jdeq.fixed_point(lambda z: z, jnp.zeros(2), solver=jdeq.GMRES())


def test_throw_raises_under_jit_only_when_not_converged():
    w, x = random_matrix(6, 6, 0.5), jnp.ones(6)

    def solve(max_steps):
        return jax.jit(
            lambda x: (
                jdeq.fixed_point(
                    tanh_map, jnp.zeros(6), x, w, solver=jdeq.FixedPoint(tol=1e-10, max_steps=max_steps), throw=True
                ).value
            )
        )(x)

    jax.block_until_ready(solve(200))
    with pytest.raises(Exception, match="did not converge.*max_steps"):
        jax.block_until_ready(solve(2))


def test_root_solves_linear_system():
    a = jnp.eye(6) + 0.3 * random_matrix(7, 6, 1.0)
    b = jnp.arange(6.0)
    sol = jdeq.root(lambda z, a, b: a @ z - b, jnp.zeros(6), a, b, solver=jdeq.Broyden(tol=1e-12, max_steps=100))
    assert bool(sol.stats.converged)
    np.testing.assert_allclose(sol.value, jnp.linalg.solve(a, b), atol=1e-9)


def test_batch_helper_gives_per_sample_stats():
    w = random_matrix(8, 10, 0.9)
    x = jnp.stack([jnp.zeros(10), 3.0 * jnp.ones(10), jnp.linspace(-2, 2, 10)])
    sol = jdeq.fixed_point_batch(tanh_map, jnp.zeros((3, 10)), x, w, in_axes=(0, None), solver=SOLVERS["fixed_point"])
    assert sol.value.shape == (3, 10) and sol.stats.num_steps.shape == (3,)
    assert int(sol.stats.num_steps[0]) == 0  # z0 = 0 is already the fixed point of tanh(W z) with x = 0
    assert len(set(np.asarray(sol.stats.num_steps).tolist())) == 3
    for i in range(3):
        single = jdeq.fixed_point(tanh_map, jnp.zeros(10), x[i], w, solver=SOLVERS["fixed_point"])
        np.testing.assert_allclose(sol.value[i], single.value, atol=1e-12)
        assert int(sol.stats.num_steps[i]) == int(single.stats.num_steps)


def test_batch_helper_checks_in_axes_length():
    with pytest.raises(ValueError, match="in_axes"):
        jdeq.fixed_point_batch(tanh_map, jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.eye(3), in_axes=(0,))


def test_batch_coupled_map_is_solved_as_one_problem():
    x = jnp.arange(12.0).reshape(4, 3)

    def f(z, x):  # couples samples through the batch mean
        return 0.5 * jnp.tanh(z - z.mean(axis=0, keepdims=True) + x)

    sol = jdeq.fixed_point(f, jnp.zeros((4, 3)), x, solver=SOLVERS["anderson"])
    assert bool(sol.stats.converged) and sol.stats.num_steps.shape == ()
    np.testing.assert_allclose(f(sol.value, x), sol.value, atol=1e-9)


def test_second_call_does_not_recompile():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def solve(x, w):
        return jdeq.fixed_point(tanh_map, jnp.zeros(6), x, w, solver=jdeq.Anderson()).value

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grad(x, w):
        return jax.grad(lambda x, w: solve(x, w).sum())(x, w)

    w = random_matrix(9, 6, 0.5)
    solve(jnp.ones(6), w)
    solve(jnp.zeros(6), 0.5 * w)
    grad(jnp.ones(6), w)
    grad(2 * jnp.ones(6), w)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_float32_solve_keeps_dtypes(name):
    solver = SOLVERS[name].__class__(tol=1e-5, max_steps=300)
    w, x = random_matrix(10, 8, 0.8).astype(jnp.float32), jnp.ones(8, jnp.float32)
    sol = jdeq.fixed_point(tanh_map, jnp.zeros(8, jnp.float32), x, w, solver=solver)
    assert sol.value.dtype == jnp.float32 and bool(sol.stats.converged)
    assert true_relative_residual(tanh_map, sol.value, x, w) < 2e-5
