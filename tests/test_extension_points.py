"""A solver and gradient modes defined outside jdeq (the examples of docs/architecture.md) through every entry point."""

import functools
import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOL
from helpers import leaves_equal, random_matrix, tanh_map

import jdeq
from jdeq.models import MLPCell
from jdeq.nn import DEQ, forward_stats


def architecture_examples() -> dict:
    """Execute the Python blocks of docs/architecture.md as a user's file would; return their names."""
    text = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    namespace: dict = {"__name__": "user_module"}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        exec(compile(block, "docs/architecture.md", "exec"), namespace)
    return namespace


EXAMPLES = architecture_examples()
Relaxation, LastStep, IdentityAdjoint = EXAMPLES["Relaxation"], EXAMPLES["LastStep"], EXAMPLES["IdentityAdjoint"]
N = 6
W, X = random_matrix(3, N, 0.7), jnp.linspace(-1.0, 1.0, N)
CUSTOM = Relaxation(alpha=0.7, tol=TOL, max_steps=2000)


def grad_of(solver, mode, w=W, x=X):
    def loss(w, x):
        return jnp.sum(jnp.sin(jdeq.fixed_point(tanh_map, jnp.zeros(N), x, w, solver=solver, grad=mode).value))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x)


@functools.cache
def unrolled_anderson_gradient():
    """The reference of the exact modes: Anderson differentiated through its unrolled steps, computed once."""
    return grad_of(jdeq.Anderson(tol=TOL, max_steps=300), jdeq.Unrolled())


def test_examples_are_defined_outside_jdeq():
    assert Relaxation.__module__ == "user_module" and issubclass(Relaxation, jdeq.Solver)
    assert issubclass(LastStep, jdeq.GradientMode) and issubclass(IdentityAdjoint, jdeq.AdjointMode)


def test_custom_solver_solves_and_reports_stats():
    sol = jdeq.fixed_point(tanh_map, jnp.zeros(N), X, W, solver=CUSTOM)
    assert bool(sol.stats.converged)
    np.testing.assert_allclose(sol.value, tanh_map(sol.value, X, W), atol=1e-9)
    assert sol.state == ()  # the final solver state always comes with the solution


@pytest.mark.parametrize(
    "mode",
    [
        jdeq.Implicit(),
        jdeq.ImplicitJVP(),
        jdeq.Unrolled(),
        jdeq.Shine(refine=jdeq.FixedPoint(tol=TOL, max_steps=500)),
        jdeq.Implicit(jdeq.GMRES(tol=TOL, max_steps=N)),
    ],
    ids=["implicit", "implicit_jvp", "unrolled", "shine_refined", "gmres"],
)
def test_custom_solver_gives_the_exact_gradient_in_every_exact_mode(mode):
    assert leaves_equal(grad_of(CUSTOM, mode), unrolled_anderson_gradient(), rtol=1e-7, atol=1e-12)


def test_custom_solver_inverse_jacobian_reaches_shine():
    """Unrefined Shine uses u = −Hᵀ ḡ = α ḡ from the custom solver's estimate, nothing else."""
    sol = jdeq.fixed_point(tanh_map, jnp.zeros(N), X, W, solver=CUSTOM)
    z = sol.value
    _, vjp_theta = jax.vjp(lambda w: tanh_map(z, X, w), W)
    expected = vjp_theta(CUSTOM.alpha * jnp.cos(z))[0]
    np.testing.assert_allclose(grad_of(CUSTOM, jdeq.Shine())[0], expected, rtol=1e-9)


def test_custom_solver_as_a_fallback_stage_and_through_shine():
    chain = jdeq.Fallback(stages=(CUSTOM, jdeq.Anderson()), tol=TOL, max_steps=2000)
    assert chain.has_inverse_jacobian and chain.unrollable
    sol = jdeq.fixed_point(tanh_map, jnp.zeros(N), X, W, solver=chain)
    assert bool(sol.stats.converged) and int(sol.state.stage) == 0
    assert leaves_equal(
        grad_of(chain, jdeq.Shine(refine=jdeq.FixedPoint(tol=TOL, max_steps=500))),
        unrolled_anderson_gradient(),
        rtol=1e-7,
        atol=1e-12,
    )


def test_solver_without_estimate_is_rejected_by_shine_by_capability():
    class NoMemory(Relaxation):
        @property
        def has_inverse_jacobian(self):
            return False

    with pytest.raises(ValueError, match="keeps none"):
        grad_of(NoMemory(tol=TOL), jdeq.Shine())


