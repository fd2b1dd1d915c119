"""Forward solvers on a trained MDEQ's test equilibria, without retraining.

Loads the newest checkpoint of a ``jdeq train mdeq`` run and solves every test image's equilibrium with each
solver named in ``--solvers`` (the same parameters, tolerance and data split), one row per solver: test accuracy,
converged fraction at the run's tolerance, mean and largest forward steps, the largest relative residual, and the
test images whose solve did not converge.

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


def solve_test_split(params, model: MDEQClassifier, x: np.ndarray, y: np.ndarray, batch: int) -> dict:
    """``model``'s test accuracy and forward solves (fixed-size padded batches, one compilation): converged
    fraction, mean and largest steps, largest relative residual, the indices of the non-converged images."""

    @jax.jit
    def apply(images):
        logits, state = model.apply({"params": params}, images, mutable=["intermediates"])
        (stats,) = forward_stats(state)
        return jnp.argmax(logits, -1), stats.converged, stats.num_steps, stats.residual

    parts = []
    for start in range(0, len(x), batch):
        xb = x[start : start + batch]
        pad = batch - len(xb)
        out = jax.device_get(apply(np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])))
        parts.append([np.asarray(o)[: len(xb)] for o in out])
    pred, converged, steps, residual = (np.concatenate(p) for p in zip(*parts))
    return {
        "accuracy": float(np.mean(pred == y)),
        "fwd_converged_fraction": float(np.mean(converged)),
        "fwd_mean_steps": float(np.mean(steps)),
        "fwd_max_steps": int(np.max(steps)),
        "fwd_max_residual": float(np.max(residual)),
        "not_converged": [int(i) for i in np.flatnonzero(~converged)],
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the output directory of a `jdeq train mdeq` run (digits)")
    parser.add_argument("--solvers", nargs="+", default=None, help="names from candidates() (default: all)")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    config = json.loads((Path(args.run) / "metrics.json").read_text())["config"]
    config.setdefault("solver", "anderson")  # runs from before the option trained with Anderson
    data = load_digits(seed=config["seed"], flatten=False)
    trained = cli.zoo_model(argparse.Namespace(**config), data)  # the run's own model: its checkpoint's fields
    params = load(Path(args.run) / "checkpoints", trained)
    solvers = candidates(args.tol)
    rows = []
    for name in args.solvers or list(solvers):
        began = time.process_time()
        row = solve_test_split(params, trained.clone(solver=solvers[name]), data.x_test, data.y_test, args.batch_size)
        row = {"run": args.run, "solver": name, "solver_repr": repr(solvers[name]), **row}
        row["cpu_s"] = time.process_time() - began
        print(json.dumps({k: v for k, v in row.items() if k != "solver_repr"}), flush=True)
        rows.append(row)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
