"""Opacus's ``opacus.optimizers.ddpoptimizer``: the DP optimizer for replicas (DDP/DPDDP).

fastdp's sums every rank's clipped sums with one all-reduce of a flat buffer and draws the noise once,
on rank 0 (see ``fastdp.optimizers.distributed_dp_optimizer``); ``expected_batch_size`` is the global one.
"""

from .distributed_dp_optimizer import DistributedDPOptimizer

__all__ = ["DistributedDPOptimizer"]
