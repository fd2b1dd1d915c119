"""Child process of ``tests/test_multidevice_matrix.py``: one forward solver, several gradient modes, on 8 CPU devices.

``python tests/multidevice_worker.py SOLVER GRAD [GRAD ...]`` runs, for each gradient mode in turn, the solve of a
batch sharded over 8 host devices in two ways, ``jax.shard_map`` (each device solves its own shard, so devices stop
after different numbers of steps) and ``jax.jit`` of the unsharded code called with sharded inputs, and compares the
value and the gradient in the parameters with the same solve on one device. It prints one JSON line per
combination as soon as it is done (``{"solver", "grad", "ok", "error"}``), after a ``{"start": ...}`` line, so
that a parent that kills a hung child knows which combination hung. The names are the keys of ``SOLVERS`` and
``GRADS`` below.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=8 --xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import lineax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jdeq  # noqa: E402

WIDTH, IN_DIM, BATCH = 6, 3, 16
TOL = 1e-10

SOLVERS = {
    "fixed_point": jdeq.FixedPoint(tol=TOL, max_steps=300),
    "anderson": jdeq.Anderson(tol=TOL, max_steps=100, m=4),
    "broyden": jdeq.Broyden(tol=TOL, max_steps=100, m=20),
    "broyden_ls": jdeq.Broyden(tol=TOL, max_steps=100, m=20, line_search=True),
    "newton": jdeq.Newton(tol=TOL, max_steps=30),
    "newton_ls": jdeq.Newton(tol=TOL, max_steps=30, line_search=True),
    "newton_gmres": jdeq.Newton(tol=TOL, max_steps=30, linear_solver=jdeq.GMRES(tol=1e-12, max_steps=WIDTH)),
    "newton_bicgstab": jdeq.Newton(tol=TOL, max_steps=30, linear_solver=jdeq.BiCGStab(tol=1e-12, max_steps=50)),
    "newton_lineax": jdeq.Newton(
        tol=TOL, max_steps=30, linear_solver=jdeq.Lineax(lineax.GMRES(rtol=1e-12, atol=1e-14, max_steps=50))
    ),
    "chord": jdeq.Chord(tol=TOL, max_steps=100, refresh=3),
    "fallback": jdeq.Fallback(tol=TOL, max_steps=100),
}
"""Forward solvers; a ``root_`` prefix (``root_newton``) solves ``g(z) = z − f(z) = 0`` with :func:`jdeq.root`."""

GRADS = {
    "implicit": jdeq.Implicit(),
    "implicit_lu": jdeq.Implicit(jdeq.LU()),
    "implicit_gmres": jdeq.Implicit(jdeq.GMRES(tol=1e-12, max_steps=WIDTH)),
    "implicit_bicgstab": jdeq.Implicit(jdeq.BiCGStab(tol=1e-12, max_steps=50)),
    "implicit_neumann": jdeq.Implicit(jdeq.Neumann(k=60)),
    "implicit_lineax": jdeq.Implicit(jdeq.Lineax(lineax.GMRES(rtol=1e-12, atol=1e-14, max_steps=50))),
    "implicit_jvp": jdeq.ImplicitJVP(),
    "implicit_jvp_gmres": jdeq.ImplicitJVP(jdeq.GMRES(tol=1e-12, max_steps=WIDTH)),
    "shine_refined": jdeq.Shine(refine=jdeq.Anderson(tol=1e-12, max_steps=100)),
    "phantom": jdeq.Phantom(k=5),
    "unrolled": jdeq.Unrolled(),
}

RTOL = {"phantom": 1e-6, "implicit_neumann": 1e-6}  # approximate gradients: same approximation, other rounding


def cell(z, x, params):
    """f(z, x) = tanh(W z + U x + b), a contraction (‖W‖₂ ≈ 0.5)."""
    return jnp.tanh(params["W"] @ z + params["U"] @ x + params["b"])


def problem():
    kw, ku, kx = jax.random.split(jax.random.key(0), 3)
    params = {
        "W": 0.5 * jax.random.normal(kw, (WIDTH, WIDTH)) / WIDTH**0.5,
        "U": jax.random.normal(ku, (WIDTH, IN_DIM)) / IN_DIM**0.5,
        "b": jnp.linspace(-0.1, 0.1, WIDTH),
    }
    scales = jnp.linspace(0.05, 3.0, BATCH)[:, None]  # samples (and devices) need different numbers of steps
    return params, scales * jax.random.normal(kx, (BATCH, IN_DIM))


def solve_fn(solver_name, grad):
    """``solve(x, params) -> (value, num_steps)`` for one device's batch (or the whole batch)."""
    if solver_name.startswith("root_"):
        solver = SOLVERS[solver_name[len("root_") :]]

        def solve(x, params):  # the device's batch as one root-finding problem
            def g(z, x, params):
                return z - jax.vmap(cell, in_axes=(0, 0, None))(z, x, params)

            sol = jdeq.root(g, jnp.zeros((x.shape[0], WIDTH)), x, params, solver=solver, grad=grad)
            return sol.value, jnp.broadcast_to(sol.stats.num_steps, x.shape[:1])

        return solve
    solver = SOLVERS[solver_name]

    def solve(x, params):
        z0 = jnp.zeros((x.shape[0], WIDTH))
        sol = jdeq.fixed_point_batch(cell, z0, x, params, in_axes=(0, None), solver=solver, grad=grad)
        return sol.value, sol.stats.num_steps

    return solve


