"""DPDDP: Opacus's ``DifferentiallyPrivateDistributedDataParallel``, for fastdp's engine."""

from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def check_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed DP training needs torch.distributed.init_process_group(...) first (torchrun sets "
            "the environment for it)"
        )


class DifferentiallyPrivateDistributedDataParallel(nn.Module):
    """One replica of ``module`` per process, kept identical by the DP optimizer, not by a reducer.

    torch's DDP sums gradients from hooks on each parameter's gradient accumulation, which
    fastdp's engine bypasses (it forms the clipped sums itself, after the backward). So this
    wrapper only does what DDP does at construction: broadcast every parameter and buffer from
    rank 0, so that all replicas start equal. ``make_private`` unwraps it (as it does torch's
    DDP) and hands the sum over ranks to ``DistributedDPOptimizer``: each step every rank
    applies the same all-reduced noisy gradient, so the replicas stay equal.
    """

    def __init__(self, module: nn.Module, process_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        check_initialized()
        self.module = module
        self.__dict__["process_group"] = process_group  # not a submodule or state: a handle
        source = 0 if process_group is None else dist.get_global_rank(process_group, 0)
        with torch.no_grad():
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                dist.broadcast(tensor.data, src=source, group=process_group)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


DPDDP = DifferentiallyPrivateDistributedDataParallel
