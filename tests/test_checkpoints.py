"""Checkpoints: checksums and fallback past damage, the run config, the directory lock, unwritable directories, load."""

import logging
import os
import shutil
import socket
import subprocess
import sys

import optax
import pytest
from helpers import leaves_equal

import jdeq.train as train
from jdeq.data import Dataset, load_digits
from jdeq.models import MLPCell
from jdeq.nn import DEQ, DEQClassifier
from jdeq.train._lock import LOCK_FILE, directory_lock


@pytest.fixture(scope="module")
def digits():
    d = load_digits(seed=2)
    return Dataset("digits-small", d.x_train[:256], d.y_train[:256], d.x_test[:64], d.y_test[:64], 10)


def model(width=8):
    return DEQClassifier(DEQ(MLPCell(width)), 10)


def fit(data, epochs, directory, width=8, **kwargs):
    kwargs = {"batch_size": 64, "seed": 0, **kwargs}
    return train.fit(
        model(width), optax.adam(1e-2), data, epochs=epochs, checkpoint_dir=directory, progress=False, **kwargs
    )


def contents(directory) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(digits, tmp_path_factory):
    """A directory with checkpoints 1 and 2 of a 2-epoch run, that run's result, and checkpoint 1's params."""
    directory = tmp_path_factory.mktemp("run")
    result = fit(digits, 2, directory)
    first = tmp_path_factory.mktemp("first") / "run"
    shutil.copytree(directory, first)
    shutil.rmtree(first / "2")
    return directory, result, train.load(first, model())


@pytest.fixture
def copy(saved, tmp_path):
    shutil.copytree(saved[0], tmp_path / "run")
    return tmp_path / "run"


def largest_array_file(checkpoint):
    return max((p for p in (checkpoint / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_a_byte(checkpoint):
    path = largest_array_file(checkpoint)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(checkpoint):
    path = largest_array_file(checkpoint)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite_every_file(checkpoint):
    for path in checkpoint.rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage" * 3)


def edit_the_seed(checkpoint):
    path = next(p for p in (checkpoint / "run").rglob("*") if p.is_file() and b'"seed": 0' in p.read_bytes())
    path.write_bytes(path.read_bytes().replace(b'"seed": 0', b'"seed": 7'))


def test_load_returns_the_latest_params_and_fit_leaves_no_lock(saved):
    directory, result, _ = saved
    assert leaves_equal(train.load(directory, model()), result.state.params)
    assert not (directory / LOCK_FILE).exists()
    with pytest.raises(ValueError, match=r"model\.deq\.f\.features: \"8\" → \"16\""):
        train.load(directory, model(16))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (flip_a_byte, r"altered on disk \(sha256 mismatch in params\)"),
        (truncate, r"unreadable \(.+\)"),
        (overwrite_every_file, r"unreadable \(.+\)"),
        (edit_the_seed, r"altered on disk \(sha256 mismatch in config\)"),
    ],
)
def test_damaged_latest_checkpoint_warns_once_and_the_previous_one_is_loaded(
    saved, copy, damage, reason, caplog, capfd
):
    damage(copy / "2")
    damaged = contents(copy)
    with pytest.warns(UserWarning, match=rf"^skipping checkpoint 2 in {copy}: {reason}$") as caught:
        params = train.load(copy, model())
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert leaves_equal(params, saved[2])
    assert contents(copy) == damaged  # nothing deleted or changed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in capfd.readouterr().err


def test_no_intact_checkpoint_is_an_error_listing_each(copy):
    flip_a_byte(copy / "2")
    truncate(copy / "1")
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            train.CheckpointError,
            match=r"no intact checkpoint in .*checkpoint 2: altered on disk.*; checkpoint 1: unreadable",
        ),
    ):
        train.load(copy, model())


def test_fit_resumes_from_the_previous_checkpoint_and_sets_the_damaged_one_aside(saved, digits, copy):
    flip_a_byte(copy / "2")
    damaged = (copy / "2" / largest_array_file(copy / "2").relative_to(copy / "2")).read_bytes()
    with pytest.warns(UserWarning) as caught:
        resumed = fit(digits, 2, copy)
    assert [str(w.message).split(":")[0] for w in caught] == [
        f"skipping checkpoint 2 in {copy}",
        f"moved damaged checkpoint 2 to {copy / '2.damaged'}",
    ]
    assert leaves_equal(resumed.state.params, saved[1].state.params)
    assert resumed.history == saved[1].history
    assert damaged in [p.read_bytes() for p in (copy / "2.damaged").rglob("*") if p.is_file()]
    assert leaves_equal(train.load(copy, model()), saved[1].state.params)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"width": 16}, r"model\.deq\.f\.features: \"8\" → \"16\""),
        ({"seed": 1}, r"seed: 0 → 1"),
        ({"batch_size": 32}, r"batch_size: 64 → 32"),
        ({"config": {"lr": 0.01}}, r"config\.lr: \(absent\) → 0\.01"),
    ],
)
def test_resuming_with_another_configuration_names_each_field_and_leaves_the_checkpoint(digits, copy, change, named):
    before = contents(copy)
    with pytest.raises(ValueError, match=rf"checkpoint 2 in .* was saved by another run configuration \(.*{named}"):
        fit(digits, 3, copy, **change)
    assert contents(copy) == before


def test_fewer_epochs_than_saved_is_a_clear_error(digits, copy):
    with pytest.raises(ValueError, match=r"already trained for 2 epochs, more than epochs=1: pass epochs >= 2"):
        fit(digits, 1, copy)


def test_a_directory_locked_by_a_live_run_is_refused_at_once(digits, copy):
    lock = copy / LOCK_FILE
    lock.write_text(f'{{"pid": {os.getpid()}, "host": "{socket.gethostname()}"}}')
    with pytest.raises(train.DirectoryLockedError, match=rf"in use by another run \(pid {os.getpid()} on "):
        fit(digits, 3, copy)
    assert lock.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_FILE
    lock.write_text(f'{{"pid": {dead.pid}, "host": "{socket.gethostname()}"}}')
    with pytest.warns(UserWarning, match=rf"replacing the stale lock .* of pid {dead.pid} on "):
        with directory_lock(tmp_path):
            assert f'"pid": {os.getpid()}' in lock.read_text()
    assert not lock.exists()


def test_a_checkpoint_dir_under_a_regular_file_is_refused_before_training(digits, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file/checkpoints is not a writable directory"):
        fit(digits, 1, tmp_path / "file" / "checkpoints")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_checkpoint_dir_is_refused_before_training(digits, tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="is not a writable directory"):
            fit(digits, 1, tmp_path)
    finally:
        tmp_path.chmod(0o700)
