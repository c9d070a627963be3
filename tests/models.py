"""Small models covering every layer rule, and the microbatch reference for whole models."""

from __future__ import annotations

import copy
from typing import Callable, Dict

import torch
from torch import nn
import torch.nn.functional as F


class SequenceClassifier(nn.Module):
    """Embedding → LayerNorm → Linear over tokens → mean-pool → RMSNorm → Linear."""

    def __init__(self, vocab=13, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.pool_norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.norm(self.embed(tokens))))
        return self.head(self.pool_norm(h.mean(1)))


class Scale(nn.Module):
    """A layer no rule knows: exercises the functorch fallback."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return x * self.gain + self.gain.pow(2).sum()


class TiedLM(nn.Module):
    """Input embedding tied to the output projection; one block applied twice."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        h = torch.tanh(self.block(torch.tanh(self.block(h))))
        return self.out(h).mean(1)


class BagClassifier(nn.Module):
    def __init__(self, vocab=17, dim=5, classes=3):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.bag(tokens))


def mlp():
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)), (lambda b: torch.randn(b, 10)), 3


def cnn():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.InstanceNorm2d(4, affine=True), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    return model, (lambda b: torch.randn(b, 2, 8, 8)), 3


def conv1d_net():
    model = nn.Sequential(nn.Conv1d(3, 5, 3, padding="same", dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 9, 3))
    return model, (lambda b: torch.randn(b, 3, 9)), 3


def sequence():
    return SequenceClassifier(), (lambda b: torch.randint(0, 13, (b, 7))), 3


def fallback():
    model = nn.Sequential(nn.Linear(4, 6), Scale(6), nn.Tanh(), nn.Linear(6, 3))
    return model, (lambda b: torch.randn(b, 4)), 3


def tied():
    return TiedLM(), (lambda b: torch.randint(0, 11, (b, 5))), 11


def bag():
    return BagClassifier(), (lambda b: torch.randint(0, 17, (b, 6))), 3


MODELS: Dict[str, Callable] = {
    "mlp": mlp, "cnn": cnn, "conv1d": conv1d_net, "sequence": sequence, "fallback": fallback, "tied": tied, "bag": bag,
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return MODELS[name]()


def microbatch_per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample gradients of cross_entropy(model(x_i), y_i), one sample at a time (a private copy)."""
    model = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)])
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(params)}


def clipped_sum(grads: Dict[str, torch.Tensor], max_grad_norm: float) -> Dict[str, torch.Tensor]:
    """The DP-SGD reference: clip each sample's full gradient to max_grad_norm, then sum."""
    norms = torch.sqrt(sum(g.flatten(1).double().square().sum(1) for g in grads.values()))
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factors.to(g.dtype), g) for n, g in grads.items()}
