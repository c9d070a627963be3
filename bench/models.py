"""The benchmark models, built from plain nn layers so every DP library can wrap them.

``build(name, quick=False)`` returns a ``ModelSpec``: the model, the batch size, a
function that makes one (input, target) batch and the loss. ``quick=True`` gives the
same architecture scaled down so the whole preset runs on a CPU in about a minute.

All models are classifiers or a language model trained with cross-entropy; the loss is
``PerSampleCrossEntropy`` for every method so that Opacus's ghost criterion (which sets
``reduction="none"`` and needs one loss per sample) and the mean over samples agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class PerSampleCrossEntropy(nn.Module):
    """Cross-entropy with one loss per sample (sequence outputs: the mean over its tokens).

    ``reduction`` is "mean", "sum" or "none" like nn.CrossEntropyLoss, so it can be handed
    to Opacus's ghost clipping. Extra keyword arguments (Opacus passes some) are ignored.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        batch = target.shape[0]
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
        per_sample = per_token.view(batch, -1).mean(1)
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


# -- MLP ----------------------------------------------------------------------------------------
def mlp(widths) -> nn.Module:
    layers = []
    for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# -- ResNet18 with GroupNorm ----------------------------------------------------------------------
def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or fewer where the channel count is smaller."""
    return nn.GroupNorm(min(32, channels), channels)


class BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.norm2 = group_norm(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False), group_norm(channels_out)
            )

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18GN(nn.Module):
    """The BasicBlock ResNet18 for 32×32 inputs (3×3 stem, no max-pool), GroupNorm for BatchNorm."""

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), group_norm(width), nn.ReLU())
        stages, channels = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**stage
            stages += [BasicBlock(channels, out, stride), BasicBlock(out, out, 1)]
            channels = out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        out = self.stages(self.stem(x))
        return self.fc(out.mean((2, 3)))


# -- recurrent classifiers ----------------------------------------------------------------------
class RecurrentClassifier(nn.Module):
    """Embedding → one-layer ``cell`` (nn.LSTM or nn.GRU) → Linear on the last time step's output."""

    def __init__(self, cell: type, vocab: int, embedding_dim: int, hidden: int, num_classes: int = 10):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding_dim)
        self.rnn = cell(embedding_dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)
        self.hidden, self.lstm = hidden, cell is nn.LSTM  # the layer may be swapped for a DP twin later

    def forward(self, tokens):
        embedded = self.embedding(tokens)
        # torch's default zero initial state, but made from the input: under torch.func.vmap (the
        # torchfunc method) nn.GRU's own default state does not broadcast against the batched input
        h0 = embedded.new_zeros(1, embedded.shape[0], self.hidden)
        out, _ = self.rnn(embedded, (h0, torch.zeros_like(h0)) if self.lstm else h0)
        return self.fc(out[:, -1])


# -- GPT-2-shaped language model ------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT2LM(nn.Module):
    """GPT-2-small-shaped causal LM; the output head is tied to the token embedding as in GPT-2."""

    def __init__(self, vocab: int, context: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.position_embedding = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.token_embedding.weight

    def forward(self, tokens):
        batch, length = tokens.shape
        # positions get the batch dimension too: per-sample engines need it on every layer input
        positions = torch.arange(length, device=tokens.device).expand(batch, length)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.lm_head(self.norm(self.blocks(x)))


# -- EmbeddingBag text classifier -----------------------------------------------------------------
class EmbeddingBagClassifier(nn.Module):
    """EmbeddingBag(mean) over each sample's tokens → Linear.

    Takes ``tokens [B, L]`` and calls the bag in the flat (input, offsets) form, the
    form Opacus's EmbeddingBag grad sampler accepts.
    """

    def __init__(self, vocab: int, dim: int = 64, num_classes: int = 4):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens):
        batch, length = tokens.shape
        offsets = torch.arange(0, batch * length, length, device=tokens.device)
        return self.fc(self.bag(tokens.reshape(-1), offsets))


# -- specs ----------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    name: str
    description: str
    model: nn.Module
    batch_size: int
    make_batch: Callable[[int, torch.device, torch.Generator], Tuple[torch.Tensor, torch.Tensor]]
    #: microbatching times only this many samples and extrapolates (None: the whole batch)
    microbatch_samples: Optional[int] = None
    #: why a method is not run for this model (method -> reason), e.g. too slow for --quick
    skip: Optional[dict] = None

    def criterion(self) -> PerSampleCrossEntropy:
        return PerSampleCrossEntropy()


def _images(shape, classes):
    def make(batch, device, generator):
        x = torch.randn((batch, *shape), generator=generator).to(device)
        return x, torch.randint(0, classes, (batch,), generator=generator).to(device)

    return make


def _tokens(vocab, length, classes=None):
    """Random token batches; the target is a class label, or (classes=None) the next tokens."""

    def make(batch, device, generator):
        tokens = torch.randint(0, vocab, (batch, length + (classes is None)), generator=generator)
        if classes is None:
            return tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        return tokens.to(device), torch.randint(0, classes, (batch,), generator=generator).to(device)

    return make


def _mlp(quick):
    widths = (64, 32, 32, 10) if quick else (3072, 1024, 1024, 10)
    batch = 32 if quick else 512
    return ModelSpec("mlp", f"MLP {'-'.join(map(str, widths))}, B={batch}", mlp(widths), batch, _images((widths[0],), 10))


def _resnet18(quick):
    width, size, batch = (8, 16, 8) if quick else (64, 32, 256)
    return ModelSpec(
        "resnet18", f"ResNet18-GroupNorm width {width}, {size}×{size}, B={batch}", ResNet18GN(width), batch,
        _images((3, size, size), 10), microbatch_samples=None if quick else 32,
    )


def _recurrent(name: str, cell: type, quick: bool):
    vocab, embedding_dim, hidden, length, batch = (1000, 16, 32, 16, 8) if quick else (10000, 128, 256, 128, 256)
    return ModelSpec(
        name, f"{name.upper()} classifier emb {embedding_dim}, hidden {hidden}, T={length}, B={batch}",
        RecurrentClassifier(cell, vocab, embedding_dim, hidden), batch, _tokens(vocab, length, classes=10),
        microbatch_samples=None if quick else 32,
    )


def _lstm(quick):
    return _recurrent("lstm", nn.LSTM, quick)


def _gru(quick):
    return _recurrent("gru", nn.GRU, quick)


def _gpt2(quick):
    vocab, context, dim, layers, heads, batch = (1000, 32, 64, 2, 4, 4) if quick else (50257, 256, 768, 12, 12, 16)
    return ModelSpec(
        "gpt2", f"GPT-2-shaped LM {layers} layers, d={dim}, {heads} heads, vocab {vocab}, T={context}, B={batch}",
        GPT2LM(vocab, context, dim, layers, heads), batch, _tokens(vocab, context), microbatch_samples=None if quick else 4,
    )


def _embedding_bag(quick):
    vocab, length, batch = (1000, 16, 32) if quick else (50000, 50, 256)
    return ModelSpec(
        "embbag", f"EmbeddingBag(mean) classifier vocab {vocab}, {length} tokens/bag, B={batch}",
        EmbeddingBagClassifier(vocab), batch, _tokens(vocab, length, classes=4),
    )


MODELS = {"mlp": _mlp, "resnet18": _resnet18, "lstm": _lstm, "gru": _gru, "gpt2": _gpt2, "embbag": _embedding_bag}


def build(name: str, quick: bool = False) -> ModelSpec:
    """The model ``name`` (one of MODELS), full size or the --quick size; seeded, so every method gets the same weights."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(0)
    return MODELS[name](quick)
