"""The ``jdeq`` command: ``jdeq demo`` trains a DEQ on bundled real data; ``jdeq solvers`` compares solvers;
``jdeq reproduce`` runs the paper reproductions."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import Anderson, Broyden, FixedPoint, Newton, Result, fixed_point_batch, summarize


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
        "Newton": Newton(tol=1e-5, max_steps=200),
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
                    **{key: float(value) for key, value in jax.device_get(summarize(sol.stats)).items()},
                    "mean_evals": float(np.mean(st.num_evals)),
                    "nonconverged_result": _most_common_failure(st.result),
                    "ms": 1e3 * elapsed,
                }
            )
    return rows


def _most_common_failure(results) -> str:
    failed = results[results != Result.CONVERGED]
    return "-" if failed.size == 0 else Result.name(np.bincount(failed).argmax())


SOLVER_COLUMNS = [
    ("radius", "radius", ">6.2f"),
    ("solver", "solver", "<14"),
    ("mean steps", "mean_steps", ">10.1f"),
    ("max steps", "max_steps", ">9.0f"),
    ("evals", "mean_evals", ">6.1f"),
    ("max resid", "max_residual", ">10.2e"),
    ("converged", "converged_fraction", ">9.1%"),
    ("failure", "nonconverged_result", ">9"),
    ("ms", "ms", ">8.1f"),
]
HISTORY_COLUMNS = [
    ("epoch", "epoch", ">5d"),
    ("loss", "loss", ">7.4f"),
    ("train acc", "accuracy", ">9.2%"),
    ("test acc", "test_accuracy", ">8.2%"),
    ("fwd mean", "fwd_mean_steps", ">8.1f"),
    ("fwd max", "fwd_max_steps", ">7.0f"),
    ("bwd mean", "bwd_mean_steps", ">8.1f"),
    ("bwd max", "bwd_max_steps", ">7.0f"),
    ("fwd resid max", "fwd_max_residual", ">13.2e"),
]


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse then prints a one-line usage error, not a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def print_table(columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """Print ``rows`` under ``columns`` given as ``(title, key, format spec)``."""
    widths = [max(len(title), len(format(rows[0][key], spec))) for title, key, spec in columns]
    header = " ".join(f"{title:>{width}}" for (title, _, _), width in zip(columns, widths))
    print(header)
    print("-" * len(header))
    for r in rows:
        print(" ".join(f"{format(r[key], spec):>{width}}" for (_, key, spec), width in zip(columns, widths)))


def _solvers_command(args) -> None:
    print(
        f"jdeq solvers: batch {args.batch} × width {args.width}, f(z) = tanh(W z + x), per-sample solves, {jax.default_backend()}"
    )
    print_table(SOLVER_COLUMNS, solver_table(args.batch, args.width, args.radii, args.seed))


GRADIENT_MODES = ("implicit", "phantom", "shine", "unrolled")
SOLVERS = {"anderson": Anderson, "broyden": Broyden, "fixedpoint": FixedPoint}


def demo_model(args, data) -> Any:
    """The demo's classifier: a DEQ over ``MLPCell(args.width)`` with the chosen solver, gradient mode and API,
    and with ``args.warm_start`` a fixed-point cache of every training example (warm starts)."""
    from flax import nnx

    from . import Implicit, Phantom, Shine, Unrolled
    from .models import MLPCell
    from .nn import DEQ, NNXDEQ, DEQClassifier, NNXDEQClassifier

    solver = SOLVERS[args.solver](tol=args.tol, max_steps=args.max_steps)
    grad = {"implicit": Implicit(solver), "phantom": Phantom(k=5), "shine": Shine(), "unrolled": Unrolled()}[args.grad]
    cell = MLPCell(args.width)
    options = dict(solver=solver, grad=grad, cache_size=len(data.x_train) if args.warm_start else None)
    if args.api == "linen":
        return DEQClassifier(DEQ(cell, **options), data.num_classes)
    rngs = nnx.Rngs(args.seed)
    deq = NNXDEQ(cell, data.x_train.shape[1:], rngs=rngs, **options)
    return NNXDEQClassifier(deq, args.width, data.num_classes, rngs=rngs)


def demo_optimizer(args, data) -> Any:
    """The demo's optimizer: AdamW with a cosine decay of ``args.lr`` over the run's steps."""
    import optax

    steps = args.epochs * (len(data.x_train) // args.batch_size)
    return optax.adamw(optax.cosine_decay_schedule(args.lr, steps), weight_decay=args.weight_decay)


def _demo_command(args) -> None:
    from .data import load_digits
    from .train import fit
    from .train._lock import writable_directory

    try:
        out = writable_directory(args.out)
    except ValueError as err:
        raise SystemExit(f"jdeq demo: --out {err}") from None
    data = load_digits(seed=args.seed)
    model, optimizer = demo_model(args, data), demo_optimizer(args, data)
    warm = ", warm starts" if args.warm_start else ""
    print(
        f"jdeq demo: DEQ-MLP (width {args.width}, {args.solver}, {args.grad} gradients, {args.api}{warm}) on digits "
        f"({len(data.x_train)} train / {len(data.x_test)} test), {args.epochs} epochs, {jax.default_backend()}"
    )
    result = fit(model, optimizer, data, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    print_table(HISTORY_COLUMNS, result.history)
    last = result.history[-1]
    metrics = {
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "test_forward_steps_mean": last["test_fwd_mean_steps"],
        "test_forward_steps_max": last["test_fwd_max_steps"],
        "train_forward_steps_mean": last["fwd_mean_steps"],
        "train_forward_steps_max": last["fwd_max_steps"],
        "train_backward_steps_mean": last["bwd_mean_steps"],
        "train_backward_steps_max": last["bwd_max_steps"],
        "wall_time_s": result.wall_time_s,
        "backend": jax.default_backend(),
        "config": {k: v for k, v in vars(args).items() if k != "run"},
        "history": result.history,
    }
    metrics_path, figure = write_outputs(out, metrics, result.history, f"DEQ-MLP on digits (seed {args.seed})")
    print(
        f"test accuracy {last['test_accuracy']:.2%}, forward steps mean {last['test_fwd_mean_steps']:.1f} / max "
        f"{last['test_fwd_max_steps']:.0f}, wall time {result.wall_time_s:.1f} s -> {metrics_path}, {figure}"
    )


def write_outputs(out: Path, metrics: dict, history: list[dict], title: str) -> tuple[Path, Path]:
    """Write ``out/metrics.json`` and ``out/training.png`` (:func:`jdeq.plots.plot_history`) as a pair: both are
    written to a temporary directory in ``out``, then renamed into place with SIGINT held off, so an interrupt
    leaves both files of the previous run or both of this one."""
    from .plots import plot_history

    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=out))
    try:
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_history(history, staging / "training.png", title)
        with _sigint_held():
            for name in ("training.png", "metrics.json"):
                os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "metrics.json", out / "training.png"


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Defer SIGINT (Ctrl-C) to the end of the block, then deliver it to the previous handler."""
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


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
        invalid = [r.run for r in results.runs if not r.valid]
        if invalid:
            print(f"  {len(invalid)} run(s) with a non-converged equilibrium (valid=false in results.json): {invalid}")
    if failed:
        print(f"{len(failed)} claim(s) did not hold as measured (reported with holds=false in results.json).")