def loss_and_grad(solve):
    def loss(params, x):
        value, _ = solve(x, params)
        return jnp.sum(jnp.sin(value))

    return jax.jit(jax.value_and_grad(loss))


def check_close(name, actual, expected, rtol):
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol, err_msg=f"{name}{jax.tree_util.keystr(path)}")


def run_combination(solver_name, grad_name):
    params, x = problem()
    solve = solve_fn(solver_name, GRADS[grad_name])
    rtol = RTOL.get(grad_name, 1e-8)
    value, steps = jax.jit(solve)(x, params)
    loss, grads = loss_and_grad(solve)(params, x)

    n = jax.device_count()
    assert n == 8, n
    manual = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharded = jax.shard_map(solve, mesh=manual, in_specs=(P("data"), P()), out_specs=(P("data"), P("data")))
    x_manual = jax.device_put(x, NamedSharding(manual, P("data")))
    value_sm, steps_sm = jax.jit(sharded)(x_manual, params)
    if not solver_name.startswith("root_"):  # one root problem per device: its step count is the device's own
        np.testing.assert_array_equal(steps_sm, steps)
    device_steps = np.asarray(steps_sm).reshape(n, -1).max(axis=1)
    assert len(set(device_steps.tolist())) > 1, f"devices should stop after different step counts: {device_steps}"
    check_close("shard_map value", value_sm, value, rtol)
    loss_sm, grads_sm = loss_and_grad(sharded)(params, x_manual)
    check_close("shard_map loss", loss_sm, loss, rtol)
    check_close("shard_map grad", grads_sm, grads, rtol)

    auto = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x_auto = jax.device_put(x, NamedSharding(auto, P("data")))
    params_auto = jax.device_put(params, NamedSharding(auto, P()))
    loss_jit, grads_jit = loss_and_grad(solve)(params_auto, x_auto)
    check_close("sharded-input jit loss", loss_jit, loss, rtol)
    check_close("sharded-input jit grad", grads_jit, grads, rtol)


def main(solver_name, grad_names):
    for grad_name in grad_names:
        print(json.dumps({"start": [solver_name, grad_name]}), flush=True)
        try:
            run_combination(solver_name, grad_name)
            error = None
        except Exception as exc:  # reported to the parent, which fails the combination's test with it
            error = f"{type(exc).__name__}: {exc}"[:3000]
        print(json.dumps({"solver": solver_name, "grad": grad_name, "ok": error is None, "error": error}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
