"""Pointwise parts of one LSTM / GRU time step, after the two gate GEMMs.

A DP recurrent layer computes the input projection of all time steps in one GEMM
(``gx``, [B, G·H] per step) and the hidden projection step by step (``gh``); what
remains per step is elementwise, and these ops do it. The torch references below are
differentiable compositions of torch ops; the CUDA extension (``fastdp.csrc``)
registers fused forward/backward kernels for them. Both take ``gx`` and ``gh``
separately (a GRU needs them apart, and adding them in the kernel saves a pass).
Gate order is torch's: LSTM (i, f, g, o), GRU (r, z, n).
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch

from . import available_impls, op, requested_backend, select_impl


@op("lstm_cell_pointwise")
def lstm_cell_pointwise(gx: torch.Tensor, gh: torch.Tensor, c_prev: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(h, c) of one LSTM step from the gate pre-activations ``gx + gh`` [B, 4H] and ``c_prev`` [B, H]."""
    i, f, g, o = (gx + gh).chunk(4, 1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


@op("gru_cell_pointwise")
def gru_cell_pointwise(gx: torch.Tensor, gh: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
    """h of one GRU step from ``gx = x W_ihᵀ + b_ih``, ``gh = h_prev W_hhᵀ + b_hh`` [B, 3H] and ``h_prev``."""
    x_r, x_z, x_n = gx.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return n + z * (h_prev - n)


def cell_impl(name: str, tensor: torch.Tensor) -> Callable:
    """The function that a recurrence over ``tensor`` calls for cell op ``name``, chosen once per
    sequence (not per step). As ``fastdp.ops`` dispatches, except that a backend forced by
    FASTDP_BACKEND that has no cell kernel (triton) runs the torch reference rather than failing:
    the forced backend is about the per-sample norm and clipping ops, which still use it. An
    implementation with a ``resolve(tensor)`` attribute (the CUDA extension's, which loads on first
    use) says there what really runs: its kernel, or the torch reference when it cannot load."""
    forced = requested_backend()
    if forced is not None:
        impls = available_impls(name)
        impl = impls.get(forced, impls["torch"])
    else:
        impl = select_impl(name, tensor)
    resolve = getattr(impl, "resolve", None)
    return impl if resolve is None else resolve(tensor)


def is_torch_reference(name: str, impl: Callable) -> bool:
    dispatch = {"lstm_cell_pointwise": lstm_cell_pointwise, "gru_cell_pointwise": gru_cell_pointwise}[name]
    return impl is dispatch.torch_reference
