"""DP optimizers for several processes: the clipped sums of all ranks, noised once, in one collective.

Each rank's engine leaves the clipped per-sample-gradient sum over *its own* samples. The
step must release  (sum over all ranks + N(0, σ²C²)) / (q·N)  — one Gaussian draw for the
global sum, divided by the global expected batch size. Noise scheme: rank 0 adds the whole
N(0, σ²C²) to its buffer before the collective sum, the other ranks add none.

Why on one rank rather than N(0, σ²C²/W) on every rank: the variance is exact by construction
(never σ²C²·W, whatever the ranks' generators), it needs no independent streams across ranks
(equally seeded generators on every rank would make per-rank shares identical, not
independent), and with a seeded generator the step equals the single-process step. The cost is
one draw of d Gaussians on rank 0 — what a single process draws anyway.

- ``DistributedDPOptimizer`` (DDP/DPDDP): the gradient buffer (``GradBuffer``, where the engine
  left the clipped sums and the noise went in place) is all-reduced in place once per real step: one
  collective per segment of the buffer (about 32; see ``grad_buffer.py``).
- ``FSDPDPOptimizer`` (FSDP2): the full clipped sums are laid out rank by rank in a buffer allocated
  once and reduce-scattered once into a shard buffer allocated once; each rank keeps its shard (a
  view) as the sharded parameter's gradient.

Flat clipping cannot overlap this collective with the backward: every clip factor depends on
all layers' norms, known only when the backward ends. Virtual steps (BatchMemoryManager) do not
communicate; only the real step does, once per logical batch on every rank.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from ..engine.clipping import PerLayerClipping
from ..ops.noise import NOISE_CHUNK_NUMEL, add_noise_and_scale
from ..utils.secure_random import normal
from .dp_optimizer import AdaptiveClipping, DPOptimizer


class DistributedDPOptimizer(DPOptimizer):
    """``DPOptimizer`` for replicas (DDP/DPDDP): one all-reduce(SUM) of each noised buffer segment per step.

    ``expected_batch_size`` is the *global* one (``sample_rate`` × whole dataset). Every rank
    must call ``step()`` for every logical batch, an empty one included (its gradients are zeros).
    """

    def __init__(self, optimizer: Optimizer, *, process_group: Optional[dist.ProcessGroup] = None, **kwargs):
        super().__init__(optimizer, **kwargs)
        if isinstance(self.clipping_policy, AdaptiveClipping):
            raise ValueError(
                "clipping='adaptive' is not supported across processes yet (its noisy count would need the same "
                "one-rank noise and sum); use clipping='flat', 'per_layer' or 'automatic'"
            )
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)

    def _adds_noise(self) -> bool:
        return self.rank == 0

    def _sum_over_ranks(self, flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)


class FSDPDPOptimizer(DistributedDPOptimizer):
    """``DPOptimizer`` for a model sharded with FSDP2: one reduce-scatter of the full clipped sums.

    The optimizer's parameters are FSDP's sharded DTensors; the engine left each one's full
    rank-local clipped sum on FSDP's unsharded parameter (see ``fastdp.distributed.fsdp``).
    ``step()`` lays those out as ``[world size, S]`` (rank r's row holds r's dim-0 chunk of
    every parameter, padded as FSDP pads), adds the noise on rank 0, scales, reduce-scatters,
    and sets each sharded parameter's ``.grad`` to its chunk of the result.
    """

    auto_attach = False  # attach() needs FSDP's parameter layout: make_private calls it
    #: the engine leaves the clipped sums on FSDP's unsharded parameters, not in a buffer of the sharded ones
    uses_grad_buffer = False
    _layout_buffer: Optional[torch.Tensor] = None  # [world, S]: the full clipped sums, rank by rank (allocated once)
    _shard_buffer: Optional[torch.Tensor] = None  # [S]: this rank's part of the released sum (allocated once)

    def attach(self, module) -> None:
        from ..distributed.fsdp import ShardedPerLayerClipping, fsdp_params_by_id, sharded_layout

        by_id = fsdp_params_by_id(module)
        if isinstance(self.clipping_policy, PerLayerClipping):  # the engine sees the gathered parameters
            self.clipping_policy = ShardedPerLayerClipping(self.clipping_policy.bounds, list(by_id.values()))
        super().attach(module)
        self._fsdp_params: Dict[int, object] = {}
        for p in self.params:
            if id(p) not in by_id:
                raise ValueError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that FSDP does not shard; call "
                    "fully_shard on the root module too, so that every trainable parameter is sharded"
                )
            sharded_layout(p, self.world_size, self.rank)
            self._fsdp_params[id(p)] = by_id[id(p)]

    #: why virtual steps are refused (BatchMemoryManager checks this on every rank at construction)
    virtual_steps_unsupported = (
        "BatchMemoryManager cannot split batches under FSDP: ranks would run different numbers of forward "
        "passes, each with FSDP all-gathers; use a smaller sample rate or DDP"
    )

    def signal_skip_step(self, do_skip: bool = True) -> None:
        if do_skip:
            raise ValueError(self.virtual_steps_unsupported)
        super().signal_skip_step(do_skip)

    def _noise_and_scale(self, *, noise: bool, scale: bool) -> None:
        from ..distributed.fsdp import sharded_grad, sharded_layout, take_unsharded_grad

        params = self.params
        if not params:
            return
        factor = self._scale_factor() if scale else 1.0
        if not noise:  # scale_grad() alone: the sharded gradients were released already
            for p in params:
                if p.grad is not None and factor != 1.0:
                    p.grad.mul_(factor)
            return
        std = self.gradient_noise_multiplier * self.max_grad_norm if self._adds_noise() else 0.0
        world = self.world_size
        layouts = [sharded_layout(p, world, self.rank) for p in params]
        widths = [rows * row_numel for rows, row_numel in layouts]
        device = params[0].to_local().device
        if self._layout_buffer is None or self._layout_buffer.shape != (world, sum(widths)):
            self._layout_buffer = torch.zeros(world, sum(widths), dtype=torch.float32, device=device)
            self._shard_buffer = torch.empty(sum(widths), dtype=torch.float32, device=device)
        buffer = self._layout_buffer
        buffer.zero_()
        offset = 0
        for p, (rows, row_numel), width in zip(params, layouts, widths):
            full = take_unsharded_grad(self._fsdp_params[id(p)])
            if full is not None:  # rank r's rows of p go to row r of the buffer (the padding stays zero)
                full = full.detach().reshape(p.shape[0], -1)
                for r in range(world):
                    part = full[r * rows : (r + 1) * rows]
                    if part.shape[0]:
                        buffer[r, offset : offset + part.numel()].view_as(part).copy_(part)
                del full
            offset += width
        flat = buffer.view(-1)
        if self.secure_mode and std != 0:
            for chunk in flat.split(NOISE_CHUNK_NUMEL):
                chunk.add_(normal(chunk.numel(), self.generator, device=device), alpha=std)
            std = 0.0
        add_noise_and_scale(flat, std, factor, self.generator)
        shard = self._shard_buffer
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in 2.13
        reduce_scatter(shard, flat, op=dist.ReduceOp.SUM, group=self.process_group)
        offset = 0
        for p, (rows, _), width in zip(params, layouts, widths):
            local_rows = p.to_local().shape[0]
            local = shard[offset : offset + width].view(rows, *p.shape[1:])[:local_rows]
            p.grad = sharded_grad(p, local)
            offset += width

    def zero_grad(self, set_to_none: bool = True) -> None:
        from ..distributed.fsdp import take_unsharded_grad

        if not self._skipped_steps:  # a backward without a step must not leak into the next step
            for fsdp_param in self._fsdp_params.values():
                take_unsharded_grad(fsdp_param)
        super().zero_grad(set_to_none=set_to_none)


__all__: List[str] = ["DistributedDPOptimizer", "FSDPDPOptimizer"]
