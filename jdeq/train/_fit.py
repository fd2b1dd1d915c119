"""fit: the one driver of a training run (epochs, evaluation, checkpoints, progress)."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .._errors import ConvergenceWarning, SolveError
from ..data import Dataset, check_dataset
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
    evaluate,
    init_state,
    make_eval_step,
    make_train_step,
    train_epoch,
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
    data: Dataset,
    *,
    epochs: int,
    batch_size: int = 64,
    eval_batch_size: int = 512,
    seed: int = 0,
    loss_fn: Optional[Callable] = None,
    metrics_fn: Optional[Callable] = None,
    eval_data: Optional[tuple[np.ndarray, np.ndarray]] = None,
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
      loss_fn: ``loss_fn(outputs, y) -> scalar``, averaged over the batch (default: softmax
        cross-entropy of logits against integer labels).
      metrics_fn: ``metrics_fn(outputs, y) -> {name: scalar}`` (default: accuracy).
      eval_data: ``(x, y)`` evaluated after each epoch (default: ``data``'s test split), validated before
        training like ``data`` (non-empty, as many labels as inputs, labels in ``[0, num_classes)``).
      on_epoch_end: ``on_epoch_end(epoch, row)`` after each epoch's history row (1-based epoch), before the
        epoch's checkpoint: values it adds to ``row`` must be numbers (numpy/JAX scalars are converted).
      rng_streams: linen: the rng streams (``model.apply(..., rngs=...)``) given a fresh key at every training
        step, ``fold_in(fold_in(PRNGKey(seed), epoch), step)`` (default ``("dropout",)``); none in evaluation.
        An NNX model's own ``nnx.Rngs`` state is threaded through each step and written back.
      train_flag: linen: a keyword of the model's ``__call__`` (e.g. ``"train"``) passed True in training and
        False in evaluation and at init. An NNX model is trained in ``train()`` mode and evaluated in ``eval()``
        mode (``nnx.Dropout`` off, ``nnx.BatchNorm`` on its running averages).
      resume: ``"strict"`` (default): a checkpoint of another run configuration is a ValueError naming each
        changed field (old → new); ``"allow_changes"``: it is resumed with a warning naming them.
      on_step: ``on_step(step, row)`` with every training step's metrics row (1-based step over the run), called
        when the rows reach the host (every ``log_every`` steps): a metric writer's hook.
      log_every: training metrics are fetched from the device every ``log_every`` steps (and at the end of each
        epoch), not after each step.

    Each history row holds the epoch's mean training metrics (``loss``, the metrics, forward/backward
    solver statistics of the DEQ layers, ``skipped_steps``) and ``test_*`` metrics on ``eval_data``.
    Parameters: linen models are initialised from ``PRNGKey(seed)``; an NNX model starts from its own
    parameters (the seed sets the batch order) and holds the trained ones when ``fit`` returns.

    With ``checkpoint_dir`` (checked writable first, then locked for the run by a ``jdeq.lock`` file holding
    this process's pid and host; a stale one is replaced), the run resumes from the newest intact checkpoint
    there (newer damaged ones are renamed aside; a checkpoint of another configuration, or of a run trained
    for more than ``epochs``, is a ValueError) and saves one per epoch, with sha256 checksums and the run's
    configuration: the model's fields, the optimizer state's structure, the data's shapes, ``seed``,
    ``batch_size`` and ``config``, a dict of JSON values.

    Warm starts: when the model's DEQ layers have a fixed-point cache (``cache_size=len(data.x_train)``), each
    training step gives them the batch's indices in ``data.x_train`` (linen: the ``"deq_index"`` collection;
    NNX: :func:`jdeq.nn.set_cache_index`; the model's ``__call__`` passes nothing on) and keeps the cache in
    the state (checkpointed, restored on resume); evaluation starts cold.

    A step with a nonfinite loss, gradient or update never changes the state; ``on_nonfinite="stop"``
    (default) then raises :class:`NonfiniteError` naming the epoch and step, ``"skip"`` goes on (each
    history row counts its ``skipped_steps``; its other training metrics are over the steps kept).
    """
    check_not_traced(data, eval_data, epochs, batch_size, seed, config)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    check_dataset(data)
    n = len(data.x_train)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the training set size), got {batch_size}")
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f'on_nonfinite must be "stop" or "skip", got {on_nonfinite!r}')
    if resume not in ("strict", "allow_changes"):
        raise ValueError(f'resume must be "strict" or "allow_changes", got {resume!r}')
    if on_nonconvergence not in ("warn", "raise", "ignore"):
        raise ValueError(f'on_nonconvergence must be "warn", "raise" or "ignore", got {on_nonconvergence!r}')
    if not (isinstance(log_every, int) and log_every >= 1):
        raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
    trainable = as_trainable(model, tuple(rng_streams), train_flag)
    if unused := unused_caches(model):
        warnings.warn(
            f"the DEQ layer(s) {', '.join(unused)} hold a fixed-point cache but have warm_start=False: fit neither "
            "reads nor fills it (0 entries); set warm_start=True to use it",
            stacklevel=2,
        )
    loss_fn, metrics_fn = loss_fn or default_loss, metrics_fn or default_metrics
    x_eval, y_eval = (data.x_test, data.y_test) if eval_data is None else checked_eval_data(data, eval_data)
    directory = None if checkpoint_dir is None else writable_directory(checkpoint_dir)
    with contextlib.nullcontext() if directory is None else directory_lock(directory):
        state = init_state(trainable, optimizer, data, seed)
        fields = {**trainable.fields(), "optimizer.update_of_ones": optimizer_fingerprint(optimizer, state)}
        if state.cache is not None:  # the cache is keyed to the examples' positions: their content must match
            fields["data.x_train.sha256"] = checksum(data.x_train)
        run = run_config(fields, state.opt_state, data, seed, batch_size, config or {})
        manager = None if directory is None else checkpoint_manager(directory)
        allow = resume == "allow_changes"
        state, history = (state, []) if manager is None else resume_run(manager, state, run, epochs, allow)
        train_step = make_train_step(trainable, optimizer, loss_fn, metrics_fn, on_nonfinite == "stop")
        eval_step = make_eval_step(trainable, loss_fn, metrics_fn)
        steps_per_epoch = n // batch_size
        start = time.perf_counter()
        with tqdm(
            total=epochs * steps_per_epoch, initial=len(history) * steps_per_epoch, disable=not progress, unit="step"
        ) as bar:
            for epoch in range(len(history), epochs):
                bar.set_description(f"epoch {epoch + 1}/{epochs}")
                state, rows = train_epoch(train_step, state, data, seed, epoch, batch_size, log_every, bar, on_step)
                test = evaluate(eval_step, state.params, x_eval, y_eval, eval_batch_size, state.model_state)
                history.append({"epoch": epoch + 1, **epoch_summary(rows), **{f"test_{k}": v for k, v in test.items()}})
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, history[-1])
                    history[-1] = numbers_only(history[-1])
                if manager is not None:
                    save_checkpoint(manager, epoch + 1, state, history, run)
                logger.info("epoch %d/%d: %s", epoch + 1, epochs, format_row(history[-1]))
                report_nonconvergence(convergence_failures(history[-1], epoch + 1), on_nonconvergence)
        trainable.finish(state.params, state.model_state)
        return FitResult(state, history, time.perf_counter() - start)


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
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(values)):
        raise TypeError(
            "fit cannot be traced (jax.jit, jax.vmap, jax.grad): it is a host-side loop that compiles its own steps; "
            "call it outside any JAX transformation"
        )


def checked_eval_data(data: Dataset, eval_data: Any) -> tuple[np.ndarray, np.ndarray]:
    """``eval_data`` as ``(x, y)`` arrays, validated like ``data`` (:func:`jdeq.data.check_dataset`) before training."""
    x, y = (np.asarray(part) for part in eval_data)
    check_dataset(Dataset(f"{data.name} (eval_data)", data.x_train, data.y_train, x, y, data.num_classes))
    return x, y


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
