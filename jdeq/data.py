"""Datasets as numpy arrays: scikit-learn's bundled digits (real, offline) and loaders for the standard
MNIST (idx files, gzipped or not) and CIFAR-10 (python pickle batches) formats from a local directory.

Images are float32 in ``[0, 1]`` shaped ``(N, H, W, C)`` (``flatten=True``: ``(N, H·W·C)``); labels int32.
Downloads happen only with ``download=True``; a missing directory or file is a ``FileNotFoundError``
naming what is missing. A download that fails, is cut short, is an HTML page or differs from the published
MD5 is a ``ConnectionError`` naming the URL, and leaves no file behind.

Checked at load time, each failure a ``ValueError`` naming the file (and the index of the first bad value):
CIFAR-10 pickles are unpickled without running code (only numpy array reconstruction may be named);
malformed or truncated pickles, gzip files and idx headers are refused; pixels must be integers in ``[0, 255]``;
labels must have an integer dtype (float labels are refused, even integral ones like ``2.0``: nothing is cast
before it is checked).
Every dataset then passes :func:`check_dataset` before labels are cast to int32.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
# Published MD5 of each download (the values torchvision checks too).
DOWNLOAD_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
}
# What a CIFAR-10 python batch may name when unpickled: numpy's array reconstruction (as Python 2 wrote it,
# numpy 2's module names, protocol 5's _frombuffer) and the codec Python 3 uses for bytes in protocols 0-2.
PICKLE_GLOBALS = frozenset(
    [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
    + [(f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
    + [(f"numpy.{core}.multiarray", "scalar") for core in ("core", "_core")]  # numpy scalars: list(np_labels)
)
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


class Dataset(NamedTuple):
    """A train/test split: inputs ``x_*`` (float32), integer labels ``y_*`` in ``[0, num_classes)``."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def check_dataset(data: Dataset) -> Dataset:
    """Return ``data`` unchanged, or raise ValueError naming what is wrong with it."""
    what = f"dataset {data.name!r}"
    for split in ("train", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        check_examples(what, split, x, y)
        check_labels(what, split, y, data.num_classes)
        if np.asarray(y).ndim != 1:
            raise ValueError(f"{what}: {split} labels must be one integer per sample, got shape {np.shape(y)}")
        if np.asarray(x).shape[1:] != np.asarray(data.x_train).shape[1:]:
            raise ValueError(f"{what}: train and test inputs differ in shape")
    return data


def check_examples(what: str, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """ValueError (starting with ``what``) unless the ``split`` ``(x, y)`` is non-empty, has as many targets as
    inputs and finite inputs."""
    if len(x) == 0:
        raise ValueError(f"{what}: the {split} split is empty")
    if len(x) != len(y):
        raise ValueError(f"{what}: {len(x)} {split} inputs but {len(y)} labels")
    finite = np.isfinite(np.asarray(x, np.float64).reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        raise ValueError(
            f"{what}: {int((~finite).sum())} {split} input(s) hold NaN or inf, e.g. at index {int(np.flatnonzero(~finite)[0])}"
        )


def check_labels(what: str, split: str, y: np.ndarray, num_classes: int) -> None:
    """ValueError (starting with ``what``) unless the ``split`` labels ``y`` are integers in ``[0, num_classes)``."""
    if problem := _not_integers(np.asarray(y)):
        raise ValueError(f"{what}: {split} labels must be integers, got {problem}")
    bad = (np.asarray(y) < 0) | (np.asarray(y) >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"{what}: {int(bad.sum())} {split} label(s) outside [0, {num_classes}), "
            f"e.g. {int(np.asarray(y)[bad][0])} at {_where(bad)}"
        )


def _where(mask: np.ndarray) -> str:
    """``index i`` (``index (i, j, ...)`` when ``mask`` is not 1-d) of the first True in ``mask``."""
    first = tuple(int(i) for i in np.argwhere(mask)[0])
    return f"index {first[0] if len(first) == 1 else first}"


def _not_integers(values: np.ndarray) -> str:
    """``""`` if ``values`` has an integer dtype, else what is wrong: the first fractional value, or the dtype."""
    if np.issubdtype(values.dtype, np.integer):
        return ""
    if np.issubdtype(values.dtype, np.floating) and (fractional := values != np.round(values)).any():
        return f"{values[fractional][0]} at {_where(fractional)}"
    return f"dtype {values.dtype}"


def _labels(path: Path, values: np.ndarray) -> np.ndarray:
    """``values``, after checking they have an integer dtype (a ValueError naming ``path`` otherwise)."""
    if problem := _not_integers(values):
        raise ValueError(f"{path}: labels must be integers, got {problem}")
    return values


def _pixels(path: Path, values: np.ndarray) -> np.ndarray:
    """``values`` as uint8, after checking they are integers in [0, 255] (a ValueError naming ``path`` otherwise)."""
    problem = _not_integers(values)
    if not problem and (outside := (values < 0) | (values > 255)).any():
        problem = f"{values[outside][0]} at {_where(outside)}"
    if problem:
        raise ValueError(f"{path}: pixel values must be integers in [0, 255], got {problem}")
    return values.astype(np.uint8)


def _finish(name: str, x_train, y_train, x_test, y_test, num_classes: int, flatten: bool) -> Dataset:
    """The checked Dataset; labels are cast to int32 only after check_dataset found them integers in range."""

    def inputs(x):
        x = np.asarray(x, np.float32)
        return x.reshape(len(x), -1) if flatten else x

    data = check_dataset(
        Dataset(name, inputs(x_train), np.asarray(y_train), inputs(x_test), np.asarray(y_test), num_classes)
    )
    return data._replace(y_train=data.y_train.astype(np.int32), y_test=data.y_test.astype(np.int32))


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 handwritten digits as they ship: ``(images (1797, 8, 8) in 0..16, labels)``."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return digits.images, digits.target


def load_digits(test_fraction: float = 0.2, seed: int = 0, flatten: bool = True) -> Dataset:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes), split at random by ``seed``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = digits_images()
    x = images[..., None] / 16.0
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return _finish("digits", x[train], labels[train], x[test], labels[test], 10, flatten)


def _missing(directory: Path, wanted: str, what: str) -> FileNotFoundError:
    where = "does not exist" if not directory.is_dir() else f"has no {wanted}"
    return FileNotFoundError(f"{what}: directory {directory} {where}; pass download=True to fetch it, or put it there")


def _download(url: str, target: Path) -> None:
    """Fetch ``url`` to ``target`` (via ``target.part``, renamed when complete and verified).

    Any failure, including a body shorter than its Content-Length, an HTML page or an MD5 other than the published
    one in ``DOWNLOAD_MD5``, is a ConnectionError naming ``url``, and leaves no file behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        md5 = _fetch(url, partial)
        if DOWNLOAD_MD5.get(target.name, md5) != md5:
            raise ValueError(f"MD5 {md5} is not the published {DOWNLOAD_MD5[target.name]}")
        partial.replace(target)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        raise ConnectionError(
            f"could not download {url} ({err}); place {target.name} in {target.parent} by hand"
        ) from err
    finally:
        partial.unlink(missing_ok=True)


def _fetch(url: str, partial: Path) -> str:
    """Stream ``url`` into ``partial`` and return its MD5; ValueError if it is cut short or is an HTML page."""
    digest = hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
        while block := response.read(1 << 20):
            digest.update(block)
            out.write(block)
        length, kind = response.headers.get("Content-Length"), response.headers.get("Content-Type", "")
    size = partial.stat().st_size
    if length is not None and size != int(length):
        raise ValueError(f"cut short: {size} of {length} bytes")
    with open(partial, "rb") as f:
        head = f.read(64).lstrip().lower()
    if "text/html" in kind or head.startswith((b"<!doctype", b"<html")):
        raise ValueError("the server sent an HTML page, not the file")
    return digest.hexdigest()


def _read_bytes(path: Path) -> bytes:
    """The contents of ``path``, gunzipped when the name ends in ``.gz``; a corrupt gzip is a ValueError."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a valid gzip file ({err})") from err


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format; gzipped when the name ends in ``.gz``)."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(
            f"{path}: the idx header of a {ndim}-d array needs {4 + 4 * ndim} bytes, the file has {len(raw)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected = 4 + 4 * ndim + math.prod(shape) * dtype.itemsize  # Python ints: a huge header cannot wrap around
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(shape)


