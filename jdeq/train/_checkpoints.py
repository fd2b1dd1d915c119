"""Checkpoints of :func:`jdeq.train.fit`: the orbax manager, checksums, the run config, resume and load.

Checkpoints are written at the end of each epoch, with the sha256 of every item and the run's configuration,
so a run resumed from its last intact checkpoint replays exactly the steps an uninterrupted run takes; damaged
ones are set aside (renamed), never deleted. A checkpoint saved by an older jdeq, before a field with a default was
added to a model, solver or gradient mode, is read as if it had recorded that field at its default
(:func:`upgraded`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ._adapters import FieldValue, as_trainable, describe
from ._loop import TrainState
from ._sources import Budget, Position

CHECKPOINTS_KEPT = 3
logger = logging.getLogger("jdeq.train")


class CheckpointError(RuntimeError):
    """No checkpoint could be read back intact (unreadable, partial, or altered on disk)."""


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


def run_config(model: dict, opt_state: Any, data: dict, seed: int, batch_size: Any, config: dict) -> dict:
    """What identifies a run, as flat JSON ``{field: value}``: the ``model``'s fields (``model.<path>``, see
    :func:`model_fields`), the optimizer state's structure and shapes, the ``data`` fields (shapes and dtypes of
    the training and evaluation data, ``data.<name>``), ``seed``, ``batch_size`` and the user's ``config``
    (``config.<key>``)."""
    fields = {
        **model,
        "optimizer.structure": str(jax.tree_util.tree_structure(opt_state)),
        "optimizer.shapes": " ".join(
            f"{leaf.dtype}{list(leaf.shape)}" for leaf in jax.tree_util.tree_leaves(opt_state)
        ),
        **data,
        "seed": int(seed),
        "batch_size": batch_size,
        **{f"config.{key}": value for key, value in config.items()},
    }
    try:
        return json.loads(json.dumps(fields))  # as it reads back: tuples become lists
    except (TypeError, ValueError) as err:
        raise ValueError(f"config must map names to JSON values: {err}") from None


def config_changes(saved: dict, new: dict) -> list[str]:
    """``key: old → new`` for each field in which ``new`` differs from ``saved`` (JSON texts compared, so a NaN
    equals a NaN), long values shortened to a window that starts shortly before their first difference."""

    def text(config, key):
        return json.dumps(config[key]) if key in config else "(absent)"

    def shown(value: str, start: int) -> str:
        window = ("..." if start else "") + value[start : start + 57]
        return value if len(value) <= 60 else window + ("..." if start + 57 < len(value) else "")

    changes = []
    for k in sorted(saved.keys() | new.keys()):
        if json.dumps(saved.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True):
            old, now = text(saved, k), text(new, k)
            first = next((i for i, (a, b) in enumerate(zip(old, now)) if a != b), min(len(old), len(now)))
            start = max(0, first - 20)
            changes.append(f"{k}: {shown(old, start)} → {shown(now, start)}")
    return changes


def upgraded(saved: dict, values: dict[str, FieldValue]) -> tuple[dict, list[str]]:
    """``(saved, added)``: the ``saved`` run config as this version of jdeq writes it, where it differs only by
    fields that the version which saved it did not have and that hold their default here (``values``: the model's
    fields, see :func:`jdeq.train._adapters.field_values`), and those fields as ``"key: Class.field=repr"``. Such a
    field is a ``model.<path>`` key the saved config lacks, or a dataclass field in a saved repr (e.g. a solver in
    a tuple of stages) whose name that repr does not mention. A field whose value differs from its default, or a
    saved repr that differs otherwise, is left as it was saved, for :func:`config_changes` to name."""
    saved, added = dict(saved), []
    for key, field in values.items():
        text = describe(field.value)
        if key not in saved and field.default:
            saved[key] = text
            added.append(f"{key}={text}")
        elif isinstance(saved.get(key), str) and saved[key] != text:
            old, omitted = saved[key], []
            if describe(field.value, functools.partial(mentions, old), omitted) == old:
                saved[key] = text
                added.extend(f"{key}: {name}" for name in omitted)
    return saved, added


def mentions(text: str, name: str) -> bool:
    """Whether the repr ``text`` holds a field ``name=`` (not the end of a longer name)."""
    return re.search(rf"(?<![\w.]){re.escape(name)}=", text) is not None


def check_config(
    directory: Path, epoch: int, saved: dict, new: dict, allow_changes: bool = False, values: dict | None = None
) -> None:
    """ValueError naming each field (old → new) in which ``new`` differs from ``saved``, the run config of
    checkpoint ``epoch``; with ``allow_changes`` a warning instead. With the model's field ``values``, fields that
    ``saved`` predates and that hold their defaults are no difference (:func:`upgraded`; logged at INFO)."""
    saved, added = upgraded(saved, values or {})
    if added:
        logger.info(
            "checkpoint %d in %s predates the fields %s: read at these defaults", epoch, directory, "; ".join(added)
        )
    changes = config_changes(saved, new)
    if changes and allow_changes:
        warnings.warn(f"resuming checkpoint {epoch} of {directory} with changes: {'; '.join(changes)}", stacklevel=4)
    elif changes:
        raise ValueError(
            f"checkpoint {epoch} in {directory} was saved by another run configuration ({'; '.join(changes)}); it is "
            'left as it is: resume with the same configuration, pass resume="allow_changes" to change it '
            "deliberately, or use another checkpoint_dir"
        )


def save_checkpoint(
    manager: ocp.CheckpointManager, state: TrainState, history: list[dict], config: dict, position: Position
):
    """Save ``state`` (its fixed-point cache too, if any), ``history`` and ``run`` (``config``, the run's
    ``position`` and the :func:`checksum` of each item) as checkpoint ``len(history)`` (one per history row)."""
    arrays = {"params": state.params, "opt_state": state.opt_state}
    if state.cache is not None:
        arrays["cache"] = state.cache
    if state.model_state is not None:
        arrays["model_state"] = state.model_state
    position = dict(position._asdict())
    items = {**arrays, "history": history, "config": config, "position": position}
    run = {"config": config, "position": position, "sha256": {name: checksum(item) for name, item in items.items()}}
    args = ocp.args.Composite(
        **{name: ocp.args.StandardSave(item) for name, item in arrays.items()},
        history=ocp.args.JsonSave(history),
        run=ocp.args.JsonSave(run),
    )
    manager.save(len(history), args=args)
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
    for name in ("config", "position"):
        if checksum(run.get(name)) != run["sha256"].get(name):
            raise CheckpointError(f"altered on disk (sha256 mismatch in {name})")
    templates = prepare(epoch, run["config"])
    args = {k: ocp.args.JsonRestore() if t is None else ocp.args.StandardRestore(t) for k, t in templates.items()}
    items = _read(manager, epoch, **args)
    altered = [name for name in templates if checksum(items[name]) != run["sha256"].get(name)]
    if altered:
        raise CheckpointError(f"altered on disk (sha256 mismatch in {', '.join(altered)})")
    return {**items, "run": run}


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


def resume(
    manager: ocp.CheckpointManager,
    state: TrainState,
    config: dict,
    budget: Budget,
    allow_changes: bool = False,
    values: dict | None = None,
) -> tuple[TrainState, list, Position]:
    """``(state, history, position)`` to continue from: the newest intact checkpoint's, newer damaged ones set
    aside; ``(state, [], Position())`` if there is none. ValueError, leaving the checkpoints as they are, if it was
    saved by a run of another ``config`` (unless ``allow_changes``: a warning; fields it predates, at their
    defaults in the model's field ``values``, are no difference) or trained beyond ``budget``."""
    if not manager.all_steps():
        return state, [], Position()

    def templates(number: int, saved: dict) -> dict:
        check_config(Path(manager.directory), number, saved, config, allow_changes, values)
        cache = {} if state.cache is None else {"cache": state.cache}
        model_state = {} if state.model_state is None else {"model_state": state.model_state}
        return {"params": state.params, "opt_state": state.opt_state, **cache, **model_state, "history": None}

    number, items = restore_latest(manager, templates)
    position = Position(**items["run"]["position"])
    if beyond := budget.exceeded(position):
        raise ValueError(
            f"checkpoint {number} in {manager.directory} is of a run already trained for {beyond} to continue it, "
            "read it with jdeq.train.load, or use another checkpoint_dir"
        )
    set_aside(manager, [e for e in manager.all_steps() if e > number])
    state = TrainState(items["params"], items["opt_state"], items.get("cache"), items.get("model_state"))
    return state, list(items["history"]), position


def load(checkpoint_dir: str | Path, model: Any) -> Any:
    """The ``params`` of ``model`` in the newest intact checkpoint of a :func:`fit` run in ``checkpoint_dir``; an NNX
    ``model`` is updated in place with them (and its batch statistics and rng state), ready for inference. The template comes from ``model.init`` with the
    saved seed and input shape (linen) or the model's own parameters (NNX). Newer damaged checkpoints are skipped
    with a warning; nothing on disk is modified. ValueError if ``model``'s fields differ from the saved model's
    (fields added to jdeq after it was saved, at their defaults in ``model``, are no difference)."""
    directory = Path(checkpoint_dir).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    trainable = as_trainable(model)

    def templates(epoch: int, saved: dict) -> dict:
        model_saved = {k: v for k, v in saved.items() if k == "model" or k.startswith("model.")}
        check_config(directory, epoch, model_saved, trainable.fields(), values=trainable.field_values())
        x = jnp.zeros((1, *saved["data.x_train"][1:]), saved["data.dtype"])
        params = trainable.init(saved["seed"], x)
        return {"params": params, **({} if trainable.model_state is None else {"model_state": trainable.model_state})}

    items = restore_latest(checkpoint_manager(directory, read_only=True), templates)[1]
    trainable.finish(items["params"], items.get("model_state"))
    return items["params"]
