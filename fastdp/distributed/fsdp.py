"""What fastdp needs to know about a model sharded with FSDP2 (``fully_shard``).

After ``fully_shard`` each parameter is a DTensor sharded along dim 0 over the mesh. In the
forward FSDP all-gathers a layer's full ("unsharded") parameters and registers them on the
layer, so the engine records those and, after the backward, leaves each layer's clipped
per-sample-gradient sum over this rank's samples in the *unsharded* parameter's ``.grad``
(full shape, rank-local). FSDP's own reduce-scatter would only see such a gradient in the next
backward (it runs before the engine's end-of-backward step), so it is switched off
(``set_requires_gradient_sync(False)``) and ``FSDPDPOptimizer`` does the one reduce-scatter
itself: full clipped sums in, each rank's shard of the global noisy sum out, stored as the
sharded parameter's DTensor gradient. Parameters, gradients and optimizer state stay sharded.

The links between sharded and unsharded parameters live in FSDP's private ``FSDPParam``
objects (torch ≥ 2.4); a torch without them gets a clear error, not a silent wrong step.
"""

from __future__ import annotations

import sys
from typing import Dict, List, Optional

import torch
from torch import nn

from ..engine.clipping import PerLayerClipping


def _fsdp_module_class():
    """FSDP2's module class, or None. Importing torch.distributed.fsdp costs seconds, and a model can only
    be sharded after its user imported it: until then no module is an FSDPModule, and nothing is imported."""
    if "torch.distributed.fsdp" not in sys.modules and "torch.distributed._composable.fsdp" not in sys.modules:
        return None
    try:  # torch >= 2.6
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def _dtensor():
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch < 2.5
        from torch.distributed._tensor import DTensor, Shard
    return DTensor, Shard


def is_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` (or a submodule) was sharded with FSDP2's ``fully_shard``."""
    return bool(fsdp_modules(module))


def fsdp_modules(module: nn.Module) -> List[nn.Module]:
    fsdp_module = _fsdp_module_class()
    return [] if fsdp_module is None else [m for m in module.modules() if isinstance(m, fsdp_module)]


def _param_groups(fsdp_module: nn.Module) -> list:
    state = fsdp_module._get_fsdp_state()
    if hasattr(state, "_fsdp_param_groups"):
        return list(state._fsdp_param_groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


def fsdp_params_by_id(module: nn.Module) -> Dict[int, object]:
    """``id(sharded parameter)`` → its FSDPParam, for every parameter FSDP manages in ``module``."""
    found = {}
    try:
        for fsdp_module in fsdp_modules(module):
            for group in _param_groups(fsdp_module):
                for fsdp_param in group.fsdp_params:
                    found[id(fsdp_param.sharded_param)] = fsdp_param
    except AttributeError as error:  # FSDP internals moved in this torch version
        raise ValueError(
            f"fastdp cannot read FSDP2's parameter groups in torch {torch.__version__} ({error}); "
            "use DDP (DPDDP) with this torch, or a torch version fastdp's FSDP support is tested with (2.13)"
        ) from error
    return found


def sharded_layout(param: torch.Tensor, world_size: int, rank: int):
    """(rows per rank, elements per row) of FSDP's dim-0 sharding, checked against this rank's shard."""
    DTensor, Shard = _dtensor()
    if not isinstance(param, DTensor) or tuple(param.placements) != (Shard(0),):
        placements = getattr(param, "placements", None)
        raise ValueError(
            f"fastdp supports FSDP2 parameters sharded along dim 0 on a 1-D mesh, got placements {placements}; "
            "use fully_shard without shard_placement_fn and without HSDP"
        )
    if param.dim() == 0:
        raise ValueError("fastdp cannot reduce-scatter a 0-dim FSDP parameter; give it shape [1]")
    rows = -(-param.shape[0] // world_size)  # FSDP pads dim 0 to a multiple of the world size
    local_rows = param.to_local().shape[0]
    if local_rows != max(0, min(rows, param.shape[0] - rank * rows)):
        raise ValueError(
            f"unexpected FSDP shard: rank {rank} holds {local_rows} of {param.shape[0]} rows (chunks of {rows}); "
            "fastdp expects fully_shard's default even chunks along dim 0"
        )
    return rows, param.numel() // param.shape[0] if param.shape[0] else 0


def take_unsharded_grad(fsdp_param) -> Optional[torch.Tensor]:
    """The full-shape gradient the engine left on ``fsdp_param``'s unsharded parameter; clears it.

    FSDP may have moved an earlier backward's gradient to ``unsharded_accumulated_grad`` (mixed
    precision with a reduce dtype): both are added.
    """
    unsharded = getattr(fsdp_param, "_unsharded_param", None)  # absent until the first forward
    total = getattr(fsdp_param, "unsharded_accumulated_grad", None)
    if total is not None:
        fsdp_param.unsharded_accumulated_grad = None
    if unsharded is not None and unsharded.grad is not None:
        grad = unsharded.grad
        unsharded.grad = None
        total = grad if total is None else total + grad.to(total.dtype)
    return total


def sharded_grad(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's rows) as a gradient for the sharded DTensor ``param``."""
    DTensor, _ = _dtensor()
    return DTensor.from_local(
        local.to(param.dtype), param.device_mesh, param.placements, run_check=False,
        shape=param.shape, stride=param.stride(),
    )


class ShardedPerLayerClipping(PerLayerClipping):
    """Per-layer bounds given per *sharded* parameter (the optimizer's), applied to the norms the
    engine reports per *unsharded* parameter (the one FSDP registered during the forward)."""

    def __init__(self, bounds: Dict[int, float], fsdp_params: List[object]):
        super().__init__(bounds)
        self.fsdp_params = fsdp_params

    def factors_by_param(self, norm_sq_by_param, norms):
        to_sharded = {
            id(fp._unsharded_param): id(fp.sharded_param) for fp in self.fsdp_params if hasattr(fp, "_unsharded_param")
        }
        to_unsharded = {sharded: unsharded for unsharded, sharded in to_sharded.items()}
        by_sharded = {to_sharded.get(key, key): value for key, value in norm_sq_by_param.items()}
        factors = super().factors_by_param(by_sharded, norms)
        return {to_unsharded.get(key, key): value for key, value in factors.items()}
