"""The jitted train and eval steps and the epoch loop of :func:`jdeq.train.fit`.

A run is a pure function of its seed, model and data: the batch order of in-memory data in epoch ``e`` comes from
``numpy.random.default_rng((seed, e))`` (:func:`jdeq.train.epoch_batches`), the rng streams' keys of its
step ``s`` from ``fold_in(fold_in(PRNGKey(seed), e), s)``. Metrics stay on the device and reach the host every
``log_every`` steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._errors import convergence_report
from ..nn import forward_stats
from ..stats import read_backward_stats, summarize
from ._adapters import LinenModel, NNXModel
from ._sources import ArraySource, StreamSource, training_source


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


def convergence_failures(row: dict, epoch: int, solvers: list[dict] | None = None) -> list[str]:
    """One line per DEQ layer and direction (forward, backward, evaluation) whose solves did not all converge in
    the history ``row`` of ``epoch``, with the converged fraction, the steps and the largest residual reached
    (:func:`jdeq._errors.convergence_report`), against the ``max_steps`` and ``tol`` of the layer's solver when
    ``solvers`` (the adapter's ``layer_solvers``) names them. Directions without a solve (``Phantom``/``Unrolled``
    backward) pass."""
    failures = []
    for prefix, what in (("fwd_", "forward"), ("bwd_", "backward"), ("test_fwd_", "evaluation (forward)")):
        layers = sorted({key[: key.index("_", len(prefix)) + 1] for key in row if key.startswith(prefix + "layer")})
        for part in layers or [prefix]:
            fraction = row.get(part + "converged_fraction", 1.0)
            solves = sum(row[key] for key in row if key.startswith(part + "count_")) if prefix == "bwd_" else 1
            if fraction < 1.0 and solves > 0:
                index = int(part[len(prefix) + 5 : -1]) if part != prefix else 0
                layer = f"layer {index}" if part != prefix else "the DEQ layers"
                solver = layer_solver(solvers, index, len(layers) or 1, "bwd_" if prefix == "bwd_" else "fwd_")
                failures.append(
                    convergence_report(
                        f"epoch {epoch}, {what} solves of {layer}",
                        fraction,
                        row.get(part + "mean_steps", float("nan")),
                        row.get(part + "max_steps", float("nan")),
                        row.get(part + "max_residual", float("nan")),
                        step_cap=getattr(solver, "max_steps", None),
                        tol=getattr(solver, "tol", None),
                    )
                )
    return failures


def layer_solver(solvers: list[dict] | None, index: int, layers: int, direction: str) -> Any:
    """Layer ``index``'s solver in ``direction`` (``"fwd_"``/``"bwd_"``) when ``solvers`` lists the row's
    ``layers`` layers, else ``None`` (the report then names no ``max_steps``/``tol``)."""
    return solvers[index][direction] if solvers and len(solvers) == layers else None


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


def no_metrics(outputs: jax.Array, y: jax.Array) -> dict:
    """No metric besides the loss: the default for targets that are not integer labels."""
    return {}


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
        sums = {
            "count": jnp.sum(weight),
            **{key: jnp.sum(weight.astype(value.dtype) * value) for key, value in values.items()},
        }
        if not stats:  # no DEQ layer (an explicit model): no solves to report
            return sums
        steps = jnp.stack([s.num_steps for s in stats]).astype(jnp.float32)
        converged = jnp.stack([s.converged for s in stats]).astype(jnp.float32)
        residual = jnp.stack([s.residual for s in stats]).astype(jnp.float32)
        residual = jnp.where(jnp.isnan(residual), jnp.inf, residual)
        return {
            **sums,
            "fwd_converged": jnp.sum(weight * jnp.mean(converged, axis=0)),
            "fwd_max_residual": jnp.max(jnp.where(weight > 0, jnp.max(residual, axis=0), 0.0)),
            "fwd_steps": jnp.sum(weight * jnp.mean(steps, axis=0)),
            "fwd_max_steps": jnp.max(jnp.where(weight > 0, jnp.max(steps, axis=0), 0.0)),
        }

    return evaluate


def evaluate(
    eval_step: Callable, params: Any, x: np.ndarray, y: np.ndarray, batch_size: int, model_state: Any = None
) -> dict:
    """The loss, the metrics and the forward solves (converged fraction, mean and max steps, largest residual; none
    for a model without DEQ layers) over all of ``(x, y)`` in fixed-size (padded) batches."""
    return evaluate_batches(eval_step, params, [(x, y)], batch_size, model_state)


def evaluate_batches(
    eval_step: Callable, params: Any, batches: Iterable[tuple], batch_size: int, model_state: Any = None
) -> dict:
    """:func:`evaluate` over every ``(x, y)`` of ``batches``, each cut into pieces of ``batch_size`` padded to it
    (one compiled shape); ValueError if ``batches`` holds no example."""
    totals: dict = {}
    for x, y in batches:
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
    if not totals:
        raise ValueError("the evaluation data gave no batch")
    n = totals.pop("count")
    solves = {}
    if "fwd_steps" in totals:  # a model with DEQ layers
        solves = {
            "fwd_converged_fraction": float(totals.pop("fwd_converged") / n),
            "fwd_mean_steps": float(totals.pop("fwd_steps") / n),
            **{key: float(totals.pop(key)) for key in ("fwd_max_steps", "fwd_max_residual")},
        }
    return {**{key: float(value / n) for key, value in totals.items()}, **solves}


def epoch_summary(rows: list[dict]) -> dict:
    """One epoch's metrics from its steps' (those not skipped, if any): sums of ``*count_*`` keys (such as
    ``bwd_count_max_steps``), maxima of other ``*max_*`` keys, means of the rest; and ``skipped_steps``."""
    kept = [row for row in rows if not row["skipped"]] or rows

    def reduce(key):
        values = [row[key] for row in kept]
        return np.sum(values) if "count_" in key else np.max(values) if "max_" in key else np.mean(values)

    summary = {key: float(reduce(key)) for key in rows[0] if key != "skipped"}
    return {**summary, "skipped_steps": int(sum(row["skipped"] for row in rows))}


def init_state(trainable: LinenModel | NNXModel, optimizer: optax.GradientTransformation, data: Any, seed: int):
    """The :class:`TrainState` a run on ``data`` (any form :func:`fit` takes) starts from: the model's parameters,
    ``optimizer.init`` of them, and the DEQ layers' empty fixed-point cache (if any), checked to fit the training
    set (a stream has no indices to key a cache by: ValueError)."""
    source = training_source(data)
    params = trainable.init(seed, source.first()[0][:1])
    if trainable.cache is not None:
        check_cache_fits(trainable, source)
    return TrainState(params, optimizer.init(params), trainable.cache, trainable.model_state)


def check_cache_fits(trainable: LinenModel | NNXModel, source: ArraySource | StreamSource) -> None:
    """ValueError unless every fixed-point cache of the model holds one entry per example of ``source``'s in-memory
    training set."""
    if not source.indexed:
        raise ValueError(
            "the model's DEQ layers hold a fixed-point cache (warm starts), which is keyed by each example's index in "
            "an in-memory training set; a stream of batches has none: train on a Dataset or (x, y) arrays, or build "
            "the layers without cache_size"
        )
    sizes = sorted({jnp.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(trainable.cache)})
    if sizes != [source.size]:
        raise ValueError(
            f"the model's fixed-point cache holds {', '.join(map(str, sizes))} examples, the training set "
            f"{source.size}: build its DEQ layers with cache_size=len(data.x_train)"
        )


def train_epoch(
    train_step: Callable,
    state: TrainState,
    batches: Iterable[tuple],
    seed: int,
    epoch: int,
    log_every: int,
    bar,
    on_step: Callable[[int, dict], None] | None = None,
    offset: int = 0,
    first_step: int = 0,
) -> tuple[TrainState, list[dict]]:
    """``(state, rows)`` after a step on each ``(x, y, index)`` of ``batches`` (``index``: the examples' indices
    for the fixed-point cache, or ``None``), one metrics row each; ``batches`` are those of epoch ``epoch``
    (0-based) after its first ``offset`` (trained before a resume), ``first_step`` steps into the run. See
    :func:`fit`.

    Metrics stay on the device and are fetched every ``log_every`` steps and at the end, then each row is passed
    to ``on_step(global step, row)`` (1-based, counted over the run; Python floats); a halted step (nonfinite,
    ``on_nonfinite="stop"``) raises :class:`NonfiniteError` at the next fetch, naming it.
    """
    rows, pending, halted = [], [], jnp.zeros((), bool)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)  # the rng streams' keys of step s: fold_in(key, s)
    batches = iter(batches)
    batch, step = next(batches, None), offset
    while batch is not None:
        x, y, index = batch
        step += 1
        state, metrics, halted = train_step(state, x, y, halted, index, jax.random.fold_in(key, step))
        pending.append(metrics)
        batch = next(batches, None)
        if step % log_every == 0 or batch is None:
            rows += fetch_rows(pending, halted, epoch, offset, first_step + len(rows), rows, on_step)
            bar.update(len(pending))
            last = rows[-1]  # forward steps and converged fraction, when the model has DEQ layers
            solves = (
                {"fwd": f"{last['fwd_mean_steps']:.1f}", "conv": f"{last['fwd_converged_fraction']:.2f}"}
                if "fwd_mean_steps" in last
                else {}
            )
            bar.set_postfix(loss=f"{last['loss']:.3f}", **solves, refresh=False)
            pending = []
    return state, rows


def fetch_rows(pending: list, halted, epoch: int, offset: int, done: int, rows: list, on_step) -> list[dict]:
    """The ``pending`` metrics rows on the host, each passed to ``on_step`` (steps ``done + 1, ...`` of the run);
    :class:`NonfiniteError` naming the first skipped step of the epoch (after ``offset``) if the run ``halted``."""
    fetched, halted = jax.device_get((pending, halted))
    if on_step is not None:
        for i, row in enumerate(fetched, done + 1):
            on_step(i, {key: np.asarray(value).item() for key, value in row.items()})
    if halted:
        trained = rows + fetched
        first = next(i for i, row in enumerate(trained, 1) if row["skipped"])
        raise NonfiniteError(
            f"nonfinite loss, gradient or update at epoch {epoch + 1}, step {offset + first} (loss "
            f"{trained[first - 1]['loss']}): stopped before applying it; no nonfinite state was saved. Pass "
            'on_nonfinite="skip" to skip such steps.'
        )
    return fetched
