"""Per-step cost of each jdeq solver next to one evaluation of f, and the default solver on one small problem.

    python -m benchmarks.step_cost --sizes 64x256,256x64 --steps 40

``step_cost_rows``: every solver runs a fixed budget of ``--steps`` iterations (a tolerance no
float32 solve reaches, divergence checks off) on the ``mlp_moderate`` map, per sample
(``fixed_point_batch``) and as one whole-batch problem; time / steps taken (the worst sample's) is
the cost of a step, and the FixedPoint row is the cost of ``f`` plus the driver. The ``f`` row, timed
interleaved with them, is ``--steps`` evaluations of ``f`` chained in a ``fori_loop``, per evaluation:
the denominator of M1 (FixedPoint step / f) in ``docs/benchmarks.md``; M2 is Anderson step / FixedPoint step.
The ``floor`` row (:func:`per_sample_floor`) is the least loop with a per-sample stopping test, for scale.
``--anderson-floor`` adds the rows of :func:`per_sample_anderson_floor`: that loop with the parts of an Anderson
step added one at a time (``floor+writes``, ``floor+gram``, ``floor+solve``, ``floor+mix``), what each part costs
written by hand, the last row the least an Anderson step costs in XLA (its iterates equal ``jdeq.Anderson``'s).
``single_problem_rows``: the default ``jdeq.Anderson()`` on one 64-state ``mlp_easy`` problem against a
plain ``lax.while_loop`` fixed-point iteration of the same map with the same stopping rule.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

import jdeq

from .timing import clock_for, interleaved_ms, jax_call, set_cpu_threads
from .workloads import mlp_workload

SOLVERS = (jdeq.FixedPoint, jdeq.Anderson, jdeq.Broyden)
ANDERSON_PARTS = ("writes", "gram", "solve", "mix")


def _spread_per(spread: dict, per: float) -> dict:
    return {k: (v / per if k != "repeats" else v) for k, v in spread.items()}


def step_cost_rows(
    batch: int, width: int, steps: int, repeats: int, clock: Callable, anderson_floor: bool = False
) -> list[dict]:
    """One row per (solver, mode): microseconds per step (min/median/max) and the steps it took.

    ``anderson_floor``: also a row per part of :func:`per_sample_anderson_floor` (methods ``floor+writes`` ...).
    """
    w = mlp_workload("mlp_moderate", batch, width)
    params, x = jax.device_put(w.params), jnp.asarray(w.data["x"])
    z0 = jnp.zeros((batch, width), jnp.float32)
    one = w.one_sample_map()
    budget = dict(tol=1e-30, max_steps=steps, divergence=float("inf"))

    # params, x and z0 are arguments of the jitted calls, as in a solver's use: closed over, they would be
    # constants that XLA folds into the program
    def per_sample(solver, params, x, z0):
        sol = jdeq.fixed_point_batch(one, z0, params, x, in_axes=(None, 0), solver=solver)
        return sol.value, jnp.max(sol.stats.num_steps)

    def whole_batch(solver, params, x, z0):
        sol = jdeq.fixed_point(w.jax_map, z0, params, x, solver=solver)
        return sol.value, sol.stats.num_steps

    def floor(params, x, z0):
        z, taken = per_sample_floor(lambda z: w.jax_map(z, params, x), budget["tol"], steps)(z0)
        return z, jnp.max(taken)

    def chained(params, x, z0):
        return jax.lax.fori_loop(0, steps, lambda _, z: w.jax_map(z, params, x), z0), jnp.asarray(steps)

    variants = {
        (cls.__name__.lower(), mode): jax.jit(functools.partial(build, cls(**budget)))
        for cls in SOLVERS
        for mode, build in (("per-sample", per_sample), ("whole-batch", whole_batch))
    }
    variants["floor", "per-sample"] = jax.jit(floor)
    for parts in range(1, len(ANDERSON_PARTS) + 1) if anderson_floor else ():

        def anderson_parts(params, x, z0, parts=parts):
            solve = per_sample_anderson_floor(lambda z: w.jax_map(z, params, x), budget["tol"], steps, parts)
            z, taken, memory = solve(z0)
            return (z, memory), jnp.max(taken)

        variants["floor+" + ANDERSON_PARTS[parts - 1], "per-sample"] = jax.jit(anderson_parts)
    variants["f", "chained"] = jax.jit(chained)
    taken = {key: int(fn(params, x, z0)[1]) for key, fn in variants.items()}
    times = interleaved_ms({key: jax_call(fn, params, x, z0) for key, fn in variants.items()}, repeats, clock)
    rows = []
    for (method, mode), spread in times.items():
        us = _spread_per(spread, taken[method, mode] / 1e3)
        rows.append(
            {
                "workload": "step_cost",
                "batch": batch,
                "state_shape": [width],
                "library": "jax" if method == "f" or method.startswith("floor") else "jdeq",
                "method": method,
                "mode": mode,
                "steps": taken[method, mode],
                "us_per_step": us["median"],
                "us_per_step_min": us["min"],
                "us_per_step_max": us["max"],
                "repeats": us["repeats"],
            }
        )
    return rows


def plain_fixed_point(f: Callable, tol: float, max_steps: int) -> Callable:
    """``z ↦ f(z)`` in a ``lax.while_loop`` until ``‖f(z) − z‖ <= tol·‖f(z)‖``: ``(z, evaluations)``."""

    def solve(z0):
        def running(carry):
            z, fz, step = carry
            return (step < max_steps) & (jnp.linalg.norm(fz - z) > tol * jnp.linalg.norm(fz))

        def body(carry):
            _, fz, step = carry
            return fz, f(fz), step + 1

        z, fz, step = jax.lax.while_loop(running, body, (z0, f(z0), 1))
        return fz, step

    return solve


def per_sample_floor(f: Callable, tol: float, max_steps: int) -> Callable:
    """A batch ``(B, n)`` iterated by ``z ↦ f(z)`` in a ``lax.while_loop``, each row until ``‖f(z) − z‖ <= tol·‖f(z)‖``.

    The least a per-sample loop does: freeze the rows that stopped, one reduction per norm, an ``any`` in the
    loop's test; no overflow-safe norms, nonfinite or divergence checks, or verification. ``(z, steps)``.
    """

    def solve(z0):
        def body(carry):
            z, fz, steps, active = carry
            new = active[:, None]
            z, fz = jnp.where(new, fz, z), jnp.where(new, f(fz), fz)
            steps = steps + active.astype(jnp.int32)
            rest = jnp.sum(jnp.square(fz - z), axis=-1) > tol**2 * jnp.sum(jnp.square(fz), axis=-1)
            return z, fz, steps, active & rest & (steps < max_steps)

        start = (z0, f(z0), jnp.zeros(z0.shape[0], jnp.int32), jnp.ones(z0.shape[0], bool))
        _, fz, steps, _ = jax.lax.while_loop(lambda carry: jnp.any(carry[3]), body, start)
        return fz, steps

    return solve


def per_sample_anderson_floor(f: Callable, tol: float, max_steps: int, parts: int = len(ANDERSON_PARTS)) -> Callable:
    """:func:`per_sample_floor` with the first ``parts`` of :data:`ANDERSON_PARTS` of an Anderson step (memory 5).

    Written on the batch, with the memory's slot shared by every row: ``writes`` stores ``g = f(z) − z`` and
    ``f(z)`` in ``(B, 5, n)`` ring buffers (one ``dynamic_update_slice`` each); ``gram`` adds the Gram row
    ``G g`` (a batched product) and its row and column in ``(B, 5, 5)``; ``solve`` adds the coefficients α
    (``jdeq.Anderson``'s own, by the unrolled Cholesky) and the safeguard ``Σ|α_i| <= 10⁴``; ``mix`` steps to
    ``Σ α_i f_i``. Before ``mix`` the step is to ``f(z)`` (plain iteration, the parts' results kept alive). With
    every part its iterates are ``jdeq.Anderson()``'s: an Anderson step without the driver's checks.
    ``(f(z), steps, memory)``: return the memory, or XLA removes the parts whose results nothing reads.
    """
    m = 5
    coefficients = jax.vmap(jdeq.Anderson(m=m, cholesky=True).coefficients, in_axes=(0, None))

    def solve(z0):
        def body(carry):
            z, fz, steps, active, gs, fs, gram, count = carry
            slot, g, x = count % m, fz - z, fz
            gs = lax.dynamic_update_slice_in_dim(gs, g[:, None], slot, axis=1)
            fs = lax.dynamic_update_slice_in_dim(fs, fz[:, None], slot, axis=1)
            if parts >= 2:
                row = jnp.einsum("bmn,bn->bm", gs, g)
                gram = lax.dynamic_update_slice_in_dim(gram, row[:, None, :], slot, axis=1)
                gram = lax.dynamic_update_slice_in_dim(gram, row[:, :, None], slot, axis=2)
            if parts >= 3:
                alpha = coefficients(gram, count + 1)
                ok = (sum(jnp.abs(alpha[:, i]) for i in range(m)) <= 1e4)[:, None]
                alpha = jnp.where(ok, alpha, 0.0)
                mixed = sum(alpha[:, i, None] * fs[:, i] for i in range(m)) if parts >= 4 else fz
                x = jnp.where(ok, mixed, z + g)
            new = active[:, None]
            z, fz = jnp.where(new, x, z), jnp.where(new, f(x), fz)
            steps = steps + active.astype(jnp.int32)
            rest = jnp.sum(jnp.square(fz - z), axis=-1) > tol**2 * jnp.sum(jnp.square(fz), axis=-1)
            return z, fz, steps, active & rest & (steps < max_steps), gs, fs, gram, count + 1

        batch, width = z0.shape
        memory = jnp.zeros((batch, m, width), z0.dtype)
        start = (z0, f(z0), jnp.zeros(batch, jnp.int32), jnp.ones(batch, bool), memory, memory)
        start += (jnp.zeros((batch, m, m), z0.dtype), jnp.zeros((), jnp.int32))
        _, fz, steps, _, gs, fs, gram, _ = lax.while_loop(lambda carry: jnp.any(carry[3]), body, start)
        return fz, steps, (gs, fs, gram)

    return solve


def single_problem_rows(width: int, repeats: int, clock: Callable) -> list[dict]:
    """Default ``Anderson()`` vs a plain ``while_loop`` on one ``width``-state problem: ms per call and NFE."""
    w = mlp_workload("mlp_easy", 1, width)
    params, x = jax.device_put(w.params), jnp.asarray(w.data["x"][0])
    one, solver, z0 = w.one_sample_map(), jdeq.Anderson(), jnp.zeros(width, jnp.float32)

    def anderson(params, x):
        sol = jdeq.fixed_point(one, z0, params, x, solver=solver)
        return sol.value, sol.stats.num_evals

    def plain(params, x):
        return plain_fixed_point(lambda z: one(z, params, x), solver.tol, solver.max_steps)(z0)

    variants = {"anderson": jax.jit(anderson), "plain_while_loop": jax.jit(plain)}
    nfe = {name: int(fn(params, x)[1]) for name, fn in variants.items()}
    times = interleaved_ms({name: jax_call(fn, params, x) for name, fn in variants.items()}, repeats, clock)
    return [
        {
            "workload": "single",
            "batch": 1,
            "state_shape": [width],
            "library": "jdeq" if name == "anderson" else "jax",
            "method": name,
            "mode": "one problem",
            "nfe": nfe[name],
            "fwd_ms": spread["median"],
            "fwd_ms_min": spread["min"],
            "fwd_ms_max": spread["max"],
            "repeats": spread["repeats"],
            "tol": solver.tol,
            "max_steps": solver.max_steps,
        }
        for name, spread in times.items()
    ]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"64x256,256x64"`` → ``[(64, 256), (256, 64)]`` (batch × width)."""
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_cost", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64x256,256x64", help="BATCHxWIDTH list")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="CPU cores for XLA (1: single-threaded Eigen)")
    p.add_argument("--anderson-floor", action="store_true", help="also time per_sample_anderson_floor, part by part")
    args = p.parse_args(argv)
    set_cpu_threads(args.threads)
    clock = clock_for(jax.default_backend())
    print("load average at start", os.getloadavg())
    for batch, width in parse_sizes(args.sizes):
        print(f"batch {batch} x width {width}: microseconds per step or evaluation of f (median [min, max])")
        rows = step_cost_rows(batch, width, args.steps, args.repeats, clock, args.anderson_floor)
        for r in rows:
            print(
                f"  {r['method']:<13} {r['mode']:<12} {r['us_per_step']:8.1f} "
                f"[{r['us_per_step_min']:.1f}, {r['us_per_step_max']:.1f}]  ({r['steps']} steps)"
            )
        us = {(r["method"], r["mode"]): r["us_per_step"] for r in rows}
        fixed = us["fixedpoint", "per-sample"]
        print(f"  per-sample floor / f = {us['floor', 'per-sample'] / us['f', 'chained']:.2f}")
        for part in ANDERSON_PARTS if args.anderson_floor else ():
            print(f"  floor+{part} / floor = {us['floor+' + part, 'per-sample'] / us['floor', 'per-sample']:.2f}")
        print(
            f"  M1 FixedPoint step / f = {fixed / us['f', 'chained']:.2f}, "
            f"M2 Anderson step / FixedPoint step = {us['anderson', 'per-sample'] / fixed:.2f} (per sample, medians)"
        )
    for r in single_problem_rows(64, args.repeats, clock):
        print(f"one 64-state problem: {r['method']:<17} {1e3 * r['fwd_ms']:8.1f} us per call, NFE {r['nfe']}")
    print("load average at end", os.getloadavg())


if __name__ == "__main__":
    main()
