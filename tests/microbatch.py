"""The ground truth for every per-sample computation: one sample at a time through plain autograd."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn


def microbatch_grad_sample(
    module: nn.Module,
    sample_inputs: Sequence[tuple],
    sample_grad_outputs: Sequence[torch.Tensor],
    params: Dict[str, nn.Parameter] | None = None,
) -> Dict[str, torch.Tensor]:
    """Per-sample gradients ``[B, *p.shape]`` of ``<module(*inputs_i), grad_output_i>``.

    ``sample_inputs[i]`` is the positional input tuple of sample i alone (with its own
    batch dimension of 1 where the module needs one); ``params`` defaults to the
    module's trainable parameters (recursively).
    """
    if params is None:
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    names = list(params)
    per_sample: List[List[torch.Tensor]] = [[] for _ in names]
    for inputs, grad_output in zip(sample_inputs, sample_grad_outputs):
        out = module(*inputs)
        grads = torch.autograd.grad(
            out, [params[n] for n in names], grad_outputs=grad_output, allow_unused=True
        )
        for k, (name, grad) in enumerate(zip(names, grads)):
            per_sample[k].append(torch.zeros_like(params[name]) if grad is None else grad)
    return {n: torch.stack(gs) for n, gs in zip(names, per_sample)}


def split_batch(*tensors: torch.Tensor, batch_dim: int = 0) -> List[tuple]:
    """Per-sample input tuples from batch tensors (each keeps a batch dimension of 1)."""
    size = tensors[0].shape[batch_dim]
    return [tuple(t.narrow(batch_dim, i, 1) for t in tensors) for i in range(size)]
