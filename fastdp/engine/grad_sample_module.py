"""GradSampleModule: wraps a model so that one ``loss.backward()`` leaves clipped gradient sums.

The data flow of one DP step (see DESIGN.md), in this file's order:

1. ``__init__``: every submodule with parameters is routed (``capture.route``) under
   its layer rule, or the functorch fallback when it has none.
2. forward: each routed call records its inputs; its parameters are detached, so
   autograd will not form the non-private weight gradients.
3. backward: each call receives its output gradient (``_on_grad_output``); the
   first one queues ``_finish_backward`` to run when the backward ends.
4. ``_finish_backward``: per-sample squared norms from each call's rule → norms →
   clip factors (``clipping``) → each call's clipped sum, accumulated into
   ``p.grad``; the recorded activations are freed. With per-layer clipping, a call
   whose parameters are used once is clipped at step 3 already (``_clip_in_backward``),
   so its activations live no longer than in a non-private backward.
5. The optimizer (``DPOptimizer``) adds noise once, scales and steps.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections import Counter
from typing import Dict, List, Optional

import torch
from torch import nn

from ..losses import check_model_loss
from ..validators.errors import SampleMixingModuleError
from .capture import ModuleCall, route
from .clipping import PerLayerClipping
from . import rounding
from .rules import get_rule
from .rules.base import clipped_sum_of_grad_samples, outer_inner_product
from .rules.functorch import FUNCTORCH_RULE

MODES = ("bk", "hooks", "functorch")
MODE_ALIASES = {"ghost": "bk"}  # Opacus's ghost clipping is what "bk" does, in one backward

#: every live GradSampleModule, so that a DPOptimizer built by hand (Opacus's "under the hood" wiring)
#: finds and attaches the module(s) owning its parameters (``DPOptimizer.attach_owners``)
LIVE_MODULES: "weakref.WeakSet[GradSampleModule]" = weakref.WeakSet()


def check_loss_reduction(value) -> str:
    if value not in ("sum", "mean"):
        raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {value!r}")
    return value


def check_mode(value) -> str:
    value = MODE_ALIASES.get(value, value)
    if value not in MODES:
        raise ValueError(f"grad_sample_mode must be one of {MODES} (or 'ghost' = 'bk'), got {value!r}")
    return value


def _add_to_grad(param: nn.Parameter, grad: torch.Tensor) -> None:
    """Accumulate like autograd does: several backward passes (virtual steps) add up."""
    grad = grad.detach().to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class GradSampleModule(nn.Module):
    """Per-sample clipping in one backward pass.

    Modes: "bk" (book-keeping: per-sample norms without materialising per-sample
    gradients, clipped sums from each layer's rule), "hooks" (materialises
    ``p.grad_sample`` like Opacus; the reference), "functorch" (torch.func for every
    call it can split into samples; the DP recurrent/attention layers and EmbeddingBag's flat
    (input, offsets) form keep their exact rule). ``clipping`` is set by the optimizer; without one, a backward only
    computes ``per_sample_norms`` (and ``p.grad_sample`` in hooks/functorch mode), and
    ``accumulate_clipped_grads`` applies factors of your choice.
    """

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        mode: str = "bk",
        strict: bool = False,
        force_functorch: bool = False,
        clipping=None,
    ):
        super().__init__()
        LIVE_MODULES.add(self)
        if isinstance(m, GradSampleModule):
            raise ValueError("module is already a GradSampleModule; wrap the original module once")
        self._module = m
        self.batch_first = bool(batch_first)
        self.loss_reduction = check_loss_reduction(loss_reduction)
        self.mode = check_mode(mode)
        self.clipping = clipping
        self.per_sample_norms: Optional[torch.Tensor] = None
        self.backward_passes = 0  # backward passes since the last zero_grad / optimizer step
        self.skipped_samples = 0  # samples dropped for a non-finite gradient norm
        self._calls: List[ModuleCall] = []
        self._retained_step: Optional[_BackwardStep] = None
        self._finish_queued = False
        self._capturing = True
        self._unroutes = []
        #: a torch.amp.GradScaler whose scaled loss is backpropagated (set by make_private): norms are
        #: taken unscaled, clipped sums are left scaled for ``scaler.step``, and an overflow skips the step
        self.grad_scaler = None
        self._forward_batch_size: Optional[int] = None  # batch size of the last forward's inputs
        #: id(p) → how many captured calls used p since the last backward ended (per-layer clipping inside
        #: the backward needs each of a call's parameters used exactly once)
        self._forward_uses: Counter = Counter()
        self._inference_forward = False  # inside a forward of this module run without grad
        self._early: Optional[_EarlyClipping] = None  # what the calls clipped inside this backward left
        #: True: the step makes no host synchronisation (automatic while a CUDA graph is captured), so a
        #: whole DP step on fixed-shape (padded, masked) batches can be captured; non-finite samples are
        #: still dropped, but without a warning and without counting them in ``skipped_samples``
        self.sync_free = False
        force_functorch = force_functorch or self.mode == "functorch"
        for name, sub in m.named_modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                raise SampleMixingModuleError(
                    f"{name or 'model'} ({type(sub).__name__}) mixes the samples of a batch, so per-sample "
                    "clipping cannot bound them; use fastdp.ModuleValidator.fix(model) (BatchNorm → GroupNorm)"
                )
            params = list(sub.parameters(recurse=False))
            if not params:
                continue
            shared = _count_shared_with_submodules(sub, params)
            if shared == len(params):
                continue  # all also a submodule's own (BERT's MLM head bias is its decoder's): captured there, once
            if shared and any(p.requires_grad for p in params):
                raise ValueError(
                    f"{name} ({type(sub).__name__}) shares some of its parameters with one of its submodules, whose "
                    "per-sample gradients would be counted twice; untie them or register a rule for the submodule"
                )
            rule = get_rule(sub)
            if force_functorch and not (rule is not None and rule.captures_internally):  # torch.func cannot see inside those
                rule = FUNCTORCH_RULE
            if rule is None:
                if strict:
                    raise ValueError(
                        f"no fastdp rule for {name} ({type(sub).__name__}); register one with "
                        "fastdp.register_grad_sampler(...) or pass strict=False for the functorch fallback"
                    )
                rule = FUNCTORCH_RULE
            if any(p.requires_grad for p in params):
                rule.check(sub)
            self._unroutes.append(
                route(
                    sub, rule, functools.partial(self._is_capturing_call_of, sub), self._on_grad_output,
                    self._expand_shared_indices,
                )
            )
        for name, param in m.named_parameters():
            if param.requires_grad:  # routing means autograd never reaches a parameter; if it does, refuse
                self._unroutes.append(param.register_hook(functools.partial(_reject_direct_gradient, name)).remove)

    # -- plumbing -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self._forward_batch_size = _batch_size_of(args, kwargs, self.batch_first)
        self._inference_forward = not torch.is_grad_enabled()  # nothing in it reaches a backward
        try:
            output = self._module(*args, **kwargs)
        finally:
            self._inference_forward = False
        if kwargs.get("labels") is not None and getattr(output, "loss", None) is not None:
            check_model_loss(kwargs, self.loss_reduction)  # a Hugging Face model computed its own loss
        return output

    def _expand_shared_indices(self, args: tuple) -> tuple:
        """Index inputs ``[1, T, ...]`` shared by a batch of B > 1 (position ids that the model
        broadcasts over the batch) become ``[B, T, ...]``: the output is the same after broadcasting,
        and each sample's part of the gradient stays its own instead of being summed over the batch."""
        batch = self._forward_batch_size
        dim = 0 if self.batch_first else 1
        if not args or batch is None or batch <= 1:
            return args
        first = args[0]
        if not isinstance(first, torch.Tensor) or first.is_floating_point() or first.is_complex() or first.dim() < 2:
            return args
        if first.shape[dim] != 1:
            return args
        return (first.expand(*first.shape[:dim], batch, *first.shape[dim + 1 :]), *args[1:])

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("_module"), name)

    def to_standard_module(self) -> nn.Module:
        """Undo the routing and return the wrapped module."""
        for unroute in self._unroutes:
            unroute()
        self._unroutes = []
        return self._module

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for p in self.parameters():
            p.grad_sample = None
        self._retained_step = None
        self.backward_passes = 0

    # -- Opacus API: hooks and per-sample attributes ------------------------------------------
    def remove_hooks(self) -> None:
        """Undo the routing (the model computes plain, non-private gradients again); keeps the wrapper."""
        self.to_standard_module()

    def set_grad_sample_to_none(self) -> None:
        for p in self.parameters():
            p.grad_sample = None

    def del_grad_sample(self) -> None:
        for p in self.parameters():
            if hasattr(p, "grad_sample"):
                del p.grad_sample

    def cleanup(self) -> None:
        """Remove the routing and every attribute fastdp or Opacus code set on the parameters."""
        self.remove_hooks()
        for p in self.parameters():
            for attr in ("grad_sample", "summed_grad", "_norm_sample", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)

    # -- Opacus API: gradient accumulation ------------------------------------------------------
    #: several backward passes before one optimizer step are several batches of distinct samples
    #: (Opacus semantics: the optimizer counts them in ``accumulated_iterations``); make_private
    #: forbids it under Poisson sampling, where one step is one sampled batch
    grad_accumulation_allowed = True

    def forbid_grad_accumulation(self) -> None:
        """Refuse a second batch before the optimizer step: its forward (with grad) after a backward raises,
        as does the step (Opacus raises at the second backward)."""
        self.grad_accumulation_allowed = False
        if getattr(self, "_accumulation_check", None) is None:
            self._accumulation_check = self.register_forward_pre_hook(_refuse_accumulation)

    def allow_grad_accumulation(self) -> None:
        """Accept several backward passes (distinct batches) per optimizer step."""
        self.grad_accumulation_allowed = True
        if getattr(self, "_accumulation_check", None) is not None:
            self._accumulation_check.remove()
            self._accumulation_check = None

    # -- Opacus API: switching the capture off and on ------------------------------------------
    @property
    def hooks_enabled(self) -> bool:
        return self._capturing

    def disable_hooks(self) -> None:
        """Stop capturing until ``enable_hooks()``: forwards run the plain layers (no recorded activations).
        A backward reaching a parameter then raises, as fastdp never lets a non-private gradient into
        ``p.grad``; ``to_standard_module()`` / ``cleanup()`` give a plain model for non-private training."""
        self._capturing = False

    def enable_hooks(self) -> None:
        self._capturing = True

    def _is_capturing(self) -> bool:
        return self._capturing

    def _is_capturing_call_of(self, module: nn.Module) -> bool:
        """Asked by every call of a routed module with trainable parameters: counts their uses.

        A call made without grad inside a training forward counts as two uses: reentrant activation
        checkpointing runs it again, with grad, in the middle of the backward."""
        if self._capturing and not self._inference_forward:
            weight = 1 if torch.is_grad_enabled() else 2
            for param in module.parameters(recurse=False):
                if param.requires_grad:
                    self._forward_uses[id(param)] += weight
        return self._capturing

    # -- backward ---------------------------------------------------------------------------
    def _on_grad_output(self, call: ModuleCall, grad_output: torch.Tensor) -> None:
        call.grad_output = grad_output.detach()
        if self._early is not None and any(id(p) in self._early.params for p in call.params.values()):
            raise RuntimeError(
                f"{type(call.module).__name__} was used again after its per-layer clipped gradient was formed in "
                "this backward; please report this (a forward the engine did not see ran during the backward)"
            )
        if self._clips_in_backward(call):
            self._clip_in_backward(call)
        else:
            self._calls.append(call)
        if not self._finish_queued:
            self._finish_queued = True
            self._queue_finish()

    def _queue_finish(self) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _finish_backward(self) -> None:
        node = torch._C._current_autograd_node()
        if node is not None:
            # The end of a backward nested in a node of an outer one (reentrant checkpointing): the outer
            # backward still has calls to deliver, so finish with it (this node's hook runs in the outer).
            node.register_hook(lambda grad_inputs, grad_outputs: self._queue_finish())
            return
        self._finish_queued = False
        calls, self._calls = self._calls, []
        early, self._early = self._early, None
        self._forward_uses.clear()
        if not calls and early is None:
            return
        self._capturing = False  # the functorch fallback runs forwards of its own
        try:
            self._process(calls, early)
        finally:
            self._capturing = True
        self.backward_passes += 1

    # -- per-layer clipping inside the backward ------------------------------------------------
    def _clips_in_backward(self, call: ModuleCall) -> bool:
        """Per-layer clipping needs only this call's own norms when each of its parameters is used once
        (counted in the forward); shared parameters, hooks mode and other policies wait for the end.
        FSDP's per-layer policy (a subclass) and internally captured layers (several calls per forward
        call, not counted per parameter) wait too."""
        if self.mode != "bk" or type(self.clipping) is not PerLayerClipping or call.rule.captures_internally:
            return False
        return all(self._forward_uses[id(p)] == 1 for p in call.params.values())

    def _clip_in_backward(self, call: ModuleCall) -> None:
        """Norms, per-layer factors and the clipped sum of one call, now; its activations are then freed."""
        self._batch_first(call)
        self._capturing = False  # the functorch fallback runs forwards of its own
        try:
            step = _BackwardStep(
                [call], materialise_all=False, mean=self.loss_reduction == "mean", loss_scale=self._loss_scale()
            )
            early = self._early
            if early is None:
                early = self._early = _EarlyClipping(step.batch_size, step.device)
            _check_batch_sizes({early.batch_size, step.batch_size})
            norm_sq = step.total_norm_sq()
            early.norm_sq += norm_sq
            early.params.update(id(p) for p in call.params.values())
            # A sample with a non-finite norm here is left out of this call's clipped sums (each parameter
            # clips alone, so the others still bound it); the end of the backward counts it once.
            bad = ~torch.isfinite(norm_sq)
            if self._loss_scale() is not None:
                if early.overflow or bad.any():
                    early.overflow = True  # the scaler must see inf (see _accumulate); the step is skipped
                    step.mark_overflow()
                    return
            elif self.sync_free or _capturing_cuda_graph(bad) or bad.any():
                step.drop_samples(bad)
            step.accumulate_clipped(self.clipping.factors_by_param(step.norm_sq, norm_sq.sqrt()))
        finally:
            self._capturing = True
            call.inputs = call.grad_output = None  # the activations go now, not at the end of the backward

    def _batch_first(self, call: ModuleCall) -> None:
        if not self.batch_first and not call.batch_first:
            call.inputs = tuple(
                x.movedim(1, 0) if isinstance(x, torch.Tensor) and x.dim() >= 2 else x for x in call.inputs
            )
            call.grad_output = call.grad_output.movedim(1, 0)

    def _process(self, calls: List[ModuleCall], early: Optional["_EarlyClipping"] = None) -> None:
        """The end of a backward: every call not clipped inside it (``early``: what those left)."""
        if not calls:  # every call was clipped inside the backward: count its non-finite samples
            self.per_sample_norms = early.norm_sq.sqrt()
            if not early.overflow:
                self._count_skipped(~torch.isfinite(self.per_sample_norms))
            return
        for call in calls:
            self._batch_first(call)
        step = _BackwardStep(
            calls, materialise_all=self.mode != "bk", mean=self.loss_reduction == "mean", loss_scale=self._loss_scale()
        )
        total = step.total_norm_sq()
        if early is not None:
            _check_batch_sizes({early.batch_size, step.batch_size})
            total += early.norm_sq  # samples non-finite in a layer clipped early are left out here too
        self.per_sample_norms = total.sqrt()
        if self.mode != "bk":
            for param, grads in step.materialised.values():
                previous = getattr(param, "grad_sample", None)
                param.grad_sample = grads if previous is None else previous + grads
        if self.clipping is None:
            self._retained_step = step
            return
        self._accumulate(step, self.clipping.factors_by_param(step.norm_sq, self.per_sample_norms))

    def accumulate_clipped_grads(self, clip_factors: torch.Tensor) -> None:
        """Add ``sum_i c_i g_i`` to ``p.grad`` for the last backward (only when no ``clipping`` is set)."""
        if self._retained_step is None:
            raise ValueError("no backward to clip: call loss.backward() first (with no clipping policy set)")
        step, self._retained_step = self._retained_step, None
        self._accumulate(step, {key: clip_factors for key in step.norm_sq})

    def _loss_scale(self):
        """The GradScaler's current scale S (a tensor), or None when no scaler is attached/enabled."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = scaler._get_scale_async()  # the scale tensor, without a device sync
        if scale is None:
            raise ValueError("grad_scaler has no scale yet: backpropagate grad_scaler.scale(loss), not loss")
        return scale

    def _accumulate(self, step: "_BackwardStep", factors: Dict[int, torch.Tensor]) -> None:
        bad = ~torch.isfinite(self.per_sample_norms)
        if self._loss_scale() is not None and bad.any():
            # fp16 overflow under a GradScaler: the scaler must see it (inf grads) to skip the step and
            # lower its scale; the optimizer step, and so the accountant, then never runs.
            step.mark_overflow()
            return
        if self.sync_free or _capturing_cuda_graph(bad):
            step.drop_samples(bad)  # branch-free, no host sync: zeroes nothing when every norm is finite
        elif self._count_skipped(bad):
            step.drop_samples(bad)
        step.accumulate_clipped(factors)

    def _count_skipped(self, bad: torch.Tensor) -> bool:
        """Count and report the samples with a non-finite norm (a host sync, skipped when sync-free)."""
        if self.sync_free or _capturing_cuda_graph(bad) or not bad.any():
            return False
        count = int(bad.sum())
        self.skipped_samples += count
        warnings.warn(
            f"{count} sample(s) had a non-finite gradient norm (inf/NaN, or above ~1.8e19 in float32) "
            "and were left out of this step's sum (counted in GradSampleModule.skipped_samples)",
            RuntimeWarning,
        )
        return True


class _EarlyClipping:
    """What the calls clipped inside one backward (per-layer clipping) leave for its end: their
    per-sample squared norms (for ``per_sample_norms`` and the count of non-finite samples), their
    parameters (which no later call of this backward may use), and whether a GradScaler overflowed."""

    def __init__(self, batch_size: int, device: torch.device):
        self.batch_size = batch_size
        self.norm_sq = torch.zeros(batch_size, dtype=torch.float32, device=device)
        self.params: set = set()
        self.overflow = False


class _BackwardStep:
    """One backward's calls: those whose rules give norms and clipped sums, and materialised parameters.

    A parameter used by several calls (weight tying, a module called twice) has the sum over its
    uses as per-sample gradient, whose norm is not the sum of the parts' norms:
    ``||sum_u G^(u)||² = sum_u ||G^(u)||² + 2 sum_{u<v} <G^(u), G^(v)>``. When every use's rule
    gives its gradient as outer products (``LayerRule.outer_factors``: linear, embedding, HF Conv1D),
    the cross terms come from cross Grams and each use's clipped sum from its rule, with the
    parameter's one clip factor per sample (a sum of the uses' clipped parts: exact). Otherwise the
    parameter's per-sample gradients are materialised and summed (exact; no use is ever dropped).
    In "hooks" and "functorch" modes every parameter is materialised, and in any mode where the
    rule finds that cheaper for a parameter used once (``LayerRule.prefers_grad_sample``).
    """

    def __init__(self, calls: List[ModuleCall], *, materialise_all: bool, mean: bool, loss_scale=None):
        batch_sizes = {call.grad_output.shape[0] for call in calls}
        _check_batch_sizes(batch_sizes)
        self.batch_size = batch_sizes.pop()
        # With a mean loss each output gradient carries 1/B; per-sample gradients are B times it.
        self.scale = float(self.batch_size) if mean else 1.0
        # A GradScaler's S multiplies every output gradient: norms are divided by it, clipped sums keep it.
        self.loss_scale = loss_scale
        self.device = calls[0].grad_output.device
        self.rule_calls: List[ModuleCall] = []
        self.materialised: Dict[int, tuple] = {}  # id(p) -> (p, per-sample grads summed over its calls)
        materialised_calls, cross_factors = _split_calls(calls, materialise_all)
        for call in calls:
            if id(call) not in materialised_calls:
                self.rule_calls.append(call)
                continue
            for name, grads in call.rule.grad_sample(call.module, call.inputs, call.grad_output).items():
                param = call.params[name]
                grads = grads * self.scale
                if id(param) in self.materialised:
                    grads = self.materialised[id(param)][1] + grads
                self.materialised[id(param)] = (param, grads)
        self.norm_sq = self._norm_sq_by_param(cross_factors)

    def total_norm_sq(self) -> torch.Tensor:
        """Each sample's squared norm over all of this step's parameters, float32 [B]."""
        total = torch.zeros(self.batch_size, dtype=torch.float32, device=self.device)
        for norm_sq in self.norm_sq.values():
            total += norm_sq
        return total

    def _norm_sq_by_param(self, cross_factors: Dict[int, list]) -> Dict[int, torch.Tensor]:
        """id(p) → each sample's squared gradient norm for p, ``[B]`` float32; ``cross_factors`` (id(p) →
        the outer factors of each use of a shared parameter) add the cross terms of the uses."""
        norm_sq, slack = {}, {}
        for call in self.rule_calls:
            with rounding.ieee_fp32():
                call_norm_sq = call.rule.norm_sq_per_param(call.module, call.inputs, call.grad_output)
            for name, value in call_norm_sq.items():
                key = id(call.params[name])
                value = value * self.scale**2
                norm_sq[key] = norm_sq[key] + value if key in norm_sq else value
            for name, value in call.rule.rounding_slack(call.module, call.inputs, call.grad_output).items():
                key = id(call.params[name])
                value = value * self.scale
                slack[key] = slack[key] + value if key in slack else value
        for key, uses in cross_factors.items():
            with rounding.ieee_fp32():
                cross = sum(
                    outer_inner_product(uses[u], uses[v]) for u in range(len(uses)) for v in range(u + 1, len(uses))
                )
            # ||sum of uses||² >= 0; rounding may take a cancelling sum below 0 (clamp keeps NaN as NaN)
            norm_sq[key] = (norm_sq[key] + 2 * self.scale**2 * cross).clamp(min=0).float()
        for key, (_, grads) in self.materialised.items():
            norm_sq[key] = grads.flatten(1).float().square().sum(1)
        for key, value in slack.items():  # clip what is computed: ‖G_i‖ + its rounding bound (engine/rounding.py)
            norm_sq[key] = (norm_sq[key].sqrt() + value).square()
        if self.loss_scale is not None:
            norm_sq = {key: value / self.loss_scale.float().square() for key, value in norm_sq.items()}
        return norm_sq

    def mark_overflow(self) -> None:
        """Leave inf in every parameter's gradient, so GradScaler.step skips the step."""
        params = [p for call in self.rule_calls for p in call.params.values()]
        params += [p for p, _ in self.materialised.values()]
        for param in {id(p): p for p in params}.values():
            param.grad = torch.full_like(param, float("inf"))

    def drop_samples(self, rows: torch.Tensor) -> None:
        """Zero the given samples everywhere (c = 0 alone is not enough: 0 * inf is NaN)."""
        for call in self.rule_calls:
            call.grad_output = _zero_rows(call.grad_output, rows)
            call.inputs = tuple(_zero_rows(x, rows) for x in call.inputs)
        self.materialised = {k: (p, _zero_rows(g, rows)) for k, (p, g) in self.materialised.items()}

    def accumulate_clipped(self, factors: Dict[int, torch.Tensor]) -> None:
        """Add each parameter's ``sum_i c_{i,p} g_{i,p}`` to ``p.grad`` (factors keyed by id(p))."""
        for call in self.rule_calls:
            call_factors = {name: factors[id(p)] * self.scale for name, p in call.params.items()}
            clipped = call.rule.clipped_grad(call.module, call.inputs, call.grad_output, call_factors)
            for name, grad in clipped.items():
                _add_to_grad(call.params[name], grad)
        for key, (param, grads) in self.materialised.items():
            _add_to_grad(param, clipped_sum_of_grad_samples(factors[key], grads))


