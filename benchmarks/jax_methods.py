"""The JAX methods: jdeq (per-sample and whole-batch), jaxopt and optimistix.

Every method is built as two jitted functions of ``(params, x)``: ``forward`` returning
``(z, nfe)`` and ``forward_backward`` returning the gradient of ``⟨z*, c⟩`` with respect to the
parameters, ``c`` a fixed random cotangent. Each library gets the same tolerance and step budget;
its own stopping rule decides when it stops, and the harness measures the residual it reached.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

import jdeq

from .workloads import Workload


@dataclasses.dataclass(frozen=True)
class Method:
    library: str
    method: str
    mode: str  # "per-sample" (each sample stops on its own residual) or "whole-batch" (one problem)
    build: Callable  # (workload, z_scale) -> (forward, forward_backward) of (params, x)


def _loss_and_grad(forward, cotangent):
    def loss(params, x):
        z, _ = forward(params, x)
        return jnp.vdot(z, cotangent)

    return jax.jit(jax.grad(loss))


def jdeq_method(solver_cls, mode: str, **options) -> Method:
    name = solver_cls.__name__.lower()

    def build(w: Workload, z_scale, cotangent):
        solver = solver_cls(tol=w.tol, max_steps=w.max_steps, **options)
        grad = jdeq.Implicit()  # the adjoint reuses the forward solver and tolerance
        z0 = jnp.zeros((w.batch, *w.state_shape), jnp.float32)
        if mode == "per-sample":
            f = w.one_sample_map()

            def forward(params, x):
                sol = jdeq.fixed_point_batch(f, z0, params, x, in_axes=(None, 0), solver=solver, grad=grad)
                return sol.value, jnp.max(sol.stats.num_evals)
        else:

            def forward(params, x):
                sol = jdeq.fixed_point(w.jax_map, z0, params, x, solver=solver, grad=grad)
                return sol.value, sol.stats.num_evals

        return jax.jit(forward), _loss_and_grad(forward, cotangent)

    return Method("jdeq", name, mode, build)


def jaxopt_method(kind: str) -> Method:
    def build(w: Workload, z_scale, cotangent):
        import jaxopt
        from jaxopt.linear_solve import solve_gmres

        atol = w.tol * z_scale  # jaxopt stops on an absolute error: scale the relative tolerance by ‖z*‖
        backward = functools.partial(solve_gmres, tol=w.tol)
        common = dict(maxiter=w.max_steps, tol=atol, implicit_diff=True, implicit_diff_solve=backward, jit=True)
        if kind == "fixed_point":
            solver = jaxopt.FixedPointIteration(fixed_point_fun=w.jax_map, **common)
        elif kind == "anderson":
            solver = jaxopt.AndersonAcceleration(fixed_point_fun=w.jax_map, history_size=5, ridge=1e-4, **common)
        else:
            solver = jaxopt.Broyden(fun=lambda z, params, x: w.jax_map(z, params, x) - z, history_size=20, **common)
        z0 = jnp.zeros((w.batch, *w.state_shape), jnp.float32)

        def forward(params, x):
            params_out, state = solver.run(z0, params, x)
            return params_out, state.num_fun_eval

        return jax.jit(forward), _loss_and_grad(forward, cotangent)

    return Method("jaxopt", kind, "whole-batch", build)


def optimistix_method() -> Method:
    def build(w: Workload, z_scale, cotangent):
        import lineax as lx
        import optimistix as optx

        solver = optx.FixedPointIteration(rtol=w.tol, atol=1e-3 * w.tol, norm=optx.rms_norm)
        adjoint = optx.ImplicitAdjoint(linear_solver=lx.GMRES(rtol=w.tol, atol=1e-3 * w.tol))
        z0 = jnp.zeros((w.batch, *w.state_shape), jnp.float32)

        def fn(z, args):
            params, x = args
            return w.jax_map(z, params, x)

        def forward(params, x):
            sol = optx.fixed_point(fn, solver, z0, (params, x), max_steps=w.max_steps, adjoint=adjoint, throw=False)
            return sol.value, sol.stats["num_steps"]

        return jax.jit(forward), _loss_and_grad(forward, cotangent)

    return Method("optimistix", "fixed_point", "whole-batch", build)


def jdeq_methods() -> list[Method]:
    solvers = (jdeq.FixedPoint, jdeq.Anderson, jdeq.Broyden)
    return [jdeq_method(cls, mode) for mode in ("per-sample", "whole-batch") for cls in solvers]


def peer_jax_methods() -> list[Method]:
    return [jaxopt_method("fixed_point"), jaxopt_method("anderson"), jaxopt_method("broyden"), optimistix_method()]
