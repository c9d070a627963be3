"""How ``make_private`` recognises a distributed model, and the checks that keep ranks in step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .ddp import DifferentiallyPrivateDistributedDataParallel, check_initialized
from .fsdp import fsdp_modules, is_fsdp

DDP_WRAPPERS = (DistributedDataParallel, DifferentiallyPrivateDistributedDataParallel)


@dataclass
class DistributedContext:
    """A model trained by several processes: what fastdp wraps, and over whom it sums."""

    kind: str  # "ddp" (replicas: one all-reduce per step) or "fsdp" (shards: one reduce-scatter)
    module: nn.Module  # what GradSampleModule wraps: DDP's inner module, or the FSDP model itself
    process_group: Optional[dist.ProcessGroup]  # None: the default group
    world_size: int
    rank: int


def distributed_context(module: nn.Module) -> Optional[DistributedContext]:
    """The context for a model wrapped in DDP/DPDDP or sharded with ``fully_shard``; None otherwise.

    Refuses what fastdp cannot make private: DataParallel, DDP below the top or around a
    GradSampleModule, and a process group that is not the whole world (the distributed
    Poisson sampler splits the dataset over all processes).
    """
    from ..engine.grad_sample_module import GradSampleModule

    inner = module._module if isinstance(module, GradSampleModule) else module
    for name, sub in inner.named_modules():
        if isinstance(sub, nn.DataParallel):
            raise ValueError(
                f"{name or 'module'} is wrapped in nn.DataParallel, which replicates layers inside one process on "
                "every forward; use one process per device with DDP or fastdp.distributed.DPDDP instead"
            )
        if name and isinstance(sub, DDP_WRAPPERS):
            raise ValueError(f"{name} is wrapped in DDP inside the model; wrap the whole model once, at the top")
    if isinstance(inner, DDP_WRAPPERS):
        if inner is not module:
            raise ValueError("module is a GradSampleModule around DDP; pass the DDP-wrapped model to make_private")
        check_initialized()
        group = getattr(inner, "process_group", None)
        return _context("ddp", inner.module, None if group is dist.group.WORLD else group)
    if is_fsdp(inner):
        check_initialized()
        meshes = [getattr(p, "device_mesh", None) for p in inner.parameters()]
        if not meshes or any(mesh is None or mesh != meshes[0] for mesh in meshes) or meshes[0].ndim != 1:
            raise ValueError(
                "fastdp supports FSDP2 over one 1-D device mesh (every parameter sharded by fully_shard, no HSDP); "
                "call fully_shard on the root module too"
            )
        return _context("fsdp", module, meshes[0].get_group())
    return None


def _context(kind: str, module: nn.Module, group) -> DistributedContext:
    world_size = dist.get_world_size(group)
    if world_size != dist.get_world_size():
        raise ValueError(
            f"the {kind.upper()} process group has {world_size} of the {dist.get_world_size()} processes; fastdp's "
            "distributed sampler splits the dataset over all processes, so train over the default (world) group"
        )
    return DistributedContext(kind, module, group, world_size, dist.get_rank(group))


def prepare_module(context: DistributedContext, grad_sample_module: nn.Module) -> None:
    """FSDP: switch off FSDP's own gradient reduce-scatter, and refuse layers the engine would
    re-run after FSDP has freed their full parameters (the torch.func fallback)."""
    if context.kind != "fsdp":
        return
    from ..engine.rules.functorch import FunctorchRule

    for name, sub in grad_sample_module.named_modules():
        route = sub.__dict__.get("_fastdp_route")
        if route is not None and isinstance(route.rule, FunctorchRule):
            raise ValueError(
                f"{name} ({type(sub).__name__}) has no fastdp layer rule; under FSDP2 the torch.func fallback would "
                "run it after FSDP freed its gathered parameters. Register a rule (fastdp.register_rule) or use DDP"
            )
    for fsdp_module in fsdp_modules(grad_sample_module):
        fsdp_module.set_requires_gradient_sync(False, recurse=False)


def check_same_on_all_ranks(context: DistributedContext, **values: Any) -> None:
    """Every rank must make private the same way: one ``all_gather_object`` of ``values``.

    A rank with another noise multiplier, clipping bound, dataset or model would break the
    guarantee silently (the noise is drawn on rank 0 alone, every rank's accountant records its
    own σ and q); all ranks see the same gathered values, so all raise together.
    """
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, values, group=context.process_group)
    for key in values:
        seen = [ranks_values[key] for ranks_values in gathered]
        if any(value != seen[0] for value in seen):
            raise ValueError(
                f"{key} differs across ranks ({', '.join(f'rank {r}: {v!r}' for r, v in enumerate(seen))}); "
                "call make_private with the same arguments, dataset and model on every rank"
            )
