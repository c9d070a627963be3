"""One audited DP training run: canaries in, DP-SGD through the public API, ε_lower out.

``run_audit`` trains a copy of the model with ``GradSampleModule`` + ``DPOptimizer`` (plain SGD)
+ ``DPDataLoader`` — the pieces ``PrivacyEngine.make_private`` wires, assembled here so the
sample rate is exactly the one accounted for (make_private derives it as 1 / len(loader)) and the
expected batch size is fixed by public quantities (len(real data) + m/2, not by which canaries
were drawn). It then scores the canaries, turns the guesses into ε_lower with the bound of
Steinke, Nasr and Jagielski (``bound.py``) and sets it beside ε_upper from the accountants for
the *claimed* (σ, q, steps). A correct engine gives ε_lower <= ε_upper with probability at least
``confidence``; ε_lower > ε_upper means the run leaked more than the accountant says.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .. import accountants
from ..accountants.validation import check_delta, check_noise_multiplier, check_sample_rate, check_steps
from ..data import DPDataLoader
from ..engine.clipping import check_max_grad_norm
from ..engine.grad_sample_module import GradSampleModule
from ..optimizers import DPOptimizer
from . import bound, canaries as canary_lib, faults, scoring

UPPER_BOUND_ACCOUNTANTS = ("rdp", "prv", "pld")  # gdp is an approximation, not an upper bound
DEFAULT_GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5)


@dataclass
class AuditResult:
    """What one audit found. ``epsilon_lower`` holds with probability >= ``confidence`` for an
    (ε, δ)-DP run; ``epsilon_upper`` maps accountant name → ε for the claimed (σ, q, steps)."""

    epsilon_lower: float
    epsilon_upper: Dict[str, float]
    confidence: float
    delta: float
    canaries: int
    guesses: int
    correct: int
    kind: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    fault: Optional[str]
    seconds: float
    scores: np.ndarray = field(repr=False)
    included: np.ndarray = field(repr=False)

    @property
    def leak_detected(self) -> bool:
        """ε_lower above the smallest accountant ε: the run is *not* as private as claimed (at
        ``confidence``)."""
        return self.epsilon_lower > min(self.epsilon_upper.values(), default=math.inf)

    def summary(self) -> str:
        upper = "  ".join(f"{name}={value:.3f}" for name, value in self.epsilon_upper.items())
        return (
            f"{self.kind} canaries: m={self.canaries} ({int(self.included.sum())} included), "
            f"{self.correct}/{self.guesses} guesses correct\n"
            f"sigma={self.noise_multiplier:g}  q={self.sample_rate:g}  steps={self.steps}  C={self.max_grad_norm:g}  "
            f"delta={self.delta:g}  fault={self.fault or 'none'}  ({self.seconds:.1f} s)\n"
            f"epsilon_lower={self.epsilon_lower:.3f} (confidence {self.confidence:g})  epsilon_upper: {upper}\n"
            + ("LEAK: epsilon_lower exceeds the accountant's epsilon\n" if self.leak_detected else "")
        )


def epsilon_upper(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  names: Sequence[str] = UPPER_BOUND_ACCOUNTANTS) -> Dict[str, float]:
    """ε of each accountant (that is available) for ``steps`` steps of (σ, q); σ = 0 gives inf."""
    result = {}
    for name in names:
        if name not in accountants.available_accountants():
            continue
        accountant = accountants.create_accountant(name)
        accountant.history = [(noise_multiplier, sample_rate, steps)]
        result[name] = math.inf if noise_multiplier == 0 else float(accountant.get_epsilon(delta))
    return result


def _num_classes(dataset: Dataset) -> int:
    return int(max(int(dataset[i][1]) for i in range(len(dataset)))) + 1


def run_audit(
    model: nn.Module,
    dataset: Dataset,
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    max_grad_norm: float = 1.0,
    canaries: int = 1000,
    kind: str = "gradient",
    lr: float = 0.5,
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
    fault: Optional[str] = None,
    criterion: Callable[..., torch.Tensor] = F.cross_entropy,
    grad_sample_mode: str = "bk",
    guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
) -> AuditResult:
    """Audit one DP-SGD run of ``model`` (a copy; yours is left untouched) on ``dataset`` (items
    ``(x, y)``; ``criterion(output, y, reduction="none")`` gives per-sample losses) with
    ``canaries`` canaries of ``kind`` ("gradient" or "input").

    Training: ``steps`` steps of plain SGD (learning rate ``lr`` on the mean over the expected
    batch), Poisson rate ``sample_rate``, flat clipping at ``max_grad_norm``, noise
    ``noise_multiplier``. ``fault`` ("no-clipping", "noise-scale=F") breaks the step on purpose
    (``faults.py``) while the accountants keep the claimed values. ε_lower is reported at
    ``confidence`` for ``delta``, the best of the guess counts ``guess_fractions`` · m
    (Bonferroni-corrected)."""
    noise_multiplier = check_noise_multiplier(noise_multiplier)
    sample_rate = check_sample_rate(sample_rate)
    steps = check_steps(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    max_grad_norm = check_max_grad_norm(max_grad_norm)
    delta = check_delta(delta)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    kind = canary_lib.check_kind(kind)
    fault_name, noise_scale = faults.parse_fault(fault)
    if len(dataset) == 0:
        raise ValueError("dataset is empty; the audit trains on it plus the canaries")
    started = time.perf_counter()

    included = canary_lib.draw_inclusions(canaries, seed)
    example_x, example_y = dataset[0][:2]
    if kind == "input" and not torch.as_tensor(example_x).is_floating_point():
        raise ValueError("kind='input' draws random float inputs, but the dataset's inputs are not floating point "
                         "(token ids?); use kind='gradient'")
    canary_x, canary_y = canary_lib.make_canary_samples(
        kind, torch.as_tensor(example_x), torch.as_tensor(example_y), canaries,
        _num_classes(dataset) if kind == "input" else 1, seed,
    )
    train_set = canary_lib.AuditDataset(dataset, canary_x, canary_y, included)

    model = copy.deepcopy(model)
    if kind == "gradient":
        model = canary_lib.GradientCanaryModel(model, canaries, canary_lib.CANARY_NORM_MULTIPLE * max_grad_norm)
        weights_before = model.canary_weights()
    else:
        losses_before = scoring.per_sample_losses(model, canary_x, canary_y, criterion)
    module = GradSampleModule(model, loss_reduction="sum", mode=grad_sample_mode)  # loss = sum of per-sample losses

    # E[B] from public quantities only, so the step's scale does not reveal how many canaries went in
    expected_batch_size = sample_rate * (len(dataset) + canaries / 2)
    optimizer_class = faults.QuietNoiseDPOptimizer if fault_name == "noise-scale" else DPOptimizer
    optimizer = optimizer_class(
        torch.optim.SGD(module.parameters(), lr=lr),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",  # divide the noised sum by E[B]
        generator=torch.Generator().manual_seed(seed + 1),
    )
    if fault_name == "noise-scale":
        optimizer.noise_scale = noise_scale
    if fault_name == "no-clipping":
        optimizer.clipping_policy = faults.NoClipping(max_grad_norm)
    optimizer.attach(module)
    engine_accountant = accountants.RDPAccountant()  # what the engine reports, to check the claim
    optimizer.attach_step_hook(engine_accountant.get_optimizer_hook_fn(sample_rate=sample_rate))

    loader = DPDataLoader(train_set, sample_rate=sample_rate, generator=torch.Generator().manual_seed(seed + 2))
    done = 0
    while done < steps:
        for x, y, canary_id in loader:
            optimizer.zero_grad()
            if len(y):  # an empty Poisson batch has nothing to backpropagate; its step still adds noise
                outputs = module(x, canary_id) if kind == "gradient" else module(x)
                canary_lib.per_sample_loss(outputs, y, canary_id, kind, criterion).sum().backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    if engine_accountant.history != [(noise_multiplier, sample_rate, steps)]:
        raise RuntimeError(f"the engine accounted {engine_accountant.history}, not ({noise_multiplier}, {sample_rate}, {steps})")

    if kind == "gradient":
        scores = scoring.gradient_canary_scores(
            weights_before, model.canary_weights(), lr=lr, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
        )
    else:
        scores = scoring.input_canary_scores(losses_before, scoring.per_sample_losses(module, canary_x, canary_y, criterion))
    epsilon_lower, guesses, correct = bound.audit_from_scores(
        scores, included, delta=delta, confidence=confidence, fractions=guess_fractions
    )
    return AuditResult(
        epsilon_lower=epsilon_lower,
        epsilon_upper=epsilon_upper(noise_multiplier, sample_rate, steps, delta),
        confidence=confidence, delta=delta, canaries=canaries, guesses=guesses, correct=correct, kind=kind,
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, max_grad_norm=max_grad_norm,
        fault=fault if fault_name else None, seconds=time.perf_counter() - started, scores=scores, included=included,
    )
