"""Opacus's ``opacus.grad_sample.functorch`` helper for per-sample gradients by ``torch.func``."""

from __future__ import annotations

import copy
from typing import Callable, Tuple

import torch
from torch import nn


def make_functional(mod: nn.Module, disable_autograd_tracking: bool = False) -> Tuple[Callable, tuple]:
    """``(fmodel, params)``: ``fmodel(params, *args)`` runs ``mod``'s forward with the given parameter values
    (``torch.func.functional_call`` on a parameterless copy), as the removed ``functorch.make_functional``.
    ``disable_autograd_tracking``: the returned parameter values are detached."""
    names = [name for name, _ in mod.named_parameters()]
    values = tuple(p for _, p in mod.named_parameters())
    stateless = copy.deepcopy(mod).to("meta")
    if hasattr(stateless, "allow_grad_accumulation"):
        stateless.allow_grad_accumulation()

    def fmodel(new_values, *args, **kwargs):
        return torch.func.functional_call(stateless, dict(zip(names, new_values)), args, kwargs)

    if disable_autograd_tracking:
        values = tuple(v.detach() for v in values)
    return fmodel, values


__all__ = ["make_functional"]
