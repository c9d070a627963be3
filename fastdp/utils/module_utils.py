"""Module helpers (Opacus's ``opacus.utils.module_utils``)."""

from __future__ import annotations

import copy
import io
import pickle
from typing import Dict, Iterator, Tuple

import torch
from torch import nn


def clone_module(module: nn.Module) -> nn.Module:
    """A deep copy through ``torch.save``/``torch.load`` (works where ``copy.deepcopy`` does not), or
    ``copy.deepcopy`` for what cannot be pickled (a class defined in a function)."""
    try:
        with io.BytesIO() as buffer:
            torch.save(module, buffer)
            buffer.seek(0)
            return torch.load(buffer, weights_only=False)
    except (AttributeError, TypeError, pickle.PicklingError):
        return copy.deepcopy(module)


def parametrized_modules(module: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, submodule) for every submodule with parameters of its own (trainable or not)."""
    for name, sub in module.named_modules():
        if any(True for _ in sub.parameters(recurse=False)):
            yield name, sub


def requires_grad(module: nn.Module, *, recurse: bool = False) -> bool:
    """Whether any of the module's parameters (its own unless ``recurse``) is trainable."""
    return any(p.requires_grad for p in module.parameters(recurse=recurse))


def trainable_modules(module: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, submodule) for every submodule with trainable parameters of its own."""
    for name, sub in parametrized_modules(module):
        if requires_grad(sub):
            yield name, sub


def trainable_parameters(module: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """(name, parameter) for every trainable parameter."""
    for name, param in module.named_parameters():
        if param.requires_grad:
            yield name, param


def get_submodule(module: nn.Module, target: str) -> nn.Module:
    """The submodule at dotted path ``target`` ("" is ``module`` itself)."""
    return module if target == "" else module.get_submodule(target)


def are_state_dict_equal(first: Dict[str, torch.Tensor], second: Dict[str, torch.Tensor]) -> bool:
    """Same keys and equal values (tensors compared elementwise)."""
    if first.keys() != second.keys():
        return False
    for key, value in first.items():
        other = second[key]
        if isinstance(value, torch.Tensor) or isinstance(other, torch.Tensor):
            if not (isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor)):
                return False
            if value.shape != other.shape or not torch.equal(value.cpu(), other.cpu()):
                return False
        elif value != other:
            return False
    return True
