"""FSDP2 (``fully_shard``) across 2 processes (gloo, CPU; torch >= 2.6 runs it there): fastdp's
clipping on a sharded model equals the single-process step on the union of the ranks' batches,
gradients and optimizer state stay sharded, and the noise goes in once over the shards.

The cases run in one spawned 2-process session (``outcomes``); the scenarios themselves are in
tests/distributed_worker.py."""

import pytest

try:
    from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
except ImportError:  # pragma: no cover
    FSDPModule = None

from .distributed_worker import check, run_all

pytestmark = pytest.mark.skipif(FSDPModule is None, reason="this torch has no FSDP2 (fully_shard)")

CASES = {
    "flat": ("fsdp_matches_single_process", dict(clipping="flat", noise_multiplier=0.0)),
    "per_layer": ("fsdp_matches_single_process", dict(clipping="per_layer", noise_multiplier=0.0)),
    "noised": ("fsdp_matches_single_process", dict(clipping="flat", noise_multiplier=0.8)),
    "noise_std": ("fsdp_noise_std", {}),
    "bad_input": ("fsdp_bad_input", {}),
    "example": ("example_trains", dict(wrapper="fsdp")),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_all(CASES, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_fsdp_step_equals_single_process_step_on_the_union(outcomes, clipping):
    check(outcomes, clipping)


def test_fsdp_noised_steps_keep_everything_sharded(outcomes):
    check(outcomes, "noised")


def test_fsdp_noise_is_added_once_over_the_shards(outcomes):
    check(outcomes, "noise_std")


def test_fsdp_bad_input(outcomes):
    check(outcomes, "bad_input")


def test_torchrun_example_with_fsdp(outcomes):
    check(outcomes, "example")