@pytest.mark.parametrize("mode", [LastStep(), IdentityAdjoint()], ids=["last_step", "identity_adjoint"])
@pytest.mark.parametrize("solver", [CUSTOM, jdeq.Broyden(tol=TOL, max_steps=300)], ids=["custom", "broyden"])
def test_custom_modes_give_the_jacobian_free_gradient(mode, solver):
    assert leaves_equal(grad_of(solver, mode), grad_of(solver, jdeq.Phantom(k=1)), rtol=1e-9, atol=1e-12)


def test_custom_mode_and_solver_through_fixed_point_batch():
    xs = jnp.stack([X, -X, 0.5 * X])

    def loss(w, mode):
        sol = jdeq.fixed_point_batch(tanh_map, jnp.zeros((3, N)), xs, w, in_axes=(0, None), solver=CUSTOM, grad=mode)
        return jnp.sum(jnp.sin(sol.value))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    batched = grad(W, IdentityAdjoint())
    summed = sum(grad_of(CUSTOM, IdentityAdjoint(), x=x)[0] for x in xs)
    np.testing.assert_allclose(batched, summed, rtol=1e-9)
    np.testing.assert_allclose(grad(W, LastStep()), batched, rtol=1e-9)


@pytest.mark.parametrize(
    "mode", [LastStep(), IdentityAdjoint(), jdeq.Implicit()], ids=["last_step", "identity_adjoint", "implicit"]
)
def test_custom_solver_and_modes_in_a_linen_layer(mode):
    layer = DEQ(cell=MLPCell(8), solver=Relaxation(alpha=0.8, tol=1e-8, max_steps=500), grad=mode)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    variables = layer.init(jax.random.PRNGKey(1), x)
    z, sown = layer.apply(variables, x, mutable=["intermediates"])
    assert z.shape == (4, 8) and bool(jnp.all(forward_stats(sown)[0].converged))
    params = variables["params"]
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2)))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_error_messages_list_the_subclasses_defined_so_far():
    with pytest.raises(ValueError, match="LastStep"):
        jdeq.fixed_point(tanh_map, jnp.zeros(N), X, W, grad="implicit")
    with pytest.raises(ValueError, match="Relaxation"):
        jdeq.fixed_point(tanh_map, jnp.zeros(N), X, W, solver="anderson")


# --- backward statistics add up over a batch -------------------------------------------------------------


def batch_loss(w, probe, xs, solver):
    sol = jdeq.fixed_point_batch(
        tanh_map, jnp.zeros(xs.shape), xs, w, in_axes=(0, None), solver=solver, backward_stats=probe
    )
    return jnp.sum(sol.value**2)


batch_probe_grad = jax.jit(jax.grad(batch_loss, argnums=1), static_argnums=3)


def test_unbatched_probe_under_vmap_decodes_to_counts_that_add_up():
    """The issue's contract: 3 converged backward solves decode as converged, steps summed over the batch."""
    xs = jnp.stack([X, -X, 0.5 * X])
    solver = jdeq.Anderson(tol=1e-8, max_steps=100)
    shared = jdeq.read_backward_stats(batch_probe_grad(W, jdeq.stats_probe(), xs, solver))
    rows = jdeq.read_backward_stats(batch_probe_grad(W, jdeq.stats_probe((3,)), xs, solver))
    assert int(shared.result) == jdeq.Result.CONVERGED and bool(shared.converged)
    assert int(shared.num_solves) == 3 and shared.counts.tolist() == [3, 0, 0, 0]
    assert rows.num_solves.tolist() == [1, 1, 1] and bool(jnp.all(rows.converged))
    assert int(shared.num_steps) == int(jnp.sum(rows.num_steps)) and bool(jnp.all(rows.num_steps > 0))
    np.testing.assert_allclose(shared.residual, jnp.mean(rows.residual), rtol=1e-5)


def test_mixed_backward_results_are_counted_per_code():
    """Two samples whose adjoint stops at max_steps and one that converges: counts 1/2/0/0, worst max_steps."""
    xs = jnp.stack([X, 3.0 * X, -3.0 * X])  # saturated tanh: small Jacobian, the adjoint converges fast
    w = random_matrix(5, N, 0.95)
    solver = jdeq.FixedPoint(tol=1e-10, max_steps=12, linear_m=0)  # plain adjoint iteration: slow where unsaturated
    rows = jdeq.read_backward_stats(batch_probe_grad(w, jdeq.stats_probe((3,)), xs, solver))
    shared = jdeq.read_backward_stats(batch_probe_grad(w, jdeq.stats_probe(), xs, solver))
    codes = rows.result.tolist()
    expected = [codes.count(code) for code in jdeq.Result.FINAL]
    assert shared.counts.tolist() == expected and sum(expected) == 3
    assert 0 < expected[jdeq.Result.CONVERGED] < 3  # the case mixes results (else it tests nothing)
    assert int(shared.result) == max(codes) and not bool(shared.converged)


