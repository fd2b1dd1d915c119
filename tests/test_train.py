"""Training loop: metrics, determinism, interrupt/resume exactness, nonfinite steps, bad data, the demo command."""

import json
import os
import signal

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import leaves_equal

import jdeq.train as train
from jdeq import Anderson, Implicit, cli
from jdeq.data import Dataset, load_digits
from jdeq.models import MLPCell
from jdeq.nn import DEQ, DEQClassifier
from jdeq.train import epoch_batches
from jdeq.train._lock import LOCK_FILE

SOLVER = Anderson(m=4, tol=1e-4, max_steps=30)


@pytest.fixture(scope="module")
def small_digits():
    """300 training and 100 test digits: real data, small enough for several runs per test."""
    d = load_digits(seed=1)
    return Dataset("digits-small", d.x_train[:300], d.y_train[:300], d.x_test[:100], d.y_test[:100], 10)


def small_model():
    return DEQClassifier(DEQ(MLPCell(16), solver=SOLVER, grad=Implicit(SOLVER)), 10)


def run(data, epochs, **kwargs):
    return train.fit(small_model(), optax.adam(1e-2), data, epochs=epochs, batch_size=50, progress=False, **kwargs)


@pytest.fixture(scope="module")
def three_epochs(small_digits):
    """One uninterrupted 3-epoch run, shared by the tests that only read its result."""
    return run(small_digits, epochs=3)


def test_training_learns_and_reports_solver_metrics(three_epochs):
    result = three_epochs
    first, last = result.history[0], result.history[-1]
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert last["loss"] < first["loss"]
    assert last["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    for row in result.history:
        assert 1 <= row["fwd_mean_steps"] <= row["fwd_max_steps"] <= SOLVER.max_steps
        assert 1 <= row["bwd_mean_steps"] <= row["bwd_max_steps"] <= SOLVER.max_steps
        assert 0 <= row["fwd_mean_residual"] <= row["fwd_max_residual"]
        assert 0 <= row["fwd_converged_fraction"] <= 1
        assert row["test_fwd_mean_steps"] <= row["test_fwd_max_steps"]


@pytest.mark.slow  # the default suite's 15-minute budget; resume-equals-uninterrupted keeps determinism in it
def test_same_seed_same_parameters_other_seed_differs(small_digits):
    tiny = small_digits._replace(x_train=small_digits.x_train[:100], y_train=small_digits.y_train[:100])
    a, b, c = run(tiny, 1, seed=3), run(tiny, 1, seed=3), run(tiny, 1, seed=4)
    assert leaves_equal(a.state.params, b.state.params)
    assert not leaves_equal(a.state.params, c.state.params)


def test_interrupted_run_resumes_to_exactly_the_uninterrupted_parameters(
    small_digits, three_epochs, tmp_path, interrupted_training
):
    uninterrupted = three_epochs
    with interrupted_training(2, 2), pytest.raises(KeyboardInterrupt):
        run(small_digits, epochs=3, checkpoint_dir=tmp_path)
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [1, 2]
    resumed = run(small_digits, epochs=3, checkpoint_dir=tmp_path)
    assert leaves_equal(resumed.state.params, uninterrupted.state.params)
    assert leaves_equal(resumed.state.opt_state, uninterrupted.state.opt_state)
    assert resumed.history == uninterrupted.history


def test_bad_data_and_arguments_are_named(small_digits):
    labels = small_digits.y_train.copy()
    labels[7] = 10
    with pytest.raises(ValueError, match=r"1 train label\(s\) outside \[0, 10\), e.g. 10 at index 7"):
        run(small_digits._replace(y_train=labels), 1)
    empty = small_digits._replace(x_train=small_digits.x_train[:0], y_train=small_digits.y_train[:0])
    with pytest.raises(ValueError, match="train split is empty"):
        run(empty, 1)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 300\]"):
        train.fit(small_model(), optax.sgd(0.1), small_digits, epochs=1, batch_size=301, progress=False)


