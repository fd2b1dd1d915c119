"""Datasets: bundled digits, MNIST idx and CIFAR-10 pickle loaders on small files written in those formats."""

import gzip
import hashlib
import http.client
import io
import os
import pickle
import re
import urllib.request

import numpy as np
import pytest
from helpers import padded_windows

from jdeq import data


def write_idx(path, array):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def mnist_arrays():
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 6).astype(np.uint8),
        "x_test": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 4).astype(np.uint8),
    }


def test_digits_are_real_split_deterministically_and_scaled():
    d = data.load_digits(seed=0)
    assert d.x_train.shape == (1438, 64) and d.x_test.shape == (359, 64) and d.num_classes == 10
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert 0.0 == d.x_train.min() and d.x_train.max() == 1.0
    assert set(np.unique(d.y_train)) == set(range(10))
    again, other = data.load_digits(seed=0), data.load_digits(seed=1)
    np.testing.assert_array_equal(d.x_test, again.x_test)
    assert not np.array_equal(d.y_test, other.y_test)
    train_rows = {row.tobytes() for row in d.x_train}
    assert sum(row.tobytes() in train_rows for row in d.x_test) < 10  # a few duplicate images exist in digits
    assert data.load_digits(flatten=False).x_train.shape == (1438, 8, 8, 1)


def test_random_crops_are_windows_of_the_zero_padded_images_drawn_from_the_rng():
    images = np.arange(1, 1 + 50 * 3 * 4 * 2, dtype=np.float32).reshape(50, 3, 4, 2)  # no zero pixels
    crops = data.random_crops(images, 1, np.random.default_rng(0))
    assert crops.shape == images.shape and crops.dtype == images.dtype
    seen = set()
    for image, crop in zip(images, crops):
        offsets = [k for k, window in enumerate(padded_windows(image, 1)) if np.array_equal(window, crop)]
        assert len(offsets) == 1  # a shifted window, its out-of-image pixels zero
        seen.add(offsets[0])
    assert seen == set(range(9))  # 50 draws reach all (2·1 + 1)² offsets
    assert np.array_equal(crops, data.random_crops(images, 1, np.random.default_rng(0)))  # the rng decides
    assert not np.array_equal(crops, data.random_crops(images, 1, np.random.default_rng(1)))
    assert np.array_equal(data.random_crops(images, 0, np.random.default_rng(0)), images)
    one = np.array([[1.0, 2.0], [3.0, 4.0]])[None, :, :, None]
    crops = {data.random_crops(one, 1, np.random.default_rng(seed))[0, :, :, 0].tobytes() for seed in range(40)}
    assert np.array([[0.0, 0.0], [0.0, 1.0]]).tobytes() in crops  # the top-left shift, by hand
    assert np.array([[4.0, 0.0], [0.0, 0.0]]).tobytes() in crops and len(crops) == 9


def test_random_crops_flip_mirrors_about_half_the_images_and_bad_arguments_are_refused():
    images = np.random.default_rng(0).random((200, 4, 4, 3))
    flipped = data.random_crops(images, 0, np.random.default_rng(0), flip=True)
    mirrored = np.array([np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, images)])
    assert all(m or np.array_equal(f, i) for m, f, i in zip(mirrored, flipped, images))
    assert 70 < mirrored.sum() < 130
    for pad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="pad must be"):
            data.random_crops(images, pad, np.random.default_rng(0))
    with pytest.raises(ValueError, match="NHWC"):
        data.random_crops(images[0], 1, np.random.default_rng(0))


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_reads_idx_files(tmp_path, mnist_arrays, suffix):
    for key, stem in data.MNIST_FILES.items():
        write_idx(tmp_path / (stem + suffix), mnist_arrays[key])
    d = data.load_mnist(tmp_path)
    assert d.x_train.shape == (6, 28, 28, 1) and d.x_test.shape == (4, 28, 28, 1)
    np.testing.assert_allclose(d.x_train[..., 0], mnist_arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_test, mnist_arrays["y_test"])
    assert data.load_mnist(tmp_path, flatten=True).x_train.shape == (6, 784)