def test_probe_with_no_backward_solve_reads_no_solve():
    stats = jdeq.read_backward_stats(jnp.zeros(jdeq.stats_probe().shape))
    assert int(stats.num_solves) == 0 and int(stats.result) == jdeq.Result.RUNNING and not bool(stats.converged)


def test_summarize_is_the_one_summary():
    stats = jdeq.Stats(
        num_steps=jnp.array([3, 7]),
        num_evals=jnp.array([4, 8]),
        residual=jnp.array([1e-6, jnp.nan]),
        abs_residual=jnp.array([1e-6, jnp.nan]),
        converged=jnp.array([True, False]),
        result=jnp.array([0, 3]),
    )
    summary = jdeq.summarize(stats, prefix="fwd_")
    assert float(summary["fwd_mean_steps"]) == 5.0 and float(summary["fwd_max_residual"]) == np.inf
    assert float(summary["fwd_count_nonfinite"]) == 1 and float(summary["fwd_converged_fraction"]) == 0.5


# --- linear solvers share one base ----------------------------------------------------------------------


def test_gmres_max_steps_counts_iterations_not_restarts():
    a = random_matrix(7, 12, 0.9)
    b = jnp.linspace(1.0, 2.0, 12)

    def matvec(u):
        return a.T @ u

    _, few = jdeq.GMRES(tol=1e-10, max_steps=3, restart=20).solve_linear(matvec, b)
    u, enough = jdeq.GMRES(tol=1e-10, max_steps=12, restart=20).solve_linear(matvec, b)
    assert int(few.result) == jdeq.Result.MAX_STEPS and bool(enough.converged)
    np.testing.assert_allclose(u, jnp.linalg.solve(jnp.eye(12) - a.T, b), rtol=1e-8)


def test_every_linear_solver_is_a_linear_solver():
    for solver in (jdeq.LU(), jdeq.GMRES(), jdeq.BiCGStab(), jdeq.Neumann(3), jdeq.Lineax(solver=None)):
        assert isinstance(solver, jdeq.LinearSolver)


def test_lineax_solvers_work_as_the_adjoint_solver():
    lineax = pytest.importorskip("lineax")
    for inner in (lineax.GMRES(rtol=1e-12, atol=1e-14), lineax.LU()):
        got = grad_of(jdeq.Anderson(tol=TOL, max_steps=300), jdeq.Implicit(jdeq.Lineax(inner)))
        assert leaves_equal(got, unrolled_anderson_gradient(), rtol=1e-7, atol=1e-12)


# --- no recompiles --------------------------------------------------------------------------------------


def test_jitted_custom_solve_traces_once_for_new_values():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def solve(x, w):
        return jdeq.fixed_point(tanh_map, jnp.zeros(N), x, w, solver=CUSTOM, grad=IdentityAdjoint()).value

    for scale in (1.0, 0.5, -0.3):
        jax.block_until_ready(jax.grad(lambda w, x: jnp.sum(solve(x, w)))(W, scale * X))


def test_lu_factorises_once_and_solves_any_right_hand_side_one_problem_or_a_batch():
    a = random_matrix(3, 9, 0.9)
    b = jnp.linspace(-1.0, 2.0, 9)
    lu = jdeq.LU()
    state = lu.init(lambda u: a.T @ u, b)
    exact = jnp.linalg.solve(jnp.eye(9) - a.T, b)
    for scale in (1.0, -3.0):
        u, stats = lu.solve(state, lambda u: a.T @ u, scale * b)
        np.testing.assert_allclose(u, scale * exact, rtol=1e-10)
        assert bool(stats.converged) and float(stats.residual) <= 1e-12
    rows = jnp.stack([b, 2 * b, -b])
    u, stats = lu.solve_linear(lambda u: u @ a, rows)  # row i: u_i = aᵀ u_i + b_i
    np.testing.assert_allclose(u, jnp.stack([exact, 2 * exact, -exact]), rtol=1e-10)
    assert stats.converged.shape == (3,) and bool(jnp.all(stats.converged))


def test_lu_of_a_singular_system_is_not_converged():
    _, stats = jdeq.LU().solve_linear(lambda u: u, jnp.ones(4))  # I − M = 0
    assert not bool(stats.converged)
