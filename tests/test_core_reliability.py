"""What the core guarantees when things go wrong: nonfinite solves, failed backward solves, long memories, init."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_matrix, tanh_map

import jdeq
from jdeq.models import MLPCell
from jdeq.nn import DEQ, forward_stats


def nan_input_solve(solver):
    return jdeq.fixed_point(
        lambda z, x: jnp.tanh(0.5 * z + x), jnp.zeros(3), jnp.array([jnp.nan, 0.0, 0.0]), solver=solver
    )


@pytest.mark.parametrize(
    "solver", [jdeq.FixedPoint(), jdeq.Anderson(), jdeq.Broyden()], ids=["fp", "anderson", "broyden"]
)
def test_nan_in_cannot_pass_for_a_solution(solver):
    sol = nan_input_solve(solver)
    assert int(sol.stats.result) == jdeq.Result.NONFINITE and not bool(sol.stats.converged)
    assert bool(jnp.all(jnp.isnan(sol.value)))
    assert bool(jnp.isnan(sol.stats.residual)) and bool(jnp.isnan(sol.stats.abs_residual))


def test_nan_midway_with_return_best_returns_the_best_finite_iterate():
    def f(z, w):  # finite for three steps, then NaN
        return jnp.where(jnp.sum(jnp.abs(z)) > 2.5, jnp.nan, 0.9 * z + w)

    sol = jdeq.fixed_point(f, jnp.zeros(2), jnp.ones(2), solver=jdeq.FixedPoint(return_best=True, max_steps=20))
    assert int(sol.stats.result) == jdeq.Result.NONFINITE
    assert bool(jnp.all(jnp.isfinite(sol.value))) and bool(jnp.isfinite(sol.stats.residual))
    np.testing.assert_allclose(
        sol.stats.abs_residual, jnp.linalg.norm(f(sol.value, jnp.ones(2)) - sol.value), rtol=1e-6
    )


def expanding_problem():
    """A linear map with spectral radius 2: Broyden solves the forward system, plain iteration cannot do the adjoint."""
    a = 2.0 * jnp.eye(4) + 0.1 * random_matrix(0, 4, 1.0)
    return a, jnp.ones(4)


def loss_with_probe(b, probe, a, throw):
    sol = jdeq.fixed_point(
        lambda z, a, b: a @ z + b,
        jnp.zeros(4),
        a,
        b,
        solver=jdeq.Broyden(tol=1e-10, max_steps=100),
        grad=jdeq.Implicit(jdeq.FixedPoint(max_steps=100, linear_m=0)),  # plain iteration diverges here
        throw=throw,
        backward_stats=probe,
    )
    return jnp.sum(sol.value)


def test_divergent_backward_solve_is_counted_without_throw():
    a, b = expanding_problem()
    _, probe_grad = jax.grad(loss_with_probe, argnums=(0, 1))(b, jdeq.stats_probe(), a, False)
    stats = jdeq.read_backward_stats(probe_grad)
    assert int(stats.result) in (jdeq.Result.DIVERGED, jdeq.Result.NONFINITE) and not bool(stats.converged)


def test_throw_raises_on_a_divergent_backward_solve():
    a, b = expanding_problem()
    with pytest.raises(Exception, match="backward"):
        jax.block_until_ready(jax.jit(jax.grad(loss_with_probe), static_argnums=3)(b, jdeq.stats_probe(), a, True))


def test_throw_passes_a_converged_backward_solve():
    a, b = 0.25 * expanding_problem()[0], jnp.ones(4)
    grad = jax.jit(jax.grad(loss_with_probe), static_argnums=3)(b, jdeq.stats_probe(), a, True)
    np.testing.assert_allclose(grad, jnp.linalg.solve(jnp.eye(4) - a.T, jnp.ones(4)), rtol=1e-4)  # adjoint tol 1e-5


def test_a_long_anderson_memory_does_not_slow_convergence():
    """Anderson(m=60) on an 8-element state: at most twice the steps of m=5 (the ridge follows the newest residual)."""
    w, x = random_matrix(6, 8, 0.95), jnp.linspace(-1.0, 1.0, 8)

    def steps(m):
        return int(
            jdeq.fixed_point(
                tanh_map, jnp.zeros(8), x, w, solver=jdeq.Anderson(m=m, tol=1e-8, max_steps=200)
            ).stats.num_steps
        )

    assert steps(60) <= 2 * steps(5)


def test_init_returns_no_statistics():
    layer = DEQ(cell=MLPCell(6))
    x = jnp.ones((2, 3))
    variables = layer.init(jax.random.PRNGKey(0), x)
    assert set(variables) == {"params", "deq_probe"}  # parameters and the zero backward-stats probe
    _, sown = layer.apply(variables, x, mutable=["intermediates"])
    assert len(forward_stats(sown)) == 1


def test_root_with_a_mismatched_output_names_g():
    with pytest.raises(ValueError, match=r"g\(z, \*args\) must return the same pytree"):
        jdeq.root(lambda z: (z, z), jnp.zeros(3))


def test_grad_of_grad_under_implicit_points_to_implicit_jvp():
    def inner(w):
        return jnp.sum(jdeq.fixed_point(lambda z, w: jnp.tanh(w * z + 1.0), jnp.zeros(3), w).value)

    with pytest.raises(ValueError, match="ImplicitJVP"):
        jax.grad(jax.grad(inner))(0.5)


def test_a_large_finite_float32_iterate_is_not_reported_nonfinite():
    """‖x‖ of x = 1e19 in float32 is finite: the norm scales before squaring."""
    big = jnp.full(4, 1e19, jnp.float32)
    sol = jdeq.fixed_point(lambda z, b: 0.5 * z + b, big, big, solver=jdeq.FixedPoint(max_steps=3))
    assert int(sol.stats.result) == jdeq.Result.MAX_STEPS and bool(jnp.isfinite(sol.stats.abs_residual))


@pytest.mark.parametrize(
    "scale, dtype",
    [(1.0, jnp.float32), (1e19, jnp.float32), (1e-21, jnp.float32), (1e-160, jnp.float64), (1.0, jnp.bfloat16)],
)
def test_residual_norms_are_accurate_from_overflow_to_underflow(scale, dtype):
    """The driver's one-pass residual norms (``√Σv²``) fall back to the scaled two-pass norm where a sum overflows
    (1e19² in float32) or underflows (1e-21² in float32): every row's norm within a few ε of float64 numpy's,
    a zero row 0, NaN and inf rows NaN and inf, batched like one row at a time."""
    from jdeq.solvers._base import residuals

    rng = np.random.default_rng(0)
    fx = rng.standard_normal((5, 7)) * scale
    x = fx + rng.standard_normal((5, 7)) * scale * 1e-2
    x[1] = fx[1]  # a zero residual
    fx_d, x_d = jnp.asarray(fx, dtype), jnp.asarray(x, dtype)
    abs_res, rel_res, fx_norm = residuals(x_d, fx_d)
    want_f = np.linalg.norm(np.asarray(fx_d, np.float64) / scale, axis=-1)
    want_r = np.linalg.norm((np.asarray(fx_d, np.float64) - np.asarray(x_d, np.float64)) / scale, axis=-1)
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(fx_norm, np.float64) / scale, want_f, rtol=8 * eps)
    np.testing.assert_allclose(np.asarray(abs_res, np.float64) / scale, want_r, rtol=8 * eps, atol=0)
    assert float(abs_res[1]) == 0.0 and float(rel_res[1]) == 0.0
    for row in range(5):
        alone = residuals(x_d[row], fx_d[row])
        np.testing.assert_allclose(np.asarray(alone[0], np.float64), np.asarray(abs_res[row], np.float64), rtol=4 * eps)
    bad = fx_d.at[2, 3].set(jnp.nan).at[4, 0].set(jnp.inf)
    abs_bad, _, norm_bad = residuals(x_d, bad)
    assert np.isnan(float(abs_bad[2])) and np.isnan(float(norm_bad[2])) and np.isinf(float(norm_bad[4]))
    np.testing.assert_allclose(np.asarray(norm_bad[0], np.float64) / scale, want_f[0], rtol=8 * eps)


def _resident_mb() -> float:
    """This process's resident memory in MB (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("entry", [jdeq.fixed_point, jdeq.root], ids=["fixed_point", "root"])
def test_eager_calls_with_the_same_map_trace_once_and_keep_memory_flat(entry):
    """A loop calling fixed_point/root outside jit reuses one compiled solve (f is traced on the first call only).

    Memory bound (our choice): 200 further calls may grow the resident set by at most 30 MB; a recompile per
    call kept one executable per call, about 5.7 MB each (over 1 GB for 200 calls).
    """
    traces = []

    def f(z, x):
        traces.append(1)
        image = jnp.tanh(0.5 * z + x)
        return z - image if entry is jdeq.root else image  # the root of z − F(z) is F's fixed point

    entry(f, jnp.zeros(5), jnp.ones(5))
    first, before = len(traces), _resident_mb()
    for scale in range(1, 201):
        sol = entry(f, jnp.zeros(5), (scale % 7) * jnp.ones(5))
    assert len(traces) == first and bool(sol.stats.converged)
    assert _resident_mb() - before < 30
    with pytest.raises(jdeq.SolveError):  # throw still raises SolveError itself when called eagerly
        jdeq.fixed_point(f, jnp.zeros(5), jnp.ones(5), solver=jdeq.FixedPoint(max_steps=2), throw=True)