def test_idx_reader_rejects_bad_files(tmp_path):
    write_idx(tmp_path / "ok", np.arange(12, dtype=">i4").reshape(3, 4))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "ok"), np.arange(12).reshape(3, 4))
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an idx file"):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"header says shape \(3, 4\) \(60 bytes\) but the file has 56 bytes"):
        data.read_idx(tmp_path / "short")


def test_bad_idx_headers_and_gzip_files_are_value_errors_naming_the_file(tmp_path):
    write_idx(tmp_path / "ok.gz", (np.arange(300) % 256).astype(np.uint8).reshape(3, 100))
    packed = (tmp_path / "ok.gz").read_bytes()
    bad = {
        "short-header": (
            bytes([0, 0, 0x08, 3, 0, 0, 0, 1]),
            "idx header of a 3-d array needs 16 bytes, the file has 8",
        ),
        "not-gzip.gz": (b"\x00\x00\x08\x01\x00\x00\x00\x00", "not a valid gzip file"),
        "truncated.gz": (packed[: len(packed) // 2], "not a valid gzip file"),
        "corrupt.gz": (packed[:-8] + bytes(8), "not a valid gzip file"),  # CRC and length trailer zeroed
        "magic-only": (b"\x00\x00", "not an idx file"),
    }
    for name, (blob, message) in bad.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}") + ".*" + re.escape(message)):
            data.read_idx(tmp_path / name)


def test_cifar10_reads_python_batches(tmp_path):
    root = tmp_path / data.CIFAR10_DIR
    root.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name in (*data.CIFAR10_TRAIN, data.CIFAR10_TEST):
        images = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)  # stored channel-major, row-major
        batches[name] = images
        with open(root / name, "wb") as f:
            pickle.dump({b"data": images.reshape(2, -1), b"labels": [3, 9]}, f)
    d = data.load_cifar10(tmp_path)
    assert d.x_train.shape == (10, 32, 32, 3) and d.x_test.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(d.x_train[2], batches["data_batch_2"][0].transpose(1, 2, 0) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_train, [3, 9] * 5)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"pixels": []}, f)
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        data.load_cifar10(tmp_path)


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING), as the published CIFAR-10 batches were written."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def cifar_pickle(batch, writer):
    if writer != "python2":
        return pickle.dumps(batch, protocol=writer)
    out = io.BytesIO()
    Python2Pickler(out, protocol=2).dump(batch)
    return out.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


