"""Every gradient mode × every solver: exact modes against the closed form, approximate modes converging in k."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
from conftest import SOLVERS, TOL
from helpers import linear_map, random_matrix, rel_err, tanh_map
from jax.test_util import check_grads

import jdeq

RTOL = 1e-6

EXACT_MODES = {
    "implicit_jvp": jdeq.ImplicitJVP(),
    "unrolled": jdeq.Unrolled(),
    "shine_refined": jdeq.Shine(refine=jdeq.FixedPoint(tol=TOL, max_steps=500)),
}


def supported(mode, solver) -> bool:
    """Shine needs a forward inverse-Jacobian estimate; Unrolled needs a reverse-differentiable step."""
    if isinstance(mode, jdeq.Shine):
        return solver.has_inverse_jacobian
    if isinstance(mode, jdeq.Unrolled):
        return solver.unrollable
    return True


def linear_problem(n=7):
    a, b, c = random_matrix(0, n, 0.6), jnp.linspace(-1.0, 1.0, n), jnp.cos(jnp.arange(float(n)))
    inv = jnp.linalg.inv(jnp.eye(n) - a)
    return a, b, c, inv


@pytest.fixture(params=list(EXACT_MODES), ids=list(EXACT_MODES))
def exact_mode(request):
    return EXACT_MODES[request.param]


def test_exact_modes_match_closed_form(solver, exact_mode):
    a, b, c, inv = linear_problem()

    def loss(a, b):
        return jnp.vdot(c, jdeq.fixed_point(linear_map, jnp.zeros(7), a, b, solver=solver, grad=exact_mode).value)

    if not supported(exact_mode, solver):
        with pytest.raises(ValueError, match="Shine|Unrolled"):
            jax.grad(loss)(a, b)
        return
    grad_a, grad_b = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
    u = inv.T @ c
    assert rel_err(grad_b, u) < RTOL
    assert rel_err(grad_a, jnp.outer(u, inv @ b)) < RTOL


def tanh_squares_gradient(solver_name, mode):
    w, x = random_matrix(1, 8, 0.8), jnp.sin(jnp.arange(8.0) + 1.0)
    solver = SOLVERS[solver_name]

    def loss(x, w):
        return jnp.sum(jdeq.fixed_point(tanh_map, jnp.zeros(8), x, w, solver=solver, grad=mode).value ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


@functools.cache
def implicit_gmres_tanh_squares_gradient(solver_name):
    """The reference of the exact modes, computed once per solver and worker."""
    return tanh_squares_gradient(solver_name, jdeq.Implicit(jdeq.GMRES(tol=TOL, max_steps=20)))


@pytest.mark.parametrize("solver_name", ["anderson", "broyden"])
def test_exact_modes_match_implicit_on_tanh(solver_name, exact_mode):
    got = tanh_squares_gradient(solver_name, exact_mode)
    for g, r in zip(got, implicit_gmres_tanh_squares_gradient(solver_name), strict=True):
        assert rel_err(g, r) < RTOL


@pytest.mark.parametrize("mode", [jdeq.ImplicitJVP(), jdeq.Unrolled()], ids=["implicit_jvp", "unrolled"])
def test_forward_mode_matches_closed_form(solver, mode):
    a, b, c, inv = linear_problem()
    if not supported(mode, solver):
        pytest.skip("Unrolled rejects Broyden(line_search=True); tested in test_exact_modes_match_closed_form")

    def solve(a, b):
        return jdeq.fixed_point(linear_map, jnp.zeros(7), a, b, solver=solver, grad=mode).value

    da = random_matrix(11, 7, 1.0)
    _, tangent = jax.jvp(solve, (a, b), (da, c))
    z = inv @ b
    assert rel_err(tangent, inv @ (da @ z + c)) < RTOL  # ż = (I − A)^{-1} (Ȧ z + ḃ)


def test_implicit_jvp_passes_fwd_and_rev_finite_differences():
    w, x = random_matrix(2, 5, 0.7), jnp.cos(jnp.arange(5.0))

    @jax.jit
    def solve(x, w):
        mode = jdeq.ImplicitJVP(jdeq.GMRES(tol=1e-12, max_steps=20))
        return jdeq.fixed_point(tanh_map, jnp.zeros(5), x, w, solver=SOLVERS["anderson"], grad=mode).value

    check_grads(solve, (x, w), order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)
    jac_fwd = jax.jacfwd(solve)(x, w)
    jac_rev = jax.jit(
        jax.jacrev(lambda x: jdeq.fixed_point(tanh_map, jnp.zeros(5), x, w, solver=SOLVERS["anderson"]).value)
    )(x)
    assert rel_err(jac_fwd, jac_rev) < 1e-9


def tanh_gradient(mode, solver=SOLVERS["anderson"], seed=3, n=10, norm=0.8):
    w, x = random_matrix(seed, n, norm), jnp.sin(jnp.arange(float(n)))

    def loss(x, w):
        z = jdeq.fixed_point(tanh_map, jnp.zeros(n), x, w, solver=solver, grad=mode).value
        return jnp.sum(jnp.cos(z))

    return jnp.concatenate([g.ravel() for g in jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)])


@pytest.mark.parametrize(
    "make",
    [lambda k: jdeq.Phantom(k, tau=1.0), lambda k: jdeq.Phantom(k, tau=0.6), lambda k: jdeq.Implicit(jdeq.Neumann(k))],
    ids=["phantom_tau1", "phantom_tau0.6", "neumann"],
)
def test_approximate_modes_converge_as_k_grows(make):
    exact = tanh_gradient(jdeq.Implicit())
    errors = [rel_err(tanh_gradient(make(k)), exact) for k in (1, 2, 4, 8, 16)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-2 * errors[0], errors


def test_phantom_value_is_the_solution_and_tau1_equals_neumann():
    w, x = random_matrix(4, 6, 0.8), jnp.ones(6)
    solver = SOLVERS["broyden"]
    plain = jdeq.fixed_point(tanh_map, jnp.zeros(6), x, w, solver=solver).value
    phantom = jdeq.fixed_point(tanh_map, jnp.zeros(6), x, w, solver=solver, grad=jdeq.Phantom(3)).value
    assert bool(jnp.all(plain == phantom))
    for k in (1, 4):  # k damped steps at τ = 1 from z*: the Neumann series of k terms
        got, want = tanh_gradient(jdeq.Phantom(k), solver), tanh_gradient(jdeq.Implicit(jdeq.Neumann(k)), solver)
        assert rel_err(got, want) < 1e-8


def test_unrolled_value_and_stats_equal_the_while_loop_solve(solver):
    if not supported(jdeq.Unrolled(), solver):
        pytest.skip("Unrolled rejects Broyden(line_search=True); tested in test_exact_modes_match_closed_form")
    w, x = random_matrix(5, 6, 0.9), jnp.ones(6)
    solver = dataclasses.replace(solver, tol=1e-8)
    loop = jdeq.fixed_point(tanh_map, jnp.zeros(6), x, w, solver=solver)
    scan = jdeq.fixed_point(tanh_map, jnp.zeros(6), x, w, solver=solver, grad=jdeq.Unrolled())
    assert int(scan.stats.num_steps) == int(loop.stats.num_steps) < solver.max_steps
    assert rel_err(scan.value, loop.value) < 1e-12


def backward_stats(mode, solver, w, x):
    def loss(w, probe):
        sol = jdeq.fixed_point(tanh_map, jnp.zeros(x.shape[0]), x, w, solver=solver, grad=mode, backward_stats=probe)
        return jnp.sum(jnp.cos(sol.value))

    grad_w, probe_grad = jax.grad(loss, argnums=(0, 1))(w, jdeq.stats_probe())
    return grad_w, jdeq.read_backward_stats(probe_grad)


@pytest.mark.parametrize("forward", ["anderson", "broyden"])
def test_shine_warm_start_needs_fewer_adjoint_steps(forward):
    w, x = random_matrix(6, 12, 0.9), jnp.sin(jnp.arange(12.0))
    adjoint = jdeq.FixedPoint(tol=1e-10, max_steps=1000, linear_m=0)  # plain iteration: steps ∝ log(initial error)
    cold_grad, cold = backward_stats(jdeq.Implicit(adjoint), SOLVERS[forward], w, x)
    warm_grad, warm = backward_stats(jdeq.Shine(refine=adjoint), SOLVERS[forward], w, x)
    assert bool(cold.converged) and bool(warm.converged)
    assert int(warm.num_steps) < int(cold.num_steps)
    assert rel_err(warm_grad, cold_grad) < RTOL


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_fixed_point_adjoint_is_anderson_accelerated(damping):
    """FixedPoint's linear solve (its default adjoint) is Anderson-accelerated: the same gradient in fewer VJPs."""
    w, x = random_matrix(6, 12, 0.9), jnp.sin(jnp.arange(12.0))
    forward = jdeq.FixedPoint(tol=1e-10, max_steps=1000, damping=damping)
    exact, _ = backward_stats(jdeq.Implicit(jdeq.LU()), forward, w, x)
    plain_grad, plain = backward_stats(jdeq.Implicit(dataclasses.replace(forward, linear_m=0)), forward, w, x)
    fast_grad, fast = backward_stats(jdeq.Implicit(), forward, w, x)
    assert bool(plain.converged) and bool(fast.converged)
    assert rel_err(plain_grad, exact) < RTOL and rel_err(fast_grad, exact) < RTOL
    assert int(fast.num_steps) < 0.7 * int(plain.num_steps), (int(fast.num_steps), int(plain.num_steps))


