"""Scenarios that run in several processes (gloo on CPU), started by tests/test_distributed_*.py.

``run_all({case: (scenario, kwargs)}, tmp_path)`` spawns ``world_size`` processes once (starting
processes that import torch is most of the cost); each joins one gloo process group (a file
store in ``tmp_path``: no ports to race for) and runs every case,
``SCENARIOS[scenario](rank, world_size, **kwargs)``, catching its failure. After each case the
ranks exchange their outcomes over a second process group, so a case that failed on one rank
cannot pair its collectives with the next case's; a rank left waiting in a collective by a
failed peer times out after 30 s. It returns ``{case: None | the failing ranks' tracebacks}``.

The references are single-process: every rank gathers the union of all ranks' batches and runs
the plain (non-distributed) GradSampleModule + DPOptimizer step on it, then compares.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from fastdp import BatchMemoryManager, DPDataLoader, DPOptimizer, GradSampleModule, PrivacyEngine
from fastdp.accountants import create_accountant
from fastdp.distributed import DPDDP

N, PER_RANK_BATCH, FEATURES, CLASSES = 64, 8, 6, 3


# -- harness ------------------------------------------------------------------------------------
def run_all(cases: dict, tmp_path, world_size: int = 2) -> dict:
    store, report = os.path.join(str(tmp_path), "store"), os.path.join(str(tmp_path), "outcomes.json")
    mp.spawn(_entry, args=(world_size, cases, store, report), nprocs=world_size, join=True)
    with open(report) as file:
        return json.load(file)


def _entry(rank: int, world_size: int, cases: dict, store: str, report: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )
    outcomes_group = dist.new_group(backend="gloo")
    outcomes = {}
    try:
        for case, (scenario, kwargs) in cases.items():
            torch.set_default_dtype(torch.float32)
            try:
                SCENARIOS[scenario](rank, world_size, **kwargs)
                failure = None
            except Exception:  # recorded, and the other cases still run
                failure = f"rank {rank}:\n{traceback.format_exc()}"
            failures = [None] * world_size
            dist.all_gather_object(failures, failure, group=outcomes_group)
            outcomes[case] = "\n".join(f for f in failures if f) or None
        dist.barrier(group=outcomes_group)  # no rank tears down while another still needs it
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(report, "w") as file:
            json.dump(outcomes, file)


def check(outcomes: dict, case: str) -> None:
    """Fail the calling test with the ranks' tracebacks if ``case`` failed."""
    if outcomes[case] is not None:
        pytest.fail(outcomes[case], pytrace=False)


def gather(obj):
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, obj)
    return everything


def dataset(seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(N, FEATURES, generator=generator)
    return TensorDataset(features, torch.randint(0, CLASSES, (N,), generator=generator))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, CLASSES))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def per_layer_bounds(model: nn.Module):
    return [0.3 + 0.1 * k for k, _ in enumerate(model.parameters())]


class Reference:
    """The single-process DP step on the union of the ranks' batches (same σ, C, q·N, generator)."""

    def __init__(self, model, *, lr, noise_multiplier, max_grad_norm, expected_batch_size, clipping, generator,
                 optimizer="sgd"):
        self.model = copy.deepcopy(model)
        self.module = GradSampleModule(self.model)
        inner = (torch.optim.SGD(self.model.parameters(), lr=lr) if optimizer == "sgd"
                 else torch.optim.Adam(self.model.parameters(), lr=lr))
        self.optimizer = DPOptimizer(
            inner, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size, clipping=clipping, generator=generator,
        )
        self.optimizer.attach(self.module)

    def step(self, x, y):
        F.cross_entropy(self.module(x), y).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def union(x, y):
    batches = gather((x, y))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


