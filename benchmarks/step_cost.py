"""Per-iteration cost of each jdeq solver next to one evaluation of f (the solver's overhead).

    python -m benchmarks.step_cost --batch 256 --width 64 --steps 50

Runs every solver for exactly ``--steps`` iterations (tolerance 0 is not allowed, so a tiny one with
divergence checks off) on the tanh MLP map, per sample (``jax.vmap``) and as one whole-batch problem,
and prints microseconds per step. ``--clock process`` reports CPU time of this process instead of
wall time: steadier on a shared machine when XLA runs single-threaded.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .timing import set_cpu_threads


def per_step_us(solve, x, steps: int, repeats: int, clock) -> float:
    import jax

    jax.block_until_ready(solve(x))
    times = []
    for _ in range(repeats):
        start = clock()
        jax.block_until_ready(solve(x))
        times.append(clock() - start)
    return 1e6 * float(np.median(times)) / steps


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_cost", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--clock", choices=("wall", "process"), default="wall")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads for XLA")
    args = p.parse_args(argv)
    set_cpu_threads(args.threads)
    import jax
    import jax.numpy as jnp

    import jdeq
    from jdeq.solvers import run

    from .workloads import mlp_workload

    w = mlp_workload("mlp_easy", args.batch, args.width)
    params, x = jax.device_put(w.params), jnp.asarray(w.data["x"])
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    budget = dict(tol=1e-30, max_steps=args.steps, divergence=float("inf"))
    n = args.batch * args.width

    def one(solver):
        return jax.jit(jax.vmap(lambda xi: run(solver, lambda z: w.jax_map(z, params, xi), jnp.zeros(args.width))[0]))

    def whole(solver):
        def fn(z):
            return w.jax_map(z.reshape(args.batch, args.width), params, x).ravel()

        return jax.jit(lambda x: run(solver, fn, jnp.zeros(n))[0])

    print(f"batch {args.batch} x width {args.width}, {args.steps} steps, {args.clock} clock: microseconds per step")
    for cls in (jdeq.FixedPoint, jdeq.Anderson, jdeq.Broyden):
        solver = cls(**budget)
        cost = [per_step_us(make(solver), x, args.steps, args.repeats, clock) for make in (one, whole)]
        print(f"{cls.__name__:<11} per-sample {cost[0]:8.1f}   whole-batch {cost[1]:8.1f}")


if __name__ == "__main__":
    main()
