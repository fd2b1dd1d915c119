"""The jitted train and eval steps and the epoch loop of :func:`jdeq.train.fit`.

A run is a pure function of its seed and model: the batch order of epoch ``e`` comes from
``numpy.random.default_rng((seed, e))`` (:func:`epoch_batches`). Metrics stay on the device and reach the host
every ``log_every`` steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._errors import convergence_report
from ..data import Dataset
from ..nn import forward_stats
from ..stats import read_backward_stats, summarize
from ._adapters import LinenModel, NNXModel


class TrainState(NamedTuple):
    """What a step updates: ``params`` (the model's ``"params"`` collection), the optimizer state, the DEQ
    layers' fixed-point ``cache`` (linen: the ``"deq_cache"`` collection; NNX: the ``FixedPointCache`` state;
    ``None`` without one) and the ``model_state`` besides parameters (linen: its other collections such as
    ``"batch_stats"``; NNX: its ``BatchStat`` and ``RngState`` variables; ``None`` without any)."""

    params: Any
    opt_state: Any
    cache: Any = None
    model_state: Any = None


class NonfiniteError(FloatingPointError):
    """A training step's loss, gradient or update was not finite (``fit(..., on_nonfinite="stop")``)."""


def _concatenated(records: list) -> Any:
    """One record (Stats or BackwardStats) holding every sample of every layer's ``records``."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.concatenate([jnp.ravel(leaf) for leaf in leaves]), *records)


def _summaries(records: list, prefix: str) -> dict:
    """:func:`jdeq.summarize` (``prefix``) over every sample of every layer's record and, with several layers,
    of each layer alone (``{prefix}layer{i}_...``, in the order of the model's state)."""
    if not records:
        return {}
    layers = {} if len(records) == 1 else {f"{prefix}layer{i}_": record for i, record in enumerate(records)}
    return {
        **summarize(_concatenated(records), prefix=prefix),
        **{key: value for p, record in layers.items() for key, value in summarize(record, prefix=p).items()},
    }


def forward_metrics(stats_tree: Any) -> dict:
    """Summaries (prefix ``fwd_``) of the forward solves of the DEQ layers in ``stats_tree``, see :func:`_summaries`
    (``{}`` for a model without DEQ layers, such as an explicit baseline)."""
    return _summaries([s._replace(trace=None) for s in forward_stats(stats_tree)], "fwd_")


def backward_metrics(probe_grads: Any) -> dict:
    """Summaries (prefix ``bwd_``) of the backward solves read off every layer's probe gradient."""
    return _summaries([read_backward_stats(g) for g in jax.tree_util.tree_leaves(probe_grads)], "bwd_")


def convergence_failures(row: dict, epoch: int) -> list[str]:
    """One line per DEQ layer and direction (forward, backward, evaluation) whose solves did not all converge in
    the history ``row`` of ``epoch``, with the converged fraction, the steps and the largest residual reached
    (:func:`jdeq._errors.convergence_report`). Directions without a solve (``Phantom``/``Unrolled`` backward) pass."""
    failures = []
    for prefix, what in (("fwd_", "forward"), ("bwd_", "backward"), ("test_fwd_", "evaluation (forward)")):
        layers = sorted({key[: key.index("_", len(prefix)) + 1] for key in row if key.startswith(prefix + "layer")})
        for part in layers or [prefix]:
            fraction = row.get(part + "converged_fraction", 1.0)
            solves = sum(row[key] for key in row if key.startswith(part + "count_")) if prefix == "bwd_" else 1
            if fraction < 1.0 and solves > 0:
                layer = f"layer {part[len(prefix) + 5 : -1]}" if part != prefix else "the DEQ layers"
                failures.append(
                    convergence_report(
                        f"epoch {epoch}, {what} solves of {layer}",
                        fraction,
                        row.get(part + "mean_steps", float("nan")),
                        row.get(part + "max_steps", float("nan")),
                        row.get(part + "max_residual", float("nan")),
                    )
                )
    return failures


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf of ``tree`` is finite (a norm could overflow for large finite leaves)."""
    return functools.reduce(
        jnp.logical_and, [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)], True
    )


def default_loss(outputs: jax.Array, y: jax.Array) -> jax.Array:
    """Softmax cross-entropy of logits ``outputs`` against integer labels ``y``, averaged over the batch."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, y))


def default_metrics(outputs: jax.Array, y: jax.Array) -> dict:
    """``{"accuracy": ...}`` of logits ``outputs`` against integer labels ``y``."""
    return {"accuracy": jnp.mean(jnp.argmax(outputs, -1).astype(y.dtype) == y)}


def make_train_step(
    trainable: LinenModel | NNXModel,
    optimizer: optax.GradientTransformation,
    loss_fn: Callable = default_loss,
    metrics_fn: Callable = default_metrics,
    stop_on_nonfinite: bool = True,
) -> Callable:
    """``step(state, x, y, halted, index=None, rng=None) -> (state, metrics, halted)``, jitted: ``loss_fn(outputs, y)``,
    implicit gradients, one optax update; with a fixed-point cache in ``state``, ``index`` (the samples' indices
    in the training set, passed to the cached layers as Flax state) is required and the step stores the new
    equilibria in ``state.cache``.

    ``metrics`` holds the loss, ``metrics_fn(outputs, y)``, the DEQ layers' forward statistics and their backward
    statistics (read off per-sample probes: no probe is threaded through the user's model). A step whose loss,
    gradient or updated state is not finite returns the state unchanged and ``metrics["skipped"]`` true; with
    ``stop_on_nonfinite`` it also sets ``halted``, after which every step is a no-op until the host notices
    (all decided on the device: metrics reach the host only every ``log_every`` steps).
    """

    def objective(params, probes, state, index, rng, x, y):
        outputs, stats, cache, model_state = trainable.apply(
            params, probes, x, state.cache, index, state.model_state, rng, train=True
        )
        return loss_fn(outputs, y), (outputs, stats, cache, model_state)

    @jax.jit
    def step(state: TrainState, x, y, halted, index=None, rng=None):
        grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
        (loss, (outputs, stats, cache, model_state)), (grads, probe_grads) = grad_fn(
            state.params, trainable.probes(x), state, index, rng, x, y
        )
        with jax.numpy_dtype_promotion("standard"):  # optax's own transforms (adam's decay**count) are not strict-clean
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = TrainState(optax.apply_updates(state.params, updates), opt_state, cache, model_state)
        finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(new)
        applied = finite & ~halted
        metrics = {
            "skipped": ~applied,
            "loss": loss,
            **scalar_metrics(metrics_fn(outputs, y)),
            **forward_metrics(stats),
            **backward_metrics(probe_grads),
        }
        state = jax.tree_util.tree_map(lambda n, o: jnp.where(applied, n, o), new, state)
        return state, metrics, halted | (~finite & stop_on_nonfinite)

    return step


def scalar_metrics(metrics: Any) -> dict:
    """``metrics`` (``metrics_fn``'s dict), checked at trace time: ValueError unless each value is a scalar (a
    per-sample value would be averaged wrongly, e.g. broadcast against the padding weights of evaluation)."""
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics_fn must return a dict of scalars, got {type(metrics).__name__}")
    shaped = {name: jnp.shape(value) for name, value in metrics.items() if jnp.shape(value) != ()}
    if shaped:
        raise ValueError(
            f"metrics_fn must return scalars (averaged over the batch), got shapes {shaped} for "
            f"{', '.join(map(repr, shaped))}: reduce them, e.g. with jnp.mean"
        )
    return metrics


def make_eval_step(
    trainable: LinenModel | NNXModel, loss_fn: Callable = default_loss, metrics_fn: Callable = default_metrics
) -> Callable:
    """``evaluate(params, x, y, weight, model_state=None) -> sums``, jitted; ``loss_fn`` and ``metrics_fn`` are
    applied to each sample (as a batch of one) so that ``weight`` (0/1) masks the padding of the last batch
    exactly. The model runs in eval mode (NNX ``eval()``, linen ``train_flag=False``, no rng streams, running
    statistics read, not updated); the solves start cold (no fixed-point cache)."""

    def per_sample(fn, outputs, y):
        return jax.vmap(lambda o, t: fn(jax.tree_util.tree_map(lambda a: a[None], o), t[None]))(outputs, y)

    @jax.jit
    def evaluate(params, x, y, weight, model_state=None):
        outputs, stats, _, _ = trainable.apply(params, None, x, model_state=model_state)
        values = {"loss": per_sample(loss_fn, outputs, y), **per_sample(metrics_fn, outputs, y)}
        # no DEQ layer (an explicit model): no solver steps, nothing left unconverged
        zeros, ones = [jnp.zeros(len(x))], [jnp.ones(len(x))]
        steps = jnp.stack([s.num_steps for s in stats] or zeros).astype(jnp.float32)
        converged = jnp.stack([s.converged for s in stats] or ones).astype(jnp.float32)
        residual = jnp.stack([s.residual for s in stats] or zeros).astype(jnp.float32)
        residual = jnp.where(jnp.isnan(residual), jnp.inf, residual)
        return {
            "count": jnp.sum(weight),
            "fwd_converged": jnp.sum(weight * jnp.mean(converged, axis=0)),
            "fwd_max_residual": jnp.max(jnp.where(weight > 0, jnp.max(residual, axis=0), 0.0)),
            **{key: jnp.sum(weight.astype(value.dtype) * value) for key, value in values.items()},
            "fwd_steps": jnp.sum(weight * jnp.mean(steps, axis=0)),
            "fwd_max_steps": jnp.max(jnp.where(weight > 0, jnp.max(steps, axis=0), 0.0)),
        }

    return evaluate


def evaluate(
    eval_step: Callable, params: Any, x: np.ndarray, y: np.ndarray, batch_size: int, model_state: Any = None
) -> dict:
    """The loss, the metrics and the forward solves (converged fraction, mean and max steps, largest residual) over
    all of ``(x, y)`` in fixed-size (padded) batches."""
    totals: dict = {}
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        pad = batch_size - len(xb)
        weight = np.concatenate([np.ones(len(xb), np.float32), np.zeros(pad, np.float32)])
        xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
        yb = np.concatenate([yb, np.zeros((pad, *yb.shape[1:]), yb.dtype)])
        sums = jax.device_get(eval_step(params, xb, yb, weight, model_state))
        for key, value in sums.items():
            totals[key] = (
                max(totals.get(key, 0.0), value) if key.startswith("fwd_max_") else totals.get(key, 0.0) + value
            )
    n = totals.pop("count")
    maxima = {key: float(totals.pop(key)) for key in ("fwd_max_steps", "fwd_max_residual")}
    means = {key: float(value / n) for key, value in totals.items() if key not in ("fwd_steps", "fwd_converged")}
    return {
        **means,
        "fwd_converged_fraction": float(totals["fwd_converged"] / n),
        "fwd_mean_steps": float(totals["fwd_steps"] / n),
        **maxima,
    }


def epoch_batches(seed: int, epoch: int, n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Index arrays of the full batches of epoch ``epoch``: a permutation drawn from ``(seed, epoch)``."""
    order = np.random.default_rng((seed, epoch)).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def epoch_summary(rows: list[dict]) -> dict:
    """One epoch's metrics from its steps' (those not skipped, if any): sums of ``*count_*`` keys (such as
    ``bwd_count_max_steps``), maxima of other ``*max_*`` keys, means of the rest; and ``skipped_steps``."""
    kept = [row for row in rows if not row["skipped"]] or rows

    def reduce(key):
        values = [row[key] for row in kept]
        return np.sum(values) if "count_" in key else np.max(values) if "max_" in key else np.mean(values)

    summary = {key: float(reduce(key)) for key in rows[0] if key != "skipped"}
    return {**summary, "skipped_steps": int(sum(row["skipped"] for row in rows))}


def init_state(trainable: LinenModel | NNXModel, optimizer: optax.GradientTransformation, data: Dataset, seed: int):
    """The :class:`TrainState` a run starts from: the model's parameters, ``optimizer.init`` of them, and the DEQ
    layers' empty fixed-point cache (if any), checked to fit ``data``'s training set."""
    params = trainable.init(seed, data.x_train[:1])
    if trainable.cache is not None:
        check_cache_fits(trainable, len(data.x_train))
    return TrainState(params, optimizer.init(params), trainable.cache, trainable.model_state)


def check_cache_fits(trainable: LinenModel | NNXModel, n: int) -> None:
    """ValueError unless every fixed-point cache of the model holds ``n`` examples."""
    sizes = sorted({jnp.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(trainable.cache)})
    if sizes != [n]:
        raise ValueError(
            f"the model's fixed-point cache holds {', '.join(map(str, sizes))} examples, the training set {n}: build "
            "its DEQ layers with cache_size=len(data.x_train)"
        )


def train_epoch(
    train_step: Callable,
    state: TrainState,
    data: Dataset,
    seed: int,
    epoch: int,
    batch_size: int,
    log_every: int,
    bar,
    on_step: Callable[[int, dict], None] | None = None,
) -> tuple[TrainState, list[dict]]:
    """``(state, rows)`` after the steps of epoch ``epoch`` (0-based), one metrics row each; see :func:`fit`.

    Metrics stay on the device and are fetched every ``log_every`` steps and at the end of the epoch, then each
    row is passed to ``on_step(global step, row)`` (1-based, counted over the run; Python floats); a halted
    step (nonfinite, ``on_nonfinite="stop"``) raises :class:`NonfiniteError` at the next fetch, naming it.
    """
    rows, pending, halted = [], [], jnp.zeros((), bool)
    batches = list(epoch_batches(seed, epoch, len(data.x_train), batch_size))
    key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)  # the rng streams' keys of step s: fold_in(key, s)
    for step, index in enumerate(batches, 1):  # index: the examples' indices, for the fixed-point cache (if any)
        rng = jax.random.fold_in(key, step)
        state, metrics, halted = train_step(state, data.x_train[index], data.y_train[index], halted, index, rng)
        pending.append(metrics)
        if step % log_every == 0 or step == len(batches):
            fetched = jax.device_get((pending, halted))
            if on_step is not None:
                first_step = epoch * len(batches) + len(rows) + 1
                for i, row in enumerate(fetched[0]):
                    on_step(first_step + i, {key: np.asarray(value).item() for key, value in row.items()})
            rows += fetched[0]
            if fetched[1]:
                first = next(i for i, row in enumerate(rows, 1) if row["skipped"])
                raise NonfiniteError(
                    f"nonfinite loss, gradient or update at epoch {epoch + 1}, step {first} (loss "
                    f"{rows[first - 1]['loss']}): stopped before applying it; no nonfinite state was saved. Pass "
                    'on_nonfinite="skip" to skip such steps.'
                )
            bar.update(len(pending))
            last = rows[-1]  # forward steps and converged fraction, when the model has DEQ layers
            solves = (
                {"fwd": f"{last['fwd_mean_steps']:.1f}", "conv": f"{last['fwd_converged_fraction']:.2f}"}
                if "fwd_mean_steps" in last
                else {}
            )
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", **solves, refresh=False)
            pending = []
    return state, rows
