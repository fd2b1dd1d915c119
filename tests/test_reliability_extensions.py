"""A user's own Solver or GradientMode that breaks its contract is named at trace time, with what it returned and
what was expected (each probe below failed with a raw JAX or Python error that named neither)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import jdeq

N = 3
X = jnp.array([0.3, -0.2, 0.5])


def f(z, x):
    return 0.5 * jnp.tanh(z) + x


@dataclasses.dataclass(frozen=True)
class Picard(jdeq.Solver):
    """A correct user solver (a counter as its state); the probes below break one clause of its contract each."""

    def init(self, x, fx):
        return {"count": jnp.zeros((), jnp.int32)}

    def step(self, fn, x, fx, state):
        return fx, fn(fx), {"count": state["count"] + 1}, jnp.ones((), jnp.int32)


class ThreeValues(Picard):
    def step(self, fn, x, fx, state):
        return fx, fn(fx), state


class OtherStateStructure(Picard):
    def step(self, fn, x, fx, state):
        return fx, fn(fx), (state["count"] + 1,), jnp.ones((), jnp.int32)


class Float32Iterate(Picard):
    def step(self, fn, x, fx, state):
        return fx.astype(jnp.float32), fn(fx), state, jnp.ones((), jnp.int32)


class GrowingState(Picard):
    def init(self, x, fx):
        return {"count": jnp.zeros((1,), jnp.int32)}

    def step(self, fn, x, fx, state):
        return fx, fn(fx), {"count": jnp.concatenate([state["count"], state["count"]])}, jnp.ones((), jnp.int32)


SOLVER_PROBES = {
    "return_arity": (ThreeValues, r"ThreeValues\.(batch_)?step .*returned 3 values, expected 4"),
    "state_structure": (
        OtherStateStructure,
        r"OtherStateStructure\.(batch_)?step .*the state it returned is .*expected",
    ),
    "iterate_dtype": (Float32Iterate, r"Float32Iterate\.(batch_)?step .*x_new it returned is .*float32\[3\].*float64"),
    "state_shape": (GrowingState, r"GrowingState\.(batch_)?step .*the state it returned is .*int32\[2\].*int32\[1\]"),
}


@pytest.mark.parametrize("probe", SOLVER_PROBES, ids=list(SOLVER_PROBES))
def test_a_solver_breaking_its_contract_is_named(probe):
    solver_class, message = SOLVER_PROBES[probe]
    with pytest.raises(ValueError, match=message):
        jdeq.fixed_point(f, jnp.zeros(N), X, solver=solver_class(max_steps=5))
    with pytest.raises(ValueError, match=message):  # the batch driver, its step vmapped over the samples
        jdeq.fixed_point_batch(f, jnp.zeros((2, N)), jnp.stack([X, -X]), in_axes=0, solver=solver_class(max_steps=5))


def test_the_correct_solver_passes_every_check():
    sol = jdeq.fixed_point(f, jnp.zeros(N), X, solver=Picard(tol=1e-10, max_steps=200))
    assert bool(sol.stats.converged) and int(sol.state["count"]) == int(sol.stats.num_steps)
    grad = jax.grad(lambda x: jnp.sum(jdeq.fixed_point(f, jnp.zeros(N), x, solver=Picard(tol=1e-10)).value))(X)
    assert bool(jnp.all(jnp.isfinite(grad)))


class BareArray(jdeq.GradientMode):
    """Returns the solution's value instead of the Solution."""

    def solve(self, solver, fn, x0, args, probe):
        return jdeq.solvers.run(solver, lambda x: fn(x, args), x0).value


class UncheckedShapeAdjoint(jdeq.AdjointMode):
    """Returns a cotangent with an extra axis: u of shape (n, 1) for g of shape (n,)."""

    def adjoint(self, forward_solver, vjp_z, g, state):
        u, stats = jdeq.Neumann(1).solve_linear(vjp_z, g)
        return u[:, None], stats


def test_a_mode_returning_no_solution_is_named():
    with pytest.raises(ValueError, match=r"BareArray\.solve .*returned .*float64\[3\].*expected a jdeq\.Solution"):
        jdeq.fixed_point(f, jnp.zeros(N), X, grad=BareArray())


def test_an_adjoint_with_the_wrong_cotangent_structure_is_named():
    def loss(x):
        return jnp.sum(jdeq.fixed_point(f, jnp.zeros(N), x, grad=UncheckedShapeAdjoint()).value)

    jdeq.fixed_point(f, jnp.zeros(N), X, grad=UncheckedShapeAdjoint())  # the forward pass is fine
    message = r"UncheckedShapeAdjoint\.adjoint .*cotangent u is .*float64\[3, 1\].*expected .*float64\[3\]"
    with pytest.raises(ValueError, match=message):
        jax.grad(loss)(X)