def test_shine_warm_starts_krylov_and_neumann_refinements():
    w, x = random_matrix(6, 12, 0.9), jnp.sin(jnp.arange(12.0))
    exact, _ = backward_stats(jdeq.Implicit(jdeq.GMRES(tol=1e-12)), SOLVERS["anderson"], w, x)
    gmres, _ = backward_stats(jdeq.Shine(refine=jdeq.GMRES(tol=1e-12)), SOLVERS["anderson"], w, x)
    assert rel_err(gmres, exact) < RTOL
    cold, _ = backward_stats(jdeq.Implicit(jdeq.Neumann(8)), SOLVERS["anderson"], w, x)
    warm, _ = backward_stats(jdeq.Shine(refine=jdeq.Neumann(8)), SOLVERS["anderson"], w, x)
    assert rel_err(warm, exact) < 0.5 * rel_err(cold, exact)


def test_shine_with_spanning_anderson_memory_is_exact_on_a_linear_map():
    # Anderson's multisecant inverse Jacobian is exact once its differences span the space (m > n).
    a, b, c, inv = linear_problem(n=3)
    solver = jdeq.Anderson(m=5, tol=1e-9, max_steps=100, ridge=1e-12)
    grad_b = jax.jit(
        jax.grad(
            lambda b: jnp.vdot(
                c, jdeq.fixed_point(linear_map, jnp.zeros(3), a, b, solver=solver, grad=jdeq.Shine()).value
            )
        )
    )(b)
    assert rel_err(grad_b, inv.T @ c) < 1e-6


