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
