"""Training linen and NNX models with DEQ layers under optax: jitted train/eval steps with the user's loss and
metrics, the layers' forward and backward solver statistics, progress, orbax checkpoints.

A run is a pure function of its seed and model: linen parameters come from ``PRNGKey(seed)`` (an NNX model
brings its own), the batch order of epoch ``e`` from ``numpy.random.default_rng((seed, e))``. Checkpoints are
written at the end of each epoch, so a run resumed from its last checkpoint replays exactly the steps an
uninterrupted run takes.

Warm starts: a model whose DEQ layers hold a per-example fixed-point cache (``cache_size=len(data.x_train)``,
see :mod:`jdeq.nn`) is called with ``index=`` (each sample's index in the training set) in the training steps;
the cache is part of the :class:`TrainState`, updated on the device by each step, checkpointed with the
parameters and restored on resume. Evaluation runs without it (a cold start from ``z0``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import logging
import os
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Optional

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from .data import Dataset, check_dataset
from .nn import CACHE_COLLECTION, PROBE_COLLECTION, STATS_COLLECTION, BackwardProbe, FixedPointCache, forward_stats
from .stats import read_backward_stats, stats_probe, summarize

CHECKPOINTS_KEPT = 3
LOCK_FILE = "jdeq.lock"


class TrainState(NamedTuple):
    """What a step updates: ``params`` (the model's ``"params"`` collection), the optimizer state, and the DEQ
    layers' fixed-point ``cache`` (linen: the ``"deq_cache"`` collection; NNX: the ``FixedPointCache`` state;
    ``None`` without one)."""

    params: Any
    opt_state: Any
    cache: Any = None


class FitResult(NamedTuple):
    """``state`` after the last epoch, one ``history`` row (a dict of floats) per epoch, and the wall time."""

    state: TrainState
    history: list[dict]
    wall_time_s: float


class CheckpointError(RuntimeError):
    """No checkpoint could be read back intact (unreadable, partial, or altered on disk)."""


class NonfiniteError(FloatingPointError):
    """A training step's loss, gradient or update was not finite (``fit(..., on_nonfinite="stop")``)."""


def _concatenated(records: list) -> Any:
    """One record (Stats or BackwardStats) holding every sample of every layer's ``records``."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.concatenate([jnp.ravel(leaf) for leaf in leaves]), *records)


def forward_metrics(stats_tree: Any) -> dict:
    """:func:`jdeq.summarize` (prefix ``fwd_``) over every sample of every DEQ layer in ``stats_tree``."""
    return summarize(_concatenated([s._replace(trace=None) for s in forward_stats(stats_tree)]), prefix="fwd_")


def backward_metrics(probe_grads: Any) -> dict:
    """:func:`jdeq.summarize` (prefix ``bwd_``) of the backward solves read off every layer's probe gradient."""
    records = [read_backward_stats(g) for g in jax.tree_util.tree_leaves(probe_grads)]
    return summarize(_concatenated(records), prefix="bwd_") if records else {}


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


class LinenModel:
    """A linen model as :func:`fit` uses it: ``params`` from ``init(seed)``, forward stats from ``"intermediates"``,
    per-sample backward probes passed as the ``"deq_probe"`` collection, the fixed-point cache (if any) as the
    mutable ``"deq_cache"`` collection with ``index=``."""

    def __init__(self, model: linen.Module):
        self.model = model
        self.probe_layout: Any = {}  # the "deq_probe" collection's structure, recorded by init
        self.cache: Any = None  # the initial "deq_cache" collection, recorded by init

    def init(self, seed: int, x: jax.Array) -> Any:
        variables = self.model.init(jax.random.PRNGKey(seed), x)
        self.probe_layout = variables.get(PROBE_COLLECTION, {})
        self.cache = variables.get(CACHE_COLLECTION)
        return variables["params"]

    def apply(self, params: Any, probes: Any, x: jax.Array, cache: Any = None, index: Any = None) -> tuple:
        """``(outputs, forward stats, new cache)``; without a ``cache`` (``None``) a cold start and ``None``."""
        variables = {"params": params} if probes is None else {"params": params, PROBE_COLLECTION: probes}
        if cache is None:
            outputs, sown = self.model.apply(variables, x, mutable=[STATS_COLLECTION])
            return outputs, forward_stats(sown), None
        variables[CACHE_COLLECTION] = cache
        outputs, sown = self.model.apply(variables, x, index=index, mutable=[STATS_COLLECTION, CACHE_COLLECTION])
        return outputs, forward_stats(sown), sown[CACHE_COLLECTION]

    def probes(self, x: jax.Array) -> Any:
        """A per-sample probe for each DEQ layer of the model :meth:`init` built (no second trace of ``init``)."""
        return jax.tree_util.tree_map(lambda _: stats_probe(x.shape[:1]), self.probe_layout)

    def fields(self) -> dict:
        return model_fields(self.model)

    def finish(self, params: Any) -> None:
        """Nothing to do: a linen model holds no parameters."""