def _split_calls(calls: List[ModuleCall], materialise_all: bool):
    """Which calls materialise their per-sample gradients (a set of id(call)), and the outer factors of
    each use of every shared parameter handled by cross terms (id(p) → list over its uses).

    A shared parameter takes cross terms when every one of its uses provides outer factors; any
    other shared parameter is materialised in all of its calls, and a materialised call
    materialises all its parameters, which may in turn take a shared parameter off cross terms.
    """
    if materialise_all:
        return {id(call) for call in calls}, {}
    uses: Dict[int, list] = {}
    for call in calls:
        for name, param in call.params.items():
            uses.setdefault(id(param), []).append((call, name))
    shared = {key for key, use in uses.items() if len(use) > 1}
    factors = {}  # id(call) -> that call's outer factors, asked only of calls with a shared parameter
    for call in calls:
        if any(id(p) in shared for p in call.params.values()):
            factors[id(call)] = call.rule.outer_factors(call.module, call.inputs, call.grad_output)
    crossed = {key for key in shared if all(name in factors[id(call)] for call, name in uses[key])}
    materialised = set()
    for call in calls:
        keys = [id(p) for p in call.params.values()]
        if any(key in shared and key not in crossed for key in keys):
            materialised.add(id(call))
        elif not any(key in shared for key in keys) and call.rule.prefers_grad_sample(
            call.module, call.inputs, call.grad_output
        ):
            materialised.add(id(call))
    changed = True
    while changed:  # a materialised call takes its shared parameters off cross terms, in all their calls
        changed = False
        for key in list(crossed):
            if any(id(call) in materialised for call, _ in uses[key]):
                crossed.discard(key)
                materialised.update(id(call) for call, _ in uses[key])
                changed = True
    cross_factors = {key: [factors[id(call)][name] for call, name in uses[key]] for key in crossed}
    return materialised, cross_factors