def test_approximate_adjoints_report_their_residual():
    w, x = random_matrix(7, 8, 0.8), jnp.ones(8)
    _, shine = backward_stats(jdeq.Shine(), SOLVERS["broyden"], w, x)
    _, neumann = backward_stats(jdeq.Implicit(jdeq.Neumann(6)), SOLVERS["broyden"], w, x)
    _, neumann_long = backward_stats(jdeq.Implicit(jdeq.Neumann(60)), SOLVERS["broyden"], w, x)
    for stats in (shine, neumann):
        assert int(stats.result) == jdeq.Result.MAX_STEPS and not bool(stats.converged)
    assert int(shine.num_steps) == 0 and int(neumann.num_steps) == 5
    assert 0 < float(neumann_long.residual) < float(neumann.residual)


@pytest.mark.parametrize(
    "mode, rtol",
    # Shine() inverts Anderson's small, ill-conditioned secant system: batched and single LAPACK calls round
    # differently and the estimate amplifies it (measured ~5e-8).
    [(jdeq.ImplicitJVP(), 1e-9), (jdeq.Phantom(4), 1e-9), (jdeq.Unrolled(), 1e-9), (jdeq.Shine(), 1e-6)],
    ids=["implicit_jvp", "phantom", "unrolled", "shine"],
)
def test_modes_compose_with_jit_and_vmap(mode, rtol):
    w = random_matrix(8, 6, 0.8)
    xs = jnp.stack([jnp.ones(6), jnp.linspace(-1, 1, 6)])

    def loss(w, x):
        return jnp.sum(jdeq.fixed_point(tanh_map, jnp.zeros(6), x, w, solver=SOLVERS["anderson"], grad=mode).value)

    batched = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, xs)
    single = jax.jit(jax.grad(loss))
    for i in range(2):
        assert rel_err(batched[i], single(w, xs[i])) < rtol