@pytest.mark.parametrize("writer", ["python2", 2, 3, 4, 5])
def test_cifar_batch_loads_as_python2_or_any_python3_protocol_wrote_it(tmp_path, writer):
    images = np.random.default_rng(2).integers(0, 256, (3, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [6, 9, 9], b"data": images, b"filenames": [b"a.png"]}
    blob = cifar_pickle(batch, writer)
    assert (b"cnumpy.core.multiarray\n_reconstruct" in blob) == (writer == "python2")
    (tmp_path / "data_batch_1").write_bytes(blob)
    x, y = data.read_cifar_batch(tmp_path / "data_batch_1")
    np.testing.assert_array_equal(x, images.reshape(3, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y, [6, 9, 9])


class Exploit:
    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("call", [exec, os.system])
def test_cifar_batch_that_would_run_code_is_refused_naming_the_file_and_global(tmp_path, call):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').close()" if call is exec else f"touch {marker}"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Exploit(call, code), b"labels": [0]}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + rf".*refused global \w+\.{call.__name__}\b"):
        data.read_cifar_batch(path)
    assert not marker.exists()


def test_malformed_pickles_are_value_errors_naming_the_file(tmp_path):
    whole = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    for name, blob in {"empty": b"", "garbage": b"\x00not a pickle", "truncated": whole[: len(whole) // 2]}.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / name)) + " is not a CIFAR-10 python batch"):
            data.read_cifar_batch(tmp_path / name)


def test_missing_directory_and_unreachable_download_are_named(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"MNIST: directory {missing} does not exist; pass download=True"):
        data.load_mnist(missing)
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10: directory .* has no cifar-10-batches-py"):
        data.load_cifar10(tmp_path)
    monkeypatch.setattr(data, "MNIST_URL", "http://127.0.0.1:9/")  # the discard port: connection refused
    with pytest.raises(ConnectionError, match=r"could not download http://127.0.0.1:9/train-images-idx3-ubyte.gz"):
        data.load_mnist(missing, download=True)
    assert not any(missing.iterdir())  # no partial file left behind


class FakeResponse(io.BytesIO):
    """What ``urlopen`` returns, serving ``body``; ``cut_at`` raises IncompleteRead after that many bytes."""

    def __init__(self, body, headers=None, cut_at=None):
        super().__init__(body)
        self.headers, self.cut_at = headers or {}, cut_at

    def read(self, size=-1):
        if self.cut_at is None:
            return super().read(size)
        if size < 0 or self.tell() >= self.cut_at:  # like http.client when the connection drops mid-body
            raise http.client.IncompleteRead(b"", len(self.getvalue()) - self.tell())
        return super().read(min(size, self.cut_at - self.tell()))


def serve(monkeypatch, responses):
    """Make ``urlopen`` answer each file name in ``responses`` (no network)."""
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: responses[url.rsplit("/", 1)[-1]]())


def gz_bodies(tmp_path, mnist_arrays):
    source = tmp_path / "source"
    source.mkdir()
    for key, stem in data.MNIST_FILES.items():
        write_idx(source / (stem + ".gz"), mnist_arrays[key])
    return {path.name: path.read_bytes() for path in source.iterdir()}


def test_download_is_verified_against_published_md5_then_renamed(tmp_path, monkeypatch, mnist_arrays):
    bodies = gz_bodies(tmp_path, mnist_arrays)
    serve(monkeypatch, {name: lambda body=body: FakeResponse(body) for name, body in bodies.items()})
    monkeypatch.setattr(data, "DOWNLOAD_MD5", {name: hashlib.md5(body).hexdigest() for name, body in bodies.items()})
    d = data.load_mnist(tmp_path / "mnist", download=True)
    np.testing.assert_array_equal(d.y_train, mnist_arrays["y_train"])
    assert sorted(path.name for path in (tmp_path / "mnist").iterdir()) == sorted(bodies)  # no .part left


@pytest.mark.parametrize(
    "respond, reason",
    [
        (lambda body: FakeResponse(body[:100], {"Content-Length": str(len(body))}), "cut short: 100 of"),
        (lambda body: FakeResponse(body, cut_at=100), "IncompleteRead"),
        (lambda body: FakeResponse(body, {"Content-Type": "text/html; charset=utf-8"}), "the server sent an HTML page"),
        (lambda body: FakeResponse(b"\n<!DOCTYPE html><html>Access denied</html>"), "the server sent an HTML page"),
        (lambda body: FakeResponse(body), "MD5 [0-9a-f]{32} is not the published f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    ],
    ids=["short", "incomplete-read", "html-type", "html-body", "md5"],
)
def test_failed_download_leaves_no_file_and_names_the_url(tmp_path, monkeypatch, mnist_arrays, respond, reason):
    body = gz_bodies(tmp_path, mnist_arrays)["train-images-idx3-ubyte.gz"]
    serve(monkeypatch, {"train-images-idx3-ubyte.gz": lambda: respond(body)})
    url = re.escape(data.MNIST_URL + "train-images-idx3-ubyte.gz")
    with pytest.raises(ConnectionError, match=f"could not download {url} \\({reason}"):
        data.load_mnist(tmp_path / "mnist", download=True)
    assert not any((tmp_path / "mnist").iterdir())


def test_cifar10_archive_with_wrong_md5_is_discarded(tmp_path, monkeypatch):
    serve(monkeypatch, {"cifar-10-python.tar.gz": lambda: FakeResponse(b"not the archive")})
    with pytest.raises(ConnectionError, match="is not the published c58f30108f718f92721af3b95e74349a"):
        data.load_cifar10(tmp_path, download=True)
    assert not any(tmp_path.iterdir())


def test_check_dataset_names_the_problem():
    x, y = np.zeros((4, 3), np.float32), np.array([0, 1, 2, 1])
    ok = data.Dataset("toy", x, y, x, y, 3)
    assert data.check_dataset(ok) is ok
    with pytest.raises(ValueError, match="test split is empty"):
        data.check_dataset(ok._replace(x_test=x[:0], y_test=y[:0]))
    with pytest.raises(ValueError, match="4 train inputs but 3 labels"):
        data.check_dataset(ok._replace(y_train=y[:3]))
    with pytest.raises(ValueError, match=r"1 test label\(s\) outside \[0, 3\), e.g. -1 at index 2"):
        data.check_dataset(ok._replace(y_test=np.array([0, 1, -1, 2])))
    with pytest.raises(ValueError, match="labels must be integers"):
        data.check_dataset(ok._replace(y_train=y.astype(float)))


def test_check_dataset_names_the_first_fractional_label():
    x, y = np.zeros((4, 3), np.float32), np.array([0, 1, 1.5, 2])
    toy = data.Dataset("toy", x, y.astype(int), x, y, 3)
    with pytest.raises(ValueError, match="test labels must be integers, got 1.5 at index 2"):
        data.check_dataset(toy)
    with pytest.raises(ValueError, match="train labels must be integers, got dtype float64"):  # even 2.0 is refused
        data.check_dataset(toy._replace(y_train=np.array([0.0, 1.0, 2.0, 2.0])))


def bad_pixel(shape, value, at, dtype):
    images = np.zeros(shape, dtype)
    images[at] = value
    return images


@pytest.mark.parametrize(
    "key, array, message",
    [
        ("y_train", np.array([1, 1.5, 2, 3, 4, 5], ">f4"), "labels must be integers, got 1.5 at index 1"),
        ("y_test", np.full(4, 2.0, ">f4"), "labels must be integers, got dtype >f4"),
        ("x_train", bad_pixel((6, 28, 28), 300, (2, 5, 7), ">i4"), "got 300 at index (2, 5, 7)"),
        ("x_test", bad_pixel((4, 28, 28), -1, (3, 0, 1), ">i4"), "got -1 at index (3, 0, 1)"),
    ],
    ids=["fractional-label", "integral-float-label", "pixel-300", "pixel-minus-1"],
)
def test_mnist_rejects_float_labels_and_out_of_range_pixels_instead_of_casting(
    tmp_path, mnist_arrays, key, array, message
):
    mnist_arrays[key] = array
    for name, stem in data.MNIST_FILES.items():
        write_idx(tmp_path / stem, mnist_arrays[name])
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path / data.MNIST_FILES[key]}: ") + ".*" + re.escape(message)
    ):
        data.load_mnist(tmp_path)


@pytest.mark.parametrize(
    "pixel, labels, message",
    [
        (300, [3, 9], "pixel values must be integers in [0, 255], got 300 at index (1, 17)"),
        (-1, [3, 9], "pixel values must be integers in [0, 255], got -1 at index (1, 17)"),
        (0.5, [3, 9], "pixel values must be integers in [0, 255], got 0.5 at index (1, 17)"),
        (0, [3, 1.5], "labels must be integers, got 1.5 at index 1"),
    ],
    ids=["pixel-300", "pixel-minus-1", "fractional-pixel", "fractional-label"],
)
def test_cifar_batch_rejects_out_of_range_pixels_and_float_labels_instead_of_casting(tmp_path, pixel, labels, message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": bad_pixel((2, 3072), pixel, (1, 17), type(pixel)), b"labels": labels}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        data.read_cifar_batch(path)


def test_labels_beyond_int32_are_rejected_not_wrapped(tmp_path):
    for name in (*data.CIFAR10_TRAIN, data.CIFAR10_TEST):
        label = 2**32 + 3 if name == data.CIFAR10_TEST else 3  # int32 would wrap it to 3
        (tmp_path / name).write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [label]}))
    with pytest.raises(ValueError, match=r"1 test label\(s\) outside \[0, 10\), e.g. 4294967299 at index 0"):
        data.load_cifar10(tmp_path)


def test_nonfinite_inputs_and_two_dimensional_labels_are_rejected_naming_the_index():
    base = data.load_digits()
    x = base.x_train.copy()
    x[7, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf, e.g. at index 7"):
        data.check_dataset(base._replace(x_train=x))
    with pytest.raises(ValueError, match="one integer per sample"):
        data.check_dataset(base._replace(y_train=base.y_train[:, None]))


def test_zero_channels_and_zero_epochs_are_clear_errors(capsys):
    from jdeq import cli
    from jdeq.models import ConvCell

    with pytest.raises(ValueError, match="channels must be an int >= 1"):
        ConvCell(0)
    for flag in ("--epochs", "--batch-size"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["demo", flag, "0"])
        assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err
