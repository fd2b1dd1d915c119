"""`jdeq.root` as a root-finder: its stopping rule on ‖g‖, sign-agnostic solvers (Broyden's secant scale,
Newton, Chord), and optimistix's own root-finding test problems with its tolerances."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq
from jdeq.solvers.broyden import secant_scale
from jdeq.solvers.newton import dense_jacobian

SIGN_AGNOSTIC = {
    "broyden": jdeq.Broyden(max_steps=500),
    "newton": jdeq.Newton(),
    "newton_gmres": jdeq.Newton(linear_solver=jdeq.GMRES(tol=1e-10)),
    "newton_line_search": jdeq.Newton(line_search=True),
    "chord": jdeq.Chord(),
}


def shifted_contraction_residual(sign):
    """``sign·(M z + 1 − z)`` with ``ρ(M) ≈ 0.32``: ``∂g/∂z ≈ −sign·I``, the residual of a contraction ``F = M z + 1``."""
    m = jax.random.normal(jax.random.PRNGKey(19), (28, 28)) / 16
    return lambda z: sign * (m @ z + 1.0 - z), jnp.linalg.solve(jnp.eye(28) - m, jnp.ones(28))


@pytest.mark.parametrize("name", list(SIGN_AGNOSTIC))
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["residual", "negated"])
def test_root_converges_for_either_sign_of_the_jacobian(name, sign):
    g, want = shifted_contraction_residual(sign)
    sol = jdeq.root(g, jnp.zeros(28), solver=SIGN_AGNOSTIC[name])
    assert int(sol.stats.result) == jdeq.Result.CONVERGED
    assert float(jnp.linalg.norm(g(sol.value))) <= 1e-5 * float(jnp.linalg.norm(g(jnp.zeros(28))))
    np.testing.assert_allclose(sol.value, want, atol=1e-4)


@pytest.mark.parametrize(
    "solver",
    [jdeq.Broyden(), jdeq.Anderson(), jdeq.FixedPoint(), jdeq.Newton(line_search=True)],
    ids=["broyden", "anderson", "fixed_point", "newton_line_search"],
)
def test_root_without_a_root_is_not_converged_and_throw_raises(solver):
    def g(z):
        return jnp.tanh(z) + 2.0  # >= 1 everywhere

    sol = jdeq.root(g, jnp.zeros(1), solver=solver)
    assert not bool(sol.stats.converged)
    assert int(sol.stats.result) != jdeq.Result.CONVERGED
    with pytest.raises(jdeq.SolveError, match="did not converge"):
        jdeq.root(g, jnp.zeros(1), solver=solver, throw=True)


def test_root_residuals_are_relative_to_the_initial_residual():
    sol = jdeq.root(lambda z: z**3 - 8.0, jnp.full(2, 3.0), solver=jdeq.Newton(tol=1e-12))
    g0 = float(jnp.linalg.norm(jnp.full(2, 27.0 - 8.0)))
    np.testing.assert_allclose(sol.value, 2.0, rtol=1e-12)
    np.testing.assert_allclose(float(sol.stats.residual), float(sol.stats.abs_residual) / g0, rtol=1e-12)
    at_root = jdeq.root(lambda z: z**3 - 8.0, jnp.full(2, 2.0), solver=jdeq.Newton())
    assert int(at_root.stats.num_steps) == 0 and bool(at_root.stats.converged)


def test_relative_to_is_validated():
    with pytest.raises(ValueError, match="relative_to"):
        jdeq.Anderson(relative_to="final")


def test_secant_scale_recovers_a_scalar_inverse_jacobian():
    s = jnp.array([1.0, -2.0, 0.5])
    for c in (-1.0, 0.5, 3.0):  # g linear with ∂g/∂x = c·I: y = c·s, so γ = 1/c
        np.testing.assert_allclose(secant_scale(s, c * s), 1.0 / c, rtol=1e-14)
    assert float(secant_scale(s, jnp.zeros(3))) == -1.0  # undefined: the fixed-point step's −1


def test_broyden_gamma_is_validated_and_fixes_the_scale():
    with pytest.raises(ValueError, match="gamma"):
        jdeq.Broyden(gamma=0.0)
    g, want = shifted_contraction_residual(1.0)  # ∂(f − z)/∂z = −∂g/∂z ≈ +I in the solver's convention
    sol = jdeq.root(g, jnp.zeros(28), solver=jdeq.Broyden(gamma=1.0, max_steps=100))
    assert bool(sol.stats.converged)
    np.testing.assert_allclose(sol.value, want, atol=1e-4)


def test_dense_jacobian_of_one_problem_and_of_a_batch():
    w = jnp.arange(12.0).reshape(3, 4) / 10

    def rows(x):  # maps each row of a (B, 4) batch on its own
        return jnp.tanh(x @ (w.T @ w))

    x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    batch = dense_jacobian(rows, x)
    assert batch.shape == (2, 4, 4)
    for b in range(2):
        np.testing.assert_allclose(batch[b], jax.jacfwd(lambda v: rows(v[None])[0])(x[b]), atol=1e-14)
    np.testing.assert_allclose(dense_jacobian(lambda v: rows(v[None])[0], x[0]), batch[0], atol=1e-14)


def test_chord_with_refresh_one_is_newton():
    f, xs = (lambda z, x: jnp.tanh(0.9 * z + x)), jnp.linspace(-2.0, 2.0, 6)
    newton = jdeq.fixed_point(f, jnp.zeros(6), xs, solver=jdeq.Newton(tol=1e-12, trace=True))
    chord = jdeq.fixed_point(f, jnp.zeros(6), xs, solver=jdeq.Chord(refresh=1, tol=1e-12, trace=True))
    np.testing.assert_allclose(chord.value, newton.value, atol=1e-15)
    np.testing.assert_allclose(chord.stats.trace, newton.stats.trace, rtol=1e-10)
    # the Jacobian of z = 0 kept throughout: linear convergence, more steps than Newton (from close enough)
    mild = lambda z, x: jnp.tanh(0.5 * z + x)  # noqa: E731
    slow = jdeq.fixed_point(mild, jnp.zeros(6), 0.2 * xs, solver=jdeq.Chord(refresh=1000, tol=1e-12, max_steps=200))
    fast = jdeq.fixed_point(mild, jnp.zeros(6), 0.2 * xs, solver=jdeq.Newton(tol=1e-12))
    assert bool(slow.stats.converged) and int(slow.stats.num_steps) > int(fast.stats.num_steps)


def test_newton_converges_quadratically():
    sol = jdeq.root(lambda z: z**3 - 8.0, jnp.array([3.0]), solver=jdeq.Newton(tol=1e-15, trace=True, max_steps=10))
    trace = np.asarray(sol.stats.trace)
    trace = trace[np.isfinite(trace) & (trace > 1e-13)]
    # e_{k+1} <= C e_k²: the log residual at least doubles in magnitude once it is below 1e-2
    logs = np.log10(trace[trace < 1e-2])
    assert len(logs) >= 2 and np.all(logs[1:] <= 1.8 * logs[:-1])


@pytest.mark.parametrize(
    "solver",
    [jdeq.Newton(), jdeq.Chord(refresh=2), jdeq.Newton(linear_solver=jdeq.GMRES())],
    ids=["newton", "chord", "newton_gmres"],
)
def test_newton_type_batch_solve_matches_vmap(solver):
    xs = jax.random.normal(jax.random.PRNGKey(1), (5, 4))

    def f(z, x):
        return jnp.tanh(0.5 * z + x)

    batch = jdeq.fixed_point_batch(f, jnp.zeros((5, 4)), xs, in_axes=(0,), solver=solver)
    single = jax.vmap(lambda x: jdeq.fixed_point(f, jnp.zeros(4), x, solver=solver))(xs)
    np.testing.assert_allclose(batch.value, single.value, atol=1e-12)
    np.testing.assert_array_equal(batch.stats.num_steps, single.stats.num_steps)


def test_newton_rejects_a_non_linear_solver():
    with pytest.raises(ValueError, match="linear_solver"):
        jdeq.Newton(linear_solver=jdeq.Anderson())
    with pytest.raises(ValueError, match="refresh"):
        jdeq.Chord(refresh=0)


# --- optimistix's root-finding problems (tests/helpers.py of patrick-kidger/optimistix), their values kept ---
# The Crank-Nicolson step of the nonlinear heat equation and the implicit midpoint steps (y-, f- and k-space),
# linear (a random 28x28 matrix, dt = 1/16) and nonlinear (Robertson's stiff kinetics, dt = 1e-8). Their
# `_laplacian` returns its input (as written there); kept as is, it is the problem their solvers pass.

ONES_PYTREE = ({"a": 0.5 * jnp.ones((3, 2, 4))}, 0.5 * jnp.ones(4))
ONES_ROBERTSON = (jnp.ones(2), {"b": jnp.array(1.0)})
MATRIX = jax.random.normal(jax.random.PRNGKey(19), (28, 28))
ROBERTSON_ARGS = (jnp.array(0.04), jnp.array(3e7), jnp.array(1e4))


def _map_leaves(fn, *trees):
    return jax.tree_util.tree_map(fn, *trees)


def _heat_step(y, const):
    x = jnp.linspace(-1.0, 1.0, 100)
    y0 = x**2
    f0 = (1 - y0) * y0  # (1 − y)·laplacian(y) with their laplacian(y) = y
    return const * (y0 + 0.5 * 1.0 * ((1 - y) * y + f0))


def _robertson(rates):
    return lambda y: _robertson_rhs(y, *rates)


def _robertson_rhs(y, k1, k2, k3):
    flat, unflatten = jax.flatten_util.ravel_pytree(y)
    f0 = -k1 * flat[0] + k3 * flat[1] * flat[2]
    f1 = k1 * flat[0] - k2 * flat[1] ** 2 - k3 * flat[1] * flat[2]
    f2 = k2 * flat[1] ** 2
    return unflatten(jnp.stack([f0, f1, f2]))


def _linear(matrix):
    def f(y):
        flat, unflatten = jax.flatten_util.ravel_pytree(y)
        return unflatten(matrix @ flat)

    return f


def _midpoint_y(f, dt):  # y0 = 0: y ↦ y0 + dt f((y0 + y)/2)
    return lambda y: _map_leaves(lambda v: dt * v, f(_map_leaves(lambda v: 0.5 * v, y)))


def _midpoint_f(f, dt):  # y ↦ f(y0 + dt y)
    return lambda y: f(_map_leaves(lambda v: dt * v, y))


def _midpoint_k(f, dt):  # y ↦ dt f(y0 + y)
    return lambda y: _map_leaves(lambda v: dt * v, f(y))


def _midpoint_problem(space, kind):
    def fn(y, args):
        rhs = _linear(args) if kind == "linear" else _robertson(args)
        dt = 1 / 2**4 if kind == "linear" else 1e-8
        return space(rhs, dt)(y)

    return fn


OPTIMISTIX_PROBLEMS = {
    "heat": (lambda y, const: _heat_step(y, const), jnp.ones(100), jnp.array(1.0)),
    **{
        f"midpoint_{name}_{kind}": (
            _midpoint_problem(space, kind),
            ONES_PYTREE if kind == "linear" else ONES_ROBERTSON,
            MATRIX if kind == "linear" else ROBERTSON_ARGS,
        )
        for name, space in (("y", _midpoint_y), ("f", _midpoint_f), ("k", _midpoint_k))
        for kind in ("linear", "nonlinear")
    },
}
# optimistix's tolerances: its Newton/Chord at rtol = atol = 1e-6, max_steps 10 000; the root is accepted when
# every entry of g is within 1e-5 of zero; tangents within rtol = atol = 1e-3 of finite differences.
OPTIMISTIX_SOLVERS = {
    "newton": jdeq.Newton(tol=1e-6, atol=1e-6, max_steps=10_000),
    "broyden": jdeq.Broyden(tol=1e-6, atol=1e-6, max_steps=10_000),
}


def _residual(fn):
    return lambda y, args: _map_leaves(jnp.subtract, fn(y, args), y)


def _finite_difference_jvp(fn, primals, tangents):
    """optimistix's finite_difference_jvp: ε = √eps₆₄ · max(1, max |primal|), one-sided."""
    scale = max([1.0] + [float(jnp.max(jnp.abs(p))) for p in jax.tree_util.tree_leaves(primals)])
    eps = np.sqrt(np.finfo(np.float64).eps) * scale
    shifted = jax.tree_util.tree_map(lambda p, t: p + eps * t, primals, tangents)
    return jax.tree_util.tree_map(lambda a, b: (a - b) / eps, fn(*shifted), fn(*primals))


