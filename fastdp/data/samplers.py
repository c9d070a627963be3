"""Poisson sampling: the batch sampler whose privacy amplification the accountants assume."""

from __future__ import annotations

import numbers
from typing import Iterator, List, Optional

import torch
from torch.utils.data import Sampler

from ..accountants.validation import check_sample_rate
from ..utils.secure_random import uniform


class UniformWithReplacementSampler(Sampler[List[int]]):
    """Batches of indices in which every index appears independently with probability ``sample_rate``.

    Batches have random size (Binomial(num_samples, sample_rate)) and may be empty; steps are
    independent, so an "epoch" of ``steps`` batches may repeat some indices and miss others. That
    is exactly the sampled Gaussian mechanism the accountants analyse; shuffling or fixed-size
    batches would not be. Pass a seeded ``generator`` to reproduce the batches.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        generator: Optional[torch.Generator] = None,
        steps: Optional[int] = None,
    ):
        if not (isinstance(num_samples, numbers.Integral) and num_samples > 0):
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        check_sample_rate(sample_rate)
        if steps is None:
            steps = int(1 / sample_rate)
        elif not (isinstance(steps, numbers.Integral) and steps > 0):
            raise ValueError(f"steps must be a positive int or None (= int(1 / sample_rate)), got {steps!r}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.generator = generator
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.steps):
            included = uniform(self.num_samples, self.generator) < self.sample_rate
            yield included.nonzero().view(-1).tolist()
