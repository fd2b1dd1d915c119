"""Workload 5: one optax training step of ``jdeq.nn.DEQClassifier`` over an ``MLPCell`` (the demo's model).

Digits-shaped data (64 features → 10 classes). The forward time is inference (the logits); the
forward+backward time is the whole jitted step: solve, implicit backward, Adam update.

Its cold-vs-warm variant (:func:`cold_vs_warm`) trains the model for whole epochs on digits, once from
cold starts and once with a per-example fixed-point cache (warm starts), epoch by epoch interleaved:

    python -m benchmarks.training --setting demo     # `jdeq demo`'s defaults
    python -m benchmarks.training --setting train    # workload 5's model and solver, 11 epochs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jdeq
from jdeq import cli
from jdeq.data import Dataset, load_digits
from jdeq.models import MLPCell
from jdeq.nn import DEQ, STATS_COLLECTION, DEQClassifier, forward_stats
from jdeq.train import as_trainable, evaluate, make_eval_step, make_train_step
from jdeq.train._loop import init_state, train_epoch  # fit's own epochs, interleaved with another run's
from jdeq.train._sources import training_source

from .timing import set_cpu_threads

TRAIN_SOLVER = jdeq.Anderson(tol=1e-4, max_steps=100)

FEATURES, CLASSES = 64, 10


def batch(size: int, seed: int = 1):
    """Random digits-shaped data: 64 features in [0, 1], 10 balanced labels."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(size=(size, FEATURES)), jnp.float32), jnp.asarray(rng.integers(0, CLASSES, size))


def model(solver: jdeq.Solver, mode: str, width: int, cache_size: Optional[int] = None) -> DEQClassifier:
    deq = DEQ(MLPCell(width), solver=solver, per_sample=mode == "per-sample", cache_size=cache_size)
    return DEQClassifier(deq, CLASSES)


def make(solver: jdeq.Solver, mode: str, width: int, x: jax.Array) -> tuple[Callable, Callable, tuple]:
    """``(forward(params, x) -> (logits, nfe), step(params, opt_state, x, y), (params, opt_state))``."""
    net, optimizer = model(solver, mode, width), optax.adam(1e-3)
    params = net.init(jax.random.PRNGKey(0), x)["params"]

    def forward(params, x):
        logits, stats = net.apply({"params": params}, x, mutable=[STATS_COLLECTION])
        return logits, jnp.max(forward_stats(stats)[0].num_evals)

    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply({"params": params}, x), y).mean()

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(forward), jax.jit(step), (params, optimizer.init(params))


def cold_vs_warm(
    model_for: Callable[[Optional[int]], Any],
    optimizer: optax.GradientTransformation,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    clock: Callable[[], float] = time.process_time,
) -> list[dict]:
    """One row per (epoch, variant): ``model_for(None)`` trained from cold starts and ``model_for(n)`` with a
    fixed-point cache of the ``n`` training examples, epoch by epoch interleaved with :mod:`jdeq.train`'s own
    steps (``fit``'s seed, batch order and metrics). Each row: the epoch's ``clock`` seconds, its mean forward
    steps per sample, the mean over steps of the batch's largest forward step count, the mean backward (adjoint)
    steps per sample, its training loss and accuracy; the last epoch's rows add the test accuracy."""
    runs = {}
    for variant, cache_size in (("cold", None), ("warm", len(data.x_train))):
        trainable = as_trainable(model_for(cache_size))
        state = init_state(trainable, optimizer, data, seed)
        runs[variant] = [state, make_train_step(trainable, optimizer), make_eval_step(trainable)]
    rows = []
    for epoch in range(epochs):
        for variant, run in runs.items():
            start = clock()
            batches = training_source(data).train_batches(seed, epoch, batch_size)
            run[0], steps = train_epoch(run[1], run[0], batches, seed, epoch, 10, _NO_BAR)
            seconds = clock() - start
            rows.append({"variant": variant, "epoch": epoch + 1, "cpu_s": seconds, **_epoch_metrics(steps)})
    for row in rows[-len(runs) :]:
        state, _, eval_step = runs[row["variant"]]
        row["test_accuracy"] = evaluate(eval_step, state.params, data.x_test, data.y_test, 512)["accuracy"]
    return rows