# The heat step runs in the default suite; the implicit-midpoint steps in `make test-slow` (the default suite's
# 15-minute budget).
DEFAULT_PROBLEMS = ("heat",)


@pytest.mark.parametrize("solver_name", list(OPTIMISTIX_SOLVERS))
@pytest.mark.parametrize(
    "problem",
    [p if p in DEFAULT_PROBLEMS else pytest.param(p, marks=pytest.mark.slow) for p in OPTIMISTIX_PROBLEMS],
)
def test_optimistix_root_find_and_jvp(problem, solver_name):
    """optimistix's test_root_find (every entry of g within 1e-5 of 0) and test_root_find_jvp (tangents
    within rtol = atol = 1e-3 of finite differences, random tangents for the start and the args)."""
    fn, init, args = OPTIMISTIX_PROBLEMS[problem]
    g = _residual(fn)
    solver = OPTIMISTIX_SOLVERS[solver_name]

    def solve(init, args):
        return jdeq.root(g, init, args, solver=solver, grad=jdeq.ImplicitJVP()).value

    for leaf in jax.tree_util.tree_leaves(g(solve(init, args), args)):
        np.testing.assert_allclose(leaf, jnp.zeros_like(leaf), atol=1e-5)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))
    tangents = jax.tree_util.tree_map(lambda p: jax.random.normal(next(keys), p.shape, p.dtype), (init, args))
    _, tangent_out = jax.jit(lambda primals, tangents: jax.jvp(solve, primals, tangents))((init, args), tangents)
    expected = _finite_difference_jvp(solve, (init, args), tangents)
    for got, want in zip(jax.tree_util.tree_leaves(tangent_out), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "solver",
    [jdeq.Newton(tol=1e-12), pytest.param(jdeq.Chord(tol=1e-12, max_steps=100), marks=pytest.mark.slow)],
    ids=["newton", "chord"],
)
def test_newton_type_solvers_in_a_linen_layer_with_implicit_gradients(solver):
    import flax.linen as linen

    class Cell(linen.Module):  # a user's module: the map z ↦ tanh(0.4·Dense(z) + Dense(x))
        @linen.compact
        def __call__(self, z, x):
            dense = lambda: linen.Dense(5, param_dtype=jnp.float64)  # noqa: E731
            return jnp.tanh(0.4 * dense()(z) + dense()(x))

    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    layer = jdeq.nn.DEQ(Cell(), solver=solver)
    reference = jdeq.nn.DEQ(Cell(), solver=jdeq.FixedPoint(tol=1e-13, max_steps=400))
    params = layer.init(jax.random.PRNGKey(0), x, jnp.zeros((2, 5)))

    def loss(params, layer):
        return jnp.sum(jnp.sin(layer.apply(params, x, jnp.zeros((2, 5)))))

    np.testing.assert_allclose(
        layer.apply(params, x, jnp.zeros((2, 5))), reference.apply(params, x, jnp.zeros((2, 5))), atol=1e-11
    )
    got, want = jax.grad(loss)(params, layer)["params"], jax.grad(loss)(params, reference)["params"]
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-9)


def test_chord_keeps_a_matrix_free_solvers_refresh_point_and_converges():
    m = jnp.asarray(np.random.default_rng(5).standard_normal((10, 10))) / 12  # spectral norm about 0.5
    solver = jdeq.Chord(tol=1e-10, max_steps=100, refresh=4, linear_solver=jdeq.GMRES(tol=1e-12, max_steps=30))
    sol = jdeq.root(lambda z: m @ z + 1.0 - z, jnp.zeros(10), solver=solver)
    assert bool(sol.stats.converged)
    np.testing.assert_allclose(sol.value, jnp.linalg.solve(jnp.eye(10) - m, jnp.ones(10)), rtol=1e-8)
    assert sol.state.solver_state == () and sol.state.point.shape == (10,)
