"""Every solver and gradient mode works under JAX's strictest settings (as optimistix runs its suite):
``jax.numpy_dtype_promotion("strict")`` and ``jax.numpy_rank_promotion("raise")``, in float64, float32 and
bfloat16 states (issue: an int64 ``arange`` against an int32 count, a float32 norm against a float64 state,
a rank-promoting subtraction in Shine's Anderson estimate)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq

SOLVERS = {
    "fixed_point": jdeq.FixedPoint(tol=1e-5, max_steps=200),
    "anderson": jdeq.Anderson(tol=1e-5, max_steps=100),
    "broyden": jdeq.Broyden(tol=1e-5, max_steps=100),
    "fallback": jdeq.Fallback(),
}
MODES = {
    "implicit": jdeq.Implicit(),
    "implicit_jvp": jdeq.ImplicitJVP(),
    "phantom": jdeq.Phantom(k=3),
    "unrolled": jdeq.Unrolled(),
    "gmres": jdeq.Implicit(jdeq.GMRES(tol=1e-8)),
}


def tanh_map(z, a):
    return jnp.tanh(a * z + 0.5)


@pytest.fixture(autouse=True)
def strict():
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_solver_solves_under_strict_promotion(name, dtype):
    z0, a = jnp.zeros(4, dtype), jnp.asarray(0.5, dtype)
    sol = jdeq.fixed_point(tanh_map, z0, a, solver=SOLVERS[name])
    assert sol.value.dtype == dtype and bool(sol.stats.converged)
    batch = jdeq.fixed_point_batch(
        tanh_map, jnp.zeros((3, 4), dtype), jnp.full((3,), 0.5, dtype), in_axes=(0,), solver=SOLVERS[name]
    )
    assert bool(jnp.all(batch.stats.converged))


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
@pytest.mark.parametrize("mode", [*MODES, "shine"])
def test_every_gradient_mode_differentiates_under_strict_promotion(mode, solver):
    grad = jdeq.Shine() if mode == "shine" else MODES[mode]

    def loss(a):
        return jnp.sum(jdeq.fixed_point(tanh_map, jnp.zeros(4), a, solver=SOLVERS[solver], grad=grad).value)

    got = jax.grad(loss)(jnp.asarray(0.5))
    z = jdeq.fixed_point(tanh_map, jnp.zeros(4), 0.5, solver=jdeq.FixedPoint(tol=1e-12, max_steps=500)).value
    d = 1.0 - jnp.tanh(0.5 * z + 0.5) ** 2  # dz/da = d·z / (1 − 0.5·d) per component
    exact = mode not in ("phantom", "shine")  # those two approximate the gradient by design (docs/gradients.md)
    np.testing.assert_allclose(got, jnp.sum(d * z / (1 - 0.5 * d)), rtol=1e-3 if exact else 0.5)
