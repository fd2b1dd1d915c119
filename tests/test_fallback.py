"""The Fallback chain: switches stage on growth, NaN or stagnation; DIVERGED only when every stage fails."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import iter_eqns, linear_map

import jdeq
from jdeq import Result
from jdeq.solvers import Solver

N = 8
PLAIN_THEN_DAMPED = (jdeq.FixedPoint(), jdeq.FixedPoint(damping=0.5))


def linear_problem(low, high, seed=3):
    """f(z) = A z + b with the eigenvalues of the symmetric A spread over [low, high]."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((N, N)))
    a = jnp.asarray(q @ np.diag(np.linspace(low, high, N)) @ q.T)
    b = jnp.ones(N)
    return a, b, jnp.linalg.solve(jnp.eye(N) - a, b)


def solve(solver, a, b, f=linear_map):
    return jdeq.fixed_point(f, jnp.zeros(N), a, b, solver=solver)


def test_expanding_map_plain_iteration_diverges_and_the_chain_recovers():
    a, b, exact = linear_problem(-1.5, 0.6)  # damping 0.5 maps the spectrum into [-0.25, 0.8]
    assert int(solve(jdeq.FixedPoint(tol=1e-10, max_steps=300), a, b).stats.result) == Result.DIVERGED
    sol = solve(jdeq.Fallback(stages=PLAIN_THEN_DAMPED, tol=1e-10, max_steps=300), a, b)
    assert bool(sol.stats.converged), Result.name(sol.stats.result)
    np.testing.assert_allclose(sol.value, exact, atol=1e-8)


def test_nan_step_is_rejected_and_the_next_stage_restarts_from_the_best_iterate():
    a, b, exact = linear_problem(-1.5, 0.6)
    radius = 4 * float(jnp.max(jnp.abs(exact)))

    def nan_outside(z, a, b):
        return jnp.where(jnp.max(jnp.abs(z)) < radius, a @ z + b, jnp.nan)

    plain = solve(jdeq.FixedPoint(tol=1e-10, max_steps=300), a, b, nan_outside)
    assert int(plain.stats.result) == Result.NONFINITE
    chain = jdeq.Fallback(stages=PLAIN_THEN_DAMPED, growth=1e5, tol=1e-10, max_steps=300)
    sol = solve(chain, a, b, nan_outside)
    assert bool(sol.stats.converged), Result.name(sol.stats.result)
    np.testing.assert_allclose(sol.value, exact, atol=1e-8)


def test_diverged_only_after_every_stage_failed():
    a, b, _ = linear_problem(-5.0, 0.5)  # damping 0.5 still leaves an eigenvalue at -2
    first = solve(jdeq.FixedPoint(tol=1e-10, max_steps=500), a, b)
    sol = solve(jdeq.Fallback(stages=PLAIN_THEN_DAMPED, tol=1e-10, max_steps=500), a, b)
    assert int(first.stats.result) == int(sol.stats.result) == Result.DIVERGED
    assert int(sol.stats.num_steps) > int(first.stats.num_steps)
    assert float(sol.stats.abs_residual) > 1e6 * float(jnp.linalg.norm(b))


def test_patience_moves_on_from_a_stagnating_stage():
    """f(z) = c − z: plain iteration cycles between z0 and c − z0 with a constant residual."""
    c = jnp.linspace(1.0, 2.0, N)

    def reflect(z, c):
        return c - z

    kwargs = dict(stages=PLAIN_THEN_DAMPED, tol=1e-10, max_steps=50)
    stuck = jdeq.fixed_point(reflect, jnp.zeros(N), c, solver=jdeq.Fallback(**kwargs))
    assert int(stuck.stats.result) == Result.MAX_STEPS
    sol = jdeq.fixed_point(reflect, jnp.zeros(N), c, solver=jdeq.Fallback(patience=3, **kwargs))
    assert bool(sol.stats.converged) and int(sol.stats.num_steps) <= 5
    np.testing.assert_allclose(sol.value, c / 2, atol=1e-10)


def test_default_chain_on_an_easy_problem_stays_with_anderson():
    a, b, exact = linear_problem(-0.5, 0.7)
    anderson = solve(jdeq.Anderson(tol=1e-10, max_steps=100), a, b)
    chain = solve(jdeq.Fallback(tol=1e-10, max_steps=100), a, b)
    assert bool(chain.stats.converged)
    assert int(chain.stats.num_steps) == int(anderson.stats.num_steps)
    np.testing.assert_allclose(chain.value, exact, atol=1e-9)


