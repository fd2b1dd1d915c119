"""fit: the one driver of a training run (epochs, evaluation, checkpoints, progress)."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .._errors import ConvergenceWarning, SolveError
from ._adapters import as_trainable, unused_caches
from ._checkpoints import checkpoint_manager, checksum, run_config, save_checkpoint
from ._checkpoints import resume as resume_run
from ._lock import directory_lock, writable_directory
from ._loop import (
    TrainState,
    convergence_failures,
    default_loss,
    default_metrics,
    epoch_summary,
    evaluate_batches,
    init_state,
    make_eval_step,
    make_train_step,
    no_metrics,
    train_epoch,
)
from ._sources import (
    ArraySource,
    Budget,
    Position,
    StreamSource,
    evaluation_source,
    integer,
    one_shot_error,
    training_source,
    trains,
)

logger = logging.getLogger("jdeq.train")
"""Each epoch's history row is logged here at INFO level (``logging.basicConfig(level=logging.INFO)`` shows it)."""


class FitResult(NamedTuple):
    """``state`` after the last epoch, one ``history`` row (a dict of floats) per epoch, and the wall time."""

    state: TrainState
    history: list[dict]
    wall_time_s: float


def fit(
    model: Any,
    optimizer: optax.GradientTransformation,
    data: Any,
    *,
    epochs: Optional[int] = None,
    steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    eval_batch_size: int = 512,
    seed: int = 0,
    loss_fn: Optional[Callable] = None,
    metrics_fn: Optional[Callable] = None,
    eval_data: Any = None,
    on_epoch_end: Optional[Callable[[int, dict], None]] = None,
    on_step: Optional[Callable[[int, dict], None]] = None,
    log_every: int = 10,
    checkpoint_dir: Optional[str | Path] = None,
    config: Optional[dict] = None,
    on_nonfinite: str = "stop",
    on_nonconvergence: str = "warn",
    resume: str = "strict",
    rng_streams: tuple = ("dropout",),
    train_flag: Optional[str] = None,
    progress: bool = True,
) -> FitResult:
    """Train ``model``, a linen ``Module`` or an ``nnx.Module`` mapping a batch ``x`` to outputs, on ``data``.

    Args:
      data: the training data, in one of three forms. A :class:`jdeq.data.Dataset` (its training split; its test
        split is the default ``eval_data``). An ``(x, y)`` pair of arrays (numpy or JAX) with any targets ``y``:
        integer labels, float targets, sequences. Or a stream of ``(x, y)`` batches, for data that does not fit
        in memory: a callable ``data(epoch) -> iterable`` called with each 0-based epoch (a resumed run reads the
        batches an uninterrupted one reads when it is deterministic in the epoch), a re-iterable (each
        ``iter(data)`` a new pass: a list of batches, a data loader), or a one-shot iterator (a generator: one
        epoch only, e.g. ``steps=N`` over an endless stream). In-memory data is shuffled by ``seed`` each epoch
        and cut into full batches of ``batch_size``; a stream's batches are trained as they come.
      epochs: the budget in passes over the data (a positive int); exactly one of ``epochs`` and ``steps``.
      steps: the budget in training steps (a positive int; the last epoch is cut short when the budget ends
        inside it).
      batch_size: in-memory data only (default 64, or the training set's size if smaller).
      loss_fn: ``loss_fn(outputs, y) -> scalar``, averaged over the batch (default, for integer labels only:
        softmax cross-entropy of logits against the labels, which must then lie in ``[0, number of logits)``;
        other targets need a ``loss_fn``).
      metrics_fn: ``metrics_fn(outputs, y) -> {name: scalar}`` (default: accuracy for integer labels, none for
        other targets).
      eval_data: evaluated after each epoch, in any form of ``data`` but a one-shot iterator (a Dataset: its test
        split; default: ``data``'s test split if ``data`` is a Dataset, else no evaluation). Validated before
        training: non-empty, as many targets as inputs, the training data's per-sample shapes, labels in range
        when the classes are known (a Dataset's ``num_classes``, or the logits' width under the default loss);
        a stream's first batch is checked before training, every other batch as it is read.
      on_epoch_end: ``on_epoch_end(epoch, row)`` after each epoch's history row (1-based epoch), before the
        epoch's checkpoint: values it adds to ``row`` must be numbers (numpy/JAX scalars are converted).
      rng_streams: linen: the rng streams (``model.apply(..., rngs=...)``) given a fresh key at every training
        step, ``fold_in(fold_in(PRNGKey(seed), epoch), step)`` (default ``("dropout",)``); none in evaluation.
        An NNX model's own ``nnx.Rngs`` state is threaded through each step and written back.
      train_flag: linen: a keyword of the model's ``__call__`` (e.g. ``"train"``) passed True in training and
        False in evaluation and at init. An NNX model is trained in ``train()`` mode and evaluated in ``eval()``
        mode (``nnx.Dropout`` off, ``nnx.BatchNorm`` on its running averages).
      resume: ``"strict"`` (default): a checkpoint of another run configuration is a ValueError naming each
        changed field (old → new); ``"allow_changes"``: it is resumed with a warning naming them. Fields added to
        jdeq after the checkpoint was saved are no change where the model holds their defaults (logged at INFO).
      on_step: ``on_step(step, row)`` with every training step's metrics row (1-based step over the run), called
        when the rows reach the host (every ``log_every`` steps): a metric writer's hook.
      log_every: training metrics are fetched from the device every ``log_every`` steps (and at the end of each
        epoch), not after each step.

    Each history row holds its ``epoch`` (1-based), the run's ``step`` count at its end, the epoch's mean training
    metrics (``loss``, the metrics, forward/backward solver statistics of the DEQ layers, ``skipped_steps``) and
    ``test_*`` metrics on ``eval_data``. Parameters: linen models are initialised from ``PRNGKey(seed)``; an NNX
    model starts from its own parameters and holds the trained ones when ``fit`` returns.

    With ``checkpoint_dir`` (checked writable first, then locked for the run by a ``jdeq.lock`` file holding
    this process's pid and host; a stale one is replaced), the run resumes from the newest intact checkpoint
    there (newer damaged ones are renamed aside; a checkpoint of another configuration, or of a run trained
    beyond the budget, is a ValueError) and saves one per history row (at the end of each epoch, or of the
    budget), with sha256 checksums, the run's position (epoch, batches of it trained, steps) and configuration:
    the model's fields, the optimizer state's structure, the data's shapes, ``seed``, ``batch_size`` and
    ``config``, a dict of JSON values. A resumed run continues at the saved position, skipping the batches of
    its epoch already trained: in-memory data and a deterministic ``data(epoch)`` replay an uninterrupted run
    exactly, and a budget may be extended (from ``steps=N`` to more steps or epochs; an epoch cut by a budget
    then gets a second history row for its remaining batches).

    Warm starts: when the model's DEQ layers have a fixed-point cache (``cache_size`` = the training set's
    size), each training step gives them the batch's indices in the training set (linen: the ``"deq_index"``
    collection; NNX: :func:`jdeq.nn.set_cache_index`; the model's ``__call__`` passes nothing on) and keeps the
    cache in the state (checkpointed, restored on resume); evaluation starts cold. It needs in-memory data: a
    stream has no indices (ValueError).

    A step with a nonfinite loss, gradient or update never changes the state; ``on_nonfinite="stop"``
    (default) then raises :class:`NonfiniteError` naming the epoch and step, ``"skip"`` goes on (each
    history row counts its ``skipped_steps``; its other training metrics are over the steps kept).
    """
    check_not_traced(data, eval_data, epochs, steps, batch_size, seed, config)
    budget = Budget.of(epochs, steps)
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f'on_nonfinite must be "stop" or "skip", got {on_nonfinite!r}')
    if resume not in ("strict", "allow_changes"):
        raise ValueError(f'resume must be "strict" or "allow_changes", got {resume!r}')
    if on_nonconvergence not in ("warn", "raise", "ignore"):
        raise ValueError(f'on_nonconvergence must be "warn", "raise" or "ignore", got {on_nonconvergence!r}')
    if not (isinstance(log_every, int) and log_every >= 1):
        raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
    source = training_source(data)
    batch_size = source.batch_size(batch_size)
    if source.one_shot and (budget.epochs or 1) > 1:
        raise one_shot_error("data", f"it gives one epoch, not epochs={budget.epochs}")
    loss_fn, metrics_fn = objective(source, loss_fn, metrics_fn)
    evaluation = evaluation_source(data, eval_data)
    if evaluation is not None:
        evaluation.check_like(source)
    trainable = as_trainable(model, tuple(rng_streams), train_flag)
    if unused := unused_caches(model):
        warnings.warn(
            f"the DEQ layer(s) {', '.join(unused)} hold a fixed-point cache but have warm_start=False: fit neither "
            "reads nor fills it (0 entries); set warm_start=True to use it",
            stacklevel=2,
        )
    directory = None if checkpoint_dir is None else writable_directory(checkpoint_dir)
    with contextlib.nullcontext() if directory is None else directory_lock(directory):
        state = init_state(trainable, optimizer, source, seed)
        classes = known_classes(source, evaluation, trainable, state, loss_fn is default_loss)
        for part in (source, evaluation):
            if part is not None:
                part.check_labels(classes)
        fields = {**trainable.fields(), "optimizer.update_of_ones": optimizer_fingerprint(optimizer, state)}
        if state.cache is not None:  # the cache is keyed to the examples' positions: their content must match
            fields["data.x_train.sha256"] = checksum(source.x)
        data_fields = {
            **source.fields("train"),
            **({} if evaluation is None else evaluation.fields("test")),
            "data.dtype": str(source.first()[0].dtype),
            "data.num_classes": classes,
        }
        run = run_config(fields, state.opt_state, data_fields, seed, batch_size, config or {})
        manager = None if directory is None else checkpoint_manager(directory)
        allow = resume == "allow_changes"
        state, history, position = (
            (state, [], Position())
            if manager is None
            else resume_run(manager, state, run, budget, allow, trainable.field_values())
        )
        train_step = make_train_step(trainable, optimizer, loss_fn, metrics_fn, on_nonfinite == "stop")
        eval_step = make_eval_step(trainable, loss_fn, metrics_fn)
        start = time.perf_counter()
        with tqdm(
            total=total_steps(budget, source, batch_size), initial=position.step, disable=not progress, unit="step"
        ) as bar:
            while not budget.done(position):
                epoch, offset = position.epoch, position.offset
                bar.set_description(f"epoch {epoch + 1}" + ("" if budget.epochs is None else f"/{budget.epochs}"))
                limit = budget.limit(position)
                batches = trains(source.train_batches(seed, epoch, batch_size), offset, limit)
                state, rows = train_epoch(
                    train_step, state, batches, seed, epoch, log_every, bar, on_step, offset, position.step
                )
                if not rows and offset == 0:
                    raise ValueError(f"{source.what} gave no batch in epoch {epoch + 1}")
                position = advanced(position, len(rows), source, batch_size, limit)
                if not rows:  # a resumed epoch whose batches were all trained before: the next one
                    continue
                test = evaluated(eval_step, state, evaluation, epoch, eval_batch_size)
                history.append({"epoch": epoch + 1, "step": position.step, **epoch_summary(rows), **test})
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, history[-1])
                    history[-1] = numbers_only(history[-1])
                if manager is not None:
                    save_checkpoint(manager, state, history, run, position)
                logger.info("epoch %d (%s): %s", epoch + 1, budget, format_row(history[-1]))
                failures = convergence_failures(history[-1], epoch + 1, trainable.layer_solvers)
                report_nonconvergence(failures, on_nonconvergence)
        trainable.finish(state.params, state.model_state)
        return FitResult(state, history, time.perf_counter() - start)