def parser() -> argparse.ArgumentParser:
    """The ``jdeq`` command line: ``parser().parse_args(["demo"])`` gives the demo's defaults."""
    parser = argparse.ArgumentParser(prog="jdeq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a DEQ-MLP on scikit-learn's digits; writes metrics.json and a figure",
        description="Train a DEQ-MLP classifier on scikit-learn's bundled digits, then write OUT/metrics.json "
        "and OUT/training.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--epochs", type=_positive_int, default=20, help="training epochs")
    demo.add_argument("--batch-size", type=_positive_int, default=64, help="samples per step")
    demo.add_argument("--width", type=_positive_int, default=256, help="width of the equilibrium state z")
    demo.add_argument("--solver", choices=list(SOLVERS), default="anderson", help="forward (and adjoint) solver")
    demo.add_argument("--grad", choices=GRADIENT_MODES, default="implicit", help="gradient mode (docs/gradients.md)")
    demo.add_argument("--api", choices=("linen", "nnx"), default="linen", help="Flax API of the model")
    demo.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, cosine decay)")
    demo.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    demo.add_argument("--tol", type=float, default=1e-4, help="solver tolerance (relative residual)")
    demo.add_argument("--max-steps", type=_positive_int, default=40, help="solver step budget")
    demo.add_argument("--seed", type=int, default=0, help="data split, initialisation and batch order")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument(
        "--warm-start",
        action="store_true",
        help="start each training example's solve from its last equilibrium (a per-example fixed-point cache)",
    )
    demo.set_defaults(run=_demo_command)
    solvers = sub.add_parser("solvers", help="compare the solvers on a batch of tanh fixed points")
    solvers.add_argument("--batch", type=int, default=256)
    solvers.add_argument("--width", type=int, default=64)
    solvers.add_argument("--radii", type=float, nargs="+", default=[0.9, 1.5])
    solvers.add_argument("--seed", type=int, default=0)
    solvers.set_defaults(run=_solvers_command)
    p = sub.add_parser("reproduce", help="reproduce the measured claims of the global-convergence papers")
    p.add_argument("paper", choices=["kawaguchi2021", "gao2022", "ling2023", "all"])
    p.add_argument("--quick", action="store_true", help="small sizes (all three in a few minutes on a CPU)")
    p.add_argument("--out", default="runs/reproduce", help="results go to OUT/<paper>/ (default: runs/reproduce)")
    p.set_defaults(run=_reproduce_command)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