class NNXModel:
    """An NNX model as :func:`fit` uses it: its own ``nnx.Param`` state is the initial ``params`` (the seed sets
    only the batch order), :class:`jdeq.nn.BackwardProbe` variables get per-sample probes, and the trained
    parameters are written back into the model at the end."""

    def __init__(self, model: nnx.Module):
        self.model = model
        self.graphdef, self.params, self.probe_state, cache, self.rest = nnx.split(
            model, nnx.Param, BackwardProbe, FixedPointCache, ...
        )
        self.cache = cache if jax.tree_util.tree_leaves(cache) else None

    def init(self, seed: int, x: jax.Array) -> Any:
        return self.params

    def apply(self, params: Any, probes: Any, x: jax.Array, cache: Any = None, index: Any = None) -> tuple:
        """``(outputs, forward stats, new cache)``; without a ``cache`` (``None``) the layers' ``warm_start`` is
        switched off (a cold start) and the new cache is ``None``."""
        probes = self.probe_state if probes is None else probes
        caches = () if self.cache is None else (self.cache if cache is None else cache,)
        module = nnx.merge(self.graphdef, params, probes, *caches, self.rest, copy=True)  # fresh variables
        if cache is None:
            module.set_attributes(warm_start=False, raise_if_not_found=False)
            return module(x), forward_stats(module), None
        outputs = module(x, index=index)
        return outputs, forward_stats(module), nnx.state(module, FixedPointCache)

    def probes(self, x: jax.Array) -> Any:
        return jax.tree_util.tree_map(lambda _: stats_probe(x.shape[:1]), self.probe_state)

    def fields(self) -> dict:
        shapes = jax.tree_util.tree_map(jnp.shape, self.params)
        cache = {} if self.cache is None else {"model.cache": str(jax.tree_util.tree_map(jnp.shape, self.cache))}
        return {"model": type(self.model).__name__, "model.params": str(shapes), **cache}

    def finish(self, params: Any) -> None:
        nnx.update(self.model, params)


def as_trainable(model: Any) -> LinenModel | NNXModel:
    """The adapter of a linen or NNX ``model``; TypeError for anything else."""
    if isinstance(model, nnx.Module):
        return NNXModel(model)
    if isinstance(model, linen.Module):
        return LinenModel(model)
    raise TypeError(f"fit trains a flax linen Module or an nnx.Module, got {type(model).__name__}")


def make_train_step(
    trainable: LinenModel | NNXModel,
    optimizer: optax.GradientTransformation,
    loss_fn: Callable = default_loss,
    metrics_fn: Callable = default_metrics,
    stop_on_nonfinite: bool = True,
) -> Callable:
    """``step(state, x, y, halted, index=None) -> (state, metrics, halted)``, jitted: ``loss_fn(outputs, y)``,
    implicit gradients, one optax update; with a fixed-point cache in ``state``, ``index`` (the samples' indices
    in the training set) is required and the step stores the new equilibria in ``state.cache``.

    ``metrics`` holds the loss, ``metrics_fn(outputs, y)``, the DEQ layers' forward statistics and their backward
    statistics (read off per-sample probes: no probe is threaded through the user's model). A step whose loss,
    gradient or updated state is not finite returns the state unchanged and ``metrics["skipped"]`` true; with
    ``stop_on_nonfinite`` it also sets ``halted``, after which every step is a no-op until the host notices
    (all decided on the device: metrics reach the host only every ``log_every`` steps).
    """

    def objective(params, probes, cache, index, x, y):
        outputs, stats, cache = trainable.apply(params, probes, x, cache, index)
        return loss_fn(outputs, y), (outputs, stats, cache)

    @jax.jit
    def step(state: TrainState, x, y, halted, index=None):
        grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
        (loss, (outputs, stats, cache)), (grads, probe_grads) = grad_fn(
            state.params, trainable.probes(x), state.cache, index, x, y
        )
        with jax.numpy_dtype_promotion("standard"):  # optax's own transforms (adam's decay**count) are not strict-clean
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = TrainState(optax.apply_updates(state.params, updates), opt_state, cache)
        finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(new)
        applied = finite & ~halted
        metrics = {
            "skipped": ~applied,
            "loss": loss,
            **metrics_fn(outputs, y),
            **forward_metrics(stats),
            **backward_metrics(probe_grads),
        }
        state = jax.tree_util.tree_map(lambda n, o: jnp.where(applied, n, o), new, state)
        return state, metrics, halted | (~finite & stop_on_nonfinite)

    return step