def test_bad_gradient_modes_raise():
    with pytest.raises(ValueError, match="k must be"):
        jdeq.Phantom(k=0)
    with pytest.raises(ValueError, match="tau"):
        jdeq.Phantom(k=2, tau=0.0)
    with pytest.raises(ValueError, match="Neumann k"):
        jdeq.Neumann(0)
    with pytest.raises(ValueError, match="Shine"):
        jdeq.Shine(refine="gmres")
    with pytest.raises(ValueError, match="grad must be"):
        jdeq.fixed_point(tanh_map, jnp.zeros(2), jnp.ones(2), jnp.eye(2), grad="implicit")


def training_step_temp_bytes(mode, max_steps, n=128):
    """Compiled scratch memory of one gradient evaluation on a tanh DEQ of width n."""
    solver = jdeq.FixedPoint(tol=1e-12, max_steps=max_steps)
    w, x = random_matrix(9, n, 0.5), jnp.ones(n)

    def loss(w):
        return jnp.sum(jdeq.fixed_point(tanh_map, jnp.zeros(n), x, w, solver=solver, grad=mode).value ** 2)

    return jax.jit(jax.grad(loss)).lower(w).compile().memory_analysis().temp_size_in_bytes


def test_implicit_memory_does_not_grow_with_forward_steps_but_unrolled_does():
    implicit = [training_step_temp_bytes(jdeq.Implicit(), s) for s in (10, 100)]
    unrolled = [training_step_temp_bytes(jdeq.Unrolled(), s) for s in (10, 100)]
    assert implicit[1] <= implicit[0], implicit
    saved_iterates = 90 * 128 * 8  # at least one float64 iterate per extra step
    assert unrolled[1] >= unrolled[0] + saved_iterates, unrolled


def test_test_time_budget_retraces_once_per_solver():
    """A solver is a hashable frozen dataclass: pass it as a static argument to evaluate with another budget."""
    traces = []
    w, x = random_matrix(10, 6, 0.9), jnp.ones(6)

    def predict(w, x, solver):
        traces.append(solver)
        return jdeq.fixed_point(tanh_map, jnp.zeros(6), x, w, solver=solver).value

    predict = jax.jit(predict, static_argnames="solver")
    train, evaluate = jdeq.Anderson(tol=1e-3, max_steps=5), jdeq.Anderson(tol=1e-10, max_steps=100)
    coarse = predict(w, x, train)
    predict(w, 2 * x, train)
    fine = predict(w, x, evaluate)
    predict(w, x, jdeq.Anderson(tol=1e-10, max_steps=100))  # equal solver: cache hit
    predict(w, x, train)
    assert traces == [train, evaluate]
    assert float(jnp.linalg.norm(tanh_map(fine, x, w) - fine)) < float(jnp.linalg.norm(tanh_map(coarse, x, w) - coarse))
