"""DP-SGD training of a small CNN on scikit-learn's bundled digits (8×8 images, no download).

    python -m fastdp.examples.digits [--epochs 15] [--epsilon 3.0] [--batch-size 128] [--lr 0.2]

Prints test accuracy and the ε spent after each epoch (PRV accountant, δ = 1e-5); σ is chosen
so that ε reaches ``--epsilon`` after ``--epochs``. A progress bar shows on a terminal only.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from fastdp import PrivacyEngine


def load_digits_tensors(seed: int = 0):
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit('this example needs scikit-learn: pip install -e ".[examples]"') from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = (images[order] - 0.3) / 0.4, labels[order]
    return TensorDataset(images[:1500], labels[:1500]), TensorDataset(images[1500:], labels[1500:])


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        images, labels = data.tensors
        correct = (model(images).argmax(1) == labels).float().mean().item()
    model.train()
    return correct


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--epsilon", type=float, default=3.0, help="target epsilon at the end of training")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=128, help="expected (Poisson) batch size")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train, test = load_digits_tensors(args.seed)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.5)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=args.epsilon,
        target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm,
    )
    print(f"DP-SGD on digits: {len(train)} train / {len(test)} test, sample rate {1 / len(loader):.4f}, "
          f"noise multiplier {optimizer.noise_multiplier:.3f}, clip {args.max_grad_norm}")
    for epoch in range(1, args.epochs + 1):
        # disable=None: a progress bar on a terminal only, never in a redirected log
        for images, labels in tqdm(loader, desc=f"epoch {epoch:2d}", leave=False, disable=None):
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
        print(f"epoch {epoch:2d}  test accuracy {accuracy(model, test):6.2%}  "
              f"epsilon {engine.get_epsilon(args.delta):.3f} (delta {args.delta:g})")


if __name__ == "__main__":
    main()