def make_eval_step(
    trainable: LinenModel | NNXModel, loss_fn: Callable = default_loss, metrics_fn: Callable = default_metrics
) -> Callable:
    """``evaluate(params, x, y, weight) -> sums``, jitted; ``loss_fn`` and ``metrics_fn`` are applied to each
    sample (as a batch of one) so that ``weight`` (0/1) masks the padding of the last batch exactly. The solves
    start cold (no fixed-point cache)."""

    def per_sample(fn, outputs, y):
        return jax.vmap(lambda o, t: fn(o[None], t[None]))(outputs, y)

    @jax.jit
    def evaluate(params, x, y, weight):
        outputs, stats, _ = trainable.apply(params, None, x)
        values = {"loss": per_sample(loss_fn, outputs, y), **per_sample(metrics_fn, outputs, y)}
        steps = jnp.stack([s.num_steps for s in stats]).astype(jnp.float32)
        return {
            "count": jnp.sum(weight),
            **{key: jnp.sum(weight.astype(value.dtype) * value) for key, value in values.items()},
            "fwd_steps": jnp.sum(weight * jnp.mean(steps, axis=0)),
            "fwd_max_steps": jnp.max(jnp.where(weight > 0, jnp.max(steps, axis=0), 0.0)),
        }

    return evaluate


def evaluate(eval_step: Callable, params: Any, x: np.ndarray, y: np.ndarray, batch_size: int) -> dict:
    """The loss, the metrics and the forward steps over all of ``(x, y)`` in fixed-size (padded) batches."""
    totals: dict = {}
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        pad = batch_size - len(xb)
        weight = np.concatenate([np.ones(len(xb), np.float32), np.zeros(pad, np.float32)])
        xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
        yb = np.concatenate([yb, np.zeros((pad, *yb.shape[1:]), yb.dtype)])
        sums = jax.device_get(eval_step(params, xb, yb, weight))
        for key, value in sums.items():
            totals[key] = max(totals.get(key, 0.0), value) if key == "fwd_max_steps" else totals.get(key, 0.0) + value
    n = totals.pop("count")
    max_steps = totals.pop("fwd_max_steps")
    means = {key: float(value / n) for key, value in totals.items() if key != "fwd_steps"}
    return {**means, "fwd_mean_steps": float(totals["fwd_steps"] / n), "fwd_max_steps": float(max_steps)}


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


def checkpoint_manager(directory: str | Path, read_only: bool = False) -> ocp.CheckpointManager:
    """A synchronous orbax manager keeping the last :data:`CHECKPOINTS_KEPT` epochs (older ones deleted
    only after a newer one is complete: orbax writes to a temporary directory and renames it)."""
    with _orbax_quiet():  # also its notes on read_only options
        options = ocp.CheckpointManagerOptions(
            max_to_keep=CHECKPOINTS_KEPT, enable_async_checkpointing=False, read_only=read_only
        )
        return ocp.CheckpointManager(Path(directory).absolute(), options=options)


@contextlib.contextmanager
def _orbax_quiet() -> Iterator[None]:
    """Silence orbax's absl error logging: the damage it meets is reported once, by jdeq, as a warning."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def checksum(tree: Any) -> str:
    """sha256 of the bytes of every leaf of ``tree``, in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


