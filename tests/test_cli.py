"""The `fastdp` command line."""

import subprocess
import sys

import pytest

from fastdp.accountants import RDPAccountant, get_noise_multiplier
from fastdp.cli import main


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


def test_bad_input_is_one_line_error():
    result = subprocess.run(
        [sys.executable, "-m", "fastdp", "epsilon", "--noise-multiplier", "1", "--sample-rate", "2",
         "--steps", "10", "--delta", "1e-5"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "fastdp: error: sample_rate must be in (0, 1], got 2.0"
    assert result.stdout == ""