def _mnist_file(directory: Path, stem: str, download: bool) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    if not download:
        raise _missing(directory, f"{stem}[.gz]", "MNIST")
    _download(MNIST_URL + stem + ".gz", directory / (stem + ".gz"))
    return directory / (stem + ".gz")


def load_mnist(directory: str | Path, download: bool = False, flatten: bool = False) -> Dataset:
    """MNIST from the four idx files (``train-images-idx3-ubyte[.gz]``, ...) in ``directory``."""
    directory = Path(directory)
    paths = {key: _mnist_file(directory, stem, download) for key, stem in MNIST_FILES.items()}
    x = {key: _pixels(paths[key], read_idx(paths[key]))[..., None] / 255.0 for key in ("x_train", "x_test")}
    y = {key: _labels(paths[key], read_idx(paths[key])) for key in ("y_train", "y_test")}
    return _finish("mnist", x["x_train"], y["y_train"], x["x_test"], y["y_test"], 10, flatten)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and numpy arrays only: any other global is refused, so no code runs."""

    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name} (a CIFAR-10 batch holds only arrays, lists and bytes)"
            )
        return super().find_class(module, name)


def _unpickle(path: Path):
    """The object pickled in ``path``, through ``_BatchUnpickler``; any unpickling failure is a ValueError."""
    with open(path, "rb") as f:
        try:
            return _BatchUnpickler(f, encoding="bytes").load()
        except Exception as err:  # a malformed pickle fails in many ways: EOFError, UnpicklingError, TypeError...
            raise ValueError(f"{path} is not a CIFAR-10 python batch: {type(err).__name__}: {err}") from err


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: ``(images uint8 (N, 32, 32, 3), labels (N,))``, unpickled without running code."""
    batch = _unpickle(Path(path))
    try:
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except (KeyError, IndexError, TypeError, ValueError) as err:  # ValueError: a ragged list
        raise ValueError(f"{path} is not a CIFAR-10 python batch (needs b'data' and b'labels' arrays)") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != data.shape[:1]:
        raise ValueError(
            f"{path}: data of shape {data.shape} with labels of shape {labels.shape} is not a CIFAR-10 batch"
        )
    return _pixels(path, data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), _labels(path, labels)