# -- DDP scenarios --------------------------------------------------------------------------------
def ddp_matches_single_process(rank, world_size, *, wrapper, clipping, noise_multiplier, physical=None):
    """K DDP steps equal K single-process steps on the union of the ranks' batches (σ = 0: the
    clipped sums; σ > 0 with a seeded generator: also the very same noise, drawn once)."""
    torch.set_default_dtype(torch.float64)
    model, data = mlp(seed=rank), dataset()  # different inits per rank: the wrapper must broadcast rank 0's
    wrapped = DPDDP(model) if wrapper == "dpddp" else nn.parallel.DistributedDataParallel(model)
    start = copy.deepcopy(model)
    assert all(torch.equal(p, q) for p, q in zip(start.parameters(), mlp(seed=0).parameters()))
    loader = DataLoader(data, batch_size=PER_RANK_BATCH, sampler=DistributedSampler(data))
    bound = per_layer_bounds(model) if clipping == "per_layer" else 0.5
    generator = torch.Generator().manual_seed(11)
    engine = PrivacyEngine(accountant="rdp")
    module, optimizer, dp_loader = engine.make_private(
        module=wrapped, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=bound, clipping=clipping, noise_generator=generator,
    )
    assert isinstance(dp_loader, DPDataLoader) and dp_loader.sample_rate == 1 / 4  # 64 / (2 ranks × 8)
    assert optimizer.expected_batch_size == N * dp_loader.sample_rate == world_size * PER_RANK_BATCH
    if physical is None:
        batches = iter(dp_loader)  # draws the loader's worker seed from the generator: copy its state after
    else:
        assert noise_multiplier == 0  # the split loader draws from the generator at its own times
        batches = BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=physical, optimizer=optimizer)
        batches = batches.__enter__()
    reference = Reference(
        start, lr=0.5, noise_multiplier=noise_multiplier, max_grad_norm=bound,
        expected_batch_size=optimizer.expected_batch_size, clipping=clipping,
        generator=torch.Generator().set_state(generator.get_state()),  # rank 0's noise stream from here on
    )
    steps, clipped_seen, chunks = 0, False, []
    logical_x, logical_y = [], []
    for x, y in batches:
        F.cross_entropy(module(x), y).backward()
        skipping = optimizer._skip_next
        optimizer.step()
        optimizer.zero_grad()
        logical_x.append(x), logical_y.append(y)
        chunks.append(len(x))
        if skipping:
            continue
        ux, uy = union(torch.cat(logical_x), torch.cat(logical_y))
        logical_x, logical_y = [], []
        reference.step(ux, uy)
        clipped_seen = clipped_seen or bool((reference.module.per_sample_norms > 0.5).any())
        steps += 1
        for p, q in zip(model.parameters(), reference.model.parameters()):
            assert relative_error(p.detach(), q.detach()) < 1e-6, (steps, relative_error(p.detach(), q.detach()))
    assert steps == 4 and clipped_seen
    if physical is not None:  # the ranks split their batches into different numbers of chunks
        assert max(chunks) <= physical and len(chunks) > steps
    # every rank's accountant holds the single-process history, hence the single-process epsilon
    single = create_accountant("rdp")
    single.history = [(noise_multiplier, 0.25, 4)]
    assert engine.accountant.history == single.history
    if noise_multiplier > 0:
        assert engine.get_epsilon(1e-5) == single.get_epsilon(1e-5)


def ddp_empty_batch_on_one_rank(rank, world_size):
    """A rank with no samples contributes zeros and still joins the one collective."""
    torch.set_default_dtype(torch.float64)
    model, data = mlp(), dataset()
    start = copy.deepcopy(model)
    loader = DataLoader(data, batch_size=PER_RANK_BATCH, sampler=DistributedSampler(data))
    module, optimizer, _ = PrivacyEngine().make_private(
        module=DPDDP(model), optimizer=torch.optim.SGD(model.parameters(), lr=0.5), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=0.5,
    )
    x, y = data.tensors
    x, y = (x[:10], y[:10]) if rank == 0 else (x[:0], y[:0])
    F.cross_entropy(module(x), y, reduction="sum").backward()
    optimizer.step()
    reference = Reference(start, lr=0.5, noise_multiplier=0.0, max_grad_norm=0.5,
                          expected_batch_size=optimizer.expected_batch_size, clipping="flat", generator=None)
    ux, uy = union(x, y)
    assert len(ux) == 10
    reference.step(ux, uy)
    for p, q in zip(model.parameters(), reference.model.parameters()):
        assert relative_error(p.detach(), q.detach()) < 1e-6


