"""DPOptimizer: the last stage of a DP step (DESIGN.md step 6).

By the time ``step()`` runs, the engine (GradSampleModule) has left each
parameter's *clipped, summed* gradient in ``p.grad``. The optimizer adds
N(0, σ²C²) noise to all of them in one draw, divides by the expected batch size
(mean loss), steps the wrapped optimizer and tells the accountant.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from ..accountants.validation import check_noise_multiplier
from ..engine.clipping import AutomaticClipping, FlatClipping, PerLayerClipping, check_max_grad_norm
from ..engine.grad_sample_module import check_loss_reduction
from ..ops.noise import add_noise_and_scale
from ..utils.secure_random import SecureRandom, normal

CLIPPING_MODES = ("flat", "per_layer", "automatic", "adaptive")


class AdaptiveClipping(FlatClipping):
    """Flat clipping whose bound tracks a quantile of the norms (Andrew et al. 2021).

    After each step C ← C·exp(-η·(b̃ - γ)), where b̃ is the *noised* fraction of samples
    with ||g_i|| ≤ C. The released count is centred, sum_i (1[||g_i|| ≤ C] - 1/2), whose
    add/remove sensitivity is 1/2; b̃ = (that + N(0, σ_b²)) / expected batch size + 1/2.
    With that sensitivity, gradient noise σ_Δ and count noise σ_b together cost one
    Gaussian release of σ with σ⁻² = σ_Δ⁻² + (2σ_b)⁻² (Andrew et al., Thm 1).
    """

    def __init__(self, max_grad_norm, *, target_unclipped_quantile=0.5, clipbound_learning_rate=0.2,
                 min_clipbound=1e-3, max_clipbound=1e3, unclipped_num_std=None):
        super().__init__(max_grad_norm)
        self.target_unclipped_quantile = float(target_unclipped_quantile)
        self.clipbound_learning_rate = float(clipbound_learning_rate)
        self.min_clipbound, self.max_clipbound = float(min_clipbound), float(max_clipbound)
        self.unclipped_num_std = unclipped_num_std
        self.centred_count = 0.0

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        self.centred_count = self.centred_count + (norms <= self.max_grad_norm).sum() - 0.5 * norms.numel()
        return super().factors(norms)

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        """σ_Δ such that the gradient and count releases together cost ``noise_multiplier``."""
        if noise_multiplier == 0:
            return 0.0
        return (noise_multiplier**-2 - (2 * self.unclipped_num_std) ** -2) ** -0.5

    def update(self, expected_batch_size: float, generator=None) -> None:
        count = float(self.centred_count)
        noise = float(normal(1, generator)) * float(self.unclipped_num_std)
        fraction = (count + noise) / expected_batch_size + 0.5
        bound = self.max_grad_norm * math.exp(-self.clipbound_learning_rate * (fraction - self.target_unclipped_quantile))
        self.max_grad_norm = min(max(bound, self.min_clipbound), self.max_clipbound)
        self.centred_count = 0.0


class DPOptimizer(Optimizer):
    """Wraps ``optimizer``; use ``attach(grad_sample_module)`` (PrivacyEngine does it for you).

    ``clipping``: "flat" (min(1, C/||g_i||)), "per_layer" (``max_grad_norm`` a list with one
    bound per trainable parameter, in optimizer order, as Opacus; the noise uses the L2 norm
    of the bounds), "automatic" (C/(||g_i|| + γ), Bu et al.),
    or "adaptive" (Andrew et al. 2021: the bound follows a quantile of the norms; pass
    ``target_unclipped_quantile``, ``clipbound_learning_rate``, ``unclipped_num_std`` etc.
    as keyword arguments; the gradient noise is raised so that the pair of noisy
    releases costs exactly ``noise_multiplier`` in the accountant).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: Optional[int],
        loss_reduction: str = "mean",
        generator: Optional[torch.Generator] = None,
        secure_mode: bool = False,
        clipping: str = "flat",
        **clipping_kwargs,
    ):
        loss_reduction = check_loss_reduction(loss_reduction)
        if loss_reduction == "mean" and (expected_batch_size is None or expected_batch_size <= 0):
            raise ValueError(f"expected_batch_size must be > 0 with loss_reduction='mean', got {expected_batch_size!r}")
        if secure_mode and generator is not None and not isinstance(generator, SecureRandom):
            raise ValueError(
                "secure_mode=True draws noise from the OS CSPRNG; a torch generator would make it predictable "
                "(drop generator=, or use secure_mode=False for reproducible runs)"
            )
        if secure_mode:
            generator = SecureRandom()
        self.original_optimizer = optimizer
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        self.generator = generator
        self.secure_mode = secure_mode
        self.clipping = clipping
        self.clipping_policy = self._make_policy(clipping, max_grad_norm, clipping_kwargs)
        self.step_hook: Optional[Callable] = None
        self.accumulated_iterations = 1  # Opacus attribute read by accountant hooks
        self.modules: List[nn.Module] = []
        self._skipped_steps = 0  # virtual steps since the last real one (BatchMemoryManager)
        self._skip_next = False
        self.grad_scaler = None  # a torch.amp.GradScaler (attach_grad_scaler)

    def _make_policy(self, clipping, max_grad_norm, kwargs):
        if clipping == "flat":
            policy = FlatClipping(max_grad_norm)
        elif clipping == "automatic":
            policy = AutomaticClipping(max_grad_norm, **kwargs)
            kwargs = {}
        elif clipping == "adaptive":
            policy = AdaptiveClipping(max_grad_norm, **kwargs)
            if policy.unclipped_num_std is None:
                raise ValueError("clipping='adaptive' needs unclipped_num_std= (the noise std of the unclipped count)")
            if not self.noise_multiplier < 2 * policy.unclipped_num_std:
                raise ValueError(
                    "clipping='adaptive' needs noise_multiplier < 2 * unclipped_num_std "
                    f"(got {self.noise_multiplier} and {policy.unclipped_num_std})"
                )
            kwargs = {}
        elif clipping == "per_layer":
            params = self.params
            if not isinstance(max_grad_norm, (list, tuple)) or len(max_grad_norm) != len(params):
                raise ValueError(
                    f"clipping='per_layer' needs max_grad_norm as a list with one bound per trainable "
                    f"parameter of the optimizer ({len(params)}), got {max_grad_norm!r}"
                )
            policy = PerLayerClipping({id(p): bound for p, bound in zip(params, max_grad_norm)})
        else:
            raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {clipping!r}")
        if kwargs:
            raise ValueError(f"unexpected keyword arguments for clipping={clipping!r}: {sorted(kwargs)}")
        return policy

    # -- torch.optim.Optimizer surface, delegated ------------------------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        self.original_optimizer.add_param_group(param_group)

    def __repr__(self):
        return f"DPOptimizer({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm})"

    @property
    def params(self) -> List[nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    @property
    def gradient_noise_multiplier(self) -> float:
        """The σ of the gradient noise (below ``noise_multiplier`` only for adaptive clipping)."""
        if isinstance(self.clipping_policy, AdaptiveClipping):
            return self.clipping_policy.gradient_noise_multiplier(self.noise_multiplier)
        return self.noise_multiplier

    @property
    def max_grad_norm(self) -> float:
        return self.clipping_policy.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        if isinstance(self.clipping_policy, PerLayerClipping):
            raise ValueError("with clipping='per_layer' the bounds are per parameter: set clipping_policy.bounds")
        self.clipping_policy.max_grad_norm = check_max_grad_norm(value)

    # -- wiring -----------------------------------------------------------------------------
    def attach(self, module: nn.Module) -> None:
        """Let ``module`` (a GradSampleModule) clip with this optimizer's policy."""
        module.clipping = self.clipping_policy
        module.grad_scaler = self.grad_scaler
        self.modules.append(module)

    def attach_step_hook(self, fn: Callable) -> None:
        self.step_hook = fn

    def attach_grad_scaler(self, scaler) -> None:
        """Train with a ``torch.amp.GradScaler`` (fp16): backpropagate ``scaler.scale(loss)`` and step
        with ``scaler.step(optimizer)``. The attached modules clip with unscaled norms and leave the
        clipped sums scaled, so ``scaler.step`` unscales them before this optimizer adds noise; when a
        backward overflowed, the modules leave inf gradients and the scaler skips the step, so neither
        noise nor the accountant run for it. (Whether a step overflowed depends on the batch; that
        skip is not noised.)"""
        if not isinstance(scaler, torch.amp.GradScaler):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.grad_scaler = scaler
        for module in self.modules:
            module.grad_scaler = scaler

    def _check_grad_scaler(self) -> None:
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return
        from torch.amp.grad_scaler import OptState

        if self._skip_next:
            raise ValueError("grad_scaler does not combine with virtual steps (BatchMemoryManager); use one of them")
        state = self.grad_scaler._per_optimizer_states.get(id(self))  # what scaler.unscale_ records
        if state is None or state["stage"] is not OptState.UNSCALED:
            raise ValueError(
                "with a grad_scaler the clipped gradients are still scaled: step with grad_scaler.step(optimizer), "
                "which unscales them first, not optimizer.step()"
            )

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """The next ``step()`` only ends a physical batch of a larger logical one (virtual step)."""
        self._skip_next = do_skip

    # -- the step ----------------------------------------------------------------------------
    def _check_backward_passes(self) -> None:
        for module in self.modules:
            if module.backward_passes > 1 + self._skipped_steps:
                raise ValueError(
                    f"{module.backward_passes} backward passes reached one optimizer step: each sample would be "
                    "clipped once per pass; call optimizer.step() after every batch (sum losses before "
                    "backward), or split large batches with fastdp.BatchMemoryManager"
                )

    def _noise_and_scale(self, *, noise: bool, scale: bool) -> None:
        """One pass over all summed gradients: p.grad ← (p.grad + N(0, σ²C²)) / expected batch size.

        The gradients are gathered into one flat float32 buffer so the noise is one draw
        (one fused kernel on GPU); fp32 parameters then hold views into it. A parameter no
        sample reached (or an empty batch) gets a zero gradient: noise still goes in.
        """
        params = self.params
        if not params:
            return
        std = self.gradient_noise_multiplier * self.max_grad_norm if noise and self._adds_noise() else 0.0
        factor = 1.0 / self.expected_batch_size if scale and self.loss_reduction == "mean" else 1.0
        device = params[0].device
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device=device, dtype=torch.float32)
            for p in params
        ])
        if self.secure_mode and std != 0:
            flat.add_(normal(flat.numel(), self.generator, device=device), alpha=std)
            std = 0.0
        add_noise_and_scale(flat, std, factor, self.generator)
        if noise:
            self._sum_over_ranks(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype)
            offset += p.numel()

    def _adds_noise(self) -> bool:
        """Whether this process draws the noise (DistributedDPOptimizer: one rank of all)."""
        return True

    def _sum_over_ranks(self, flat: torch.Tensor) -> None:
        """Where a distributed optimizer sums the ranks' noised buffers (single process: nothing)."""

    def add_noise(self) -> None:
        """p.grad += N(0, σ²C²), one draw for all parameters (one flat buffer)."""
        self._noise_and_scale(noise=True, scale=False)

    def scale_grad(self) -> None:
        """p.grad /= expected batch size (loss_reduction="mean")."""
        self._noise_and_scale(noise=False, scale=True)

    def pre_step(self) -> bool:
        """Noise and scale; False when this is a virtual (skipped) step."""
        self._check_backward_passes()
        self._check_grad_scaler()
        if self._skip_next:
            self._skip_next = False
            self._skipped_steps += 1
            return False
        self._noise_and_scale(noise=True, scale=True)
        if self.step_hook is not None:
            self.step_hook(self)
        if isinstance(self.clipping_policy, AdaptiveClipping):
            self.clipping_policy.update(self.expected_batch_size, self.generator)
        self._skipped_steps = 0
        for module in self.modules:
            module.backward_passes = 0
        return True

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.pre_step():
            return self.original_optimizer.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._skipped_steps:
            return  # mid logical batch (BatchMemoryManager): the clipped sums must keep accumulating
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for module in self.modules:
            module.zero_grad(set_to_none=set_to_none)