def load_cifar10(directory: str | Path, download: bool = False, flatten: bool = False) -> Dataset:
    """CIFAR-10 from the python batches in ``directory/cifar-10-batches-py`` (or ``directory`` itself)."""
    directory = Path(directory)
    root = directory / CIFAR10_DIR if (directory / CIFAR10_DIR).is_dir() else directory
    names = (*CIFAR10_TRAIN, CIFAR10_TEST)
    if not all((root / name).is_file() for name in names):
        if not download:
            raise _missing(directory, f"{CIFAR10_DIR}/{{data_batch_1..5, test_batch}}", "CIFAR-10")
        archive = directory / Path(CIFAR10_URL).name
        _download(CIFAR10_URL, archive)
        with tarfile.open(archive) as tar:
            tar.extractall(directory, filter="data")
        root = directory / CIFAR10_DIR
    train = [read_cifar_batch(root / name) for name in CIFAR10_TRAIN]
    x_test, y_test = read_cifar_batch(root / CIFAR10_TEST)
    x_train = np.concatenate([x for x, _ in train]) / 255.0
    y_train = np.concatenate([y for _, y in train])
    return _finish("cifar10", x_train, y_train, x_test / 255.0, y_test, 10, flatten)


def random_crops(images: np.ndarray, pad: int, rng: np.random.Generator, flip: bool = False) -> np.ndarray:
    """MDEQ's training augmentation (Bai, Koltun & Kolter 2020, after ResNet's CIFAR-10 recipe) of NHWC ``images``:
    each image zero-padded by ``pad`` pixels on every side and cropped back to its size at an offset drawn from
    ``rng``, uniform over the ``(2·pad + 1)²`` windows; with ``flip``, then mirrored left-right with probability
    1/2. A new array of ``images``' shape and dtype; ``pad = 0`` without ``flip`` returns a copy."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"random_crops takes NHWC images, got shape {images.shape}")
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad must be a whole number >= 0, got {pad!r}")
    n, height, width = images.shape[:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = rng.integers(0, 2 * pad + 1, n)[:, None] + np.arange(height)
    cols = rng.integers(0, 2 * pad + 1, n)[:, None] + np.arange(width)
    crops = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flip:
        mirrored = rng.random(n) < 0.5
        crops[mirrored] = crops[mirrored, :, ::-1]
    return crops


TEXT_SPLIT = (0.9, 0.05, 0.05)
"""The fixed split of a text: its first 90 % of characters train, the next 5 % validate, the last 5 % test."""


class TextDataset(NamedTuple):
    """A character-level text split: ``train``, ``valid``, ``test`` (int32 character ids, contiguous in the text)
    and ``vocab`` (the characters, sorted; id ``i`` is ``vocab[i]``)."""

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab: str

    def encode(self, text: str) -> np.ndarray:
        """The ids of ``text``'s characters (ValueError naming the first character outside ``vocab``)."""
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        known = np.frombuffer(self.vocab.encode("utf-32-le"), np.uint32)  # sorted: the vocabulary is
        ids = np.minimum(np.searchsorted(known, codes), max(len(known) - 1, 0))
        unknown = known[ids] != codes if len(known) else np.ones(len(codes), bool)
        if unknown.any():
            first = int(np.argmax(unknown))
            raise ValueError(
                f"text dataset {self.name!r}: character {text[first]!r} (at {first}) is not in its vocabulary"
            )
        return ids.astype(np.int32)

    def decode(self, ids: np.ndarray) -> str:
        """The characters of ``ids``."""
        return "".join(self.vocab[int(i)] for i in np.ravel(ids))

    def windows(self, length: int, eval_split: str = "test") -> Dataset:
        """Non-overlapping windows of ``length + 1`` characters as a :class:`Dataset` for :func:`jdeq.train.fit`:
        ``x`` the windows (int32, ``(N, length + 1)``; a model reads ``x[:, :-1]`` and predicts ``x[:, 1:]``,
        see :class:`jdeq.models.TeacherForced`), ``y`` each window's last character (the last target);
        ``x_test`` from ``eval_split`` (``"test"`` or ``"valid"``); ``num_classes`` the vocabulary size."""
        if not (isinstance(length, (int, np.integer)) and length >= 1):
            raise ValueError(f"windows(length=...) must be an int >= 1, got {length!r}")
        if eval_split not in ("test", "valid"):
            raise ValueError(f'eval_split must be "test" or "valid", got {eval_split!r}')

        def cut(ids: np.ndarray, split: str) -> np.ndarray:
            count = len(ids) // (length + 1)
            if count == 0:
                raise ValueError(
                    f"text dataset {self.name!r}: its {split} split has {len(ids)} characters, fewer than one window "
                    f"of {length + 1}"
                )
            return ids[: count * (length + 1)].reshape(count, length + 1)

        train, evaluation = cut(self.train, "train"), cut(getattr(self, eval_split), eval_split)
        return check_dataset(
            Dataset(f"{self.name}-{length}", train, train[:, -1], evaluation, evaluation[:, -1], len(self.vocab))
        )


