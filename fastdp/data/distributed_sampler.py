"""Poisson sampling across processes: each rank's share of one Poisson sample of the whole dataset."""

from __future__ import annotations

import numbers
from typing import Iterator, List, Optional

import torch
from torch.utils.data import Sampler

from ..accountants.validation import check_sample_rate
from ..utils.secure_random import SecureRandom, uniform


def _check_index(value, name: str, *, minimum: int):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def agreed_seed(generator: Optional[torch.Generator] = None) -> int:
    """A seed drawn on rank 0 (from ``generator``, else torch's global generator) and sent to every rank.

    One ``broadcast_object_list`` on the default process group: every rank must call it, in the
    same order as its other collectives. Without torch.distributed, the local draw.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        message = [seed]
        dist.broadcast_object_list(message, src=0)
        seed = int(message[0])
    return seed


class DistributedUniformWithReplacementSampler(Sampler[List[int]]):
    """This rank's indices of one Poisson sample (rate ``sample_rate``) of the whole dataset, per step.

    Index ``i`` of the dataset belongs to rank ``i % num_replicas``. Each step every index is
    included independently with probability ``sample_rate`` and rank ``r`` yields the included
    indices it owns, so the union over ranks is exactly the Poisson sample the accountant assumes
    for the whole dataset (a rank's batch may be empty; the global expected batch size is
    ``sample_rate * total_size``).

    Independence across ranks is what makes the union a Poisson sample, and it must not depend
    on how the ranks seeded their generators: per-rank draws from equally seeded generators would
    include index ``i`` on rank 0 exactly when they include index ``i + 1`` on rank 1. So:

    - with a torch generator, every rank draws the *same* ``total_size`` uniforms from a generator
      private to this sampler, seeded alike on all ranks (``seed``; by default one broadcast of
      a seed drawn on rank 0 from ``generator`` at construction), and keeps its own indices. The
      union then equals ``UniformWithReplacementSampler`` driven by ``torch.Generator().manual_seed(seed)``,
      whatever the world size;
    - with a ``SecureRandom`` (secure mode), each rank draws its own indices' uniforms from the OS
      CSPRNG, which is independent across processes by construction.

    ``num_replicas`` and ``rank`` default to the default process group's.
    """

    def __init__(
        self,
        *,
        total_size: int,
        sample_rate: float,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        generator=None,
        steps: Optional[int] = None,
        seed: Optional[int] = None,
    ):
        total_size = _check_index(total_size, "total_size", minimum=1)
        check_sample_rate(sample_rate)
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            try:
                num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
                rank = dist.get_rank() if rank is None else rank
            except (ValueError, RuntimeError):  # no default process group
                raise ValueError(
                    "DistributedUniformWithReplacementSampler needs torch.distributed.init_process_group(...) "
                    "first, or explicit num_replicas= and rank="
                ) from None
        num_replicas = _check_index(num_replicas, "num_replicas", minimum=1)
        rank = _check_index(rank, "rank", minimum=0)
        if rank >= num_replicas:
            raise ValueError(f"rank must be < num_replicas ({num_replicas}), got {rank}")
        if steps is None:
            steps = int(1 / sample_rate)
        steps = _check_index(steps, "steps", minimum=1)
        self.total_size = total_size
        self.sample_rate = sample_rate
        self.num_replicas = num_replicas
        self.rank = rank
        self.steps = steps
        self.num_samples = len(range(rank, total_size, num_replicas))  # this rank's share of the dataset
        self.secure = isinstance(generator, SecureRandom)
        if self.secure:
            if seed is not None:
                raise ValueError("seed= cannot be used with a SecureRandom generator (secure mode is unseedable)")
            self.generator, self.seed = generator, None
        else:
            self.seed = agreed_seed(generator) if seed is None else _check_index(seed, "seed", minimum=0)
            self.generator = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.steps):
            if self.secure:
                own = (uniform(self.num_samples, self.generator) < self.sample_rate).nonzero().view(-1)
            else:
                draws = torch.rand(self.total_size, generator=self.generator)
                own = (draws[self.rank :: self.num_replicas] < self.sample_rate).nonzero().view(-1)
            yield (own * self.num_replicas + self.rank).tolist()
