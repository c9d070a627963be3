"""Accountant speed: ε after 100k steps, a 1,000-segment history, and σ calibration.

Goals (one core): < 1 s, < 5 s and < 5 s respectively for every accountant.

    OMP_NUM_THREADS=1 python -m pytest bench/bench_accountants.py --benchmark-only   # pytest-benchmark
    OMP_NUM_THREADS=1 python -m bench.bench_accountants                                # plain table
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from fastdp.accountants import available_accountants, create_accountant, get_noise_multiplier

ACCOUNTANTS = [name for name in ("rdp", "gdp", "prv", "pld") if name in available_accountants()]


def epsilon_long_run(name: str) -> float:
    acc = create_accountant(name)
    acc.history = [(1.0, 0.001, 100_000)]
    return acc.get_epsilon(1e-5)


def epsilon_many_segments(name: str) -> float:
    """1,000 segments of 100 steps, each with its own (σ, q): a noise/batch-size schedule."""
    rng = np.random.default_rng(0)
    acc = create_accountant(name)
    acc.history = [
        (float(sigma), float(q), 100)
        for sigma, q in zip(rng.uniform(0.8, 2.0, 1000), rng.uniform(0.001, 0.01, 1000))
    ]
    return acc.get_epsilon(1e-5)


def calibrate_sigma(name: str) -> float:
    return get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.004, epochs=50, accountant=name)


CASES = {"100k steps": epsilon_long_run, "1000 segments": epsilon_many_segments, "get_noise_multiplier": calibrate_sigma}
GOALS_S = {"100k steps": 1.0, "1000 segments": 5.0, "get_noise_multiplier": 5.0}


@pytest.mark.parametrize("name", ACCOUNTANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_accountant_speed(benchmark, name, case):
    value = benchmark.pedantic(CASES[case], args=(name,), rounds=3, iterations=1)
    assert np.isfinite(value)


def main() -> None:
    print(f"| accountant | {' | '.join(f'{c} (s, goal < {GOALS_S[c]:g})' for c in CASES)} |")
    print("|---" * (len(CASES) + 1) + "|")
    for name in ACCOUNTANTS:
        cells = []
        for fn in CASES.values():
            start = time.perf_counter()
            fn(name)
            cells.append(f"{time.perf_counter() - start:.3f}")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
