"""Training DEQ classifiers with optax: jitted train/eval steps, solver metrics, progress, orbax checkpoints.

A run is a pure function of its seed: parameters come from ``PRNGKey(seed)`` and the batch order of
epoch ``e`` from ``numpy.random.default_rng((seed, e))``. Checkpoints are written at the end of each
epoch, so a run resumed from its last checkpoint replays exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from .data import Dataset, check_dataset
from .nn import STATS_COLLECTION
from .stats import read_backward_stats, stats_probe, summarize

CHECKPOINTS_KEPT = 3


class TrainState(NamedTuple):
    """What a step updates: ``params`` (the model's ``"params"`` collection) and the optimizer state."""

    params: Any
    opt_state: Any


class FitResult(NamedTuple):
    """``state`` after the last epoch, one ``history`` row (a dict of floats) per epoch, and the wall time."""

    state: TrainState
    history: list[dict]
    wall_time_s: float


class CheckpointError(RuntimeError):
    """A checkpoint could not be read (corrupt or partial); earlier checkpoints are left in place."""


class NonfiniteError(FloatingPointError):
    """A training step's loss, gradient or update was not finite (``fit(..., on_nonfinite="stop")``)."""


def sown_stats(stats_tree: Any) -> list:
    """The :class:`jdeq.Stats` of every DEQ layer sown in ``stats_tree`` (the ``"deq_stats"`` collection)."""
    return jax.tree_util.tree_leaves(stats_tree, is_leaf=lambda s: hasattr(s, "num_steps"))


def forward_metrics(stats_tree: Any) -> dict:
    """:func:`jdeq.summarize` (prefix ``fwd_``) over every sample of every DEQ layer sown in ``stats_tree``."""
    stats = [s._replace(trace=None) for s in sown_stats(stats_tree)]
    merged = jax.tree_util.tree_map(lambda *leaves: jnp.concatenate([jnp.ravel(leaf) for leaf in leaves]), *stats)
    return summarize(merged, prefix="fwd_")


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf of ``tree`` is finite (a norm could overflow for large finite leaves)."""
    return functools.reduce(
        jnp.logical_and, [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)], True
    )


def make_train_step(model: Any, optimizer: optax.GradientTransformation) -> Callable:
    """``step(state, x, y) -> (state, metrics)``, jitted: cross-entropy, implicit gradients, one optax update.

    ``model`` is a linen module called as ``model.apply(variables, x, backward_stats=probe)`` that sows
    :class:`jdeq.Stats` into ``"deq_stats"`` (e.g. :class:`jdeq.nn.DEQClassifier`). A step whose loss,
    gradient or updated state is not finite returns the state unchanged and ``metrics["skipped"]`` true
    (decided on the device: no extra host round trip).
    """

    def loss_fn(params, probe, x, y):
        logits, sown = model.apply({"params": params}, x, backward_stats=probe, mutable=[STATS_COLLECTION])
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        return loss, (logits, sown[STATS_COLLECTION])

    @jax.jit
    def step(state: TrainState, x, y):
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (loss, (logits, stats)), (grads, probe_grad) = grad_fn(state.params, stats_probe(x.shape[:1]), x, y)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = TrainState(optax.apply_updates(state.params, updates), opt_state)
        finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(new)
        backward = read_backward_stats(probe_grad)
        metrics = {
            "skipped": ~finite,
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            **forward_metrics(stats),
            **summarize(backward, prefix="bwd_"),
        }
        return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state), metrics

    return step


def make_eval_step(model: Any) -> Callable:
    """``evaluate(params, x, y, weight) -> sums``, jitted; ``weight`` (0/1) masks padding in the last batch."""

    @jax.jit
    def evaluate(params, x, y, weight):
        logits, sown = model.apply({"params": params}, x, mutable=[STATS_COLLECTION])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        steps = jnp.stack([s.num_steps for s in sown_stats(sown[STATS_COLLECTION])]).astype(jnp.float32)
        return {
            "count": jnp.sum(weight),
            "loss": jnp.sum(weight * losses),
            "correct": jnp.sum(weight * (jnp.argmax(logits, -1) == y)),
            "fwd_steps": jnp.sum(weight * jnp.mean(steps, axis=0)),
            "fwd_max_steps": jnp.max(jnp.where(weight > 0, jnp.max(steps, axis=0), 0.0)),
        }

    return evaluate


def evaluate(eval_step: Callable, params: Any, x: np.ndarray, y: np.ndarray, batch_size: int) -> dict:
    """Loss, accuracy and forward steps over all of ``(x, y)`` in fixed-size (padded) batches."""
    totals: dict = {}
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        pad = batch_size - len(xb)
        weight = np.concatenate([np.ones(len(xb), np.float32), np.zeros(pad, np.float32)])
        xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
        yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
        sums = jax.device_get(eval_step(params, xb, yb, weight))
        for key, value in sums.items():
            totals[key] = max(totals.get(key, 0.0), value) if "max" in key else totals.get(key, 0.0) + value
    n = totals["count"]
    return {
        "loss": float(totals["loss"] / n),
        "accuracy": float(totals["correct"] / n),
        "fwd_mean_steps": float(totals["fwd_steps"] / n),
        "fwd_max_steps": float(totals["fwd_max_steps"]),
    }


def epoch_batches(seed: int, epoch: int, n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Index arrays of the full batches of epoch ``epoch``: a permutation drawn from ``(seed, epoch)``."""
    order = np.random.default_rng((seed, epoch)).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def epoch_summary(rows: list[dict]) -> dict:
    """One epoch's metrics from its steps' (those not skipped, if any): maxima of ``*max_*`` keys, sums of
    ``*count_*`` keys, means of the rest; and ``skipped_steps``, the number of skipped steps."""
    kept = [row for row in rows if not row["skipped"]] or rows

    def reduce(key):
        values = [row[key] for row in kept]
        return np.max(values) if "max_" in key else np.sum(values) if "count_" in key else np.mean(values)

    summary = {key: float(reduce(key)) for key in rows[0] if key != "skipped"}
    return {**summary, "skipped_steps": int(sum(row["skipped"] for row in rows))}


def checkpoint_manager(directory: str | Path) -> ocp.CheckpointManager:
    """A synchronous orbax manager keeping the last :data:`CHECKPOINTS_KEPT` epochs (older ones deleted
    only after a newer one is complete: orbax writes to a temporary directory and renames it)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=CHECKPOINTS_KEPT, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, epoch: int, state: TrainState, history: list[dict]) -> None:
    """Save ``state`` and ``history`` as checkpoint ``epoch``."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history))
    manager.save(epoch, args=args)
    manager.wait_until_finished()


def restore_checkpoint(
    manager: ocp.CheckpointManager, template: TrainState, epoch: Optional[int] = None
) -> tuple[TrainState, list[dict]]:
    """``(state, history)`` of checkpoint ``epoch`` (default: the latest); CheckpointError if unreadable."""
    epoch = manager.latest_step() if epoch is None else epoch
    args = ocp.args.Composite(state=ocp.args.StandardRestore(template), history=ocp.args.JsonRestore())
    try:
        restored = manager.restore(epoch, args=args)
    except Exception as err:  # orbax/tensorstore raise many types for damaged files
        earlier = [s for s in manager.all_steps() if s != epoch]
        raise CheckpointError(
            f"checkpoint {epoch} in {manager.directory} is corrupt or partial ({type(err).__name__}: {err}); "
            f"earlier checkpoints kept: {earlier or 'none'}. Delete {manager.directory / str(epoch)} to resume "
            "from the previous one."
        ) from err
    return TrainState(*restored["state"]), list(restored["history"])


def fit(
    model: Any,
    optimizer: optax.GradientTransformation,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int = 64,
    eval_batch_size: int = 512,
    seed: int = 0,
    checkpoint_dir: Optional[str | Path] = None,
    on_nonfinite: str = "stop",
    progress: bool = True,
) -> FitResult:
    """Train ``model`` (a linen classifier, see :func:`make_train_step`) on ``data`` for ``epochs`` epochs.

    Each history row holds the epoch's mean training metrics (``loss``, ``accuracy``, forward/backward
    steps and residuals) and ``test_*`` metrics. With ``checkpoint_dir``, the run resumes from the
    latest checkpoint there and saves one per epoch.

    A step with a nonfinite loss, gradient or update never changes the state; ``on_nonfinite="stop"``
    (default) then raises :class:`NonfiniteError` naming the epoch and step, ``"skip"`` goes on (each
    history row counts its ``skipped_steps``; its other training metrics are over the steps kept).
    """
    check_dataset(data)
    n = len(data.x_train)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the training set size), got {batch_size}")
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f'on_nonfinite must be "stop" or "skip", got {on_nonfinite!r}')
    params = model.init(jax.random.PRNGKey(seed), data.x_train[:1])["params"]
    state = TrainState(params, optimizer.init(params))
    history: list[dict] = []
    manager = None if checkpoint_dir is None else checkpoint_manager(checkpoint_dir)
    if manager is not None and manager.latest_step() is not None:
        state, history = restore_checkpoint(manager, state)
    train_step, eval_step = make_train_step(model, optimizer), make_eval_step(model)
    steps_per_epoch = n // batch_size
    start = time.perf_counter()
    with tqdm(
        total=epochs * steps_per_epoch, initial=len(history) * steps_per_epoch, disable=not progress, unit="step"
    ) as bar:
        for epoch in range(len(history), epochs):
            bar.set_description(f"epoch {epoch + 1}/{epochs}")
            rows = []
            for step, index in enumerate(epoch_batches(seed, epoch, n, batch_size), 1):
                state, metrics = train_step(state, data.x_train[index], data.y_train[index])
                rows.append(jax.device_get(metrics))
                if rows[-1]["skipped"] and on_nonfinite == "stop":
                    raise NonfiniteError(
                        f"nonfinite loss, gradient or update at epoch {epoch + 1}, step {step} (loss "
                        f"{rows[-1]['loss']}): stopped before applying it; no nonfinite state was saved. Pass "
                        'on_nonfinite="skip" to skip such steps.'
                    )
                bar.update()
                bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", fwd=f"{rows[-1]['fwd_mean_steps']:.1f}", refresh=False)
            test = evaluate(eval_step, state.params, data.x_test, data.y_test, eval_batch_size)
            history.append({"epoch": epoch + 1, **epoch_summary(rows), **{f"test_{k}": v for k, v in test.items()}})
            if manager is not None:
                save_checkpoint(manager, epoch + 1, state, history)
    return FitResult(state, history, time.perf_counter() - start)