def pydoc_text() -> str:
    """The English prose of the Python documentation topics bundled with CPython (``pydoc_data.topics``,
    about 465 k characters): every topic's text in the order of its sorted name, separated by a blank line."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def load_text(source: str | Path = "pydoc") -> TextDataset:
    """A character-level :class:`TextDataset` of ``"pydoc"`` (:func:`pydoc_text`, no download) or of a UTF-8
    text file at the path ``source``, split by :data:`TEXT_SPLIT` (contiguous: train, valid, test in that order).

    The vocabulary is every character of the whole text, so the three splits share it. A missing file is a
    ``FileNotFoundError``; a file that is not UTF-8, or is too short to give each split a character, a
    ``ValueError`` naming it.
    """
    if str(source) == "pydoc":
        name, text = "pydoc", pydoc_text()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"load_text: {path} is not a file (pass 'pydoc' or the path of a UTF-8 text file)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"load_text: {path} is not UTF-8 text ({error})") from None
        name = path.stem
    if len(text) < 1 / min(TEXT_SPLIT):
        raise ValueError(
            f"load_text: {source} has {len(text)} characters; each of the train/valid/test splits "
            f"({', '.join(f'{share:.0%}' for share in TEXT_SPLIT)}) needs at least one"
        )
    vocab = "".join(sorted(set(text)))
    ids = TextDataset(name, *(np.zeros(0, np.int32),) * 3, vocab).encode(text)
    train_end = int(len(ids) * TEXT_SPLIT[0])
    valid_end = train_end + int(len(ids) * TEXT_SPLIT[1])
    return TextDataset(name, ids[:train_end], ids[train_end:valid_end], ids[valid_end:], vocab)