def ddp_noise_std(rank, world_size, *, steps=12, secure_mode=False):
    """Released gradient = N(0, (σC/B)²) per coordinate with zero data: noise added once, not per rank
    (secure mode: from rank 0's CSPRNG; independent per-rank draws would give √2 times the std)."""
    torch.manual_seed(0)  # the same global generator on every rank: per-rank noise would be perfectly correlated
    sigma, bound = 1.3, 0.7
    model = nn.Linear(100, 20, bias=False)
    data = TensorDataset(torch.zeros(N, 100), torch.zeros(N, dtype=torch.long))  # every clipped sum is 0
    loader = DataLoader(data, batch_size=PER_RANK_BATCH, sampler=DistributedSampler(data))
    engine = PrivacyEngine(accountant="prv", secure_mode=secure_mode)
    module, optimizer, dp_loader = engine.make_private(
        module=nn.parallel.DistributedDataParallel(model), optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader, noise_multiplier=sigma, max_grad_norm=bound,
    )
    released = []
    while len(released) < steps:  # every rank has len(dp_loader) steps per epoch
        for x, y in dp_loader:
            F.cross_entropy(module(x), y).backward()
            optimizer.step()
            released.append(model.weight.grad.detach().clone())
            optimizer.zero_grad()
    released = torch.stack(released)
    everyone = gather(released)
    assert all(torch.equal(r, released) for r in everyone)  # the replicas apply the same gradient
    expected = sigma * bound / optimizer.expected_batch_size
    assert abs(released.std().item() / expected - 1) < 0.03, released.std().item() / expected  # √2 if per rank
    single = create_accountant("prv")
    single.history = [(sigma, dp_loader.sample_rate, len(released))]
    assert engine.accountant.history == single.history
    assert engine.get_epsilon(1e-5) == pytest.approx(single.get_epsilon(1e-5), rel=1e-12)


def ddp_sampler_union(rank, world_size):
    """The ranks' batches are disjoint, each from its own shard, and together one Poisson sample."""
    from fastdp.data import UniformWithReplacementSampler

    loader = DPDataLoader(dataset(), sample_rate=0.2, distributed=True, generator=torch.Generator().manual_seed(rank))
    sampler = loader.batch_sampler
    assert sampler.num_replicas == world_size and sampler.rank == rank
    assert gather(sampler.seed) == [sampler.seed] * world_size  # agreed, though the generators differ
    mine = list(sampler)
    assert all(i % world_size == rank for batch in mine for i in batch)
    everyone = gather(mine)
    single = UniformWithReplacementSampler(
        num_samples=N, sample_rate=0.2, generator=torch.Generator().manual_seed(sampler.seed)
    )
    for step, expected in enumerate(single):
        assert sorted(i for batches in everyone for i in batches[step]) == expected


