"""Mixed precision: f in bfloat16/float16, solver state, statistics and gradients in float32."""

import functools

import jax
import jax.numpy as jnp
import pytest
from helpers import iter_eqns, random_matrix, rel_err, tanh_map

import jdeq

N = 32
LOW = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
SOLVERS = {
    "fixed_point": jdeq.FixedPoint,
    "anderson": jdeq.Anderson,
    "broyden": jdeq.Broyden,
}


def problem():
    w = random_matrix(0, N, 0.8).astype(jnp.float32)
    x = jnp.sin(jnp.arange(N, dtype=jnp.float32))
    return w, x


@functools.cache
def exact_fixed_point():
    w, x = problem()
    w64, x64 = w.astype(jnp.float64), x.astype(jnp.float64)
    sol = jdeq.fixed_point(tanh_map, jnp.zeros(N), x64, w64, solver=jdeq.Anderson(tol=1e-13, max_steps=200))
    assert bool(sol.stats.converged)
    return sol.value


@pytest.mark.parametrize("low", list(LOW))
@pytest.mark.parametrize("name", list(SOLVERS))
def test_low_precision_map_reaches_its_rounding_level(low, name):
    """tol = the low dtype's machine epsilon is reachable; the answer is that close to the exact one."""
    w, x = problem()
    eps = float(jnp.finfo(LOW[low]).eps)
    solver = SOLVERS[name](tol=eps, max_steps=100)
    sol = jdeq.fixed_point(tanh_map, jnp.zeros(N), x, w, solver=solver, precision=jdeq.Precision(LOW[low]))
    assert bool(sol.stats.converged), jdeq.Result.name(sol.stats.result)
    assert sol.value.dtype == jnp.float32
    for field in ("residual", "abs_residual"):
        assert getattr(sol.stats, field).dtype == jnp.float32
    assert float(sol.stats.residual) <= eps
    assert rel_err(sol.value, exact_fixed_point()) <= 2 * eps


def test_unreachable_tolerance_is_not_reported_as_converged():
    """bfloat16 rounding keeps the residual near 2⁻⁸; asking for 1e-6 must end in max_steps, not 'converged'."""
    w, x = problem()
    solver = jdeq.Anderson(tol=1e-6, max_steps=60, return_best=True)
    sol = jdeq.fixed_point(tanh_map, jnp.zeros(N), x, w, solver=solver, precision=jdeq.Precision(jnp.bfloat16))
    assert int(sol.stats.result) == jdeq.Result.MAX_STEPS
    assert 1e-6 < float(sol.stats.residual) <= 2.0**-8
    full = jdeq.fixed_point(tanh_map, jnp.zeros(N), x, w, solver=solver, precision=jdeq.Precision())
    assert bool(full.stats.converged)


def test_map_runs_in_the_low_dtype_and_anderson_state_in_float32():
    w, x = problem()
    policy = jdeq.Precision(jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x, w: jdeq.fixed_point(tanh_map, jnp.zeros(N), x, w, precision=policy))(x, w)
    text = str(jaxpr)
    assert "tanh" in text and "bf16[32,32]" in text  # W cast to bfloat16 for the product
    state = jdeq.Anderson().init(*(jnp.zeros(N, policy.state),) * 2)
    assert state.gs.dtype == state.fs.dtype == jnp.float32 and state.gram.dtype == jnp.float32


def head_loss(w, x, solver, precision=None):
    z = jdeq.fixed_point(tanh_map, jnp.zeros(N), x, w, solver=solver, precision=precision).value
    return jnp.dot(jnp.cos(jnp.arange(N, dtype=z.dtype)), z)


@functools.cache
def exact_gradients():
    w, x = problem()
    solver = jdeq.Anderson(tol=1e-13, max_steps=200)
    return jax.grad(head_loss, argnums=(0, 1))(w.astype(jnp.float64), x.astype(jnp.float64), solver)


@pytest.mark.parametrize("low", list(LOW))
def test_gradients_are_finite_and_close_to_float64(low):
    w, x = problem()
    solver = jdeq.Anderson(tol=float(jnp.finfo(LOW[low]).eps), max_steps=100)
    grads = jax.grad(head_loss, argnums=(0, 1))(w, x, solver, jdeq.Precision(LOW[low]))
    for g, e, master in zip(grads, exact_gradients(), (w, x)):
        assert g.dtype == master.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(g)))
        assert rel_err(g, e) <= 16 * float(jnp.finfo(LOW[low]).eps)


def test_matmul_precision_reaches_the_products_of_both_passes():
    w, x = problem()

    def loss(w, precision):
        return jnp.sum(jdeq.fixed_point(tanh_map, jnp.zeros(N, x.dtype), x, w, precision=precision).value)

    def dot_precisions(precision):
        jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(w, precision)
        return [
            str(e.params["precision"])
            for e in iter_eqns(jaxpr.jaxpr)
            if e.primitive.name == "dot_general" and any(v.aval.shape == (N, N) for v in e.invars)
        ]

    default, highest = dot_precisions(None), dot_precisions(jdeq.Precision(matmul="highest"))
    assert len(default) == len(highest) >= 3  # f in the loop, its VJP in the adjoint loop and for ∂f/∂W
    assert not any("HIGHEST" in p for p in default), default
    assert all("HIGHEST" in p for p in highest), highest


def test_bad_policies_are_rejected():
    with pytest.raises(ValueError, match="floating dtype"):
        jdeq.Precision(jnp.int32)
    with pytest.raises(ValueError, match="matmul"):
        jdeq.Precision(matmul="fast")


def test_structure_errors_still_name_both_sides_under_a_policy():
    with pytest.raises(ValueError, match="same pytree structure"):
        jdeq.fixed_point(lambda z: (z, z), jnp.zeros(3), precision=jdeq.Precision(jnp.bfloat16))