def model_fields(value: Any, prefix: str = "model") -> dict:
    """``{"model.<field path>": repr}`` of a (linen) dataclass's fields, nested ones flattened, addresses dropped."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            key: text
            for field in dataclasses.fields(value)
            if field.name != "parent"
            for key, text in model_fields(getattr(value, field.name), f"{prefix}.{field.name}").items()
        }
    return {prefix: re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))}


def run_config(model: dict, opt_state: Any, data: Dataset, seed: int, batch_size: int, config: dict) -> dict:
    """What identifies a run, as flat JSON ``{field: value}``: the ``model``'s fields (``model.<path>``, see
    :func:`model_fields`), the optimizer state's structure and shapes, the data's shapes, ``seed``,
    ``batch_size`` and the user's ``config`` (``config.<key>``)."""
    fields = {
        **model,
        "optimizer.structure": str(jax.tree_util.tree_structure(opt_state)),
        "optimizer.shapes": " ".join(
            f"{leaf.dtype}{list(leaf.shape)}" for leaf in jax.tree_util.tree_leaves(opt_state)
        ),
        "data.x_train": list(data.x_train.shape),
        "data.x_test": list(data.x_test.shape),
        "data.dtype": str(data.x_train.dtype),
        "data.num_classes": int(data.num_classes),
        "seed": int(seed),
        "batch_size": int(batch_size),
        **{f"config.{key}": value for key, value in config.items()},
    }
    try:
        return json.loads(json.dumps(fields))  # as it reads back: tuples become lists
    except (TypeError, ValueError) as err:
        raise ValueError(f"config must map names to JSON values: {err}") from None


def check_config(directory: Path, epoch: int, saved: dict, new: dict) -> None:
    """ValueError naming each field in which ``new`` differs from ``saved``, the run config of checkpoint ``epoch``."""

    def show(config, key):
        text = json.dumps(config[key]) if key in config else "(absent)"
        return text if len(text) <= 200 else text[:197] + "..."

    differ = [
        f"{k}: saved {show(saved, k)}, new {show(new, k)}"
        for k in sorted(saved.keys() | new.keys())
        if saved.get(k) != new.get(k)
    ]
    if differ:
        raise ValueError(
            f"checkpoint {epoch} in {directory} was saved by another run configuration ({'; '.join(differ)}); "
            "it is left as it is: resume with the same configuration, or use another checkpoint_dir"
        )


def save_checkpoint(manager: ocp.CheckpointManager, epoch: int, state: TrainState, history: list[dict], config: dict):
    """Save ``state`` (its fixed-point cache too, if any), ``history`` and ``run`` (``config``, and the
    :func:`checksum` of it and of each item) as checkpoint ``epoch``."""
    arrays = {"params": state.params, "opt_state": state.opt_state}
    if state.cache is not None:
        arrays["cache"] = state.cache
    items = {**arrays, "history": history, "config": config}
    run = {"config": config, "sha256": {name: checksum(item) for name, item in items.items()}}
    args = ocp.args.Composite(
        **{name: ocp.args.StandardSave(item) for name, item in arrays.items()},
        history=ocp.args.JsonSave(history),
        run=ocp.args.JsonSave(run),
    )
    manager.save(epoch, args=args)
    manager.wait_until_finished()


def _read(manager: ocp.CheckpointManager, epoch: int, **items: Any) -> dict:
    """orbax's restore of ``items`` (name: restore args) of checkpoint ``epoch``; CheckpointError (one line) if it fails."""
    try:
        with _orbax_quiet():
            return dict(manager.restore(epoch, args=ocp.args.Composite(**items)))
    except Exception as err:  # orbax/tensorstore raise many types for damaged files
        lines = str(err).strip().splitlines() or [""]
        raise CheckpointError(f"unreadable ({type(err).__name__}: {lines[0][:160]})") from None