def test_any_gradient_transformation_trains(small_digits):
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.3, momentum=0.9))
    result = train.fit(small_model(), optimizer, small_digits, epochs=2, batch_size=50, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_demo_command_writes_metrics_and_figure(tmp_path, capsys):
    out = tmp_path / "demo"
    cli.main(["demo", "--epochs", "2", "--width", "16", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["wall_time_s"] > 0
    assert metrics["test_accuracy"] == metrics["history"][-1]["test_accuracy"]
    assert metrics["train_backward_steps_mean"] >= 1 and metrics["test_forward_steps_max"] >= 1
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "test acc" in printed and f"{metrics['test_accuracy']:.2%}" in printed


@pytest.mark.parametrize(
    "flags", [["--api", "nnx", "--solver", "broyden"], ["--grad", "phantom", "--solver", "fixedpoint"]], ids=str
)
def test_demo_picks_the_api_solver_and_gradient_mode(tmp_path, flags):
    cli.main(["demo", "--epochs", "1", "--width", "16", "--out", str(tmp_path), *flags])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert all(metrics["config"][flag[2:]] == value for flag, value in zip(flags[::2], flags[1::2]))
    assert metrics["test_accuracy"] > 0.3  # one epoch at width 16: well above chance (0.1)


def test_demo_help_gives_every_flag_a_description_and_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = capsys.readouterr().out
    flags = ("epochs", "batch-size", "width", "solver", "grad", "api", "lr", "tol", "max-steps", "seed")
    assert all(f"--{flag}" in text for flag in flags) and text.count("(default:") >= len(flags) + 2


MARK = 1e6  # a finite input value no digit has: the batch holding it is poisoned


@jax.custom_vjp
def nan_gradient(logits, marked):
    return logits


nan_gradient.defvjp(lambda logits, marked: (logits, marked), lambda marked, g: (jnp.where(marked, jnp.nan, g), None))


class Poisoned(linen.Module):
    """A small DEQ classifier whose loss (or only its gradient) is NaN on a batch holding an input ``MARK``."""

    poison: str

    @linen.compact
    def __call__(self, x):
        logits = DEQClassifier(DEQ(MLPCell(8)), 10)(x)
        marked = jnp.any(x == MARK)
        return logits * jnp.where(marked, jnp.nan, 1.0) if self.poison == "loss" else nan_gradient(logits, marked)


def marked(data, index):
    x = data.x_train.copy()
    x[index, 0] = MARK
    return data._replace(x_train=x)


def all_leaves_finite(tree) -> bool:
    return all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def first_index(epoch, n=300, batch_size=64):
    return next(epoch_batches(0, epoch, n, batch_size))[0]


def fit_poisoned(poison, data, epochs, **kwargs):
    return train.fit(Poisoned(poison), optax.adam(1e-2), data, epochs=epochs, batch_size=64, progress=False, **kwargs)


def test_nonfinite_loss_stops_naming_epoch_and_step_and_is_never_saved(small_digits, tmp_path):
    fit_poisoned("loss", small_digits, 1, checkpoint_dir=tmp_path)
    with pytest.raises(train.NonfiniteError, match=r"nonfinite loss, gradient or update at epoch 2, step 1 "):
        fit_poisoned("loss", marked(small_digits, first_index(epoch=1)), 3, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["1"]
    assert not (tmp_path / LOCK_FILE).exists()


def test_nonfinite_gradient_with_a_finite_loss_stops(small_digits):
    with pytest.raises(train.NonfiniteError, match=r"at epoch 1, step 1 \(loss \d"):
        fit_poisoned("gradient", marked(small_digits, first_index(epoch=0)), 1)


def test_skipped_nonfinite_steps_are_counted_and_leave_the_state_finite(small_digits):
    index = first_index(epoch=0)
    result = fit_poisoned("loss", marked(small_digits, index), 2, on_nonfinite="skip")
    in_full_batches = [index in np.concatenate(list(epoch_batches(0, e, 300, 64))) for e in (0, 1)]
    assert [row["skipped_steps"] for row in result.history] == [int(b) for b in in_full_batches]
    assert all_leaves_finite(result.state) and all(np.isfinite(row["loss"]) for row in result.history)


HISTORY = [
    {"epoch": e, "loss": 1 / e, "test_loss": 1 / e, "accuracy": 0.5, "test_accuracy": 0.5, "fwd_mean_steps": 3.0}
    | {"fwd_max_steps": 5.0, "bwd_mean_steps": 4.0}
    for e in (1, 2)
]


def test_demo_outputs_are_replaced_as_a_pair(tmp_path, monkeypatch):
    import jdeq.plots

    cli.write_outputs(tmp_path, {"run": 1}, HISTORY, "first")
    figure = (tmp_path / "training.png").read_bytes()

    def interrupted_plot(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(jdeq.plots, "plot_history", interrupted_plot)
    with pytest.raises(KeyboardInterrupt):
        cli.write_outputs(tmp_path, {"run": 2}, HISTORY, "second")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"run": 1}
    assert (tmp_path / "training.png").read_bytes() == figure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "training.png"]


def test_ctrl_c_between_the_two_renames_is_delivered_after_both(tmp_path, monkeypatch):
    cli.write_outputs(tmp_path, {"run": 1}, HISTORY, "first")
    replace = os.replace

    def interrupted_replace(source, target):
        replace(source, target)
        if target.name == "training.png":
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    # Python's own Ctrl-C handler is the one the deferred signal goes to (another test in this worker may have
    # left a different one installed)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            cli.write_outputs(tmp_path, {"run": 2}, HISTORY, "second")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"run": 2}


def test_demo_refuses_an_unwritable_out_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"jdeq demo: --out .*file/out is not a writable directory"):
        cli.main(["demo", "--out", str(tmp_path / "file" / "out")])
