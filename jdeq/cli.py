"""The ``jdeq`` command: ``jdeq demo`` trains a DEQ on bundled real data; ``jdeq solvers`` compares solvers;
``jdeq reproduce`` runs the paper reproductions; ``jdeq train mdeq|lm`` trains the zoo models."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import Anderson, Broyden, FixedPoint, Newton, Result, fixed_point_batch, summarize
from .models.mdeq import JACOBIAN_WEIGHT


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


def _number(convert: Callable[[str], Any], minimum: float, strict: bool) -> Callable[[str], Any]:
    """argparse type: a finite ``convert(text)`` above ``minimum`` (``> minimum`` if ``strict``, else ``>=``).

    argparse then prints a one-line usage error naming the option, not a traceback or a table of NaN.
    """
    kind = "a whole number" if convert is int else "a number"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            finite = "" if convert is int else "finite and "
            raise argparse.ArgumentTypeError(f"must be {finite}{'>' if strict else '>='} {minimum}, got {text}")
        return value

    return parse


_positive_int = _number(int, 1, strict=False)
_nonnegative_int = _number(int, 0, strict=False)
_positive_float = _number(float, 0.0, strict=True)
_nonnegative_float = _number(float, 0.0, strict=False)


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


def epoch_steps(args, data, command: str) -> int:
    """The training steps of an epoch, ``len(data.x_train) // args.batch_size`` (full batches); SystemExit naming
    ``--batch-size`` (``command`` says whose) when the training set holds no full batch."""
    if args.batch_size > len(data.x_train):
        raise SystemExit(
            f"{command}: --batch-size {args.batch_size} is larger than the training set ({len(data.x_train)} samples)"
        )
    return len(data.x_train) // args.batch_size


def cosine_adamw(args, steps: int) -> Any:
    """The commands' optimizer: AdamW with a cosine decay of ``args.lr`` over the run's ``steps``."""
    import optax

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
    optimizer = cosine_adamw(args, args.epochs * epoch_steps(args, data, "jdeq demo"))
    model = demo_model(args, data)
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


def write_outputs(out: Path, metrics: dict, history: list[dict], title: str, plot=None) -> tuple[Path, Path]:
    """Write ``out/metrics.json`` and ``out/training.png`` (``plot(history, path, title)``, default
    :func:`jdeq.plots.plot_history`) as a pair: both are written to a temporary directory in ``out``, then renamed
    into place with SIGINT held off, so an interrupt leaves both files of the previous run or both of this one."""
    from .plots import plot_history

    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=out))
    try:
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (plot or plot_history)(history, staging / "training.png", title)
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


def _reproduce_one(name: str, quick: bool, out: str) -> dict:
    """Run and save one paper's reproduction; its summary lines, the claims that failed or were not measured,
    its invalid runs, and the process's CPU seconds (one paper per process, so that is the paper's CPU time)."""
    from .experiments import EXPERIMENTS, save_results

    module = EXPERIMENTS[name]
    results = module.run(module.QUICK if quick else module.FULL)
    folder = save_results(results, out)
    return {
        "summary": f"{results.summary()}\n  -> {folder / 'results.json'} ({time.process_time():.0f} s CPU)",
        "failed": [f"{name}: {c.claim}" for c in results.claims if c.holds is False],
        "unmeasured": [f"{name}: {c.claim}" for c in results.claims if c.holds == "unmeasured"],
        "invalid": [r.run for r in results.runs if not r.valid],
    }


def _reproduce_command(args) -> None:
    """Each paper in its own process, ``--jobs`` of them at a time (a fresh process per paper, so the results do
    not depend on how many run side by side); the summaries print as the papers finish."""
    import concurrent.futures
    import multiprocessing

    from .experiments import EXPERIMENTS

    names = list(EXPERIMENTS) if args.paper == "all" else [args.paper]
    failed, unmeasured = [], []
    context = multiprocessing.get_context("spawn")  # never fork a process that has started JAX
    with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(names)), context, max_tasks_per_child=1) as pool:
        running = [pool.submit(_reproduce_one, name, args.quick, args.out) for name in names]
        print(f"running {', '.join(names)} ({min(args.jobs, len(names))} at a time)", flush=True)
        for future in concurrent.futures.as_completed(running):
            outcome = future.result()
            print(outcome["summary"], flush=True)
            failed += outcome["failed"]
            unmeasured += outcome["unmeasured"]
            if outcome["invalid"]:
                print(f"  runs with a non-converged equilibrium (valid=false in results.json): {outcome['invalid']}")
    if failed:
        print(f"{len(failed)} claim(s) did not hold as measured (reported with holds=false in results.json).")
    if unmeasured:
        print(f"{len(unmeasured)} claim(s) measured by no run (holds='unmeasured' in results.json).")


ZOO_MODELS = {"mdeq": "mdeq", "lm": "deq_lm"}


def zoo_data(args) -> Any:
    """The task's data: digits (or CIFAR-10 from ``--cifar10 DIR``) as NHWC images; pydoc text (or ``--text FILE``)
    as windows of ``--length + 1`` characters, the training split cut to its first ``--train-chars``."""
    from .data import load_cifar10, load_digits, load_text

    if args.task == "mdeq":
        return load_cifar10(args.cifar10) if args.cifar10 else load_digits(seed=split_seed(args), flatten=False)
    text = load_text(args.text)
    if args.train_chars:
        text = text._replace(train=text.train[: args.train_chars])
    return text.windows(args.length)


def split_seed(args) -> int | None:
    """The digits split's seed: ``--split-seed``, or ``--seed`` without it (``None`` for CIFAR-10 and text)."""
    if args.task != "mdeq" or args.cifar10:
        return None
    return args.seed if args.split_seed is None else args.split_seed