def restore_checkpoint(manager: ocp.CheckpointManager, epoch: int, prepare: Callable[[int, dict], dict]) -> dict:
    """The items of checkpoint ``epoch`` named by ``prepare(epoch, saved_config)`` (name: template, ``None`` for
    JSON), verified against their checksums; CheckpointError (the reason) if unreadable or altered."""
    run = _read(manager, epoch, run=ocp.args.JsonRestore())["run"]
    if not (isinstance(run, dict) and isinstance(run.get("config"), dict) and isinstance(run.get("sha256"), dict)):
        raise CheckpointError("unreadable (no record of its config and checksums)")
    if checksum(run["config"]) != run["sha256"].get("config"):
        raise CheckpointError("altered on disk (sha256 mismatch in config)")
    templates = prepare(epoch, run["config"])
    args = {k: ocp.args.JsonRestore() if t is None else ocp.args.StandardRestore(t) for k, t in templates.items()}
    items = _read(manager, epoch, **args)
    altered = [name for name in templates if checksum(items[name]) != run["sha256"].get(name)]
    if altered:
        raise CheckpointError(f"altered on disk (sha256 mismatch in {', '.join(altered)})")
    return items


def restore_latest(manager: ocp.CheckpointManager, prepare: Callable[[int, dict], dict]) -> tuple[int, dict]:
    """``(epoch, items)`` of the newest intact checkpoint (see :func:`restore_checkpoint`); each newer one is
    skipped with a warning. CheckpointError listing every checkpoint and why if none is intact."""
    failures = []
    for epoch in sorted(manager.all_steps(), reverse=True):
        try:
            return epoch, restore_checkpoint(manager, epoch, prepare)
        except CheckpointError as err:
            failures.append(f"checkpoint {epoch}: {err}")
            warnings.warn(f"skipping checkpoint {epoch} in {manager.directory}: {err}", stacklevel=3)
    raise CheckpointError(f"no intact checkpoint in {manager.directory} ({'; '.join(failures) or 'none saved'})")


def set_aside(manager: ocp.CheckpointManager, epochs: list[int]) -> None:
    """Rename checkpoints ``epochs`` (found damaged) to ``<epoch>.damaged[-<n>]``, so those epochs can be saved
    again; jdeq deletes nothing."""
    directory = Path(manager.directory)
    for epoch in epochs:
        names = (f"{epoch}.damaged" + (f"-{n}" if n else "") for n in itertools.count())
        target = next(directory / name for name in names if not (directory / name).exists())
        (directory / str(epoch)).rename(target)
        warnings.warn(f"moved damaged checkpoint {epoch} to {target}", stacklevel=3)
    manager.reload()


def resume(manager: ocp.CheckpointManager, state: TrainState, config: dict, epochs: int) -> tuple[TrainState, list]:
    """``(state, history)`` to continue from: the newest intact checkpoint's, newer damaged ones set aside;
    ``(state, [])`` if there is none. ValueError, leaving the checkpoints as they are, if it was saved by a
    run of another ``config`` or trained for more than ``epochs`` epochs."""
    if not manager.all_steps():
        return state, []

    def templates(epoch: int, saved: dict) -> dict:
        check_config(Path(manager.directory), epoch, saved, config)
        cache = {} if state.cache is None else {"cache": state.cache}
        return {"params": state.params, "opt_state": state.opt_state, **cache, "history": None}

    epoch, items = restore_latest(manager, templates)
    if epoch > epochs:
        raise ValueError(
            f"checkpoint {epoch} in {manager.directory} is of a run already trained for {epoch} epochs, more than "
            f"epochs={epochs}: pass epochs >= {epoch} to continue it, read it with jdeq.train.load, or use another "
            "checkpoint_dir"
        )
    set_aside(manager, [e for e in manager.all_steps() if e > epoch])
    return TrainState(items["params"], items["opt_state"], items.get("cache")), list(items["history"])


def load(checkpoint_dir: str | Path, model: Any) -> Any:
    """The ``params`` of ``model`` in the newest intact checkpoint of a :func:`fit` run in ``checkpoint_dir``; an NNX
    ``model`` is updated in place with them, ready for inference. The template comes from ``model.init`` with the
    saved seed and input shape (linen) or the model's own parameters (NNX). Newer damaged checkpoints are skipped
    with a warning; nothing on disk is modified. ValueError if ``model``'s fields differ from the saved model's."""
    directory = Path(checkpoint_dir).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    trainable = as_trainable(model)

    def templates(epoch: int, saved: dict) -> dict:
        model_saved = {k: v for k, v in saved.items() if k == "model" or k.startswith("model.")}
        check_config(directory, epoch, model_saved, trainable.fields())
        x = jnp.zeros((1, *saved["data.x_train"][1:]), saved["data.dtype"])
        return {"params": trainable.init(saved["seed"], x)}

    params = restore_latest(checkpoint_manager(directory, read_only=True), templates)[1]["params"]
    trainable.finish(params)
    return params