def _refuse_accumulation(module: "GradSampleModule", args) -> None:
    if module.backward_passes >= 1 and torch.is_grad_enabled() and not module.grad_accumulation_allowed:
        raise ValueError(
            "a new batch reached the model after a backward pass without an optimizer step, but Poisson sampling "
            "is not compatible with gradient accumulation (each logical batch is one sampled step); call "
            "optimizer.step() and zero_grad() after every batch, or split large batches with "
            "fastdp.BatchMemoryManager"
        )


def _check_batch_sizes(batch_sizes: set) -> None:
    if len(batch_sizes) != 1:
        raise ValueError(
            f"layers saw different batch sizes in one backward ({sorted(batch_sizes)}); check batch_first, "
            "and pass inputs that the model broadcasts over the batch (shape [1, ...]) with one row per sample"
        )


def _count_shared_with_submodules(module: nn.Module, params: List[nn.Parameter]) -> int:
    nested = {id(p) for child in module.children() for p in child.parameters()}
    return sum(id(p) in nested for p in params)


def _capturing_cuda_graph(like: torch.Tensor) -> bool:
    return like.is_cuda and torch.cuda.is_current_stream_capturing()


def _reject_direct_gradient(name: str, grad: Optional[torch.Tensor]):
    if grad is None:  # the capture hands the parameter no gradient (autograd still calls the hook)
        return None
    raise ValueError(
        f"parameter {name} received a gradient outside the engine's capture: it is used directly by another "
        "module's forward (a ParameterDict, a tied tensor read as an attribute, ...), which would add its "
        "non-private gradient; compute with it inside its own module, or register a rule for the module using it"
    )


def _batch_size_of(args: tuple, kwargs: dict, batch_first: bool) -> Optional[int]:
    """The batch size of a forward's first tensor argument (positional first, then keyword)."""
    dim = 0 if batch_first else 1
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > dim:
            return value.shape[dim]
    return None


def _zero_rows(x, rows: torch.Tensor):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 or x.shape[0] != rows.shape[0]:
        return x
    return torch.where(rows.view(-1, *([1] * (x.dim() - 1))), torch.zeros((), dtype=x.dtype, device=x.device), x)
