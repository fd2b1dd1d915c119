"""Loaders: labels numpy wrote are read (still no arbitrary globals), and an overflowing idx header names the file."""

import pickle
import re
import struct

import numpy as np
import pytest

from jdeq import data


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batch_with_numpy_integer_labels_is_read(tmp_path, protocol):
    images = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    labels = list(np.array([6, 9, 1], dtype=np.int64))  # numpy integer scalars, as list(np_labels) writes them
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": images, b"labels": labels}, protocol=protocol))
    _, y = data.read_cifar_batch(path)
    np.testing.assert_array_equal(y, [6, 9, 1])


def test_idx_header_whose_size_overflows_names_the_file(tmp_path):
    path = tmp_path / "huge-idx"
    path.write_bytes(
        bytes([0, 0, 0x08, 4]) + struct.pack(">4I", 2**16, 2**16, 2**16, 2**16)
    )  # 2**64 entries: wraps to 0 in int64
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*header says shape"):
        data.read_idx(path)
