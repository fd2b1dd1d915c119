"""The data of :func:`jdeq.train.fit`: in-memory arrays or a stream of ``(x, y)`` batches, the step budget and the
run's position in it.

In-memory data (a :class:`jdeq.data.Dataset` or an ``(x, y)`` pair of arrays) is indexed: the full batches of
epoch ``e`` are a permutation drawn from ``numpy.random.default_rng((seed, e))`` (:func:`epoch_batches`) and carry
their examples' indices (for the fixed-point cache). A stream is ``data(epoch)``, a callable returning a fresh
iterable of ``(x, y)`` batches for each 0-based epoch, a re-iterable (each ``iter(data)`` a new pass: a list, a
data loader), or a one-shot iterator (a generator), which gives one epoch only. Every batch of a stream is
checked against the first (shapes, dtypes, as many targets as inputs, labels in range when the classes are known).
"""

from __future__ import annotations

import inspect
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Optional

import numpy as np

from ..data import Dataset, check_dataset, check_examples, check_labels

DEFAULT_BATCH_SIZE = 64


class Position(NamedTuple):
    """Where a run stands: ``epoch`` (0-based) in progress, ``offset`` of its batches trained, ``step`` batches
    trained in all."""

    epoch: int = 0
    offset: int = 0
    step: int = 0


class Budget(NamedTuple):
    """How long a run trains: ``epochs`` passes over the data or ``steps`` batches (exactly one is set)."""

    epochs: Optional[int]
    steps: Optional[int]

    @classmethod
    def of(cls, epochs: Any, steps: Any) -> Budget:
        """The budget of ``fit(epochs=...)`` or ``fit(steps=...)``; ValueError unless exactly one is a positive int."""
        if (epochs is None) == (steps is None):
            given = "both" if epochs is not None else "neither"
            raise ValueError(f"pass exactly one of epochs= (passes over the data) and steps= (batches), got {given}")
        name, value = ("epochs", epochs) if steps is None else ("steps", steps)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return cls(None if epochs is None else int(epochs), None if steps is None else int(steps))

    def done(self, position: Position) -> bool:
        if self.steps is not None:
            return position.step >= self.steps
        return position.epoch >= self.epochs

    def exceeded(self, position: Position) -> str:
        """What a checkpoint at ``position`` trained beyond this budget and the budget it needs (``""`` if none)."""
        if self.steps is not None:
            beyond = position.step > self.steps
            return (
                f"{position.step} steps, more than steps={self.steps}: pass steps >= {position.step}" if beyond else ""
            )
        needed = position.epoch + (position.offset > 0)
        return (
            f"{needed} epochs, more than epochs={self.epochs}: pass epochs >= {needed}" if needed > self.epochs else ""
        )

    def limit(self, position: Position) -> Optional[int]:
        """The most batches the epoch starting at ``position`` may train (``None``: to the end of the data)."""
        return None if self.steps is None else self.steps - position.step

    def __str__(self) -> str:
        return f"epochs={self.epochs}" if self.steps is None else f"steps={self.steps}"


