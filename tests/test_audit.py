"""One-run privacy audits of the real DP step (fastdp/audit/): a correct engine never shows more
leakage than its accountant, and a broken one (no clipping, too little noise) is caught."""

import functools

import numpy as np
import pytest
import torch

from fastdp.audit import canaries, run_audit, tiny_task
from fastdp.audit.tasks import make_model, synthetic_classification
from fastdp.cli import main

# ε_upper ≈ 2.3 for these: below the most that m = 1000 canaries can prove (about 4.6), so a leak can show
SETTING = dict(sample_rate=0.1, steps=100, canaries=1000)


@functools.lru_cache(maxsize=None)
def _audit(seed=0, noise_multiplier=2.0, fault=None):
    model, data = tiny_task("mlp", num_samples=500, seed=seed)
    return run_audit(model, data, noise_multiplier=noise_multiplier, seed=seed, fault=fault, **SETTING)


@pytest.mark.parametrize("mode", ["bk", "hooks", "functorch"])
def test_a_gradient_canary_adds_exactly_one_clipped_gradient_per_step(mode):
    # no noise, every sample in every step: an included canary's score counts its clipped contributions
    # (C each, its raw gradient being 10·C), an excluded one's stays 0, whatever the real samples do
    common = dict(noise_multiplier=0.0, sample_rate=1.0, steps=3, canaries=40, grad_sample_mode=mode)
    model, data = tiny_task("mlp", num_samples=50)
    result = run_audit(model, data, **common)
    assert 0 < result.included.sum() < 40
    np.testing.assert_allclose(result.scores[result.included], 3.0, rtol=1e-5)
    assert np.all(result.scores[~result.included] == 0)
    broken = run_audit(model, data, fault="no-clipping", **common)
    np.testing.assert_allclose(broken.scores[broken.included], 3.0 * canaries.CANARY_NORM_MULTIPLE, rtol=1e-5)


def test_huge_noise_gives_no_bound():
    result = _audit(noise_multiplier=1e4)
    assert result.epsilon_lower < 0.05
    assert result.correct <= 0.65 * result.guesses


def test_no_noise_gives_a_large_bound():
    result = _audit(noise_multiplier=0.0)
    assert result.epsilon_upper == {"rdp": float("inf"), "prv": float("inf"), "pld": float("inf")}
    assert result.epsilon_lower > 4.0 and result.correct == result.guesses


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_correct_run_stays_below_every_accountant(seed):
    result = _audit(seed=seed)
    assert set(result.epsilon_upper) == {"rdp", "prv", "pld"}
    assert 0 < result.epsilon_lower < min(result.epsilon_upper.values())  # > 0: the canaries did leave a trace
    assert not result.leak_detected


@pytest.mark.parametrize("fault", ["no-clipping", "noise-scale=0.1"])
def test_a_broken_engine_is_caught(fault):
    correct, broken = _audit(), _audit(fault=fault)
    assert broken.epsilon_upper == correct.epsilon_upper  # the accountant is told the same story
    assert broken.leak_detected and broken.epsilon_lower > max(broken.epsilon_upper.values())
    assert broken.epsilon_lower > correct.epsilon_lower + 2


def test_input_canaries_are_memorised_without_noise():
    # random inputs in 256 dimensions with random labels: a linear model fits the included ones
    data, model = synthetic_classification(100, 256, 4, 0), make_model("linear", 256, 4, 0)
    common = dict(sample_rate=0.5, steps=100, canaries=200, kind="input", lr=2.0, max_grad_norm=10.0)
    memorised = run_audit(model, data, noise_multiplier=0.0, **common)
    assert memorised.epsilon_lower > 1.5
    noisy = run_audit(model, data, noise_multiplier=50.0, **common)
    assert noisy.epsilon_lower < min(noisy.epsilon_upper.values())
    assert noisy.epsilon_lower < memorised.epsilon_lower


def test_the_callers_model_is_left_untouched():
    model, data = tiny_task("linear", num_samples=50)
    before = [p.detach().clone() for p in model.parameters()]
    run_audit(model, data, noise_multiplier=1.0, sample_rate=0.5, steps=3, canaries=10)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert type(model) is torch.nn.Linear and not hasattr(model, "_module")


@pytest.mark.parametrize("overrides,match", [
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(sample_rate=0.0), "sample_rate"),
    (dict(steps=0), "steps"),
    (dict(canaries=0), "canaries"),
    (dict(kind="black-box"), "kind"),
    (dict(fault="slow-noise"), "fault"),
    (dict(fault="noise-scale=1.5"), "noise-scale"),
    (dict(confidence=1.0), "confidence"),
    (dict(kind="input", dataset=torch.utils.data.TensorDataset(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4))),
     "kind='input'"),
])
def test_bad_arguments_are_named(overrides, match):
    model, data = tiny_task("linear", num_samples=20)
    arguments = dict(dataset=data, noise_multiplier=1.0, sample_rate=0.5, steps=2, canaries=10)
    with pytest.raises(ValueError, match=match):
        run_audit(model, **{**arguments, **overrides})


def test_cli_choices_are_the_runners():
    from fastdp.audit import cli, tasks

    assert cli.MODELS == tasks.MODELS and cli.KINDS == canaries.KINDS


def test_cli_prints_one_row_per_sigma_and_fault(capsys):
    main(["audit", "--model", "linear", "--noise-multiplier", "2", "1e4", "--sample-rate", "0.2", "--steps", "20",
          "--canaries", "200", "--samples", "100", "--fault", "none", "no-clipping"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fastdp audit: model=linear kind=gradient m=200 q=0.2 steps=20")
    assert "eps_upper rdp" in lines[1] and "eps_lower" in lines[1]
    rows = [line.split("|")[1:-1] for line in lines[3:]]
    assert [(row[0].strip(), row[1].strip()) for row in rows] == [
        ("2", "none"), ("2", "no-clipping"), ("10000", "none"), ("10000", "no-clipping")]
    assert "LEAK" in rows[1][-1] and "consistent" in rows[0][-1]


def test_cli_bad_flag_is_a_one_line_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "5"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert captured.err.strip().splitlines()[-1] == "fastdp audit: error: --sample-rate must be in (0, 1], got 1.5"


def test_cli_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "audit.png"
    main(["audit", "--model", "linear", "--noise-multiplier", "1", "--sample-rate", "0.5", "--steps", "5",
          "--canaries", "50", "--samples", "50", "--plot", str(path)])
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out.splitlines()[-1] == f"plot: {path}"
