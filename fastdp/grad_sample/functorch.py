"""Opacus's ``opacus.grad_sample.functorch`` helper for per-sample gradients by ``torch.func``."""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, Tuple

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


def prepare_layer(layer: nn.Module, batch_first: bool = True) -> None:
    """Attach ``layer.ft_compute_sample_grad(params, activations, backprops)``: the per-sample gradients of
    ``<layer(x_i), g_i>`` by ``torch.func`` (``grad`` of one sample, ``vmap`` over the first dimension of
    ``activations`` and ``backprops``, which come batch-first; ``batch_first=False``: the layer itself takes
    the batch in its second dimension). Opacus's helper, for code that calls it directly; fastdp's own
    "functorch" mode does not need it."""
    if any(True for _ in layer.buffers()):
        raise NotImplementedError(
            f"{type(layer).__name__} has buffers, which torch.func per-sample gradients do not carry; register a "
            "fastdp rule for it (fastdp.register_grad_sampler)"
        )
    if type(layer) is nn.EmbeddingBag:
        raise NotImplementedError("nn.EmbeddingBag has no torch.func per-sample gradient here; fastdp's rule handles it")
    flayer, _ = make_functional(layer)
    sample_dim = 0 if batch_first else 1

    def sample_loss(params, activation, backprop):
        mixed = activation.is_floating_point() and activation.dtype != params[0].dtype
        autocast = torch.amp.autocast(activation.device.type, dtype=activation.dtype) if mixed else contextlib.nullcontext()
        with autocast:
            output = flayer(params, activation.unsqueeze(sample_dim))
            return (output * backprop.unsqueeze(sample_dim)).sum()

    layer.ft_compute_sample_grad = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))


def ft_compute_per_sample_gradient(layer: nn.Module, activations, backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """``{p: [B, *p.shape]}`` for every parameter of ``layer``, from its recorded inputs ``activations`` (a
    sequence whose first item is the input, batch-first) and output gradient ``backprops`` (batch-first), via
    ``prepare_layer`` (called on first use), as Opacus's helper."""
    parameters = list(layer.parameters())
    if not hasattr(layer, "ft_compute_sample_grad"):
        prepare_layer(layer)
    activation = activations[0]
    if activation.is_floating_point() and activation.dtype != backprops.dtype:
        activation = activation.to(backprops.dtype)
    grads = layer.ft_compute_sample_grad(parameters, activation, backprops)
    return dict(zip(parameters, grads))


__all__ = ["ft_compute_per_sample_gradient", "make_functional", "prepare_layer"]