def ddp_bad_input(rank, world_size):
    """Non-distributed loaders, mismatched world sizes and ranks that disagree: clear errors everywhere."""
    data = dataset()

    def make_private(loader, **kwargs):
        model = mlp()
        arguments = dict(noise_multiplier=1.0, max_grad_norm=1.0)
        arguments.update(kwargs)
        return PrivacyEngine().make_private(
            module=DPDDP(model), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader, **arguments
        )

    # Opacus's DDP tutorial: the same loader over the whole dataset on every rank is split into the ranks'
    # shares of one Poisson sample at the loader's rate (the global expected batch is its batch size)
    for whole in (DataLoader(data, batch_size=8, shuffle=True), DPDataLoader(data, sample_rate=8 / N)):
        _, _, split = make_private(whole)
        assert split.distributed and split.sample_rate == pytest.approx(8 / N)
    with pytest.raises(ValueError, match="DistributedSampler"):  # without Poisson sampling it cannot be split
        make_private(DataLoader(data, batch_size=8, shuffle=True), poisson_sampling=False)
    with pytest.raises(ValueError, match="over 3 ranks but the process group has 2"):
        make_private(DataLoader(data, batch_size=8, sampler=DistributedSampler(data, num_replicas=3, rank=rank)))
    with pytest.raises(ValueError, match="noise_multiplier differs across ranks"):
        make_private(DataLoader(data, batch_size=8, sampler=DistributedSampler(data)), noise_multiplier=1.0 + rank)
    with pytest.raises(ValueError, match="adaptive"):
        make_private(DataLoader(data, batch_size=8, sampler=DistributedSampler(data)), clipping="adaptive",
                     unclipped_num_std=5.0)
    model = mlp()
    with pytest.raises(ValueError, match="GradSampleModule around DDP"):
        PrivacyEngine().make_private(
            module=GradSampleModule(DPDDP(model)), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=8, sampler=DistributedSampler(data)),
            noise_multiplier=1.0, max_grad_norm=1.0,
        )
    with pytest.raises(ValueError, match="distributed=True"):
        DPDataLoader.from_data_loader(DataLoader(data, batch_size=8, sampler=DistributedSampler(data)))
    shuffled = DataLoader(data, batch_size=8, sampler=DistributedSampler(data))  # fine, with the usual warning
    with pytest.warns(RuntimeWarning, match="poisson_sampling=False"):
        _, optimizer, loader = make_private(shuffled, poisson_sampling=False)
    assert loader is shuffled and optimizer.expected_batch_size == N / len(shuffled) == world_size * 8


# -- FSDP2 scenarios ------------------------------------------------------------------------------
def fsdp_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 7), nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, CLASSES))


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def fsdp_matches_single_process(rank, world_size, *, clipping, noise_multiplier):
    """FSDP2 steps against single-process steps on the union: σ = 0, the same gradients and Adam
    updates; σ > 0, gradient minus the reference's noiseless one is N(0, (σC/B)²) per coordinate.
    Gradients and Adam state stay sharded."""
    from torch.distributed.tensor import DTensor

    torch.set_default_dtype(torch.float64)
    start, data = fsdp_model(), dataset()
    model = shard(copy.deepcopy(start))
    loader = DataLoader(data, batch_size=PER_RANK_BATCH, sampler=DistributedSampler(data))
    bound = per_layer_bounds(start) if clipping == "per_layer" else 0.5
    engine = PrivacyEngine(accountant="rdp")
    module, optimizer, dp_loader = engine.make_private(
        module=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.05), data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=bound, clipping=clipping,
        noise_generator=torch.Generator().manual_seed(5),
    )
    from fastdp.distributed.fsdp import _param_groups, fsdp_modules

    assert all(not group.reduce_grads for m in fsdp_modules(model) for group in _param_groups(m))  # fastdp reduces
    reference = Reference(start, lr=0.05, noise_multiplier=0.0, max_grad_norm=bound, optimizer="adam",
                          expected_batch_size=optimizer.expected_batch_size, clipping=clipping, generator=None)
    noise, steps = [], 0
    for x, y in dp_loader:
        if noise_multiplier > 0:  # the noisy models part ways: compare each step's gradient from the same point
            with torch.no_grad():
                for p, q in zip(model.parameters(), reference.model.parameters()):
                    q.copy_(p.full_tensor())
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
        ux, uy = union(x, y)
        F.cross_entropy(reference.module(ux), uy).backward()
        reference.optimizer.step()
        for p, q in zip(model.parameters(), reference.model.parameters()):
            assert isinstance(p.grad, DTensor) and p.grad.to_local().shape == p.to_local().shape  # sharded
            assert all(not isinstance(s, torch.Tensor) or s.dim() == 0 or s.to_local().shape == p.to_local().shape
                       for s in optimizer.state[p].values())
            if noise_multiplier == 0:
                assert relative_error(p.grad.full_tensor(), q.grad) < 1e-6
                assert relative_error(p.full_tensor().detach(), q.detach()) < 1e-6
            else:
                noise.append((p.grad.full_tensor() - q.grad).reshape(-1))
        optimizer.zero_grad()
        reference.optimizer.zero_grad()
        steps += 1
    assert steps == 4 and engine.accountant.history == [(noise_multiplier, 0.25, 4)]
    if noise_multiplier > 0:  # 4 steps × 80 coordinates, seeded: std 2 if each rank added its own noise
        scale = noise_multiplier * optimizer.max_grad_norm / optimizer.expected_batch_size
        assert abs(torch.cat(noise).std().item() / scale - 1) < 0.15, torch.cat(noise).std().item() / scale


