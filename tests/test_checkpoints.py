"""Checkpoints: checksums and fallback past damage, the run config (and an older jdeq's), the directory lock,
unwritable directories, load."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import optax
import pytest
from flax import nnx
from helpers import leaves_equal

import jdeq
import jdeq.train as train
from jdeq.data import Dataset, load_digits
from jdeq.models import MLPCell
from jdeq.nn import DEQ, NNXDEQ, DEQClassifier
from jdeq.train._checkpoints import checksum, upgraded
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


def chained(linear_m=5):
    """A model whose saved config holds ``FixedPoint.linear_m`` (added to jdeq after some runs were saved) both as a
    key of its own (the gradient's solver, flattened) and inside a repr (a stage of the forward ``Fallback``)."""
    solver = jdeq.Fallback(stages=(jdeq.Anderson(), jdeq.FixedPoint(linear_m=linear_m)), patience=4)
    grad = jdeq.Implicit(solver=jdeq.FixedPoint(linear_m=linear_m))
    return DEQClassifier(DEQ(MLPCell(8), solver=solver, grad=grad), 10)


def fit_chained(data, epochs, directory, linear_m=5):
    return train.fit(
        chained(linear_m), optax.adam(1e-2), data, epochs=epochs, checkpoint_dir=directory, progress=False, seed=0
    )


def edit_saved_config(checkpoint, edit):
    """Rewrite checkpoint's stored run config with ``edit(config)`` and its checksum with it, as a run of another jdeq
    version would have saved it (not as damage: the checkpoint stays intact)."""
    path = next(p for p in (checkpoint / "run").rglob("*") if p.is_file() and b'"sha256"' in p.read_bytes())
    run = json.loads(path.read_text())
    edit(run["config"])
    run["sha256"]["config"] = checksum(run["config"])
    path.write_text(json.dumps(run))


def as_before_linear_m(config):
    """The config as a jdeq without ``FixedPoint.linear_m`` saved it."""
    del config["model.deq.grad.solver.linear_m"]
    stages = config["model.deq.solver.stages"]
    assert stages.count(", linear_m=5") == 1
    config["model.deq.solver.stages"] = stages.replace(", linear_m=5", "")


@pytest.fixture(scope="module")
def saved_chained(digits, tmp_path_factory):
    """A 1-epoch run of :func:`chained` whose checkpoint reads as saved before ``FixedPoint.linear_m`` existed, that
    run's result, and the 2-epoch run's (saved by this version)."""
    old = tmp_path_factory.mktemp("old") / "run"
    one = fit_chained(digits, 1, old)
    edit_saved_config(old / "1", as_before_linear_m)
    return old, one, fit_chained(digits, 2, tmp_path_factory.mktemp("new") / "run")


def test_a_checkpoint_saved_before_a_defaulted_field_existed_loads_and_resumes(saved_chained, digits, tmp_path, caplog):
    shutil.copytree(saved_chained[0], tmp_path / "run")
    before = contents(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="jdeq.train"):
        assert leaves_equal(train.load(tmp_path / "run", chained()), saved_chained[1].state.params)
    assert contents(tmp_path / "run") == before
    notes = [r.getMessage() for r in caplog.records if "predates" in r.getMessage()]
    assert len(notes) == 1
    assert "model.deq.grad.solver.linear_m=5" in notes[0]
    assert "model.deq.solver.stages: FixedPoint.linear_m=5" in notes[0]
    trained = []
    resumed = train.fit(
        chained(),
        optax.adam(1e-2),
        digits,
        epochs=2,
        checkpoint_dir=tmp_path / "run",
        progress=False,
        seed=0,
        on_epoch_end=lambda epoch, row: trained.append(epoch),
    )
    assert trained == [2]  # resumed after the old checkpoint's epoch, not started afresh
    assert resumed.history == saved_chained[2].history
    assert leaves_equal(resumed.state.params, saved_chained[2].state.params)


def test_an_nnx_layers_solver_saved_before_a_defaulted_field_existed_is_the_same_run():
    """NNX layers record their solver as one repr: a stage's field absent from it and at its default is no
    difference, the same field with another value is one."""
    solver = jdeq.Fallback(stages=(jdeq.Anderson(), jdeq.FixedPoint()))
    trainable = train.as_trainable(NNXDEQ(MLPCell(6), (4,), solver=solver, rngs=nnx.Rngs(0)))
    current = trainable.fields()
    key = next(k for k in current if k.endswith(".solver"))
    older = {**current, key: current[key].replace(", linear_m=5", "")}
    assert older != current
    assert upgraded(older, trainable.field_values()) == (current, [f"{key}: FixedPoint.linear_m=5"])
    other = {**current, key: current[key].replace("linear_m=5", "linear_m=3")}
    assert upgraded(other, trainable.field_values()) == (other, [])


def with_linear_m_3_in_the_stages(config):
    config["model.deq.solver.stages"] = config["model.deq.solver.stages"].replace(
        "damping=0.0)", "damping=0.0, linear_m=3)"
    )


@pytest.mark.parametrize(
    "edit, linear_m, named",
    [  # the saved value differs from the model's: in a repr, in a key; a field the checkpoint predates, not at default
        (with_linear_m_3_in_the_stages, 5, r"model\.deq\.solver\.stages: .*linear_m=3\)\)\" → .*linear_m=5\)\)\""),
        (
            lambda c: c.update({"model.deq.grad.solver.linear_m": "3"}),
            5,
            r"model\.deq\.grad\.solver\.linear_m: \"3\" → \"5\"",
        ),
        (None, 3, r"model\.deq\.grad\.solver\.linear_m: \(absent\) → \"3\"; model\.deq\.solver\.stages: "),
    ],
)
def test_a_changed_value_of_a_solver_field_is_still_refused(saved_chained, digits, tmp_path, edit, linear_m, named):
    shutil.copytree(saved_chained[0], tmp_path / "run")
    if edit is not None:
        edit_saved_config(tmp_path / "run" / "1", edit)
    before = contents(tmp_path / "run")
    with pytest.raises(ValueError, match=rf"checkpoint 1 in .* was saved by another run configuration \(.*{named}"):
        train.load(tmp_path / "run", chained(linear_m))
    with pytest.raises(ValueError, match=rf"was saved by another run configuration \(.*{named}"):
        fit_chained(digits, 2, tmp_path / "run", linear_m)
    assert contents(tmp_path / "run") == before


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
