"""Forward solvers on a trained MDEQ's test equilibria, without retraining.

Loads the newest checkpoint of a ``jdeq train mdeq`` run and solves every test image's equilibrium with each
solver named in ``--solvers`` (the same parameters, tolerance and data split), one row per solver: test accuracy,
converged fraction at the run's tolerance, mean and largest forward steps, the largest relative residual, and the
test images whose solve did not converge; with ``--repeats N``, the process CPU time of a pass over the test
split per solver (compiled beforehand; solvers interleaved; run it with one thread,
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``).

    python -m benchmarks.mdeq_solvers runs/mdeq --out benchmarks/results/zoo-mdeq-solvers.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdeq import Anderson, FixedPoint, cli
from jdeq.data import load_digits
from jdeq.models import MDEQClassifier
from jdeq.nn import forward_stats
from jdeq.solvers import Fallback
from jdeq.train import load


def candidates(tol: float) -> dict:
    """The solvers compared, by name, all to the relative residual ``tol`` and keeping the lowest-residual iterate."""
    common = dict(tol=tol, return_best=True)
    anderson, plain = Anderson(m=5), FixedPoint()
    return {
        "anderson-40": Anderson(m=5, max_steps=40, **common),
        "anderson-100": Anderson(m=5, max_steps=100, **common),
        "fixedpoint-200": FixedPoint(max_steps=200, **common),
        "fallback-fp-p8-100": Fallback(stages=(anderson, plain), patience=8, max_steps=100, **common),
        "fallback-fp-p8-300": Fallback(stages=(anderson, plain), patience=8, max_steps=300, **common),
        "fixedpoint-300": FixedPoint(max_steps=300, **common),
        "fallback-fp-p8-60": Fallback(stages=(anderson, plain), patience=8, max_steps=60, **common),
        "fallback-fp-p4-60": Fallback(stages=(anderson, plain), patience=4, max_steps=60, **common),
        "fallback-fp0.5-p8-100": Fallback(
            stages=(anderson, FixedPoint(damping=0.5)), patience=8, max_steps=100, **common
        ),
        "fallback-aa-p8-100": Fallback(stages=(anderson, anderson, plain), patience=8, max_steps=100, **common),
    }


def compiled(params, model: MDEQClassifier):
    """``images ↦ (predicted classes, converged, steps, relative residual)`` of ``model``, jitted."""

    @jax.jit
    def apply(images):
        logits, state = model.apply({"params": params}, images, mutable=["intermediates"])
        (stats,) = forward_stats(state)
        return jnp.argmax(logits, -1), stats.converged, stats.num_steps, stats.residual

    return apply


def padded_batches(x: np.ndarray, batch: int) -> list[tuple[np.ndarray, int]]:
    """``x`` in batches of ``batch`` (the last one padded with zero images: one compiled shape), each with its
    number of real images."""
    out = []
    for start in range(0, len(x), batch):
        xb = x[start : start + batch]
        out.append((np.concatenate([xb, np.zeros((batch - len(xb), *xb.shape[1:]), xb.dtype)]), len(xb)))
    return out


def solve_test_split(apply, batches: list, y: np.ndarray) -> dict:
    """The test accuracy and forward solves: converged fraction, mean and largest steps, largest relative
    residual, the indices of the non-converged images."""
    parts = [[np.asarray(o)[:n] for o in jax.device_get(apply(xb))] for xb, n in batches]
    pred, converged, steps, residual = (np.concatenate(p) for p in zip(*parts))
    return {
        "accuracy": float(np.mean(pred == y)),
        "fwd_converged_fraction": float(np.mean(converged)),
        "fwd_mean_steps": float(np.mean(steps)),
        "fwd_max_steps": int(np.max(steps)),
        "fwd_max_residual": float(np.max(residual)),
        "not_converged": [int(i) for i in np.flatnonzero(~converged)],
    }


def cpu_times(applies: dict, batches: list, repeats: int) -> dict:
    """Per solver, the process CPU seconds of one pass over ``batches`` (compiled beforehand), solvers interleaved
    in each of ``repeats`` rounds: ``{name: {"min", "median", "max"}}``."""
    times: dict = {name: [] for name in applies}
    for _ in range(repeats):
        for name, apply in applies.items():
            began = time.process_time()
            for xb, _ in batches:
                jax.block_until_ready(apply(xb))
            times[name].append(time.process_time() - began)
    return {name: {"min": min(t), "median": float(np.median(t)), "max": max(t)} for name, t in times.items()}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the output directory of a `jdeq train mdeq` run (digits)")
    parser.add_argument("--solvers", nargs="+", default=None, help="names from candidates() (default: all)")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=0, help="time each solver's pass over the test split")
    parser.add_argument("--out", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    config = json.loads((Path(args.run) / "metrics.json").read_text())["config"]
    config.setdefault("solver", "anderson")  # runs from before the option trained with Anderson
    data = load_digits(seed=config["seed"], flatten=False)
    trained = cli.zoo_model(argparse.Namespace(**config), data)  # the run's own model: its checkpoint's fields
    params = load(Path(args.run) / "checkpoints", trained)
    solvers = candidates(args.tol)
    batches = padded_batches(data.x_test, args.batch_size)
    applies, rows = {}, []
    for name in args.solvers or list(solvers):
        began = time.process_time()
        applies[name] = compiled(params, trained.clone(solver=solvers[name]))
        row = {"run": args.run, "solver": name, "solver_repr": repr(solvers[name])}
        row.update(solve_test_split(applies[name], batches, data.y_test))
        row["cpu_s"] = time.process_time() - began  # with the compilation
        print(json.dumps({k: v for k, v in row.items() if k != "solver_repr"}), flush=True)
        rows.append(row)
    if args.repeats:
        for row, (name, times) in zip(rows, cpu_times(applies, batches, args.repeats).items()):
            row["test_split_cpu_s"] = times
            print(name, "CPU seconds per pass over the test split (min, median, max):", times, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