def evaluated(
    eval_step: Callable, state: TrainState, evaluation: ArraySource | StreamSource | None, epoch: int, batch_size: int
) -> dict:
    """The ``test_*`` metrics of ``state`` on ``evaluation`` after ``epoch`` (``{}`` without evaluation data), in
    padded pieces of ``batch_size`` (a stream: of at most its first batch's size, not padded up to 512)."""
    if evaluation is None:
        return {}
    if not evaluation.indexed:
        batch_size = min(batch_size, len(evaluation.first()[0]))
    batches = evaluation.eval_batches(epoch)
    test = evaluate_batches(eval_step, state.params, batches, batch_size, state.model_state)
    return {f"test_{key}": value for key, value in test.items()}


def objective(source: ArraySource | StreamSource, loss_fn: Optional[Callable], metrics_fn: Optional[Callable]):
    """``(loss_fn, metrics_fn)`` with the defaults for the targets: cross-entropy and accuracy for integer labels,
    no metric for other targets, whose loss the user must give (ValueError otherwise)."""
    y = source.first()[1]
    if integer(y.dtype):
        return loss_fn or default_loss, metrics_fn or default_metrics
    if loss_fn is None:
        raise ValueError(
            f"{source.what} has targets of dtype {y.dtype} (shaped {tuple(y.shape[1:])} per sample): fit's default "
            "loss is softmax cross-entropy against integer class labels; pass loss_fn(outputs, y) -> scalar, e.g. "
            "loss_fn=lambda outputs, y: jnp.mean((outputs - y) ** 2) for regression (and metrics_fn, if any)"
        )
    return loss_fn, metrics_fn or no_metrics


