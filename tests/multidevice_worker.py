"""Child process of ``tests/test_multidevice_matrix.py``: one forward solver, several gradient modes, on 8 CPU devices.

``python tests/multidevice_worker.py SOLVER GRAD [GRAD ...]`` runs, for each gradient mode in turn, the solve of a
batch sharded over 8 host devices in two ways, ``jax.shard_map`` (each device solves its own shard, so devices stop
after different numbers of steps) and ``jax.jit`` of the unsharded code called with sharded inputs, and compares the
value and the gradient in the parameters with the same solve on one device. It prints one JSON line per
combination as soon as it is done (``{"solver", "grad", "status", "error"}``), after a ``{"start": ...}`` line, so
that a parent that kills a hung child knows which combination hung. The names are the keys of ``SOLVERS`` and
``GRADS`` below. ``collectives:SOLVER`` instead traces (does not run) the gradient under ``shard_map`` and checks
that no collective sits inside a loop or a branch (:func:`check_collectives`).
"""

import json
import os
import sys

if __name__ == "__main__":  # a child process: 8 CPU devices, before jax starts (the test imports only the names);
    # the test process's compiler flags (tests/conftest.py) are inherited
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {os.environ.get('XLA_FLAGS', '')}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jdeq  # noqa: E402

jax.config.update("jax_enable_x64", True)  # as tests/conftest.py sets them
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

WIDTH, IN_DIM, BATCH = 6, 3, 16
TOL = 1e-10
KRYLOV = jdeq.GMRES(tol=1e-12, max_steps=60, restart=20)  # converges on every system here (‖∂f/∂z‖ ≈ 0.5)

SOLVERS = {
    "fixed_point": jdeq.FixedPoint(tol=TOL, max_steps=300),
    "anderson": jdeq.Anderson(tol=TOL, max_steps=100, m=4),
    "broyden": jdeq.Broyden(tol=TOL, max_steps=100, m=20),
    "broyden_ls": jdeq.Broyden(tol=TOL, max_steps=100, m=20, line_search=True),
    "newton": jdeq.Newton(tol=TOL, max_steps=30),
    "newton_ls": jdeq.Newton(tol=TOL, max_steps=30, line_search=True),
    "newton_gmres": jdeq.Newton(tol=TOL, max_steps=30, linear_solver=KRYLOV),
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
    "implicit_gmres": jdeq.Implicit(KRYLOV),
    "implicit_bicgstab": jdeq.Implicit(jdeq.BiCGStab(tol=1e-12, max_steps=50)),
    "implicit_neumann": jdeq.Implicit(jdeq.Neumann(k=60)),
    "implicit_lineax": jdeq.Implicit(jdeq.Lineax(lineax.GMRES(rtol=1e-12, atol=1e-14, max_steps=50))),
    "implicit_jvp": jdeq.ImplicitJVP(),
    "implicit_jvp_gmres": jdeq.ImplicitJVP(KRYLOV),
    "shine_refined": jdeq.Shine(refine=jdeq.Anderson(tol=1e-12, max_steps=100)),
    "phantom": jdeq.Phantom(k=5),
    "unrolled": jdeq.Unrolled(),
}

RTOL = {"phantom": 1e-6, "implicit_neumann": 1e-6}  # approximate gradients: same approximation, other rounding
ROOT_RTOL = 1e-6
"""``root_`` solves a device's samples as one problem, not the whole batch: the same root to the solver's tolerance
(1e-10), reached by other iterates (which ``Unrolled`` differentiates), so agreement to 1e-6, not 1e-8."""


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
    """Jitted ``(params, x) -> ((loss, (value, per-sample steps)), grad of loss in params)``."""

    def loss(params, x):
        value, steps = solve(x, params)
        return jnp.sum(jnp.sin(value)), (value, steps)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def check_close(name, actual, expected, rtol):
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol, err_msg=f"{name}{jax.tree_util.keystr(path)}")


SHARD_MAP_REJECTS = "cannot solve inside jax.shard_map"
"""The trace-time error of what cannot run inside ``jax.shard_map`` (``Lineax``); it must work under ``jax.jit``."""