_NO_BAR = tqdm(disable=True)


def _epoch_metrics(steps: list[dict]) -> dict:
    def mean(key):
        return float(np.mean([s[key] for s in steps]))

    return {
        "fwd_mean_steps": mean("fwd_mean_steps"),
        "fwd_batch_max_steps": mean("fwd_max_steps"),
        "bwd_mean_steps": mean("bwd_mean_steps"),
        "loss": mean("loss"),
        "accuracy": mean("accuracy"),
    }


def summary(rows: list[dict]) -> dict:
    """Per variant over epochs 2..E: CPU seconds per epoch (min/median/max), mean forward steps (per sample and
    the batch's largest), epoch 1's, and the final test accuracy; and the warm / cold ratios."""
    out = {}
    for variant in ("cold", "warm"):
        mine = [r for r in rows if r["variant"] == variant]
        later = mine[1:]
        seconds = [r["cpu_s"] for r in later]
        out[variant] = {
            "epoch_cpu_s": {"min": min(seconds), "median": statistics.median(seconds), "max": max(seconds)},
            "epochs_timed": len(later),
            "fwd_mean_steps": float(np.mean([r["fwd_mean_steps"] for r in later])),
            "fwd_batch_max_steps": float(np.mean([r["fwd_batch_max_steps"] for r in later])),
            "first_epoch_fwd_mean_steps": mine[0]["fwd_mean_steps"],
            "test_accuracy": mine[-1]["test_accuracy"],
        }
    cold, warm = out["cold"], out["warm"]
    out["warm_over_cold"] = {
        "fwd_mean_steps": warm["fwd_mean_steps"] / cold["fwd_mean_steps"],
        "fwd_batch_max_steps": warm["fwd_batch_max_steps"] / cold["fwd_batch_max_steps"],
        "epoch_cpu_s_median": warm["epoch_cpu_s"]["median"] / cold["epoch_cpu_s"]["median"],
    }
    return out


def demo_setting(epochs: Optional[int] = None) -> dict:
    """``cold_vs_warm``'s arguments for ``jdeq demo``'s defaults (its model, optimizer, data, batch size)."""
    args = cli.parser().parse_args(["demo"] + ([] if epochs is None else ["--epochs", str(epochs)]))
    data = load_digits(seed=args.seed)

    def model_for(cache_size):
        return cli.demo_model(argparse.Namespace(**{**vars(args), "warm_start": cache_size is not None}), data)

    options = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    return dict(
        model_for=model_for,
        optimizer=cli.cosine_adamw(args, args.epochs * cli.epoch_steps(args, data, "benchmarks.training")),
        data=data,
        **options,
    )


def train_setting(epochs: int = 11, width: int = 256, batch_size: int = 64) -> dict:
    """``cold_vs_warm``'s arguments for workload 5's model and solver (Adam 1e-3) trained on digits."""
    data = load_digits(seed=0)

    def model_for(cache_size):
        return model(TRAIN_SOLVER, "per-sample", width, cache_size)

    return dict(model_for=model_for, optimizer=optax.adam(1e-3), data=data, epochs=epochs, batch_size=batch_size)


def warm_rows(setting: dict, clock: Callable[[], float]) -> list[dict]:
    """``run.py``'s rows of the cold-vs-warm variant: one per variant, with its per-epoch rows and the summary."""
    epochs = cold_vs_warm(**setting, clock=clock)
    stats = summary(epochs)
    return [
        {
            "workload": "train_warm",
            "variant": variant,
            **stats[variant],
            "warm_over_cold": stats["warm_over_cold"],
            "epochs": [r for r in epochs if r["variant"] == variant],
        }
        for variant in ("cold", "warm")
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description="Cold vs warm starts in training.")
    p.add_argument("--setting", choices=("demo", "train"), default="demo")
    p.add_argument("--epochs", type=int, default=None, help="default: the setting's (demo 20, train 11)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    set_cpu_threads(1)
    setting = demo_setting(args.epochs) if args.setting == "demo" else train_setting(args.epochs or 11)
    rows = cold_vs_warm(**setting, clock=time.process_time)
    result = {"setting": args.setting, "rows": rows, "summary": summary(rows)}
    path = Path(args.out) / f"warm-start-{args.setting}-{time.strftime('%Y-%m-%d')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