def known_classes(
    source: ArraySource | StreamSource,
    evaluation: ArraySource | StreamSource | None,
    trainable: Any,
    state: TrainState,
    default: bool,
) -> Optional[int]:
    """The number of classes the labels must lie below: a Dataset's ``num_classes``, else, under the ``default``
    loss, the width of the model's logits (checked to be shaped like the labels plus a class axis); ``None``."""
    for part in (source, evaluation):
        if part is not None and part.num_classes is not None:
            return part.num_classes
    if not default:
        return None
    x, y = source.first()
    outputs = jax.eval_shape(lambda p: trainable.apply(p, None, x[:1], model_state=state.model_state)[0], state.params)
    if jnp.ndim(outputs) < 1 or tuple(outputs.shape[1:-1]) != tuple(y.shape[1:]):
        raise ValueError(
            f"fit's default loss (softmax cross-entropy) takes logits shaped like the labels plus a class axis: the "
            f"model gives {tuple(outputs.shape[1:])} per sample for labels shaped {tuple(y.shape[1:])}; pass loss_fn"
        )
    return int(outputs.shape[-1])


def total_steps(budget: Budget, source: ArraySource | StreamSource, batch_size: Optional[int]) -> Optional[int]:
    """The run's number of steps, for the progress bar (``None`` for epochs of a stream without a length: unknown)."""
    if budget.steps is not None:
        return budget.steps
    per_epoch = source.steps_per_epoch(batch_size)
    return None if per_epoch is None else budget.epochs * per_epoch


