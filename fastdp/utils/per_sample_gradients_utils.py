"""Checking a model's per-sample gradients against microbatching (Opacus's ``opacus.utils.per_sample_gradients_utils``).

``check_per_sample_gradients_are_correct(x, model)`` runs the model one sample at a time through plain
autograd (the slow, obviously right reference) and through fastdp's engine (``grad_sample_mode``
"hooks", "functorch" or "ew"), and compares the per-sample gradients. The loss is an L1 loss against
zeros of the output, with a "mean" or "sum" reduction.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Union

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..grad_sample.utils import wrap_model
from .module_utils import clone_module, trainable_parameters
from .packed_sequences import unpack_packedsequences

__all__ = [
    "clone_module",
    "is_batch_empty",
    "ModelWithLoss",
    "compute_microbatch_grad_sample",
    "compute_opacus_grad_sample",
    "compute_grad_samples_microbatch_and_opacus",
    "check_per_sample_gradients_are_correct",
    "get_grad_sample_modes",
]


def is_batch_empty(batch) -> bool:
    first = batch if isinstance(batch, torch.Tensor) else batch[0]
    return first.numel() == 0


def _packed_l1_loss(criterion: nn.L1Loss, output: PackedSequence) -> torch.Tensor:
    """L1 against zeros of a PackedSequence output; "mean" averages each sequence, then the sequences
    (so a sample's weight does not depend on the other samples' lengths)."""
    if criterion.reduction == "sum":
        return criterion(output.data, torch.zeros_like(output.data))
    sequences = unpack_packedsequences(output)
    return sum(criterion(s, torch.zeros_like(s)) for s in sequences) / len(sequences)


class ModelWithLoss(nn.Module):
    """``module`` followed by an L1 loss against zeros of its output (a loss for any module)."""

    def __init__(self, module: nn.Module, loss_reduction: str = "mean"):
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.wrapped_module = module
        self.criterion = nn.L1Loss(reduction=loss_reduction)

    def forward(self, x):
        out = self.wrapped_module(*x) if type(x) is tuple else self.wrapped_module(x)  # not a PackedSequence
        if isinstance(out, PackedSequence):
            return _packed_l1_loss(self.criterion, out)
        return self.criterion(out, torch.zeros_like(out))


class _Deterministic:
    """Deterministic algorithms and seeds 0 for the block (both computations see the same randomness)."""

    def __enter__(self):
        self.previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(0)
        np.random.seed(0)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.previous)
        return False


def compute_microbatch_grad_sample(x: Union[torch.Tensor, List[torch.Tensor]], module: nn.Module,
                                   batch_first: bool = True, loss_reduction: str = "mean",
                                   chunk_method: Callable = iter) -> Dict[str, torch.Tensor]:
    """``{name: [B, *p.shape]}``: each sample's gradient from its own forward and backward (batch of 1).
    With a mean loss a batch of one is its own mean, so these are the gradients of each sample's loss;
    a list ``x`` holds one tensor (or tuple of inputs) per sample."""
    with _Deterministic():
        model = ModelWithLoss(clone_module(module), loss_reduction)
        params = dict(trainable_parameters(model.wrapped_module))
        rows = []
        if not batch_first and isinstance(x, torch.Tensor):
            x = x.transpose(0, 1)
        for sample in chunk_method(x):
            model.zero_grad()
            if type(sample) is not tuple:
                sample = sample.unsqueeze(0 if batch_first else 1)
            model(sample).backward()
            rows.append({n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                         for n, p in params.items()})
    return {n: torch.stack([row[n] for row in rows]) for n in params}


def compute_opacus_grad_sample(x: Union[torch.Tensor, PackedSequence], module: nn.Module, batch_first: bool = True,
                               loss_reduction: str = "mean", grad_sample_mode: str = "hooks") -> Dict[str, torch.Tensor]:
    """``{name: p.grad_sample}`` after one backward of the whole batch through fastdp's engine."""
    with _Deterministic():
        wrapped = wrap_model(clone_module(module), grad_sample_mode, batch_first=batch_first,
                             loss_reduction=loss_reduction)
        model = ModelWithLoss(wrapped, loss_reduction)
        model.zero_grad()
        model(x).backward()
        return {n: p.grad_sample for n, p in trainable_parameters(wrapped._module)}


def compute_grad_samples_microbatch_and_opacus(x, module: nn.Module, batch_first: bool = True,
                                               loss_reduction: str = "mean", grad_sample_mode: str = "hooks",
                                               chunk_method: Callable = iter):
    """(microbatching's per-sample gradients, the engine's), both ``{name: [B, ...]}``."""
    if isinstance(x, PackedSequence):
        reference_input = unpack_packedsequences(x)
    elif is_batch_empty(x):
        raise RuntimeError("x is expected to be non-empty")
    else:
        reference_input = x
    reference = compute_microbatch_grad_sample(reference_input, module, batch_first=batch_first,
                                               loss_reduction=loss_reduction, chunk_method=chunk_method)
    engine = compute_opacus_grad_sample(x, module, batch_first=batch_first, loss_reduction=loss_reduction,
                                        grad_sample_mode=grad_sample_mode)
    if reference.keys() != engine.keys():
        raise ValueError(f"parameter names differ: microbatching {sorted(reference)}, engine {sorted(engine)}")
    return reference, engine


def get_grad_sample_modes(use_ew: bool = False) -> List[str]:
    return ["hooks", "functorch"] + (["ew"] if use_ew else [])


def check_torch_version_for_ew_sample() -> bool:
    return True


def check_per_sample_gradients_are_correct(x, module: nn.Module, *, batch_first: bool = True, atol: float = 10e-6,
                                           rtol: float = 10e-5, grad_sample_mode: str = "hooks") -> bool:
    """True when the engine's per-sample gradients match microbatching for both loss reductions."""
    if grad_sample_mode == "ew" and not batch_first:
        raise RuntimeError("grad_sample_mode='ew' needs batch_first=True")
    for reduction in ("sum", "mean"):
        reference, engine = compute_grad_samples_microbatch_and_opacus(
            x, module, batch_first=batch_first, loss_reduction=reduction, grad_sample_mode=grad_sample_mode
        )
        for name, got in engine.items():
            want = reference[name]
            if got is None or got.shape != want.shape or not torch.allclose(want, got, atol=atol, rtol=rtol):
                return False
    return True
