"""Multi-process DP training on torch.distributed: DDP (replicas) and FSDP2 (shards).

One DP step across W processes, in order:

1. ``DPDataLoader(distributed=True)`` / ``DistributedUniformWithReplacementSampler``: each rank
   draws its share of one Poisson(q) sample of the *whole* dataset.
2. Each rank's engine clips its own samples (book-keeping needs only each layer's activations
   and output gradients, which are rank-local) and leaves their clipped sum.
3. ``DistributedDPOptimizer`` (DDP) all-reduces the flat buffer of sums once, or
   ``FSDPDPOptimizer`` (FSDP2) reduce-scatters the full sums once; N(0, σ²C²) goes in on
   rank 0 only, and the result is divided by the global expected batch size q·N.
4. Every rank's accountant records (σ, q): the ε is the single-process one.

``make_private`` does all of this when given a model wrapped in torch's DDP or in ``DPDDP``
(both are unwrapped: the engine bypasses DDP's reducer), or sharded with ``fully_shard``.
See docs/distributed.md.
"""

from ..data.distributed_sampler import DistributedUniformWithReplacementSampler
from .context import DistributedContext, check_same_on_all_ranks, distributed_context, prepare_module
from .ddp import DPDDP, DifferentiallyPrivateDistributedDataParallel

__all__ = [
    "DPDDP",
    "DifferentiallyPrivateDistributedDataParallel",
    "DistributedUniformWithReplacementSampler",
    "DistributedContext",
    "distributed_context",
    "check_same_on_all_ranks",
    "prepare_module",
]