def writable_directory(path: str | Path) -> Path:
    """``path`` as an absolute Path, created if missing; ValueError naming it unless files can be created in it."""
    path = Path(path).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{path} is not a writable directory ({type(err).__name__}: {err.strerror or err})") from None
    return path


class DirectoryLockedError(RuntimeError):
    """Another live run holds the checkpoint directory's lock file."""


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory/jdeq.lock`` (this process's pid and host) while the block runs; see :func:`_acquire`."""
    path = directory / LOCK_FILE
    _acquire(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _acquire(path: Path, replace_stale: bool = True) -> None:
    """Create the lock file ``path`` atomically (O_CREAT|O_EXCL). One left by a process that is no longer running
    on this host is stale: replaced, with a warning. Any other holder: DirectoryLockedError naming it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            holder = None
        pid, host = (holder.get("pid"), holder.get("host")) if isinstance(holder, dict) else (None, None)
        owner = f"pid {pid} on {host}" if pid else "an unknown process (unreadable lock file)"
        if not (
            replace_stale and host == socket.gethostname() and isinstance(pid, int) and pid > 0 and not _running(pid)
        ):
            raise DirectoryLockedError(
                f"{path.parent} is in use by another run ({owner}, lock file {path}); wait for it to end, or delete "
                "the lock file if no run uses the directory"
            ) from None
        warnings.warn(f"replacing the stale lock {path} of {owner}, which is no longer running", stacklevel=4)
        path.unlink(missing_ok=True)
        return _acquire(path, replace_stale=False)
    with os.fdopen(fd, "w") as file:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, file)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def init_state(trainable: LinenModel | NNXModel, optimizer: optax.GradientTransformation, data: Dataset, seed: int):
    """The :class:`TrainState` a run starts from: the model's parameters, ``optimizer.init`` of them, and the DEQ
    layers' empty fixed-point cache (if any), checked to fit ``data``'s training set."""
    params = trainable.init(seed, data.x_train[:1])
    if trainable.cache is not None:
        check_cache_fits(trainable, len(data.x_train))
    return TrainState(params, optimizer.init(params), trainable.cache)


def check_cache_fits(trainable: LinenModel | NNXModel, n: int) -> None:
    """ValueError unless every fixed-point cache of the model holds ``n`` examples and the model takes ``index=``."""
    sizes = sorted({jnp.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(trainable.cache)})
    if sizes != [n]:
        raise ValueError(
            f"the model's fixed-point cache holds {', '.join(map(str, sizes))} examples, the training set {n}: build "
            "its DEQ layers with cache_size=len(data.x_train)"
        )
    parameters = inspect.signature(trainable.model.__call__).parameters
    if "index" not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        raise ValueError(
            f"{type(trainable.model).__name__} has a DEQ layer with a fixed-point cache, so fit calls it with index= "
            "(the samples' indices in the training set): add an index argument to its __call__ and pass it on to "
            "the layer"
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
) -> tuple[TrainState, list[dict]]:
    """``(state, rows)`` after the steps of epoch ``epoch`` (0-based), one metrics row each; see :func:`fit`.

    Metrics stay on the device and are fetched every ``log_every`` steps and at the end of the epoch; a halted
    step (nonfinite, ``on_nonfinite="stop"``) raises :class:`NonfiniteError` at the next fetch, naming it.
    """
    rows, pending, halted = [], [], jnp.zeros((), bool)
    batches = list(epoch_batches(seed, epoch, len(data.x_train), batch_size))
    for step, index in enumerate(batches, 1):
        keys = () if state.cache is None else (index,)  # the examples' indices, for the fixed-point cache
        state, metrics, halted = train_step(state, data.x_train[index], data.y_train[index], halted, *keys)
        pending.append(metrics)
        if step % log_every == 0 or step == len(batches):
            fetched = jax.device_get((pending, halted))
            rows += fetched[0]
            if fetched[1]:
                first = next(i for i, row in enumerate(rows, 1) if row["skipped"])
                raise NonfiniteError(
                    f"nonfinite loss, gradient or update at epoch {epoch + 1}, step {first} (loss "
                    f"{rows[first - 1]['loss']}): stopped before applying it; no nonfinite state was saved. Pass "
                    'on_nonfinite="skip" to skip such steps.'
                )
            bar.update(len(pending))
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", fwd=f"{rows[-1]['fwd_mean_steps']:.1f}", refresh=False)
            pending = []
    return state, rows


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
    log_every: int = 10,
    checkpoint_dir: Optional[str | Path] = None,
    config: Optional[dict] = None,
    on_nonfinite: str = "stop",
    progress: bool = True,
) -> FitResult:
    """Train ``model``, a linen ``Module`` or an ``nnx.Module`` mapping a batch ``x`` to outputs, on ``data``.

    Args:
      loss_fn: ``loss_fn(outputs, y) -> scalar``, averaged over the batch (default :func:`default_loss`,
        softmax cross-entropy against integer labels).
      metrics_fn: ``metrics_fn(outputs, y) -> {name: scalar}`` (default :func:`default_metrics`, accuracy).
      eval_data: ``(x, y)`` evaluated after each epoch (default: ``data``'s test split).
      on_epoch_end: ``on_epoch_end(epoch, row)`` after each epoch's history row (1-based epoch).
      log_every: training metrics are fetched from the device every ``log_every`` steps (and at the end of each
        epoch), not after each step.

    Each history row holds the epoch's mean training metrics (``loss``, the metrics, forward/backward
    solver statistics of the DEQ layers, ``skipped_steps``) and ``test_*`` metrics on ``eval_data``.
    Parameters: linen models are initialised from ``PRNGKey(seed)``; an NNX model starts from its own
    parameters (the seed sets the batch order) and holds the trained ones when ``fit`` returns.

    With ``checkpoint_dir`` (checked writable first, then locked for the run: see :func:`directory_lock`), the
    run resumes from the newest intact checkpoint there (see :func:`resume`) and saves one per epoch, with
    checksums and the run's configuration (:func:`run_config`, including ``config``, a dict of JSON values).

    Warm starts: when the model's DEQ layers have a fixed-point cache (``cache_size=len(data.x_train)``), each
    training step passes ``index=`` (the batch's indices in ``data.x_train``) and keeps the cache in the state
    (checkpointed, restored on resume); evaluation starts cold.

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
    if not (isinstance(log_every, int) and log_every >= 1):
        raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
    trainable = as_trainable(model)
    loss_fn, metrics_fn = loss_fn or default_loss, metrics_fn or default_metrics
    x_eval, y_eval = (data.x_test, data.y_test) if eval_data is None else eval_data
    directory = None if checkpoint_dir is None else writable_directory(checkpoint_dir)
    with contextlib.nullcontext() if directory is None else directory_lock(directory):
        state = init_state(trainable, optimizer, data, seed)
        run = run_config(trainable.fields(), state.opt_state, data, seed, batch_size, config or {})
        manager = None if directory is None else checkpoint_manager(directory)
        state, history = (state, []) if manager is None else resume(manager, state, run, epochs)
        train_step = make_train_step(trainable, optimizer, loss_fn, metrics_fn, on_nonfinite == "stop")
        eval_step = make_eval_step(trainable, loss_fn, metrics_fn)
        steps_per_epoch = n // batch_size
        start = time.perf_counter()
        with tqdm(
            total=epochs * steps_per_epoch, initial=len(history) * steps_per_epoch, disable=not progress, unit="step"
        ) as bar:
            for epoch in range(len(history), epochs):
                bar.set_description(f"epoch {epoch + 1}/{epochs}")
                state, rows = train_epoch(train_step, state, data, seed, epoch, batch_size, log_every, bar)
                test = evaluate(eval_step, state.params, x_eval, y_eval, eval_batch_size)
                history.append({"epoch": epoch + 1, **epoch_summary(rows), **{f"test_{k}": v for k, v in test.items()}})
                if manager is not None:
                    save_checkpoint(manager, epoch + 1, state, history, run)
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, history[-1])
        trainable.finish(state.params)
        return FitResult(state, history, time.perf_counter() - start)
