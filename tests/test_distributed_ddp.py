"""DDP / DPDDP across 2 processes (gloo, CPU): the step equals the single-process step on the union
of the ranks' batches, noise is added once, ε is the single-process ε, bad setups fail clearly.

The cases run in one spawned 2-process session (``outcomes``); the scenarios themselves are in
tests/distributed_worker.py."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from fastdp import DPDataLoader, PrivacyEngine
from fastdp.data import DistributedUniformWithReplacementSampler, UniformWithReplacementSampler

from .distributed_worker import check, run_all

EQUALITY = {
    f"{wrapper}-{clipping}-sigma{sigma}": (wrapper, clipping, sigma)
    for wrapper, clipping, sigma in [
        ("ddp", "flat", 0.0), ("dpddp", "per_layer", 0.0), ("ddp", "flat", 0.8), ("dpddp", "per_layer", 0.8)
    ]
}
CASES = {
    **{
        case: ("ddp_matches_single_process", dict(wrapper=w, clipping=c, noise_multiplier=s))
        for case, (w, c, s) in EQUALITY.items()
    },
    "batch_memory_manager": (
        "ddp_matches_single_process", dict(wrapper="ddp", clipping="flat", noise_multiplier=0.0, physical=3)
    ),
    "empty_batch": ("ddp_empty_batch_on_one_rank", {}),
    "noise_std": ("ddp_noise_std", {}),
    "noise_std_secure": ("ddp_noise_std", dict(secure_mode=True)),
    "sampler_union": ("ddp_sampler_union", {}),
    "bad_input": ("ddp_bad_input", {}),
    "example": ("example_trains", dict(wrapper="dpddp")),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_all(CASES, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("case", list(EQUALITY))
def test_ddp_step_equals_single_process_step_on_the_union(outcomes, case):
    """σ = 0: same clipped sums; σ > 0 (seeded): also the same noise, drawn once; ε equal too."""
    check(outcomes, case)


def test_ddp_batch_memory_manager_communicates_on_real_steps_only(outcomes):
    check(outcomes, "batch_memory_manager")


def test_ddp_empty_batch_on_one_rank(outcomes):
    check(outcomes, "empty_batch")


@pytest.mark.parametrize("case", ["noise_std", "noise_std_secure"])
def test_ddp_noise_is_added_once_for_the_global_sum(outcomes, case):
    check(outcomes, case)


def test_distributed_sampler_union_is_one_poisson_sample(outcomes):
    check(outcomes, "sampler_union")


def test_ddp_bad_input(outcomes):
    check(outcomes, "bad_input")


def test_torchrun_example_learns_within_budget(outcomes):
    check(outcomes, "example")


# -- without processes ------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_shards_union_is_the_single_process_sample(world_size):
    """Explicit rank/num_replicas and seed: the shards partition the single-process Poisson sample."""
    samplers = [
        DistributedUniformWithReplacementSampler(
            total_size=101, sample_rate=0.1, num_replicas=world_size, rank=r, seed=7
        )
        for r in range(world_size)
    ]
    seeded = torch.Generator().manual_seed(7)
    single = list(UniformWithReplacementSampler(num_samples=101, sample_rate=0.1, generator=seeded))
    per_rank = [list(s) for s in samplers]
    assert len(single) == len(samplers[0]) == 10
    for step, expected in enumerate(single):
        assert sorted(i for batches in per_rank for i in batches[step]) == expected
    for r, batches in enumerate(per_rank):
        assert all(i % world_size == r for batch in batches for i in batch)
    assert samplers[0].num_samples == len(range(0, 101, world_size))


def test_secure_sampler_stays_in_its_shard_at_rate_q():
    from fastdp.utils.secure_random import SecureRandom

    sampler = DistributedUniformWithReplacementSampler(
        total_size=4000, sample_rate=0.05, num_replicas=4, rank=3, generator=SecureRandom(), steps=40
    )
    batches = list(sampler)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert all(i % 4 == 3 for b in batches for i in b)
    assert abs(sizes.mean().item() - 1000 * 0.05) < 5 * (1000 * 0.05 * 0.95 / 40) ** 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(total_size=0, sample_rate=0.1, num_replicas=2, rank=0), "total_size"),
        (dict(total_size=10, sample_rate=0.1, num_replicas=2, rank=2), "rank must be < num_replicas"),
        (dict(total_size=10, sample_rate=0.1), "init_process_group"),
        (dict(total_size=10, sample_rate=1.5, num_replicas=2, rank=0), "sample_rate"),
    ],
)
def test_sampler_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistributedUniformWithReplacementSampler(**kwargs)


def test_split_loader_without_distributed_is_refused():
    data = TensorDataset(torch.zeros(8, 3))
    loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    with pytest.raises(ValueError, match="pass distributed=True"):
        DPDataLoader.from_data_loader(loader)


def test_data_parallel_is_refused():
    model = nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.zeros(8, 3), torch.zeros(8, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match="DataParallel"):
        PrivacyEngine().make_private(
            module=nn.DataParallel(model), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0,
        )
