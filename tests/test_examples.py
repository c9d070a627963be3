"""The README demo runs, learns, and stays within its privacy budget."""

import re

import pytest

pytest.importorskip("sklearn", reason="the digits example needs scikit-learn (the [test] extra installs it)")

from fastdp.examples import digits  # noqa: E402


def test_digits_demo_learns_within_budget(capsys):
    digits.main(["--epochs", "4", "--epsilon", "2.0"])
    out = capsys.readouterr().out
    epochs = re.findall(r"epoch\s+(\d+)\s+test accuracy\s+([\d.]+)%\s+epsilon ([\d.]+)", out)
    assert [int(e) for e, _, _ in epochs] == [1, 2, 3, 4]
    accuracies = [float(a) for _, a, _ in epochs]
    epsilons = [float(eps) for _, _, eps in epochs]
    assert accuracies[-1] > 50.0  # chance is 10%
    assert epsilons == sorted(epsilons) and 1.9 <= epsilons[-1] <= 2.0