AUGMENT_PAD = {"digits": 1, "cifar10": 4}
"""``--augment crop``'s zero-padding in pixels per dataset: the paper's 4 for 32×32 CIFAR-10, 1 for 8×8 digits (a
shift by up to an eighth of the image, as 4 of 32 is)."""


def training_data(args, data) -> Any:
    """``fit``'s training data: the Dataset itself (``--augment none``), or with ``--augment crop`` a stream
    ``data(epoch)`` of the batches in-memory training reads (:func:`jdeq.train.epoch_batches` of ``--seed`` and the
    epoch), each image cropped by :func:`jdeq.data.random_crops` (``AUGMENT_PAD``; CIFAR-10 also flipped, digits
    never: a mirrored digit is another symbol) with ``numpy.random.default_rng((seed, epoch, 1))``: deterministic in
    (seed, epoch), so a resumed run reads the batches an uninterrupted one reads."""
    from .data import random_crops
    from .train import epoch_batches

    if args.task != "mdeq" or args.augment == "none":
        return data
    pad, flip = AUGMENT_PAD[data.name], data.name == "cifar10"

    def cropped(epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng((args.seed, epoch, 1))
        for index in epoch_batches(args.seed, epoch, len(data.x_train), args.batch_size):
            yield random_crops(data.x_train[index], pad, rng, flip), data.y_train[index]

    return lambda epoch: SizedBatches(cropped(epoch), len(data.x_train) // args.batch_size)


class SizedBatches:
    """An epoch's batches drawn one by one from ``batches``, with their number: ``fit``'s progress bar then shows
    the run's total steps for a stream."""

    def __init__(self, batches: Iterator, length: int):
        self.batches, self.length = batches, length

    def __iter__(self) -> Iterator:
        return self.batches

    def __len__(self) -> int:
        return self.length


def zoo_model(args, data) -> Any:
    """An :class:`~jdeq.models.MDEQClassifier`, or a :class:`~jdeq.models.DEQTransformerLM` (with ``--depth L`` the
    explicit :class:`~jdeq.models.WeightTiedTransformerLM`) wrapped in :class:`~jdeq.models.TeacherForced`."""
    from .models import MDEQ_SOLVER, DEQTransformerLM, MDEQClassifier, TeacherForced, WeightTiedTransformerLM

    solver = Anderson(m=5, tol=args.tol, max_steps=args.max_steps, return_best=True)
    skip = dict(skip=args.skipdeq, skip_weight=args.skip_weight)
    if args.task == "mdeq":
        if args.solver == "fallback":
            solver = dataclasses.replace(MDEQ_SOLVER, tol=args.tol, max_steps=args.max_steps)
        return MDEQClassifier(data.num_classes, solver=solver, jacobian_weight=args.jacobian_weight, **skip)
    options = dict(dim=args.dim, heads=args.heads, max_len=args.length)
    if args.depth:
        return TeacherForced(WeightTiedTransformerLM(data.num_classes, depth=args.depth, **options))
    lm = DEQTransformerLM(data.num_classes, solver=solver, skip_depth=args.skipdeq_depth, **options, **skip)
    return TeacherForced(lm)


def classification_metrics(outputs: jax.Array, y: jax.Array) -> dict:
    """``{"accuracy": ...}`` of logits against integer labels."""
    return {"accuracy": jnp.mean((jnp.argmax(outputs, -1).astype(y.dtype) == y).astype(jnp.float32))}


def held_out(last: dict, metric: str) -> dict:
    """The test split's ``metric``, ``fwd_mean_steps`` and ``fwd_converged_fraction`` (``None`` for a model without
    DEQ layers, whose evaluation ``fit`` reports without solves) from ``fit``'s last history row: its evaluation after
    the last epoch, which reads every test solve's statistics (the fraction counts each test sample's solve)."""
    solves = ("fwd_mean_steps", "fwd_converged_fraction")
    return {metric: last[f"test_{metric}"], **{key: last.get(f"test_{key}") for key in solves}}


def plot_zoo_history(history: list[dict], path: Path, title: str) -> Path:
    """Loss, the task's metric (accuracy or bits per character), forward steps (NFE) and converged fraction per
    epoch, side by side; a panel whose curves ``history`` lacks is left out (the solver panels of the explicit
    baseline, a model without DEQ layers, for which ``fit`` reports no solves)."""
    from matplotlib.figure import Figure

    metric = "bpc" if "bpc" in history[0] else "accuracy"
    panels = [
        ("loss", [("train", "loss"), ("test", "test_loss")]),
        (metric, [("train", metric), ("test", f"test_{metric}")]),
        ("forward steps (NFE) per sample", [("train", "fwd_mean_steps"), ("test", "test_fwd_mean_steps")]),
        ("converged fraction (train)", [("forward", "fwd_converged_fraction")]),
    ]
    panels = [(label, curves) for label, curves in panels if any(key in history[0] for _, key in curves)]
    fig = Figure(figsize=(4.0 * len(panels), 3.3), layout="constrained")
    epochs = [row["epoch"] for row in history]
    for ax, (label, curves) in zip(fig.subplots(1, len(panels)), panels):
        for name, key in curves:
            if key in history[0]:
                ax.plot(epochs, [row[key] for row in history], marker="o", markersize=3, label=name)
        ax.set(xlabel="epoch", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def parameter_count(params: Any) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))


def _train_command(args) -> None:
    from .models import bits_per_character, teacher_forced_loss
    from .train import fit
    from .train._lock import writable_directory

    try:
        out = writable_directory(args.out)
    except ValueError as err:
        raise SystemExit(f"jdeq train: --out {err}") from None
    if args.task == "lm" and args.skipdeq_depth != 1 and (args.depth or not args.skipdeq):
        raise SystemExit("jdeq train lm: --skipdeq-depth sets the DEQ's SkipDEQ guess: it needs --skipdeq, not --depth")
    if args.task == "lm" and args.dim % args.heads:
        raise SystemExit(f"jdeq train lm: --dim {args.dim} must be a multiple of --heads {args.heads}")
    try:
        data = zoo_data(args)
    except (OSError, ValueError) as err:  # a missing or unreadable file, a text too short for its windows
        raise SystemExit(f"jdeq train {args.task}: {err}") from None
    per_epoch = epoch_steps(args, data, f"jdeq train {args.task}")
    steps = args.epochs * per_epoch
    optimizer, model = cosine_adamw(args, steps), zoo_model(args, data)
    lm = args.task == "lm"
    loss_fn, metrics_fn = (teacher_forced_loss, bits_per_character) if lm else (None, classification_metrics)
    deq = not (lm and args.depth)  # the explicit weight-tied baseline has no DEQ layer
    name = ZOO_MODELS[args.task] if deq else "explicit_lm"
    split = split_seed(args)
    train_data = training_data(args, data)
    print(
        f"jdeq train {args.task}: {name}{' + SkipDEQ' if args.skipdeq and deq else ''} on {data.name} "
        f"({len(data.x_train)} train / {len(data.x_test)} test), {args.epochs} epochs of {per_epoch} "
        f"steps{', crop augmentation' if callable(train_data) else ''}, {jax.default_backend()}"
    )
    result = fit(
        model,
        optimizer,
        train_data,
        eval_data=data,  # the test split, never augmented
        epochs=args.epochs,
        batch_size=None if callable(train_data) else args.batch_size,
        eval_batch_size=args.batch_size,
        seed=args.seed,
        loss_fn=loss_fn,
        metrics_fn=metrics_fn,
        checkpoint_dir=out / "checkpoints",
        # the split's seed only where it is not ``seed``'s and the augmentation only where there is one, so that
        # earlier runs' checkpoints still resume
        config={
            "task": args.task,
            **({} if split in (None, args.seed) else {"split_seed": split}),
            **({} if args.task != "mdeq" or args.augment == "none" else {"augment": args.augment}),
        },
        log_every=5,
    )
    metric = "bpc" if lm else "accuracy"
    test = held_out(result.history[-1], metric)
    converged = test["fwd_converged_fraction"]
    row = {
        "model": name,
        "dataset": data.name,
        "params": parameter_count(result.state.params),
        "metric": metric,
        "value": test[metric],
        "fwd_converged_fraction": converged,
        "fwd_mean_steps": test["fwd_mean_steps"] if deq else args.depth,
        "converged_ok": None if converged is None else converged >= 0.99,
        "skipdeq": bool(args.skipdeq and deq),
        "steps": steps,
        "wall_s": result.wall_time_s,
    }
    metrics = {"row": row, "test": test, "config": {k: v for k, v in vars(args).items() if k != "run"}}
    paths = write_outputs(
        out,
        {**metrics, "history": result.history},
        result.history,
        f"{name} on {data.name}",
        plot_zoo_history,
    )
    flag = "" if converged is None or converged >= 0.99 else "  NOT CONVERGED: below 99 % of the test solves"
    print(
        f"test {metric} {row['value']:.4f}, forward steps {row['fwd_mean_steps']}, converged fraction "
        f"{converged}{flag}; wall time {result.wall_time_s:.1f} s -> {paths[0]}, {paths[1]}"
    )


def _zoo_arguments(p: argparse.ArgumentParser, task: str) -> None:
    """The options of ``jdeq train mdeq`` and ``jdeq train lm`` (defaults that finish in minutes on 2 CPU cores)."""
    mdeq = task == "mdeq"
    p.add_argument("--epochs", type=_positive_int, default=12 if mdeq else 3, help="training epochs")
    p.add_argument("--batch-size", type=_positive_int, default=64 if mdeq else 32, help="samples per step")
    p.add_argument("--lr", type=_positive_float, default=3e-3, help="peak learning rate (AdamW, cosine decay)")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--tol", type=_positive_float, default=1e-3, help="forward solver tolerance (relative residual)")
    p.add_argument("--max-steps", type=_positive_int, default=100 if mdeq else 40, help="forward solver step budget")
    p.add_argument("--skipdeq", action="store_true", help="learn the solver's start (SkipDEQ)")
    p.add_argument("--skip-weight", type=_nonnegative_float, default=1.0, help="the SkipDEQ consistency loss's weight")
    if not mdeq:
        p.add_argument("--skipdeq-depth", type=_positive_int, default=1, help="transformer blocks in the SkipDEQ guess")
    p.add_argument(
        "--seed",
        type=_nonnegative_int,
        default=0,
        help="initialisation and batch order" + (" (digits: also the split unless --split-seed)" if mdeq else ""),
    )
    p.add_argument("--out", default=f"runs/{task}", help="output directory (checkpoints resume from it)")
    if mdeq:
        p.add_argument("--cifar10", default=None, help="train on CIFAR-10's python batches in this directory")
        p.add_argument(
            "--split-seed",
            type=_nonnegative_int,
            default=None,
            help="seed of the digits train/test split (None: --seed's value)",
        )
        p.add_argument(
            "--augment",
            choices=["none", "crop"],
            default="none",
            help="training-time augmentation (the test split never): crop = MDEQ's recipe, zero-pad by P pixels and "
            "crop a random window of the original size (P = 1 for 8×8 digits, 4 for 32×32 CIFAR-10), plus random "
            "horizontal flips on CIFAR-10 only (a mirrored digit is another symbol)",
        )
        p.add_argument(
            "--solver",
            choices=["fallback", "anderson"],
            default="fallback",
            help="forward solver: jdeq.models.MDEQ_SOLVER (Anderson, then fixed-point iteration when it stalls) or "
            "Anderson (m = 5) alone",
        )
        p.add_argument(
            "--jacobian-weight",
            type=_nonnegative_float,
            default=JACOBIAN_WEIGHT,
            help="weight of the Jacobian penalty ‖∂f/∂z‖_F²/d that keeps the map contractive (0: off)",
        )
        return
    p.add_argument("--text", default="pydoc", help='"pydoc" (bundled with Python) or a UTF-8 text file')
    p.add_argument("--train-chars", type=_positive_int, default=100_000, help="train on the first N characters")
    p.add_argument("--length", type=_positive_int, default=64, help="characters per training window")
    p.add_argument("--dim", type=_positive_int, default=64, help="model width")
    p.add_argument("--heads", type=_positive_int, default=4, help="attention heads")
    p.add_argument("--depth", type=_positive_int, default=None, help="train the explicit weight-tied LM of L layers")


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
    demo.add_argument("--lr", type=_positive_float, default=3e-3, help="peak learning rate (AdamW, cosine decay)")
    demo.add_argument("--weight-decay", type=_nonnegative_float, default=1e-4, help="AdamW weight decay")
    demo.add_argument("--tol", type=_positive_float, default=1e-4, help="solver tolerance (relative residual)")
    demo.add_argument("--max-steps", type=_positive_int, default=40, help="solver step budget")
    demo.add_argument("--seed", type=_nonnegative_int, default=0, help="data split, initialisation and batch order")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument(
        "--warm-start",
        action="store_true",
        help="start each training example's solve from its last equilibrium (a per-example fixed-point cache)",
    )
    demo.set_defaults(run=_demo_command)
    solvers = sub.add_parser("solvers", help="compare the solvers on a batch of tanh fixed points")
    solvers.add_argument("--batch", type=_positive_int, default=256)
    solvers.add_argument("--width", type=_positive_int, default=64)
    solvers.add_argument("--radii", type=_positive_float, nargs="+", default=[0.9, 1.5])
    solvers.add_argument("--seed", type=_nonnegative_int, default=0)
    solvers.set_defaults(run=_solvers_command)
    p = sub.add_parser("reproduce", help="reproduce the measured claims of the global-convergence papers")
    p.add_argument("paper", choices=["kawaguchi2021", "gao2022", "ling2023", "all"])
    p.add_argument("--quick", action="store_true", help="small sizes (all three in a few minutes on a CPU)")
    p.add_argument("--out", default="runs/reproduce", help="results go to OUT/<paper>/ (default: runs/reproduce)")
    p.add_argument(
        "--jobs", type=_positive_int, default=2, help="papers run side by side, one process each (default: 2)"
    )
    p.set_defaults(run=_reproduce_command)
    train = sub.add_parser("train", help="train a zoo model: the multiscale DEQ (mdeq) or the DEQ-Transformer LM (lm)")
    tasks = train.add_subparsers(dest="task", required=True)
    for task, text in (
        ("mdeq", "MDEQClassifier on digits (or --cifar10 DIR)"),
        ("lm", "DEQTransformerLM on pydoc text (or --text FILE; --depth L: the explicit baseline)"),
    ):
        p = tasks.add_parser(task, help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _zoo_arguments(p, task)
        p.set_defaults(run=_train_command)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
