"""Property tests under hostile input: random maps (non-contractive, NaN/inf-producing, discontinuous),
random shapes, dtypes and solvers, empty states and empty batches.

Every call must return within ``max_steps`` with a valid result code, and ``converged`` must be true
only when the returned ``z`` really satisfies the tolerance; bad arguments raise ValueError at trace
time. Examples are derandomized for CI; ``JDEQ_FUZZ_EXAMPLES=500`` runs a longer search.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import jdeq
from jdeq import Result

EXAMPLES = int(os.environ.get("JDEQ_FUZZ_EXAMPLES", "12"))
PHASES = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if "JDEQ_FUZZ_EXAMPLES" in os.environ else ())
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True, phases=PHASES)
GRAD_FUZZ = settings(FUZZ, max_examples=max(1, EXAMPLES // 2))  # each example compiles a backward pass too
DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32, "float64": jnp.float64}


def _tanh(z, a, b):
    return jnp.tanh(a @ z + b)


def _linear(z, a, b):
    return a @ z + b


def _nan_outside(z, a, b):
    return jnp.where(jnp.max(jnp.abs(z), initial=0.0) < 2, a @ z + b, jnp.nan)


def _log(z, a, b):  # NaN once an iterate drops below -1
    return jnp.log1p(a @ z) + b


def _inf_jump(z, a, b):
    return jnp.where(jnp.max(jnp.abs(z), initial=0.0) > 3, jnp.inf, jnp.tanh(a @ z + b))


def _sign(z, a, b):  # discontinuous
    return 0.5 * jnp.sign(a @ z) + b


MAPS = {f.__name__[1:]: f for f in (_tanh, _linear, _nan_outside, _log, _inf_jump, _sign)}


@st.composite
def solvers(draw):
    common = dict(
        tol=draw(st.sampled_from([1e-12, 1e-6, 1e-3, 1e-1])),
        atol=draw(st.sampled_from([0.0, 1e-8])),
        max_steps=draw(st.integers(1, 25)),
        divergence=draw(st.sampled_from([1e2, 1e6, np.inf])),
        return_best=draw(st.booleans()),
        trace=draw(st.booleans()),
    )
    kind = draw(st.sampled_from(["fixed_point", "anderson", "broyden", "fallback"]))
    m = draw(st.integers(1, 6))
    if kind == "fixed_point":
        return jdeq.FixedPoint(damping=draw(st.sampled_from([0.0, 0.5])), **common)
    if kind == "anderson":
        return jdeq.Anderson(
            m=m, beta=draw(st.sampled_from([1.0, 0.5])), ridge=draw(st.sampled_from([0.0, 1e-4])), **common
        )
    if kind == "broyden":
        return jdeq.Broyden(m=m, line_search=draw(st.booleans()), **common)
    growth = draw(st.sampled_from([2.0, 10.0]))
    common["divergence"] = max(common["divergence"], 10 * growth)
    return jdeq.Fallback(growth=growth, patience=draw(st.sampled_from([None, 3])), **common)


@st.composite
def problems(draw):
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    n = draw(st.sampled_from([0, 1, 3, 8]))
    batch = draw(st.sampled_from([None, 0, 1, 3]))
    name = draw(st.sampled_from(list(MAPS)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    a = rng.standard_normal((n, n))
    a = a * draw(st.sampled_from([0.1, 0.9, 1.5, 4.0])) / max(np.linalg.norm(a, 2), 1e-12)
    lead = () if batch is None else (batch,)
    b = rng.standard_normal((*lead, n)) * draw(st.sampled_from([0.0, 1.0, 1e3]))
    z0 = rng.standard_normal((*lead, n)) * draw(st.sampled_from([0.0, 1.0]))
    if draw(st.booleans()) and z0.size:
        z0.flat[0] = draw(st.sampled_from([np.nan, np.inf]))
    cast = (lambda v: jnp.asarray(v, dtype)) if n else (lambda v: jnp.asarray(v, dtype).reshape(v.shape))
    return name, batch, cast(z0), cast(a), cast(b)


def solve(name, batch, z0, a, b, solver):
    f = MAPS[name]
    if batch is None:
        return jdeq.fixed_point(f, z0, a, b, solver=solver)
    return jdeq.fixed_point_batch(f, z0, a, b, in_axes=(None, 0), solver=solver)


def check_stats_are_honest(name, batch, a, b, solver, sol):
    stats = jax.tree_util.tree_map(np.asarray, sol.stats)
    shape = () if batch is None else (batch,)
    assert stats.result.shape == stats.num_steps.shape == shape
    assert np.all((stats.num_steps >= 0) & (stats.num_steps <= solver.max_steps))
    assert np.all(stats.num_evals >= stats.num_steps + 1)
    assert set(np.unique(stats.result).tolist()) <= {
        Result.CONVERGED,
        Result.MAX_STEPS,
        Result.DIVERGED,
        Result.NONFINITE,
    }
    np.testing.assert_array_equal(stats.converged, stats.result == Result.CONVERGED)
    assert sol.value.dtype == a.dtype and sol.value.shape == (*shape, a.shape[0])
    # Recompute the residual of every converged sample from the returned z, in float64.
    z = np.asarray(sol.value, np.float64).reshape(int(np.prod(shape)), a.shape[0])
    fz = np.asarray(jax.vmap(lambda zi, bi: MAPS[name](zi.astype(a.dtype), a, bi))(z, b.reshape(z.shape)), np.float64)
    eps = float(jnp.finfo(a.dtype).eps)
    for i, converged in enumerate(np.ravel(stats.converged)):
        if converged:
            assert np.all(np.isfinite(fz[i])) and np.all(np.isfinite(z[i])), "converged to a non-finite point"
            res, scale = np.linalg.norm(fz[i] - z[i]), np.linalg.norm(fz[i])
            allowed = (1 + eps) * max(solver.atol, solver.tol * scale) + 8 * eps * scale
            assert res <= allowed, f"false convergence: residual {res:.3e} > allowed {allowed:.3e}"


@FUZZ
@given(problem=problems(), solver=solvers())
def test_every_solve_returns_a_valid_code_and_never_converges_falsely(problem, solver):
    name, batch, z0, a, b = problem
    sol = solve(name, batch, z0, a, b, solver)
    check_stats_are_honest(name, batch, a, b, solver, sol)


@pytest.mark.slow  # the default suite's 15-minute budget
@GRAD_FUZZ
@given(problem=problems(), solver=solvers())
def test_gradients_are_finite_when_the_solve_converged_on_a_contraction(problem, solver):
    name, batch, z0, a, b = problem
    a = (0.5 * a / max(float(jnp.linalg.norm(a.astype(jnp.float32), 2)), 1e-12)).astype(a.dtype)
    z0 = jnp.nan_to_num(z0, posinf=0.0)

    def loss(b):
        sol = solve("tanh", batch, z0, a, b, solver)
        return jnp.sum(sol.value.astype(jnp.float32) ** 2), sol.stats

    grad, stats = jax.grad(loss, has_aux=True)(b)
    assert grad.shape == b.shape and grad.dtype == b.dtype
    converged = np.asarray(stats.converged).reshape(-1)
    g = np.asarray(grad, np.float64).reshape(converged.size, b.shape[-1])
    assert np.all(np.isfinite(g[converged])), "a converged contraction gave a non-finite gradient"


BAD_SOLVER_ARGS = [
    (jdeq.FixedPoint, dict(tol=0.0)),
    (jdeq.FixedPoint, dict(tol=-1e-3)),
    (jdeq.FixedPoint, dict(atol=-1.0)),
    (jdeq.FixedPoint, dict(max_steps=0)),
    (jdeq.FixedPoint, dict(max_steps=2.5)),
    (jdeq.FixedPoint, dict(divergence=1.0)),
    (jdeq.FixedPoint, dict(damping=1.0)),
    (jdeq.Anderson, dict(m=0)),
    (jdeq.Anderson, dict(beta=0.0)),
    (jdeq.Anderson, dict(ridge=-1.0)),
    (jdeq.Broyden, dict(m=0)),
    (jdeq.Broyden, dict(ls_c=1.0)),
    (jdeq.Fallback, dict(stages=())),
    (jdeq.Fallback, dict(growth=1e9)),
]


@pytest.mark.parametrize("cls, kwargs", BAD_SOLVER_ARGS, ids=[f"{c.__name__}-{k}" for c, k in BAD_SOLVER_ARGS])
def test_bad_hyperparameters_raise_at_construction(cls, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        cls(**kwargs)


@pytest.mark.parametrize(
    "z0, f, message",
    [
        (jnp.zeros(3, jnp.int32), lambda z: z, "real floating-point"),
        (jnp.zeros(3, jnp.complex64), lambda z: z + jnp.array([1, 1j, 0], jnp.complex64), "real floating-point"),
        (jnp.zeros(3), lambda z: z[:2], "same pytree structure"),
        (jnp.zeros(3, jnp.float32), lambda z: z.astype(jnp.float64), "same pytree structure"),
        ({"a": jnp.zeros(2)}, lambda z: {"b": z["a"]}, "same pytree structure"),
    ],
    ids=["integer", "complex", "shape", "dtype", "structure"],
)
def test_bad_states_raise_a_clear_error_at_trace_time(z0, f, message):
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda z0: jdeq.fixed_point(f, z0).value).lower(z0)