def epoch_batches(seed: int, epoch: int, n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Index arrays of the batches ``fit`` reads from ``n`` in-memory samples in epoch ``epoch`` (0-based): a permutation
    drawn from ``numpy.random.default_rng((seed, epoch))`` cut into ``n // batch_size`` full batches (the remainder sits
    out that epoch). A stream ``data(epoch)`` built on it (e.g. augmenting each batch) reads what ``fit`` would."""
    order = np.random.default_rng((seed, epoch)).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def is_array(value: Any) -> bool:
    """Whether ``value`` is array-like for the data forms: anything with a ``shape`` and a ``dtype``."""
    return hasattr(value, "shape") and hasattr(value, "dtype")


def is_arrays(data: Any) -> bool:
    """Whether ``data`` is an ``(x, y)`` pair of arrays (:func:`is_array`)."""
    return isinstance(data, tuple) and len(data) == 2 and all(map(is_array, data))


class ArraySource:
    """In-memory ``(x, y)``, indexed: see the module's docstring. ``num_classes``: known for a Dataset."""

    indexed = True
    one_shot = False

    def __init__(self, x: Any, y: Any, what: str, split: str, num_classes: Optional[int] = None):
        self.x, self.y, self.what, self.split, self.num_classes = x, y, what, split, num_classes

    @property
    def size(self) -> int:
        return len(self.x)

    def first(self) -> tuple[Any, Any]:
        return self.x[:1], self.y[:1]

    def batch_size(self, batch_size: Optional[int]) -> int:
        """``batch_size`` checked to be in ``[1, len(x)]``; ``None``: 64, or the whole set if smaller."""
        if batch_size is None:
            return min(DEFAULT_BATCH_SIZE, self.size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise ValueError(f"batch_size must be an int, got {batch_size!r}")
        if not 1 <= batch_size <= self.size:
            raise ValueError(f"batch_size must be in [1, {self.size}] (the training set size), got {batch_size}")
        return int(batch_size)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.size // batch_size

    def train_batches(self, seed: int, epoch: int, batch_size: int) -> Iterator[tuple]:
        """``(x, y, index)`` of each full batch of epoch ``epoch`` (:func:`epoch_batches`)."""
        for index in epoch_batches(seed, epoch, self.size, batch_size):
            yield self.x[index], self.y[index], index

    def eval_batches(self, epoch: int) -> Iterable[tuple]:
        return [(self.x, self.y)]

    def check_labels(self, num_classes: Optional[int]) -> None:
        if num_classes is not None:
            check_labels(self.what, self.split, self.y, num_classes)

    def check_like(self, train: Any) -> None:
        """ValueError unless inputs and targets are shaped per sample like ``train``'s (evaluation data)."""
        check_alike(self.what, (self.x, self.y), train.first())

    def fields(self, prefix: str) -> dict:
        return {f"data.x_{prefix}": list(self.x.shape), f"data.y_{prefix}": describe(self.y)}


class StreamSource:
    """A stream of ``(x, y)`` batches: see the module's docstring. The first batch is read at construction (to
    build the model and check the rest) and is the first of epoch 0."""

    indexed = False
    size = None

    def __init__(self, data: Any, what: str, split: str):
        self.data, self.what, self.split, self.num_classes = data, what, split, None
        if callable(data):
            check_epoch_callable(data, what)
        elif not isinstance(data, Iterable):
            raise TypeError(
                f"{what} must be a jdeq.data.Dataset, an (x, y) pair of arrays, an iterable of (x, y) batches or a "
                f"callable {what}(epoch) returning one, got {type(data).__name__}"
            )
        self.one_shot = not callable(data) and iter(data) is data
        first_pass = self._epoch(0)
        # len() where it works: some streams define __len__ but raise TypeError (tqdm without total, loaders of
        # unknown size); length_hint then falls back to its default
        self.first_epoch_length = operator.length_hint(first_pass, 0) or None
        batches = iter(first_pass)
        try:
            head = next(batches)
        except StopIteration:
            raise ValueError(f"{what} gave no batch") from None
        self._first = as_batch(head, what, "batch 1 of epoch 1")
        self._pending: Optional[Iterator] = itertools.chain([head], batches)

    def _epoch(self, epoch: int) -> Iterable:
        return self.data(epoch) if callable(self.data) else self.data

    def first(self) -> tuple[Any, Any]:
        return self._first

    def batch_size(self, batch_size: Optional[int]) -> None:
        if batch_size is not None:
            raise ValueError(f"batch_size applies to in-memory data; {self.what} is a stream of its own batches")

    def steps_per_epoch(self, batch_size: Optional[int]) -> Optional[int]:
        """The number of batches of the first epoch where the stream has a length (a list, or ``data(epoch)``
        returning one), for the progress bar; ``None`` where it has none. Every epoch still ends where it ends."""
        return self.first_epoch_length

    def batches(self, epoch: int) -> Iterator[tuple]:
        """The checked ``(x, y)`` batches of epoch ``epoch`` (0-based); ValueError for a second pass over a one-shot
        iterator."""
        if self._pending is not None and epoch == 0:
            batches, self._pending = self._pending, None
        elif self.one_shot:
            raise one_shot_error(self.what, f"it gave its one epoch and cannot give epoch {epoch + 1}")
        else:
            batches = iter(self._epoch(epoch))
        for i, batch in enumerate(batches, 1):
            x, y = as_batch(batch, self.what, f"batch {i} of epoch {epoch + 1}")
            check_alike(f"{self.what}, batch {i} of epoch {epoch + 1}", (x, y), self._first, "its first batch")
            if self.num_classes is not None:
                check_labels(
                    f"{self.what}, batch {i} of epoch {epoch + 1}", self.split, np.asarray(y), self.num_classes
                )
            yield x, y

    def train_batches(self, seed: int, epoch: int, batch_size: None) -> Iterator[tuple]:
        return ((x, y, None) for x, y in self.batches(epoch))

    def eval_batches(self, epoch: int) -> Iterator[tuple]:
        return self.batches(epoch)

    def check_labels(self, num_classes: Optional[int]) -> None:
        """Each batch's labels are checked in ``[0, num_classes)`` as it is read (the first one now)."""
        self.num_classes = num_classes
        if num_classes is not None:
            check_labels(f"{self.what}, batch 1 of epoch 1", self.split, np.asarray(self._first[1]), num_classes)

    def check_like(self, train: Any) -> None:
        check_alike(f"{self.what}, batch 1", self._first, train.first())

    def fields(self, prefix: str) -> dict:
        x, y = self._first
        return {f"data.x_{prefix}": [None, *x.shape[1:]], f"data.y_{prefix}": describe(y, stream=True)}


def one_shot_error(what: str, why: str) -> ValueError:
    return ValueError(
        f"{what} is a one-shot iterator (a generator?): {why}. Pass a re-iterable (a list of batches, a data "
        f"loader) or a callable {what}(epoch) returning a fresh iterable of (x, y) batches for each epoch"
    )


def check_epoch_callable(data: Callable, what: str) -> None:
    """TypeError unless ``data`` can be called as ``data(epoch)``."""
    try:
        inspect.signature(data).bind(0)
    except TypeError:
        raise TypeError(
            f"a callable {what} is called as {what}(epoch) with the 0-based epoch (so that a resumed run reads the "
            f"batches an uninterrupted one reads) and returns an iterable of (x, y) batches; {data!r} does not take "
            f"the epoch (e.g. lambda epoch: loader)"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): it is called as it is
        pass


def as_batch(batch: Any, what: str, where: str) -> tuple[Any, Any]:
    """``batch`` as an ``(x, y)`` pair of arrays (numpy arrays for anything without a shape and a dtype), checked to
    hold as many targets as inputs, at least one; ValueError naming ``where`` otherwise."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            f"{what} must give (x, y) batches; {where} is a {type(batch).__name__} (in-memory arrays are passed as "
            "a tuple (x, y))"
        )
    x, y = (part if is_array(part) else np.asarray(part) for part in batch)
    if np.ndim(x) == 0 or np.ndim(y) == 0:
        raise ValueError(f"{what}: {where} has no batch axis (x shape {np.shape(x)}, y shape {np.shape(y)})")
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"{what}: {where} holds {len(x)} inputs and {len(y)} targets")
    return x, y


def check_alike(what: str, batch: tuple, reference: tuple, other: str = "the training data's") -> None:
    """ValueError unless ``batch``'s inputs and targets have the per-sample shapes of ``reference``'s and targets
    of the same kind (integer or not)."""
    for name, part, ref in zip(("inputs", "targets"), batch, reference):
        if part.shape[1:] != ref.shape[1:]:
            raise ValueError(
                f"{what}: {name} shaped {tuple(part.shape[1:])} per sample, {other} {tuple(ref.shape[1:])}"
            )
    if integer(batch[1].dtype) != integer(reference[1].dtype):
        raise ValueError(f"{what}: targets of dtype {batch[1].dtype}, {other} {reference[1].dtype}")


def integer(dtype: Any) -> bool:
    return np.issubdtype(np.dtype(dtype), np.integer)


def describe(y: Any, stream: bool = False) -> str:
    """``y``'s dtype and shape as text (a stream's batch axis as ``None``), for the run config."""
    shape = [None, *y.shape[1:]] if stream else list(y.shape)
    return f"{np.dtype(y.dtype)}{shape}"


def training_source(data: Any) -> ArraySource | StreamSource:
    """``fit``'s ``data`` as a source: a Dataset's training split (checked by :func:`jdeq.data.check_dataset`), an
    ``(x, y)`` pair of arrays, or a stream (see the module's docstring)."""
    if isinstance(data, (ArraySource, StreamSource)):
        return data
    if isinstance(data, Dataset):
        check_dataset(data)
        return ArraySource(data.x_train, data.y_train, f"dataset {data.name!r}", "train", data.num_classes)
    if is_arrays(data):
        check_examples("data", "train", *data)
        return ArraySource(*data, "data", "train")
    return StreamSource(data, "data", "train")


def evaluation_source(data: Any, eval_data: Any) -> ArraySource | StreamSource | None:
    """``fit``'s ``eval_data`` as a source (a Dataset: its test split), by default ``data``'s test split if it is a
    Dataset, else ``None`` (no evaluation). A one-shot iterator is refused: evaluation reads it every epoch."""
    if eval_data is None:
        eval_data = data if isinstance(data, Dataset) else None
    if eval_data is None:
        return None
    if isinstance(eval_data, Dataset):
        check_dataset(eval_data)
        what = f"dataset {eval_data.name!r}" + ("" if eval_data is data else " (eval_data)")
        return ArraySource(eval_data.x_test, eval_data.y_test, what, "test", eval_data.num_classes)
    if is_arrays(eval_data):
        check_examples("eval_data", "test", *eval_data)
        return ArraySource(*eval_data, "eval_data", "test")
    source = StreamSource(eval_data, "eval_data", "test")
    if source.one_shot:
        raise one_shot_error("eval_data", "evaluation reads it after every epoch")
    return source


def trains(batches: Iterator[tuple], offset: int, limit: Optional[int]) -> Iterator[tuple]:
    """``batches`` without the first ``offset`` (trained before a resume) and, with ``limit``, at most ``limit``."""
    return itertools.islice(batches, offset, None if limit is None else offset + limit)
