"""Every number the ``jdeq`` command takes is validated: a usage error (exit 2) naming the option, never a table of NaN."""

import pytest

from jdeq.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["solvers", "--batch", "0"],
        ["solvers", "--width", "-3"],
        ["solvers", "--radii", "nan"],
        ["solvers", "--seed", "-1"],
        ["demo", "--lr", "inf"],
        ["demo", "--tol", "0"],
        ["demo", "--weight-decay", "-1e-4"],
        ["demo", "--epochs", "0"],
        ["train", "mdeq", "--lr", "-3e-3"],
        ["train", "mdeq", "--tol", "nan"],
        ["train", "mdeq", "--seed", "-1"],
        ["train", "lm", "--weight-decay", "-1"],
        ["train", "lm", "--skip-weight", "inf"],
    ],
)
def test_an_invalid_number_is_a_usage_error_naming_the_option(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert next(arg for arg in argv if arg.startswith("--")) in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "lm", "--text", "MISSING"], "is not a file"),
        (["train", "lm", "--train-chars", "10"], "fewer than one window"),
        (["train", "lm", "--batch-size", "100000"], "--batch-size 100000 is larger than the training set"),
        (["train", "lm", "--dim", "63", "--heads", "4"], "--dim 63 must be a multiple of --heads 4"),
        (["train", "mdeq", "--cifar10", "MISSING"], "does not exist"),
        (["demo", "--batch-size", "5000"], "--batch-size 5000 is larger than the training set"),
    ],
)
def test_bad_training_data_or_shape_is_a_one_line_error_before_training(argv, message, tmp_path):
    argv = [str(tmp_path / arg) if arg == "MISSING" else arg for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert isinstance(exit_info.value.code, str) and message in exit_info.value.code
    assert exit_info.value.code.startswith("jdeq demo: " if argv[0] == "demo" else f"jdeq train {argv[1]}: ")
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing trained
