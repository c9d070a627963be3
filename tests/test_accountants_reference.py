"""Every published value in the reference file, reproduced within the source's own tolerance."""

import json

import pytest

from fastdp.accountants import available_accountants, create_accountant, get_noise_multiplier

from .reference import DATA, SHARED, load_reference

REFERENCE = load_reference()


def _id(entry):
    return "{accountant}-sigma{}-q{}".format(entry.get("sigma"), entry["q"], **entry)


def test_vendored_copy_matches_shared_reference():
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not present (only beside the project's own checkout)")
    assert json.loads(SHARED.read_text()) == json.loads(DATA.read_text())


def test_every_reference_accountant_exists():
    for entry in REFERENCE["epsilon"] + REFERENCE["noise_multiplier"]:
        assert entry["accountant"] in available_accountants()


@pytest.mark.parametrize("entry", REFERENCE["epsilon"], ids=_id)
def test_epsilon(entry):
    acc = create_accountant(entry["accountant"])
    acc.history = [(entry["sigma"], entry["q"], entry["steps"])]
    eps = acc.get_epsilon(entry["delta"])
    if "epsilon_range" in entry:
        low, high = entry["epsilon_range"]
        assert low <= eps <= high
    else:
        assert eps == pytest.approx(entry["epsilon"], abs=entry["abs_tol"], rel=0)


@pytest.mark.parametrize("entry", REFERENCE["noise_multiplier"], ids=_id)
def test_noise_multiplier(entry):
    schedule = {"epochs": entry["epochs"]} if "epochs" in entry else {"steps": entry["steps"]}
    sigma = get_noise_multiplier(
        target_epsilon=entry["target_epsilon"],
        target_delta=entry["delta"],
        sample_rate=entry["q"],
        accountant=entry["accountant"],
        **schedule,
    )
    assert round(sigma - entry["sigma"], entry["places"]) == 0  # assertAlmostEqual(places=...)
    acc = create_accountant(entry["accountant"])
    steps = schedule.get("steps") or int(entry["epochs"] / entry["q"])
    acc.history = [(sigma, entry["q"], steps)]
    assert acc.get_epsilon(entry["delta"]) <= entry["target_epsilon"]