def test_implicit_gradient_through_the_chain_matches_the_exact_one():
    a, b, _ = linear_problem(-1.5, 0.6)
    solver = jdeq.Fallback(stages=PLAIN_THEN_DAMPED, tol=1e-12, max_steps=400)

    def loss(b):
        return jnp.sum(jnp.sin(solve(solver, a, b).value))

    exact_z = jnp.linalg.solve(jnp.eye(N) - a, b)
    exact_grad = jnp.linalg.solve((jnp.eye(N) - a).T, jnp.cos(exact_z))
    np.testing.assert_allclose(jax.grad(loss)(b), exact_grad, rtol=1e-8)


def test_per_sample_chains_under_vmap():
    easy, b, exact_easy = linear_problem(-0.5, 0.5)
    hard, _, exact_hard = linear_problem(-1.5, 0.6)
    solver = jdeq.Fallback(stages=PLAIN_THEN_DAMPED, tol=1e-10, max_steps=300)
    sol = jdeq.fixed_point_batch(
        linear_map, jnp.zeros((2, N)), jnp.stack([easy, hard]), b, in_axes=(0, None), solver=solver
    )
    assert bool(jnp.all(sol.stats.converged))
    np.testing.assert_allclose(sol.value, jnp.stack([exact_easy, exact_hard]), atol=1e-8)
    assert int(sol.stats.num_steps[0]) < int(sol.stats.num_steps[1])


@dataclasses.dataclass(frozen=True)
class StepOnlyAnderson(jdeq.Anderson):
    """Anderson with its own ``step`` (the same iteration), so it does not count as proposing."""

    def step(self, fn, x, fx, state):
        return Solver.step(self, fn, x, fx, state)


@dataclasses.dataclass(frozen=True)
class StepOnlyFixedPoint(jdeq.FixedPoint):
    def step(self, fn, x, fx, state):
        return Solver.step(self, fn, x, fx, state)


def tanh_count(solver, batch):
    """The evaluations of ``f(z) = tanh(z / 2)`` (its ``tanh``) in the program of one batch step of ``solver``."""

    def fn(xs):
        return jnp.tanh(0.5 * xs)

    def step(xs):
        fx = fn(xs)
        return solver.batch_step(fn, xs, fx, jax.vmap(solver.init)(xs, fx), 0)

    return sum(eqn.primitive.name == "tanh" for eqn in iter_eqns(jax.make_jaxpr(step)(batch).jaxpr)) - 1


def test_a_batch_step_evaluates_f_once_when_every_stage_proposes():
    batch = jnp.ones((3, N))
    assert jdeq.Anderson().proposes and jdeq.FixedPoint().proposes
    assert not (jdeq.Broyden().proposes or StepOnlyAnderson().proposes)
    assert tanh_count(jdeq.Fallback(stages=(jdeq.Anderson(), jdeq.FixedPoint())), batch) == 1
    assert tanh_count(jdeq.Fallback(stages=(jdeq.Anderson(), jdeq.Anderson(), jdeq.FixedPoint())), batch) == 1
    assert tanh_count(jdeq.Fallback(stages=(StepOnlyAnderson(), jdeq.FixedPoint())), batch) == 2
    assert tanh_count(jdeq.Fallback(stages=(jdeq.Broyden(), jdeq.FixedPoint())), batch) == 2


def test_one_shared_evaluation_gives_the_solves_of_one_evaluation_per_stage():
    """The same batch solve (values and stats), with samples in both stages, as the chain of non-proposing stages."""
    a, b, _ = linear_problem(-1.5, 0.6)  # plain iteration diverges: the samples scaled up move to damped iteration
    scales = jnp.array([0.0, 0.3, 0.7, 1.0])
    ax = jnp.stack([a * s for s in scales])
    kwargs = dict(patience=4, tol=1e-10, max_steps=300)
    shared = jdeq.Fallback(stages=(jdeq.Anderson(m=2), jdeq.FixedPoint(damping=0.5)), **kwargs)
    own = jdeq.Fallback(stages=(StepOnlyAnderson(m=2, cholesky=True), StepOnlyFixedPoint(damping=0.5)), **kwargs)
    one, every = (
        jdeq.fixed_point_batch(linear_map, jnp.zeros((4, N)), ax, b, in_axes=(0, None), solver=solver)
        for solver in (shared, own)
    )
    stages = np.asarray(one.state.stage)
    assert 0 in stages and 1 in stages, stages
    assert bool(jnp.all(one.stats.converged))
    np.testing.assert_array_equal(one.value, every.value)
    for field in ("num_steps", "num_evals", "result", "residual"):
        np.testing.assert_array_equal(getattr(one.stats, field), getattr(every.stats, field), err_msg=field)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stages=()), "non-empty tuple"),
        (dict(stages=[jdeq.FixedPoint()]), "non-empty tuple"),
        (dict(stages=(jdeq.GMRES(),)), "jdeq Solver"),
        (dict(growth=1.0), "growth"),
        (dict(growth=1e7), "growth"),
        (dict(patience=0), "patience"),
    ],
)
def test_bad_chains_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jdeq.Fallback(**kwargs)
