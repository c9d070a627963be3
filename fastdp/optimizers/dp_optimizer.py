"""DPOptimizer: the last stage of a DP step (DESIGN.md step 6), in Opacus's stages.

``step()`` runs ``pre_step()`` and then the wrapped optimizer's step. ``pre_step()`` is, as in Opacus:

1. ``clip_and_accumulate()``: this step's clipped per-sample-gradient sum goes to ``p.summed_grad``.
   The attached GradSampleModule (bk/hooks/functorch) already clipped every sample inside the
   backward and left the sum in ``p.grad``, so this only moves it (no copy); parameters with no
   attached module but with ``p.grad_sample`` are clipped here from their per-sample gradients.
2. a virtual step (BatchMemoryManager, ``signal_skip_step``) stops here: ``summed_grad`` keeps
   accumulating over the physical batches of one logical batch;
3. ``add_noise()``: ``p.grad = p.summed_grad + N(0, σ²C²)``, one draw over all parameters;
4. ``scale_grad()``: ``p.grad /= expected_batch_size · accumulated_iterations`` (mean loss);
5. the step hook (the accountant).

Gradients live in a ``GradBuffer`` (``grad_buffer.py``, flat segments allocated as the backward writes
them): the engine adds clipped sums into each parameter's view of it, ``p.grad`` and ``p.summed_grad`` are
views of it, and when a subclass overrides neither ``add_noise`` nor ``scale_grad``, 3 and 4 are one
in-place pass over it (chunked on CPU, one fused kernel per segment on GPU), so the step allocates
nothing full-size. After that pass the buffer holds the released gradient, so in "bk" mode
``p.summed_grad`` is None after the step; in the modes that materialise per-sample gradients ("hooks",
"functorch") it is kept, in a second buffer, as Opacus keeps it (``keep_summed_grad`` decides either
way). Overriding a stage (e.g. Laplace noise) runs the stages separately, as Opacus does.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from ..accountants.validation import check_noise_multiplier
from ..engine.clipping import AutomaticClipping, FlatClipping, PerLayerClipping, check_max_grad_norm
from ..engine.grad_sample_module import LIVE_MODULES, GradSampleModule, check_loss_reduction
from ..engine.rules.base import clipped_sum_of_grad_samples
from ..ops.noise import NOISE_CHUNK_NUMEL, add_noise_and_scale
from ..utils.secure_random import SecureRandom, normal
from .grad_buffer import GradBuffer

CLIPPING_MODES = ("flat", "per_layer", "automatic", "adaptive")


def _mark_as_processed(obj) -> None:
    """Mark a tensor (or each of a list) as used by an optimizer step (Opacus's API): using it in
    another step before ``zero_grad()`` would release the same samples twice."""
    for tensor in obj if isinstance(obj, list) else [obj]:
        if isinstance(tensor, torch.Tensor):
            tensor._processed = True


def _check_processed_flag(obj) -> None:
    """Raise ValueError if a tensor (or one of a list) was already used by an optimizer step."""
    for tensor in obj if isinstance(obj, list) else [obj]:
        if isinstance(tensor, torch.Tensor) and hasattr(tensor, "_processed"):
            raise ValueError(
                "gradients haven't been cleared since the last optimizer step: call optimizer.zero_grad() "
                "after every step (a gradient used twice would release its samples twice)"
            )


def _flat_grad_sample(p: torch.Tensor) -> torch.Tensor:
    """``p.grad_sample`` as one tensor ``[samples, *p.shape]`` (Opacus keeps a list per backward pass)."""
    grad_sample = p.grad_sample
    return torch.cat(grad_sample, dim=0) if isinstance(grad_sample, list) else grad_sample


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
    """Wraps any ``torch.optim.Optimizer``: clip (through the model), noise once, scale, step, account.

    ``PrivacyEngine.make_private`` builds it. Built by hand, as in Opacus's "under the hood" tutorial,
    it attaches itself to the live ``GradSampleModule`` (s) that own its parameters (at construction,
    and again at each step for a module wrapped later), so the usual
    ``GradSampleModule(model)`` → ``DPOptimizer(SGD(model.parameters()), ...)`` → ``attach_step_hook``
    wiring trains privately. A parameter that has a gradient but neither an attached module nor
    ``p.grad_sample`` is refused at ``step()``: that gradient is the non-private one.

    Args:
        optimizer: the wrapped optimizer (its param_groups, state and state_dict are this one's).
        noise_multiplier: σ: the noise std is σ·C (σ·‖bounds‖₂ for per-layer clipping).
        max_grad_norm: C, the bound on each sample's gradient norm; for ``clipping="per_layer"`` a list
            with one bound per trainable parameter, in optimizer order.
        expected_batch_size: the divisor of a mean loss, q·N (required for ``loss_reduction="mean"``).
        loss_reduction: "mean" or "sum": how the loss combined the samples of a batch.
        generator: a ``torch.Generator`` for the noise (seeded: reproducible runs).
        secure_mode: draw the noise from the OS CSPRNG (``fastdp.utils.secure_random``); no generator.
        clipping: "flat" (min(1, C/‖g_i‖)), "per_layer" (Opacus: one bound per parameter; the noise uses
            ‖bounds‖₂), "automatic" (C/(‖g_i‖ + γ), Bu et al.; keyword ``stability`` = γ) or "adaptive"
            (Andrew et al. 2021: the bound follows a quantile of the norms; keywords
            ``target_unclipped_quantile``, ``clipbound_learning_rate``, ``min_clipbound``,
            ``max_clipbound``, ``unclipped_num_std``; the gradient noise is raised so that the pair of
            noisy releases costs exactly ``noise_multiplier`` in the accountant).
        keep_summed_grad: True: keep ``p.summed_grad`` (the clipped sum) after the step until ``zero_grad()``,
            as Opacus does, at the cost of a second gradient-sized buffer. False: the noise goes into the
            buffer in place and ``p.summed_grad`` is None after the step (its storage holds ``p.grad``).
            None (default): True where per-sample gradients are materialised anyway (an attached module in
            "hooks" or "functorch" mode, or none: the optimizer clips the ``p.grad_sample`` you set), since
            they already cost B gradients; False in "bk" mode.
        **clipping_kwargs: the keywords of the chosen clipping; any other is an error.
    """

    #: False: this class's ``attach`` needs more than the base wiring (FSDP), so only make_private attaches it
    auto_attach = True
    #: False: the gradients do not live in this optimizer's ``GradBuffer`` (FSDP: the engine sees other tensors)
    uses_grad_buffer = True

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
        keep_summed_grad: Optional[bool] = None,
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
        if isinstance(optimizer, DPOptimizer):
            raise ValueError("optimizer is already a DPOptimizer; wrap its original_optimizer (noise would be added twice)")
        self.original_optimizer = optimizer
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        self.generator = generator
        self.secure_mode = secure_mode
        self.clipping = clipping
        self.modules: List[nn.Module] = []
        self.clipping_policy = self._make_policy(clipping, max_grad_norm, clipping_kwargs)
        self.step_hook: Optional[Callable] = None
        self._covered: set = set()  # ids of the attached modules' parameters
        self._skipped_steps = 0  # virtual steps since the last real one (BatchMemoryManager)
        self._skip_next = False  # the next step() is a virtual one
        self._needs_zero_grad = False  # a step() ran and zero_grad() has not since
        self.grad_scaler = None  # a torch.amp.GradScaler (attach_grad_scaler)
        self.keep_summed_grad = None if keep_summed_grad is None else bool(keep_summed_grad)
        #: where the gradients of ``params`` live (None for optimizers that keep them elsewhere: FSDP)
        self.grad_buffer: Optional[GradBuffer] = GradBuffer(self.params) if self.uses_grad_buffer else None
        for p in self.params:
            p.summed_grad = None
        if self.auto_attach:
            self.attach_owners()

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
                    "clipping='adaptive': noise_multiplier must be smaller than 2 * unclipped_num_std (Andrew et al. "
                    f"2021, Thm 1); got {self.noise_multiplier} and {policy.unclipped_num_std}"
                )
            if not policy.min_clipbound < policy.max_clipbound:
                raise ValueError(
                    f"clipping='adaptive' needs min_clipbound < max_clipbound, got {policy.min_clipbound} and "
                    f"{policy.max_clipbound}"
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

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        buffer = self.grad_buffer
        if buffer is not None and (buffer.pending or buffer.logical_batch_open):
            raise ValueError("add_param_group between a backward and its optimizer step would drop its clipped "
                             "sums; call it after optimizer.step() and zero_grad()")
        self.original_optimizer.add_param_group(param_group)
        if buffer is not None:  # a new layout; the old buffer goes with its views
            self.grad_buffer = GradBuffer(self.params)
            for module in self.modules:
                module.grad_buffers = [b for b in module.grad_buffers if b is not buffer] + [self.grad_buffer]

    def __repr__(self):
        return f"{type(self).__name__}({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm})"

    @property
    def params(self) -> List[nn.Parameter]:
        """The trainable parameters of all param groups, in order."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    @property
    def grad_samples(self) -> List[torch.Tensor]:
        """Each parameter's per-sample gradients ``[samples, *p.shape]`` (hooks/functorch modes only)."""
        missing = [tuple(p.shape) for p in self.params if getattr(p, "grad_sample", None) is None]
        if missing:
            raise ValueError(
                f"parameters of shapes {missing} have no per-sample gradients (p.grad_sample): grad_sample_mode "
                "'bk' never forms them; use grad_sample_mode='hooks' or 'functorch' to read them"
            )
        return [_flat_grad_sample(p) for p in self.params]

    @property
    def accumulated_iterations(self) -> int:
        """Backward passes (batches) accumulated for this step; the accountant counts q times it and the
        mean divides by expected_batch_size times it (Opacus semantics)."""
        if self.modules:
            return max(1, max(getattr(m, "backward_passes", 0) for m in self.modules))
        lengths = [len(p.grad_sample) for p in self.params if isinstance(getattr(p, "grad_sample", None), list)]
        return max(lengths, default=1)

    @property
    def gradient_noise_multiplier(self) -> float:
        """The σ of the gradient noise (below ``noise_multiplier`` only for adaptive clipping)."""
        if isinstance(self.clipping_policy, AdaptiveClipping):
            return self.clipping_policy.gradient_noise_multiplier(self.noise_multiplier)
        return self.noise_multiplier

    @property
    def clipping_policy(self):
        """How the attached modules turn per-sample norms into clip factors (``fastdp.engine.clipping``).
        Setting it sets it on every attached module too: the modules clip, the optimizer only noises, and
        the two must agree on the bound."""
        return self._clipping_policy

    @clipping_policy.setter
    def clipping_policy(self, policy) -> None:
        self._clipping_policy = policy
        for module in self.modules:
            module.clipping = policy

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
        """Let ``module`` (a GradSampleModule) clip with this optimizer's policy, inside its backward.

        If the module already ran a backward without a policy (the optimizer was built after it), that
        backward is clipped now with this optimizer's policy."""
        if any(module is m for m in self.modules):
            return
        if not isinstance(module, GradSampleModule):
            raise ValueError(
                f"attach() takes a fastdp GradSampleModule, got {type(module).__name__}; in 'no_op' mode nothing is "
                "attached: the optimizer clips the p.grad_sample you set"
            )
        module.clipping = self.clipping_policy
        module.grad_scaler = self.grad_scaler
        if self.grad_buffer is not None and not any(b is self.grad_buffer for b in module.grad_buffers):
            module.grad_buffers.append(self.grad_buffer)  # the engine adds clipped sums into its views
        self.modules.append(module)
        self._covered.update(id(p) for p in module.parameters())
        if getattr(module, "_retained_steps", None) is not None:  # a backward that waited for a policy
            if isinstance(self.clipping_policy, PerLayerClipping):
                raise ValueError(
                    "a backward ran before this per-layer DPOptimizer was attached to its GradSampleModule; build "
                    "the DPOptimizer before the first backward (or call optimizer.attach(module) first)"
                )
            module.accumulate_clipped_grads(self.clipping_policy.factors(module.per_sample_norms))

    def attach_owners(self) -> None:
        """Attach every live GradSampleModule that owns one of this optimizer's parameters."""
        ids = None
        for module in list(LIVE_MODULES):
            if any(module is m for m in self.modules):
                continue
            ids = {id(p) for p in self.params} if ids is None else ids
            if any(id(p) in ids for p in module.parameters()):
                self.attach(module)

    def attach_step_hook(self, fn: Callable) -> None:
        """``fn(optimizer)`` runs after noise and scaling of every real step (privacy accounting)."""
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
        narrow = sorted({str(p.dtype) for p in self.params if p.dtype in (torch.float16, torch.bfloat16)})
        if narrow:
            raise ValueError(
                f"grad_scaler with {', '.join(narrow)} parameters: their clipped sums are kept in float32 and reach "
                "p.grad only at the step, after the scaler's unscale; keep float32 parameters under torch.autocast "
                "(the usual fp16 recipe), or train bf16 without a scaler"
            )
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

    # -- virtual steps (BatchMemoryManager) ----------------------------------------------------
    def signal_skip_step(self, do_skip: bool = True) -> None:
        """The next ``step()`` only ends a physical batch of a larger logical one (virtual step): it clips
        and accumulates into ``p.summed_grad``, with no noise, no update and no accounting."""
        self._skip_next = bool(do_skip)

    def _check_skip_next_step(self, pop_next: bool = True) -> bool:
        """Whether the next step is virtual (and, with ``pop_next``, consume that signal)."""
        skip = self._skip_next
        if pop_next:
            self._skip_next = False
        return skip

    @property
    def _is_last_step_skipped(self) -> bool:
        return self._skipped_steps > 0

    def discard_virtual_batch(self) -> None:
        """Forget a logical batch left incomplete (a BatchMemoryManager loop left by ``break``, an
        exception or its end mid batch): its partial clipped sum, per-sample state and virtual-step
        flags go, so that nothing of it reaches a later step. The accountant never counted it."""
        if not (self._skipped_steps or self._skip_next):
            return
        self._skipped_steps = 0
        self._skip_next = False
        if self.grad_buffer is not None:
            self.grad_buffer.zero()
        for p in self.params:
            p.summed_grad = None
            p.grad = None
            p.grad_sample = None
        for module in self.modules:
            module.zero_grad(set_to_none=True)
        self._needs_zero_grad = False

    # -- the step ----------------------------------------------------------------------------
    def _check_backward_passes(self) -> None:
        for module in self.modules:
            if module.backward_passes > 1 and not getattr(module, "grad_accumulation_allowed", True):
                raise ValueError(
                    f"{module.backward_passes} backward passes reached one optimizer step, but Poisson sampling "
                    "is not compatible with gradient accumulation (each logical batch is one sampled step); call "
                    "optimizer.step() after every batch, or split large batches with fastdp.BatchMemoryManager"
                )

    def _check_zero_grad(self) -> None:
        if self._needs_zero_grad:
            raise ValueError(
                "optimizer.step() ran twice without optimizer.zero_grad() in between: the released (noised) "
                "gradient would be mixed into the next step; call zero_grad() after every step"
            )

    def _covered_ids(self) -> set:
        """ids of the parameters whose clipping the attached modules do inside the backward."""
        return self._covered

    def _add_to_summed(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        if p.summed_grad is not None:
            _check_processed_flag(p.summed_grad)
        buffer = self.grad_buffer
        if buffer is not None and p in buffer:
            buffer.accumulator(p).add_(grad)
            p.summed_grad = buffer.fresh_view(p)
            return
        grad = grad.to(p.dtype)
        if p.summed_grad is None:
            p.summed_grad = grad
        else:
            p.summed_grad = p.summed_grad + grad.to(p.summed_grad.dtype)

    def clip_and_accumulate(self) -> None:
        """This step's clipped per-sample-gradient sum, added to ``p.summed_grad`` (p.grad is cleared).

        Parameters of an attached GradSampleModule were clipped inside the backward, into their view of
        the gradient buffer, which already sums the physical batches of a logical one: ``p.summed_grad``
        becomes that view (no copy). The others are clipped here from ``p.grad_sample`` with this
        optimizer's policy (Opacus's optimizer-side clipping) and added to the buffer."""
        covered = self._covered_ids()
        params = self.params
        loose = [p for p in params if id(p) not in covered]
        if loose:
            self._clip_grad_samples(loose, mixed=len(loose) < len(params))
        buffer = self.grad_buffer
        for p in params:
            if id(p) not in covered:
                continue
            if buffer is not None and p in buffer:
                buffer.take_grad(p)  # a p.grad set by hand is taken as a clipped sum, as before
                if p.summed_grad is not None:
                    _check_processed_flag(p.summed_grad)
                p.summed_grad = buffer.fresh_view(p)
                p.grad = None
            elif p.grad is not None:
                self._add_to_summed(p, p.grad.detach())
                p.grad = None
        if buffer is not None:
            buffer.pending = False

    def _clip_grad_samples(self, params: List[torch.Tensor], *, mixed: bool) -> None:
        with_samples = []
        for p in params:
            if getattr(p, "grad_sample", None) is not None:
                with_samples.append(p)
            elif p.grad is not None and bool(p.grad.ne(0).any()):  # zeros: zero_grad(set_to_none=False)
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} has a gradient but no per-sample gradients: it was not "
                    "computed by a GradSampleModule attached to this optimizer, so it is the non-private gradient; "
                    "wrap the model in fastdp.GradSampleModule (or use PrivacyEngine.make_private) before training"
                )
        if not with_samples:
            return
        if mixed:
            raise ValueError(
                "some of this optimizer's parameters are clipped by an attached GradSampleModule and others carry "
                "p.grad_sample from elsewhere; one sample's norm must cover all of them: wrap the whole model once"
            )
        grads = []
        for p in with_samples:
            _check_processed_flag(p.grad_sample)
            grads.append(_flat_grad_sample(p))
        if len({g.shape[0] for g in grads}) != 1:
            raise ValueError(f"per-sample gradients of different batch sizes: {sorted({g.shape[0] for g in grads})}")
        norm_sq = {id(p): g.flatten(1).float().square().sum(1).to(grads[0].device) for p, g in zip(with_samples, grads)}
        norms = torch.stack(list(norm_sq.values())).sum(0).sqrt() if norm_sq else None
        factors = self.clipping_policy.factors_by_param(norm_sq, norms)
        for p, g in zip(with_samples, grads):
            finite = torch.isfinite(norm_sq[id(p)]).to(g.device)  # 0 * inf is NaN: drop those rows outright
            g = torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, torch.zeros((), dtype=g.dtype, device=g.device))
            clipped = clipped_sum_of_grad_samples(factors[id(p)].to(g.device), g)
            self._add_to_summed(p, clipped.view_as(p))
            _mark_as_processed(p.grad_sample)

    def _scale_factor(self) -> float:
        if self.loss_reduction != "mean":
            return 1.0
        return 1.0 / (self.expected_batch_size * self.accumulated_iterations)

    def _noise_and_scale(self, *, noise: bool, scale: bool) -> None:
        """With ``noise``: p.grad ← (p.summed_grad + N(0, σ²C²)) · (1 / divisor if ``scale``), in place over
        the gradient buffer (one noise draw over all parameters; CPU: chunk by chunk, no full-size noise
        tensor; GPU: one fused kernel); p.grad are then views of it. A parameter no sample reached (or an
        empty batch) holds zeros: noise still goes in. Without ``noise``: p.grad scaled in place."""
        params = self.params
        if not params:
            return
        factor = self._scale_factor() if scale else 1.0
        if not noise:
            for p in params:
                if p.grad is not None and factor != 1.0:
                    p.grad.mul_(factor)
            return
        std = self.gradient_noise_multiplier * self.max_grad_norm if self._adds_noise() else 0.0
        buffer = self.grad_buffer
        keep_sums = self._keeps_summed_grad()
        for group, flat in buffer.flats(keep_sums=keep_sums):
            if self.secure_mode and std != 0:  # the OS CSPRNG, a chunk at a time
                for chunk in flat.split(NOISE_CHUNK_NUMEL):
                    chunk.add_(normal(chunk.numel(), self.generator, device=chunk.device, dtype=chunk.dtype), alpha=std)
                add_noise_and_scale(flat, 0.0, factor, self.generator)
            else:
                add_noise_and_scale(flat, std, factor, self.generator)
            self._sum_over_ranks(flat)
            buffer.publish(group, flat)
        if not keep_sums:  # the buffer holds the released gradient now, not the clipped sum
            for p in params:
                p.summed_grad = None

    def _keeps_summed_grad(self) -> bool:
        """``keep_summed_grad``, with None resolved by the attached modules' modes (see the class docstring)."""
        if self.keep_summed_grad is not None:
            return self.keep_summed_grad
        # no module: the optimizer clips the p.grad_sample set by hand (Opacus's "no_op" mode)
        return not self.modules or any(getattr(module, "mode", "bk") != "bk" for module in self.modules)

    def _adds_noise(self) -> bool:
        """Whether this process draws the noise (DistributedDPOptimizer: one rank of all)."""
        return True

    def _sum_over_ranks(self, flat: torch.Tensor) -> None:
        """Where a distributed optimizer sums the ranks' noised buffers (single process: nothing)."""

    def add_noise(self) -> None:
        """p.grad = p.summed_grad + N(0, σ²C²), one draw for all parameters (one flat buffer)."""
        self._noise_and_scale(noise=True, scale=False)

    def scale_grad(self) -> None:
        """p.grad /= expected_batch_size · accumulated_iterations (loss_reduction="mean")."""
        self._noise_and_scale(noise=False, scale=True)

    def _stages_overridden(self) -> bool:
        cls = type(self)
        return cls.add_noise is not DPOptimizer.add_noise or cls.scale_grad is not DPOptimizer.scale_grad

    def pre_step(self, closure=None) -> bool:
        """Clip, then (unless this is a virtual step) noise, scale and account; False for a virtual step."""
        self.attach_owners()  # a GradSampleModule wrapped after this optimizer was built
        self._check_zero_grad()
        self._check_backward_passes()
        self._check_grad_scaler()
        self.clip_and_accumulate()
        self._needs_zero_grad = True
        if self._check_skip_next_step():
            self._skipped_steps += 1
            if self.grad_buffer is not None:
                self.grad_buffer.logical_batch_open = True
            self._consume_backward_passes()
            return False
        if self._stages_overridden():
            self.add_noise()
            self.scale_grad()
        else:
            self._noise_and_scale(noise=True, scale=True)
        if self.step_hook is not None:
            self.step_hook(self)
        if isinstance(self.clipping_policy, AdaptiveClipping):
            self.clipping_policy.update(self.expected_batch_size, self.generator)
        self._skipped_steps = 0
        if self.grad_buffer is not None:
            self.grad_buffer.logical_batch_open = False
        self._consume_backward_passes()
        return True

    def _consume_backward_passes(self) -> None:
        """The backward passes counted so far went into this step: a next batch is a new one."""
        for module in self.modules:
            module.backward_passes = 0

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.pre_step():
            return self.original_optimizer.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad``, ``p.grad_sample`` and the engine's per-backward state; and ``p.summed_grad``
        too, except inside a logical batch (after a virtual step), whose partial sum must survive.

        No partial sum outlives the step it belongs to. ``set_to_none=True`` (the default) sets ``p.grad``
        to None and releases the gradient buffer, as torch releases gradients (the next backward allocates
        it again, whole, with its first clipped sum); ``set_to_none=False`` keeps the buffer and its views,
        zeroed (one memset): static addresses, gradients held between steps."""
        inside_logical_batch = self._skipped_steps > 0
        buffer = self.grad_buffer
        if buffer is not None:
            buffer.check_clearable()
            if not inside_logical_batch:
                buffer.release() if set_to_none else buffer.zero()
        for p in self.params:
            p.grad_sample = None
            if not inside_logical_batch:
                p.summed_grad = None
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for module in self.modules:  # the buffer is zeroed above (or kept, inside a logical batch)
            module._zero_grad(set_to_none, buffers=buffer is None)
        self._needs_zero_grad = False
