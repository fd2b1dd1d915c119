"""The ``jdeq`` command: ``jdeq demo`` runs the main job on bundled defaults; ``jdeq solvers`` compares solvers;
``jdeq reproduce`` runs the paper reproductions."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import Anderson, Broyden, FixedPoint, Result, fixed_point_batch


def tanh_problem(key, batch: int, width: int, radius: float):
    """``f(z, x, W) = tanh(W z + x)`` with ``W`` rescaled to spectral radius ``radius``; returns ``(f, x, W)``."""
    kw, kx = jax.random.split(key)
    w = jax.random.normal(kw, (width, width)) / np.sqrt(width)
    w = w * radius / np.max(np.abs(np.linalg.eigvals(np.asarray(w))))
    x = jax.random.normal(kx, (batch, width))
    return (lambda z, x, w: jnp.tanh(w @ z + x)), x, w


def solver_table(batch: int = 256, width: int = 64, radii: Sequence[float] = (0.9, 1.5), seed: int = 0) -> list[dict]:
    """Solve a batch of tanh fixed points with each solver; one row per (radius, solver)."""
    solvers = {
        "FixedPoint": FixedPoint(tol=1e-5, max_steps=200),
        "Anderson(m=5)": Anderson(tol=1e-5, max_steps=200, m=5),
        "Broyden(m=20)": Broyden(tol=1e-5, max_steps=200, m=20),
        "Broyden+LS": Broyden(tol=1e-5, max_steps=200, m=20, line_search=True),
    }
    rows = []
    for radius in radii:
        f, x, w = tanh_problem(jax.random.PRNGKey(seed), batch, width, radius)
        z0 = jnp.zeros_like(x)
        for name, solver in solvers.items():
            solve = jax.jit(lambda z0, x, w, s=solver, f=f: fixed_point_batch(f, z0, x, w, in_axes=(0, None), solver=s))
            jax.block_until_ready(solve(z0, x, w))
            start = time.perf_counter()
            sol = jax.block_until_ready(solve(z0, x, w))
            elapsed = time.perf_counter() - start
            st = jax.device_get(sol.stats)
            rows.append(
                {
                    "radius": radius,
                    "solver": name,
                    "mean_steps": float(np.mean(st.num_steps)),
                    "max_steps": int(np.max(st.num_steps)),
                    "mean_evals": float(np.mean(st.num_evals)),
                    "max_residual": float(np.max(st.residual)),
                    "converged": float(np.mean(st.converged)),
                    "nonconverged_result": _most_common_failure(st.result),
                    "ms": 1e3 * elapsed,
                }
            )
    return rows


def _most_common_failure(results) -> str:
    failed = results[results != Result.CONVERGED]
    return "-" if failed.size == 0 else Result.name(np.bincount(failed).argmax())


def print_table(rows: list[dict]) -> None:
    header = f"{'radius':>6}  {'solver':<14} {'mean steps':>10} {'max steps':>9} {'evals':>6} {'max resid':>10} {'converged':>9} {'failure':>9} {'ms':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['radius']:>6.2f}  {r['solver']:<14} {r['mean_steps']:>10.1f} {r['max_steps']:>9d} {r['mean_evals']:>6.1f} "
            f"{r['max_residual']:>10.2e} {r['converged']:>8.1%} {r['nonconverged_result']:>9} {r['ms']:>8.1f}"
        )


def _solvers_command(args) -> None:
    print(
        f"jdeq solvers: batch {args.batch} × width {args.width}, f(z) = tanh(W z + x), per-sample solves, {jax.default_backend()}"
    )
    print_table(solver_table(args.batch, args.width, args.radii, args.seed))


def _reproduce_command(args) -> None:
    from .experiments import EXPERIMENTS, save_results

    names = list(EXPERIMENTS) if args.paper == "all" else [args.paper]
    failed = []
    for name in names:
        module = EXPERIMENTS[name]
        results = module.run(module.QUICK if args.quick else module.FULL)
        folder = save_results(results, args.out)
        print(results.summary())
        print(f"  -> {folder / 'results.json'}")
        failed += [f"{name}: {c.claim}" for c in results.claims if not c.holds]
    if failed:
        print(f"{len(failed)} claim(s) did not hold as measured (reported with holds=false in results.json).")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jdeq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("demo", "run the main job on bundled defaults"), ("solvers", "compare the solvers")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--batch", type=int, default=256)
        p.add_argument("--width", type=int, default=64)
        p.add_argument("--radii", type=float, nargs="+", default=[0.9, 1.5])
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(run=_solvers_command)
    p = sub.add_parser("reproduce", help="reproduce the measured claims of the global-convergence papers")
    p.add_argument("paper", choices=["kawaguchi2021", "gao2022", "ling2023", "all"])
    p.add_argument("--quick", action="store_true", help="small sizes (all three in a few minutes on a CPU)")
    p.add_argument("--out", default="runs/reproduce", help="results go to OUT/<paper>/ (default: runs/reproduce)")
    p.set_defaults(run=_reproduce_command)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