def run_combination(solver_name, grad_name):
    """``"works"``, or ``"rejected: <error>"`` for a combination refused at trace time on one device and on 8 alike
    (or, for lineax, inside ``shard_map`` only); an ``AssertionError`` for anything else."""
    params, x = problem()
    solve = solve_fn(solver_name, GRADS[grad_name])
    rtol = ROOT_RTOL if solver_name.startswith("root_") else RTOL.get(grad_name, 1e-8)
    try:
        (loss, (value, steps)), grads = loss_and_grad(solve)(params, x)
    except ValueError as error:  # refused on one device: must be refused the same way on eight
        rejected = str(error)
        for run in (lambda: shard_mapped_loss_and_grad(solve, params, x), lambda: auto_sharded(solve, params, x)):
            try:
                run()
            except ValueError as sharded_error:
                assert str(sharded_error) == rejected, (sharded_error, rejected)
            else:
                raise AssertionError(f"rejected on one device, not on eight: {rejected}")
        return f"rejected: {rejected}"

    (loss_jit, (value_jit, _)), grads_jit = auto_sharded(solve, params, x)
    check_close("sharded-input jit loss", (loss_jit, value_jit), (loss, value), rtol)
    check_close("sharded-input jit grad", grads_jit, grads, rtol)

    try:
        (loss_sm, (value_sm, steps_sm)), grads_sm = shard_mapped_loss_and_grad(solve, params, x)
    except ValueError as error:
        assert SHARD_MAP_REJECTS in str(error), error
        return f"rejected in shard_map: {error}"
    if not solver_name.startswith("root_"):  # one root problem per device: its step count is the device's own
        np.testing.assert_array_equal(steps_sm, steps)
    device_steps = np.asarray(steps_sm).reshape(jax.device_count(), -1).max(axis=1)
    assert len(set(device_steps.tolist())) > 1, f"devices should stop after different step counts: {device_steps}"
    check_close("shard_map loss and value", (loss_sm, value_sm), (loss, value), rtol)
    check_close("shard_map grad", grads_sm, grads, rtol)
    return "works"


def auto_sharded(solve, params, x):
    """The unsharded code under ``jax.jit``, called with ``x`` split over the devices and ``params`` replicated."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    return loss_and_grad(solve)(jax.device_put(params, NamedSharding(mesh, P())), x)


def shard_mapped_loss_and_grad(solve, params, x):
    """:func:`loss_and_grad` of ``solve`` under ``jax.shard_map``: each device solves its shard of ``x``."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharded = jax.shard_map(solve, mesh=mesh, in_specs=(P("data"), P()), out_specs=(P("data"), P("data")))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    return loss_and_grad(sharded)(params, x_sharded)


COLLECTIVES = {"psum", "psum_invariant", "pmax", "pmin", "ppermute", "all_gather", "all_to_all", "psum_scatter"}
CONTROL_FLOW = {"while", "scan", "cond"}


def collectives_in_control_flow(jaxpr, inside=None) -> list:
    """``(collective, enclosing loop or branch)`` for every collective of ``jaxpr`` that sits in a loop or a branch."""
    found = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if inside is not None and name in COLLECTIVES:
            found.append((name, inside))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += collectives_in_control_flow(sub, name if name in CONTROL_FLOW else inside)
    return found


def check_collectives(solver_name, grad_name):
    """``"outside"`` when no collective of the shard_mapped gradient sits in a loop or branch (traced, not run)."""
    params, x = problem()
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    solve = solve_fn(solver_name, GRADS[grad_name])
    sharded = jax.shard_map(solve, mesh=mesh, in_specs=(P("data"), P()), out_specs=(P("data"), P("data")))
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    try:
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(jnp.sin(sharded(x, p)[0]))))(params)
    except ValueError as error:
        return f"rejected: {error}"
    found = collectives_in_control_flow(jaxpr.jaxpr)
    assert not found, f"collectives inside loops or branches: {found}"
    assert collectives_in_control_flow(jaxpr.jaxpr, "top"), "the parameters' cotangents must be summed over devices"
    return "outside"


def main(solver_name, grad_names):
    assert jax.device_count() == 8, jax.device_count()
    run = check_collectives if solver_name.startswith("collectives:") else run_combination
    solver_name = solver_name.removeprefix("collectives:")
    for grad_name in grad_names:
        print(json.dumps({"start": [solver_name, grad_name]}), flush=True)
        try:
            status, error = run(solver_name, grad_name), None
        except Exception as exc:  # reported to the parent, which fails the combination's test with it
            status, error = "failed", f"{type(exc).__name__}: {exc}"[:3000]
        print(json.dumps({"solver": solver_name, "grad": grad_name, "status": status, "error": error}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