def advanced(
    position: Position, trained: int, source: ArraySource | StreamSource, batch_size: Optional[int], limit
) -> Position:
    """``position`` after ``trained`` more batches of its epoch: the next epoch's start if the epoch ended (its
    last full batch for in-memory data; a stream ended before ``limit``), else further into it."""
    offset, step = position.offset + trained, position.step + trained
    if source.size is not None:
        ended = offset == source.steps_per_epoch(batch_size)
    else:
        ended = limit is None or trained < limit
    return Position(position.epoch + 1, 0, step) if ended else Position(position.epoch, offset, step)


def report_nonconvergence(failures: list[str], action: str) -> None:
    """Warn each of ``failures`` (:class:`jdeq.ConvergenceWarning`), raise them (:class:`jdeq.SolveError`) or
    nothing, as ``action`` (``fit``'s ``on_nonconvergence``) says."""
    if not failures or action == "ignore":
        return
    if action == "raise":
        raise SolveError("; ".join(failures) + ' (on_nonconvergence="raise"; the epoch\'s checkpoint is saved)')
    for failure in failures:
        warnings.warn(failure, ConvergenceWarning, stacklevel=3)


def check_not_traced(*values: Any) -> None:
    """TypeError if any leaf of ``values`` is a JAX tracer: ``fit`` is a host-side loop around its own jitted steps."""
    leaves = jax.tree_util.tree_leaves(values, is_leaf=lambda value: isinstance(value, Iterator))  # not a stream's
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        raise TypeError(
            "fit cannot be traced (jax.jit, jax.vmap, jax.grad): it is a host-side loop that compiles its own steps; "
            "call it outside any JAX transformation"
        )


def optimizer_fingerprint(optimizer: optax.GradientTransformation, state: TrainState) -> str:
    """sha256 (16 hex digits) of ``optimizer``'s first update for a gradient of ones: it differs when the learning
    rate or another hyper-parameter does, which the optimizer state's structure does not show."""
    ones = jax.tree_util.tree_map(jnp.ones_like, state.params)
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = optimizer.update(ones, state.opt_state, state.params)
    return checksum(updates)[:16]


def numbers_only(row: dict) -> dict:
    """``row`` with numpy and JAX scalars as Python numbers; ValueError naming any other value (before any save)."""

    def number(key, value):
        if isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
            return np.asarray(value).item()
        raise ValueError(
            f"on_epoch_end put {key!r} = {value!r} in the history row: history values must be numbers "
            "(Python, numpy or JAX scalars)"
        )

    return {key: number(key, value) for key, value in row.items()}


def format_row(row: dict) -> str:
    """A history row as one log line: ``key=value`` pairs, floats to 4 significant digits."""
    return " ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in row.items()
    )
