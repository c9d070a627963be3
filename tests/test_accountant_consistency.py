"""Relations between accountants that hold by theory, on a grid of (σ, q, steps, δ).

RDP is computed independently of PRV/PLD (which share their composition code), so
RDP ≥ PLD and RDP ≥ PRV-estimate catch an optimistic composition. GDP ≤ PLD is not
assumed (the CLT can be on either side).
"""

import itertools

import pytest

from fastdp.accountants import create_accountant

GRID = list(itertools.product([0.7, 1.0, 2.0], [0.005, 0.05, 0.5], [10, 1000], [1e-5, 1e-8]))


def _epsilon(name, sigma, q, steps, delta, **kwargs):
    acc = create_accountant(name)
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta, **kwargs)


@pytest.mark.parametrize("sigma, q, steps, delta", GRID)
def test_rdp_bounds_pld_and_prv_from_above(sigma, q, steps, delta):
    rdp = _epsilon("rdp", sigma, q, steps, delta)
    pld = _epsilon("pld", sigma, q, steps, delta)
    prv = _epsilon("prv", sigma, q, steps, delta)
    assert pld <= rdp + 1e-9
    assert prv - 0.01 <= rdp + 1e-9  # PRV's upper bound may exceed RDP by at most its eps_error