def fsdp_noise_std(rank, world_size, *, steps=10):
    """FSDP2 with zero data: every coordinate of every shard gets N(0, (σC/B)²) exactly once."""
    torch.manual_seed(0)
    sigma, bound = 1.1, 0.9
    model = nn.Sequential(nn.Linear(60, 33, bias=False), nn.Linear(33, 5, bias=False))  # uneven shards (33 = 17 + 16)
    model = shard(model)
    data = TensorDataset(torch.zeros(N, 60), torch.zeros(N, dtype=torch.long))
    loader = DataLoader(data, batch_size=PER_RANK_BATCH, sampler=DistributedSampler(data))
    module, optimizer, dp_loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=loader,
        noise_multiplier=sigma, max_grad_norm=bound,
    )
    released = []
    while len(released) < steps:
        for x, y in dp_loader:
            F.cross_entropy(module(x), y).backward()
            optimizer.step()
            released.append(torch.cat([p.grad.full_tensor().reshape(-1) for p in model.parameters()]))
            optimizer.zero_grad()
    released = torch.stack(released)
    expected = sigma * bound / optimizer.expected_batch_size
    assert abs(released.std().item() / expected - 1) < 0.03, released.std().item() / expected


def fsdp_bad_input(rank, world_size):
    """Layers without a rule, non-distributed loaders and BatchMemoryManager are refused under FSDP2."""
    from .models import Scale

    data = dataset()
    loader = DataLoader(data, batch_size=PER_RANK_BATCH, sampler=DistributedSampler(data))

    def make_private(model, loader=loader):
        return PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0,
        )

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="no fastdp layer rule"):
        make_private(shard(nn.Sequential(nn.Linear(FEATURES, 4), Scale(4), nn.Linear(4, CLASSES))))
    _, _, split = make_private(shard(fsdp_model()), DataLoader(data, batch_size=8, shuffle=True))
    assert split.distributed  # a whole-dataset loader is split into the ranks' Poisson shares (as Opacus)
    module, optimizer, loader = make_private(shard(fsdp_model()))
    with pytest.raises(ValueError, match="BatchMemoryManager cannot split batches under FSDP"):
        optimizer.signal_skip_step(True)
    # refused at construction, on every rank alike (no rank is left waiting in a collective)
    with pytest.raises(ValueError, match="BatchMemoryManager cannot split batches under FSDP"):
        BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=optimizer)


def example_trains(rank, world_size, *, wrapper):
    """fastdp/examples/ddp_train.py (what torchrun runs) learns within its budget."""
    from fastdp.examples import ddp_train

    args = ddp_train.parse_args(["--wrapper", wrapper, "--epochs", "2", "--train-size", "2000", "--epsilon", "2.0"])
    result = ddp_train.train(args, torch.device("cpu"))
    assert result["accuracy"] > 0.4  # chance is 0.1
    assert 1.9 <= result["epsilon"] <= 2.0


SCENARIOS = {
    fn.__name__: fn
    for fn in [
        ddp_matches_single_process, ddp_empty_batch_on_one_rank, ddp_noise_std, ddp_sampler_union, ddp_bad_input,
        fsdp_matches_single_process, fsdp_noise_std, fsdp_bad_input, example_trains,
    ]
}
