"""DP-SGD with several processes (DDP, Opacus-style DPDDP, or FSDP2) on a synthetic 10-class problem.

    torchrun --nproc_per_node 2 -m fastdp.examples.ddp_train [--wrapper dpddp|ddp|fsdp] [--epochs 5]

CPU with gloo by default (``--backend nccl`` puts rank r on cuda:r). Each rank loads its shard
through a DistributedSampler (``--batch-size`` is per rank); ``make_private`` turns it into a
distributed Poisson loader, each rank clips its own samples and the optimizer sums the clipped
gradients of all ranks in one collective, with the noise added once. Rank 0 prints test accuracy
and the ε spent (PRV accountant), the same ε a single process would report.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from fastdp import PrivacyEngine
from fastdp.distributed import DPDDP

FEATURES, CLASSES = 20, 10


def synthetic_data(num_samples: int, seed: int = 0) -> TensorDataset:
    """Gaussian clusters around 10 fixed centres: learnable by a small MLP, same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234)) * 0.5
    labels = torch.randint(0, CLASSES, (num_samples,), generator=generator)
    return TensorDataset(centres[labels] + torch.randn(num_samples, FEATURES, generator=generator), labels)


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, CLASSES))


def wrap(model: nn.Module, wrapper: str, device: torch.device) -> nn.Module:
    if wrapper == "dpddp":
        return DPDDP(model)
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard  # torch >= 2.6

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def accuracy(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    images, labels = (t.to(device) for t in data.tensors)
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def train(args, device: torch.device) -> dict:
    """The training loop; needs an initialised process group. Returns rank 0's final numbers."""
    torch.manual_seed(args.seed)  # the same start everywhere (DDP/DPDDP also broadcast rank 0's)
    train_data, test_data = synthetic_data(args.train_size, seed=args.seed), synthetic_data(1000, seed=args.seed + 1)
    model = small_mlp().to(device)
    model = wrap(model, args.wrapper, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.5)
    loader = DataLoader(train_data, batch_size=args.batch_size, sampler=DistributedSampler(train_data))
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=args.epsilon,
        target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm,
    )
    rank = dist.get_rank()
    if rank == 0:
        print(f"{dist.get_world_size()} processes ({args.wrapper}), global expected batch "
              f"{optimizer.expected_batch_size:.0f}, sample rate {loader.sample_rate:.4f}, "
              f"noise multiplier {optimizer.noise_multiplier:.3f}", flush=True)
    result = {}
    for epoch in range(1, args.epochs + 1):
        for x, y in loader:  # every rank steps every time, even on an empty batch
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
            optimizer.zero_grad()
        correct = accuracy(model, test_data, device)  # FSDP all-gathers here: every rank evaluates
        epsilon = engine.get_epsilon(args.delta)
        result = {"accuracy": correct, "epsilon": epsilon}
        if rank == 0:
            print(f"epoch {epoch:2d}  test accuracy {correct:6.2%}  epsilon {epsilon:.3f} (delta {args.delta:g})",
                  flush=True)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wrapper", choices=["dpddp", "ddp", "fsdp"], default="dpddp")
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (one GPU per process)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64, help="expected batch size per rank")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dist.init_process_group(args.backend)  # rank and world size from torchrun's environment
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    try:
        train(args, device)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
