"""The batch-native driver: per-sample solves equal jax.vmap of single solves; loops without copies or outer products."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_matrix, tanh_map

import jdeq

N, B = 8, 6
W = random_matrix(11, N, 0.9)
XS = jnp.asarray(np.random.default_rng(2).standard_normal((B, N))) * jnp.array([0.1, 1.0, 3.0, 0.5, 2.0, 1.5])[:, None]

SOLVERS = {
    "fixed_point": jdeq.FixedPoint(tol=1e-10, max_steps=60),
    "anderson": jdeq.Anderson(tol=1e-10, max_steps=60, m=4, cholesky=True),  # as in batch solves
    "anderson_best_trace": jdeq.Anderson(tol=1e-12, max_steps=12, return_best=True, trace=True, cholesky=True),
    "broyden": jdeq.Broyden(tol=1e-10, max_steps=60, m=3),  # m=3: the memory fills and restarts
    "broyden_line_search": jdeq.Broyden(tol=1e-10, max_steps=60, line_search=True),
    "fallback": jdeq.Fallback(stages=(jdeq.Broyden(m=3), jdeq.FixedPoint(damping=0.5)), tol=1e-10, max_steps=80),
    # proposing stages (one evaluation of f per step); samples 1-5 move on to the second stage, sample 0 does not
    "fallback_anderson": jdeq.Fallback(
        stages=(jdeq.Anderson(m=3, cholesky=True), jdeq.FixedPoint()), patience=3, tol=1e-10, max_steps=80
    ),
    "newton_line_search": jdeq.Newton(tol=1e-10, max_steps=30, line_search=True),
    "chord": jdeq.Chord(tol=1e-10, max_steps=60, refresh=2),
}


def batch_solve(solver, xs=XS, w=W, **kwargs):
    return jdeq.fixed_point_batch(tanh_map, jnp.zeros(xs.shape), xs, w, in_axes=(0, None), solver=solver, **kwargs)


def vmap_solve(solver, xs=XS, w=W, **kwargs):
    return jax.vmap(lambda x: jdeq.fixed_point(tanh_map, jnp.zeros(xs.shape[1:]), x, w, solver=solver, **kwargs))(xs)


def assert_same_solves(a, b):
    np.testing.assert_allclose(a.value, b.value, rtol=1e-12, atol=1e-13)
    for field in ("num_steps", "num_evals", "result", "converged"):
        np.testing.assert_array_equal(getattr(a.stats, field), getattr(b.stats, field), err_msg=field)
    np.testing.assert_allclose(a.stats.residual, b.stats.residual, rtol=1e-9, atol=1e-15)
    if a.stats.trace is not None:
        np.testing.assert_allclose(a.stats.trace, b.stats.trace, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_values_and_stats_equal_vmap_of_single_solves(name):
    solver = SOLVERS[name]
    batch, single = batch_solve(solver), vmap_solve(solver)
    assert_same_solves(batch, single)
    if not solver.return_best:  # (that case runs every sample to its budget)
        assert len(set(np.asarray(batch.stats.num_steps).tolist())) > 1  # samples stop at different steps


def test_nan_sample_and_budget_are_per_sample():
    xs = XS.at[2, 0].set(jnp.nan)
    solver = jdeq.Anderson(tol=1e-6, max_steps=8, cholesky=True)
    batch, single = batch_solve(solver, xs), vmap_solve(solver, xs)
    assert_same_solves(batch, single)
    codes = np.asarray(batch.stats.result)
    assert codes[2] == jdeq.Result.NONFINITE and jdeq.Result.MAX_STEPS in codes and jdeq.Result.CONVERGED in codes


def test_batch_of_one_and_mixed_precision():
    solver = jdeq.Anderson(tol=1e-5, max_steps=50, cholesky=True)
    assert_same_solves(batch_solve(solver, XS[:1]), vmap_solve(solver, XS[:1]))
    policy = jdeq.Precision(compute=jnp.float32, state=jnp.float32)
    a, b = batch_solve(solver, precision=policy), vmap_solve(solver, precision=policy)
    assert a.value.dtype == jnp.float32
    np.testing.assert_allclose(a.value, b.value, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.stats.result, b.stats.result)


MODES = {
    "implicit": jdeq.Implicit(),
    "implicit_jvp": jdeq.ImplicitJVP(),
    "shine": jdeq.Shine(),
    "shine_refined": jdeq.Shine(refine=jdeq.FixedPoint(tol=1e-11, max_steps=300)),
    "phantom": jdeq.Phantom(k=3),
    "unrolled": jdeq.Unrolled(),
    "gmres": jdeq.Implicit(jdeq.GMRES(tol=1e-11, max_steps=N)),
    "neumann": jdeq.Implicit(jdeq.Neumann(6)),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("solver", ["anderson", "broyden", "fallback"])
def test_gradients_equal_vmap_of_single_solves(solver, mode):
    solver, grad = SOLVERS[solver], MODES[mode]

    def loss(solve, w):
        return jnp.sum(jnp.sin(solve(solver, w=w, grad=grad).value))

    # Unrefined Shine reads Broyden's last rank-one terms, whose tiny denominators near convergence
    # amplify the rounding differences of batched and per-sample arithmetic (measured ~5e-7 relative).
    tol = 1e-6 if mode == "shine" else 1e-12  # (gradient entries are of order 1)
    np.testing.assert_allclose(
        jax.grad(lambda w: loss(batch_solve, w))(W),
        jax.grad(lambda w: loss(vmap_solve, w))(W),
        rtol=1e3 * tol,
        atol=tol,
    )


def test_lineax_iterative_solvers_per_row_and_direct_ones_rejected_in_batches():
    lineax = pytest.importorskip("lineax")
    solver = SOLVERS["anderson"]

    def grads(solve, inner):
        def loss(w):
            return jnp.sum(jnp.sin(solve(solver, w=w, grad=jdeq.Implicit(jdeq.Lineax(inner))).value))

        return jax.grad(loss)(W)

    inner = lineax.GMRES(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grads(batch_solve, inner), grads(vmap_solve, inner), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="iterative"):
        grads(batch_solve, lineax.LU())


def test_in_axes_mismatch_names_in_axes():
    with pytest.raises(ValueError, match="in_axes"):
        jdeq.fixed_point_batch(tanh_map, jnp.zeros((B, N)), XS[:3], W, in_axes=(0, None))


# --- what runs inside the compiled loops ---------------------------------------------------------------


def hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def while_bodies(text: str) -> list[str]:
    """The HLO text of every while-loop body computation in ``text``."""
    names = set(re.findall(r"body=%?([\w.\-]+)", text))
    blocks = re.findall(r"^%?([\w.\-]+) .*?\{\n(.*?)^\}", text, re.M | re.S)
    bodies = [block for name, block in blocks if name in names]
    assert bodies, "no while loop found"
    return bodies


@pytest.mark.parametrize("grad", [jdeq.Implicit(), jdeq.Shine()], ids=["implicit", "shine"])
def test_per_sample_gradient_has_no_per_sample_outer_product(grad):
    """∂f/∂θ is transposed once for the batch: no (batch, n, n) tensor in the compiled gradient."""
    width, batch = 24, 10
    w, xs = random_matrix(1, width, 0.5), jnp.ones((batch, width))

    def loss(w):
        sol = jdeq.fixed_point_batch(tanh_map, jnp.zeros(xs.shape), xs, w, in_axes=(0, None), grad=grad)
        return jnp.sum(sol.value)

    text = hlo(jax.grad(loss), w)
    assert f"[{width},{width}]" in text  # the parameter cotangent itself
    assert not re.search(rf"\[{batch},{width},{width}\]", text)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
def test_broyden_loop_does_not_copy_its_memory(batched):
    m, n = 7, 33
    solver = jdeq.Broyden(m=m, max_steps=40)
    w, x = random_matrix(4, n, 0.5), jnp.ones((3, n) if batched else (n,))

    def solve(w, x):
        if batched:
            return jdeq.fixed_point_batch(tanh_map, jnp.zeros(x.shape), x, w, in_axes=(0, None), solver=solver).value
        return jdeq.fixed_point(tanh_map, jnp.zeros(n), x, w, solver=solver).value

    shape = rf"\[(3,)?{m},{n}\]" if batched else rf"\[{m},{n}\]"
    bodies = while_bodies(hlo(solve, w, x))
    assert any(re.search(rf"{shape}.*dynamic-update-slice", body) for body in bodies)  # the in-place row write
    copies = [line for body in bodies for line in body.splitlines() if re.search(rf"{shape}\S* copy\(", line)]
    assert not copies, copies


def test_broyden_restarts_from_its_initial_scale_when_its_memory_is_full():
    """After m updates the next step restarts: no rank-one term is in use, so Hᵀv = γv (γ from the first step)."""
    m = 3
    solver = jdeq.Broyden(m=m, tol=1e-14, max_steps=m + 1)
    sol = jdeq.fixed_point(tanh_map, jnp.zeros(N), XS[1], W, solver=solver)
    assert int(sol.stats.num_steps) == m + 1
    v = jnp.arange(N, dtype=W.dtype)
    gamma = sol.state.gamma
    assert float(gamma) != -1.0  # estimated, not the fixed-point step's −1
    np.testing.assert_allclose(solver.inverse_jacobian_transpose(sol.state, v), gamma * v)
    before = jdeq.fixed_point(tanh_map, jnp.zeros(N), XS[1], W, solver=jdeq.Broyden(m=m, tol=1e-14, max_steps=m))
    assert not np.allclose(solver.inverse_jacobian_transpose(before.state, v), before.state.gamma * v)
