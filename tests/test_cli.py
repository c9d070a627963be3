"""The `fastdp` command line."""

import subprocess
import sys

import pytest

from fastdp.accountants import RDPAccountant, get_noise_multiplier
from fastdp.cli import main

from .subprocesses import python_output


def _table(capsys):
    out = capsys.readouterr().out.splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in out[2:]}


def test_epsilon_table(capsys):
    main(["epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.0043", "--steps", "14000", "--delta", "1e-5"])
    table = _table(capsys)
    assert set(table) == {"rdp", "prv", "pld", "gdp"}
    acc = RDPAccountant()
    acc.history = [(1.1, 0.0043, 14000)]
    assert table["rdp"] == pytest.approx(acc.get_epsilon(1e-5), abs=1e-4)
    assert table["pld"] <= table["rdp"] and table["prv"] <= table["rdp"]


def test_noise_multiplier_by_epochs(capsys):
    main(["noise-multiplier", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01",
          "--epochs", "5", "--accountant", "rdp"])
    expected = get_noise_multiplier(target_epsilon=3, target_delta=1e-5, sample_rate=0.01, epochs=5)
    assert _table(capsys)["rdp"] == pytest.approx(expected, abs=1e-4)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastdp", *args], capture_output=True, text=True, timeout=300)


def test_bad_input_is_one_line_error_naming_the_flag_under_the_subcommands_usage():
    result = _run_cli("epsilon", "--noise-multiplier", "1", "--sample-rate", "2", "--steps", "10", "--delta", "1e-5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("usage: fastdp epsilon ")
    assert lines[-1] == "fastdp epsilon: error: --sample-rate must be in (0, 1], got 2.0"
    assert result.stdout == ""


@pytest.mark.parametrize("args, expected", [
    (["epsilon", "--noise-multiplier", "-1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5"],
     "fastdp epsilon: error: --noise-multiplier must be >= 0, got -1.0"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--epochs", "-2", "--delta", "1e-5"],
     "fastdp epsilon: error: --epochs must be a finite number > 0, got -2.0"),
    # get_noise_multiplier calls it target_delta: the message must still name the flag
    (["noise-multiplier", "--target-epsilon", "3", "--sample-rate", "0.1", "--steps", "10", "--delta", "2"],
     "fastdp noise-multiplier: error: --delta must be in (0, 1), got 2.0"),
])
def test_errors_name_flags_not_python_arguments(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected


def test_help_answers_without_numpy_scipy_or_torch():
    """`fastdp --help` must answer in well under a second: it may not import the heavy libraries."""
    code = ("import sys; from fastdp.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('numpy', 'scipy', 'torch') if m in sys.modules))")
    out = python_output(code)
    assert "epsilon" in out and "noise-multiplier" in out
    assert out.strip().splitlines()[-1] == "[]"


def test_every_subcommand_has_help():
    for command in ("epsilon", "noise-multiplier"):
        result = _run_cli(command, "--help")
        assert result.returncode == 0 and result.stdout.startswith(f"usage: fastdp {command} "), result.stderr
