"""GradSampleModule: wraps a model so that one ``loss.backward()`` leaves clipped gradient sums.

The data flow of one DP step (see DESIGN.md), in this file's order:

1. ``__init__``: every submodule with parameters is routed (``capture.route``) under
   its layer rule, or the functorch fallback when it has none.
2. forward: each routed call records its inputs; its parameters are detached, so
   autograd will not form the non-private weight gradients.
   Each call's rows are checked to be the samples of the forward it belongs to
   (``_register_call``); several forwards before one backward are distinct samples.
3. backward: each call receives its output gradient (``_on_grad_output``); the
   first one queues ``_finish_backward`` to run when the backward ends. A call whose
   parameters are used once is reduced there already (``_reduce_in_backward``): its
   rule's norm bounds are computed (so no Gram matrix outlives the layer's backward), or,
   where the rule finds that cheaper, its per-sample gradients are formed and its
   (inputs, output gradient) dropped. With per-layer clipping such a call is clipped there
   (``_clip_in_backward``): nothing of it outlives its backward.
4. ``_finish_backward``: per forward, per-sample upper bounds of the squared norms from
   each call's rule (``fastdp.ops.rounding``: every norm bounds the contribution as
   computed; shared parameters' cross terms here) → norms → clip factors (``clipping``) →
   each call's clipped sum, added in place into the parameter's gradient (its view of the
   optimizer's gradient buffer, ``_grad_target``); each call's activations are freed the
   moment its clipped sum is formed.
5. The optimizer (``DPOptimizer``) adds noise once, in place, scales and steps.
"""

from __future__ import annotations

import collections
import functools
import warnings
import weakref
from collections import Counter
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..losses import check_model_loss
from ..ops import rounding
from ..validators.errors import SampleMixingModuleError
from .capture import ModuleCall, route
from .clipping import PerLayerClipping
from .rules import get_rule, qualified_name
from .rules.base import add_clipped_sum_of_grad_samples, outer_inner_product, zero_rows
from .rules.functorch import FUNCTORCH_RULE, FUNCTORCH_RULE_BATCH_SECOND

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


#: Hugging Face models compute their own loss from ``labels=``; found by class name (no import)
HF_PRETRAINED_MODEL = "transformers.modeling_utils.PreTrainedModel"
_FALLBACK_WARNED: set = set()  # layer types already reported as running the torch.func fallback
ROWS_FIX = (
    "keep the batch dimension through every trainable layer (for inputs shared by the batch, index them per "
    "sample, e.g. emb(ids.expand(B, -1)), rather than broadcasting the layer's output), freeze the layer "
    "(requires_grad=False), or register a rule that maps its rows to samples"
)


class _GradSamplersAttribute:
    """``GradSampleModule.GRAD_SAMPLERS``, Opacus's class-level registry of per-sample gradient functions,
    backed by the layer rules (``fastdp.grad_sample.samplers``); made on first access."""

    def __get__(self, obj, owner):
        from ..grad_sample.samplers import GradSamplers

        registry = GradSamplers()
        setattr(GradSampleModule, "GRAD_SAMPLERS", registry)
        return registry


class _Forward:
    """One top-level forward of the wrapped model: its captured calls' rows are its ``batch_size`` samples.
    Calls of different forwards are different samples, even when one backward reaches them all."""

    __slots__ = ("batch_size",)

    def __init__(self, batch_size: Optional[int]):
        self.batch_size = batch_size


class GradSampleModule(nn.Module):
    """Per-sample clipping in one backward pass.

    Modes: "bk" (book-keeping: per-sample norms without materialising per-sample
    gradients, clipped sums from each layer's rule), "hooks" (materialises
    ``p.grad_sample`` like Opacus; the reference), "functorch" (torch.func for every
    call it can split into samples; the DP recurrent/attention layers and EmbeddingBag's flat
    (input, offsets) form keep their exact rule). ``clipping`` is set by the optimizer; without one, a backward only
    computes ``per_sample_norms`` (and ``p.grad_sample`` in hooks/functorch mode), and
    ``accumulate_clipped_grads`` applies factors of your choice.

    Samples: the batch dimension of the wrapped model's first tensor argument is the batch of a
    forward, and every trainable layer call must keep it (its rows are that forward's samples, or
    the call is refused). Several forwards before one backward are distinct samples, in order; in
    hooks mode, so are several backward passes before ``zero_grad`` (``p.grad_sample`` grows).
    """

    GRAD_SAMPLERS = _GradSamplersAttribute()

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
        self._retained_steps: Optional[List[_BackwardStep]] = None
        self._finish_queued = False
        self._capturing = True
        self._unroutes = []
        #: a torch.amp.GradScaler whose scaled loss is backpropagated (set by make_private): norms are
        #: taken unscaled, clipped sums are left scaled for ``scaler.step``, and an overflow skips the step
        self.grad_scaler = None
        self._forward: Optional[_Forward] = None  # the latest forward: new calls belong to it
        #: id(module) → the forwards in which it ran without grad (reentrant checkpointing recomputes those
        #: calls inside the backward, where they must be attributed to their own forward's samples)
        self._recompute_owners: Dict[int, collections.deque] = {}
        #: id(p) → how many captured calls used p since the last backward ended (per-layer clipping inside
        #: the backward needs each of a call's parameters used exactly once)
        self._forward_uses: Counter = Counter()
        self._inference_forward = False  # inside a forward of this module run without grad
        self._early: Optional[_EarlyClipping] = None  # what the calls clipped inside this backward left
        #: True: the step makes no host synchronisation (automatic while a CUDA graph is captured), so a
        #: whole DP step on fixed-shape (padded, masked) batches can be captured; non-finite samples are
        #: still dropped, but without a warning and without counting them in ``skipped_samples``
        self.sync_free = False
        #: the attached optimizers' gradient buffers (``DPOptimizer.attach``): clipped sums go into their views
        self.grad_buffers: list = []
        self._names: Dict[int, str] = {}  # id(submodule) -> its name in the model, for error messages
        self._plain_autograd = False  # see _reject_direct_gradient
        force_functorch = force_functorch or self.mode == "functorch"
        fallback = FUNCTORCH_RULE if self.batch_first else FUNCTORCH_RULE_BATCH_SECOND
        for name, sub in m.named_modules():
            self._names[id(sub)] = name or "model"
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                raise SampleMixingModuleError(
                    f"{name or 'model'} ({type(sub).__name__}) mixes the samples of a batch, so per-sample "
                    "clipping cannot bound them; use fastdp.ModuleValidator.fix(model) (BatchNorm → GroupNorm)"
                )
            if any(qualified_name(cls) == HF_PRETRAINED_MODEL for cls in type(sub).__mro__):
                hook = sub.register_forward_hook(self._check_model_loss, with_kwargs=True)
                self._unroutes.append(hook.remove)
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
                rule = fallback
            if rule is None:
                if strict:
                    raise ValueError(
                        f"no fastdp rule for {name} ({type(sub).__name__}); register one with "
                        "fastdp.register_grad_sampler(...) or pass strict=False for the functorch fallback"
                    )
                if any(p.requires_grad for p in params) and type(sub) not in _FALLBACK_WARNED:
                    _FALLBACK_WARNED.add(type(sub))
                    warnings.warn(
                        f"no fastdp rule for {type(sub).__name__} ({name}): its per-sample gradients come from the "
                        "torch.func fallback (exact, but slower and materialised); register a rule "
                        "(fastdp.register_grad_sampler / register_rule), or pass strict=True to refuse",
                        UserWarning, stacklevel=2,
                    )
                rule = fallback
            if any(p.requires_grad for p in params):
                rule.check(sub)
            self._unroutes.append(
                route(
                    sub, rule, functools.partial(self._is_capturing_call_of, sub), self._on_grad_output,
                    self._expand_shared_indices, self._register_call,
                )
            )
        for name, param in m.named_parameters():
            if param.requires_grad:  # routing means autograd never reaches a parameter; if it does, refuse
                self._unroutes.append(param.register_hook(functools.partial(self._reject_direct_gradient, name)).remove)

    # -- plumbing -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self._begin_forward(args, kwargs)
        try:
            return self._module(*args, **kwargs)
        finally:
            self._end_forward()

    def _begin_forward(self, args: tuple, kwargs: dict) -> None:
        """A top-level forward begins (also called by ``GradSampleHooks``, which trains the model unwrapped):
        the batch of its first tensor argument is the samples of every call it makes."""
        self._inference_forward = not torch.is_grad_enabled()  # nothing in it reaches a backward
        if not self._inference_forward:
            rule = get_rule(self._module)  # a single layer as the model may count its samples itself
            batch_size = None if rule is None else rule.batch_size(self._module, args, kwargs)
            self._forward = _Forward(batch_size if batch_size is not None else _batch_size_of(args, kwargs, self.batch_first))

    def _end_forward(self) -> None:
        self._inference_forward = False

    def _check_model_loss(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Forward hook of every Hugging Face model in the tree: a loss it computed from ``labels=``
        must not couple samples (``fastdp.losses.check_model_loss``)."""
        if kwargs.get("labels") is not None and getattr(output, "loss", None) is not None and torch.is_grad_enabled():
            check_model_loss(kwargs, self.loss_reduction)

    def _register_call(self, call: ModuleCall, captured: torch.Tensor) -> None:
        """Map a new call's rows to the samples of the current forward, or refuse it: rows that are not
        samples (a layer run on the tokens of the whole batch flattened, on inputs shared by the batch and
        broadcast after it, or on parameters alone) would be clipped one by one and bound no sample."""
        forward = self._forward
        if torch._C._current_autograd_node() is not None:  # recomputed inside the backward (checkpointing)
            owners = self._recompute_owners.get(id(call.module))
            if not owners:  # non-reentrant checkpointing: its recomputed graph is never backpropagated
                return
            forward = owners.popleft()
        if forward is None:  # a submodule called outside this module's forward: a batch of its own
            forward = self._forward = _Forward(None)
        dim = 0 if self.batch_first or call.batch_first else 1
        rows = captured.shape[dim] if captured.dim() > dim else None
        if not call.batch_first and not any(isinstance(x, torch.Tensor) for x in call.inputs):
            raise ValueError(
                f"{self._layer_name(call)} computes a trainable tensor from its parameters alone (no input rows, e.g. "
                "a parametrization such as weight_norm), so no sample's share of its gradient can be told apart; "
                "remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) or " + ROWS_FIX
            )
        if forward.batch_size is None:
            forward.batch_size = rows
        elif rows != forward.batch_size:
            which = "first" if dim == 0 else "second (batch_first=False)"
            raise ValueError(
                f"{self._layer_name(call)} was called on a tensor whose {which} dimension is {rows}, but the batch has "
                f"{forward.batch_size} samples (the model's first tensor argument): its rows are not samples, "
                f"and clipping them would bound no sample's contribution; {ROWS_FIX}"
            )
        call.forward = forward

    def _layer_name(self, call: ModuleCall) -> str:
        return f"{self._names.get(id(call.module), 'a layer')} ({type(call.module).__name__})"

    def _expand_shared_indices(self, args: tuple) -> tuple:
        """Index inputs ``[1, T, ...]`` shared by a batch of B > 1 (position ids that the model
        broadcasts over the batch) become ``[B, T, ...]``: the output is the same after broadcasting,
        and each sample's part of the gradient stays its own instead of being summed over the batch."""
        batch = None if self._forward is None else self._forward.batch_size
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
        """Clear the gradients (``p.grad``: None, or zeros with ``set_to_none=False``), ``p.grad_sample`` and
        the engine's per-backward state. Parameters whose gradients live in an optimizer's buffer have their
        part of it zeroed (kept, never freed), except inside a logical batch (BatchMemoryManager), whose
        partial sum the optimizer keeps."""
        self._zero_grad(set_to_none, buffers=True)

    def _zero_grad(self, set_to_none: bool, *, buffers: bool) -> None:
        """``zero_grad``; ``buffers=False``: the optimizer zeroes its buffers itself (DPOptimizer.zero_grad)."""
        super().zero_grad(set_to_none=set_to_none)
        for p in self.parameters():
            p.grad_sample = None
        if buffers:
            for buffer in self.grad_buffers:
                if not buffer.allocated:
                    continue
                buffer.check_clearable()
                if not buffer.logical_batch_open:
                    buffer.zero_views(self.parameters())
        self._retained_steps = None
        self.backward_passes = 0

    def _grad_target(self, param: nn.Parameter) -> torch.Tensor:
        """The tensor ``param``'s clipped sums are added into, in place: its view of an attached optimizer's
        gradient buffer (``p.grad`` then is that view, when of the parameter's dtype), else ``p.grad``
        (zeros when None). Several backward passes add up, as autograd's gradients do."""
        for buffer in self.grad_buffers:
            if param not in buffer:
                continue
            buffer.pending = True
            view = buffer.take_grad(param)  # a gradient set by hand adds up, as it did in p.grad
            if param.dtype == view.dtype:
                param.grad = view
            return view
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        return param.grad

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

    def _reject_direct_gradient(self, name: str, grad: Optional[torch.Tensor]):
        """A parameter's autograd gradient is non-private, so it is refused, also while the capture is off
        (``disable_hooks``); only ``fastdp.check_sample_independence``'s private copy, which is never
        trained, lets plain autograd through (``_plain_autograd``)."""
        return None if self._plain_autograd else _reject_direct_gradient(name, grad)

    def _is_capturing_call_of(self, module: nn.Module) -> bool:
        """Asked by every call of a routed module with trainable parameters: counts their uses.

        A call made without grad inside a training forward counts as two uses: reentrant activation
        checkpointing runs it again, with grad, in the middle of the backward."""
        if self._capturing and not self._inference_forward:
            weight = 1 if torch.is_grad_enabled() else 2
            if weight == 2:
                self._recompute_owners.setdefault(id(module), collections.deque()).append(self._forward)
            for param in module.parameters(recurse=False):
                if param.requires_grad:
                    self._forward_uses[id(param)] += weight
        return self._capturing

    # -- backward ---------------------------------------------------------------------------
    def _on_grad_output(self, call: ModuleCall, grad_output: torch.Tensor) -> None:
        if call.forward is None:
            raise RuntimeError(
                f"{type(call.module).__name__}, recomputed inside the backward, received a gradient whose rows fastdp "
                "cannot attribute to a forward's samples; please report this (use_reentrant=True checkpointing works)"
            )
        call.grad_output = grad_output.detach()
        self._batch_first(call)
        call.rows, call.device = call.grad_output.shape[0], call.grad_output.device
        if self._early is not None and any(id(p) in self._early.params for p in call.params.values()):
            raise RuntimeError(
                f"{type(call.module).__name__} was used again after its per-layer clipped gradient was formed in "
                "this backward; please report this (a forward the engine did not see ran during the backward)"
            )
        if self._clips_in_backward(call):
            self._clip_in_backward(call)
        else:
            if self._used_once(call):
                self._reduce_in_backward(call)
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
        self._recompute_owners.clear()
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

    # -- work done inside the backward -----------------------------------------------------------
    def _used_once(self, call: ModuleCall) -> bool:
        """Whether each of the call's parameters is used by this call alone in this backward (counted in the
        forward): then its norms need no other call's factors (no cross terms). Internally captured layers
        (several calls per forward call, not counted per parameter) wait for the end."""
        return not call.rule.captures_internally and all(self._forward_uses[id(p)] == 1 for p in call.params.values())

    def _reduce_in_backward(self, call: ModuleCall) -> None:
        """What the end of the backward needs of a call used once, computed now: its rule's norm bounds and
        clipped-sum slack (the same ``norm_bounds`` the end would call; the call keeps its inputs and output
        gradient for the clipped sum), or its per-sample gradients (hooks/functorch modes, or where the rule
        prefers them; its inputs and output gradient are then dropped)."""
        self._capturing = False  # the functorch fallback runs forwards of its own
        try:
            rule = call.rule
            if self.mode != "bk" or rule.prefers_grad_sample(call.module, call.inputs, call.grad_output):
                call.grad_samples = rule.grad_sample(call.module, call.inputs, call.grad_output)
                call.inputs = call.grad_output = None
            else:
                call.norm_parts = rule.norm_bounds(call.module, call.inputs, call.grad_output)
        finally:
            self._capturing = True

    def _clips_in_backward(self, call: ModuleCall) -> bool:
        """Per-layer clipping needs only this call's own norms when each of its parameters is used once
        (counted in the forward); shared parameters, hooks mode and other policies wait for the end.
        FSDP's per-layer policy (a subclass) and internally captured layers wait too."""
        if self.mode != "bk" or type(self.clipping) is not PerLayerClipping:
            return False
        return self._used_once(call)

    def _clip_in_backward(self, call: ModuleCall) -> None:
        """Norms, per-layer factors and the clipped sum of one call, now; its activations are then freed."""
        self._capturing = False  # the functorch fallback runs forwards of its own
        try:
            step = _BackwardStep(
                [call], materialise_all=False, mean=self.loss_reduction == "mean", loss_scale=self._loss_scale()
            )
            early = self._early
            if early is None:
                early = self._early = _EarlyClipping()
            norm_sq = step.total_norm_sq()
            early.add(call.forward, norm_sq)
            early.params.update(id(p) for p in call.params.values())
            # A sample with a non-finite norm here is left out of this call's clipped sums (each parameter
            # clips alone, so the others still bound it); the end of the backward counts it once.
            bad = ~torch.isfinite(norm_sq)
            drop = None
            if self._loss_scale() is not None:
                if early.overflow or bad.any():
                    early.overflow = True  # the scaler must see inf (see _accumulate); the step is skipped
                    step.mark_overflow(self._grad_target)
                    return
            elif self.sync_free or _capturing_cuda_graph(bad) or bad.any():
                drop = bad
            step.accumulate_clipped(self.clipping.factors_by_param(step.norm_sq, step.norms()), self._grad_target, drop)
        finally:
            self._capturing = True
            call.inputs = call.grad_output = None  # the activations go now, not at the end of the backward

    def _batch_first(self, call: ModuleCall) -> None:
        if not self.batch_first and not call.batch_first:
            call.inputs = tuple(
                x.movedim(1, 0) if isinstance(x, torch.Tensor) and x.dim() >= 2 else x for x in call.inputs
            )
            call.grad_output = call.grad_output.movedim(1, 0)
            call.batch_first = True

    def _process(self, calls: List[ModuleCall], early: Optional["_EarlyClipping"] = None) -> None:
        """The end of a backward: every call not clipped inside it (``early``: what those left), one
        ``_BackwardStep`` per forward; the per-sample norms are those of every forward's samples in turn."""
        mean = self.loss_reduction == "mean"
        by_forward: Dict[_Forward, List[ModuleCall]] = {}
        for call in calls:
            by_forward.setdefault(call.forward, []).append(call)
        forwards = list(by_forward)
        if early is not None:
            forwards += [forward for forward in early.norm_sq if forward not in by_forward]
        steps = [
            _BackwardStep(by_forward[f], materialise_all=self.mode != "bk", mean=mean, loss_scale=self._loss_scale())
            for f in forwards if f in by_forward
        ]
        totals = {step.forward: step.total_norm_sq() for step in steps}
        if early is not None:  # samples non-finite in a layer clipped early are left out at the end too
            for forward, norm_sq in early.norm_sq.items():
                totals[forward] = totals[forward] + norm_sq if forward in totals else norm_sq
        norms = {forward: total.sqrt() for forward, total in totals.items()}
        self.per_sample_norms = rounding.round_up_float32(torch.cat([norms[f] for f in forwards]))
        if self.mode != "bk":
            self._record_grad_samples(steps)
        if not steps:  # every call was clipped inside the backward: count its non-finite samples
            if not early.overflow:
                self._count_skipped(~torch.isfinite(self.per_sample_norms))
            return
        starts = dict(zip(forwards, _starts([norms[f].numel() for f in forwards])))
        for step in steps:
            step.first_row = starts[step.forward]  # where its samples lie in per_sample_norms
        if self.clipping is None:
            self._retained_steps = steps
            return
        self._accumulate(steps, [self.clipping.factors_by_param(step.norm_sq, norms[step.forward]) for step in steps])

    def _record_grad_samples(self, steps: List["_BackwardStep"]) -> None:
        """``p.grad_sample``: the per-sample gradients of every forward's samples in turn (zero rows where a
        forward did not use p), appended to those of earlier backward passes (new rows are new samples)."""
        params = {key: param for step in steps for key, (param, _) in step.materialised.items()}
        for key, param in params.items():
            parts = [
                step.materialised[key][1] * step.scale if key in step.materialised
                else torch.zeros((step.batch_size, *param.shape), dtype=param.dtype, device=param.device)
                for step in steps
            ]
            previous = getattr(param, "grad_sample", None)
            param.grad_sample = torch.cat(([previous] if previous is not None else []) + parts)

    def accumulate_clipped_grads(self, clip_factors: torch.Tensor) -> None:
        """Add ``sum_i c_i g_i`` to ``p.grad`` for the last backward (only when no ``clipping`` is set);
        ``clip_factors`` has one entry per row of ``per_sample_norms``."""
        if self._retained_steps is None:
            raise ValueError("no backward to clip: call loss.backward() first (with no clipping policy set)")
        steps, self._retained_steps = self._retained_steps, None
        rows = [clip_factors[step.first_row : step.first_row + step.batch_size] for step in steps]
        self._accumulate(steps, [{key: part for key in step.norm_sq} for step, part in zip(steps, rows)])

    def _loss_scale(self):
        """The GradScaler's current scale S (a tensor), or None when no scaler is attached/enabled."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = scaler._get_scale_async()  # the scale tensor, without a device sync
        if scale is None:
            raise ValueError("grad_scaler has no scale yet: backpropagate grad_scaler.scale(loss), not loss")
        return scale

    def _accumulate(self, steps: List["_BackwardStep"], factors: List[Dict[int, torch.Tensor]]) -> None:
        bad = ~torch.isfinite(self.per_sample_norms)
        if self._loss_scale() is not None and bad.any():
            # fp16 overflow under a GradScaler: the scaler must see it (inf grads) to skip the step and
            # lower its scale; the optimizer step, and so the accountant, then never runs.
            for step in steps:
                step.mark_overflow(self._grad_target)
            return
        drop = self.sync_free or _capturing_cuda_graph(bad) or self._count_skipped(bad)
        for step, step_factors in zip(steps, factors):
            # branch-free when sync-free: zeroes nothing when every norm is finite
            rows = bad[step.first_row : step.first_row + step.batch_size] if drop else None
            step.accumulate_clipped(step_factors, self._grad_target, rows)

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
    per-sample squared norms per forward (for ``per_sample_norms`` and the count of non-finite samples),
    their parameters (which no later call of this backward may use), and whether a GradScaler overflowed."""

    def __init__(self):
        self.norm_sq: Dict[_Forward, torch.Tensor] = {}  # float64 [B] per forward
        self.params: set = set()
        self.overflow = False

    def add(self, forward: _Forward, norm_sq: torch.Tensor) -> None:
        self.norm_sq[forward] = self.norm_sq[forward] + norm_sq if forward in self.norm_sq else norm_sq


class _BackwardStep:
    """One forward's calls in one backward: those whose rules give norms and clipped sums, and
    materialised parameters.

    A parameter used by several calls (weight tying, a module called twice) has the sum over its
    uses as per-sample gradient, whose norm is not the sum of the parts' norms:
    ``||sum_u G^(u)||² = sum_u ||G^(u)||² + 2 sum_{u<v} <G^(u), G^(v)>``. When every use's rule
    gives its gradient as outer products (``LayerRule.outer_factors``: linear, embedding, HF Conv1D),
    the cross terms come from cross Grams and each use's clipped sum from its rule, with the
    parameter's one clip factor per sample (a sum of the uses' clipped parts: exact). Otherwise the
    parameter's per-sample gradients are materialised and summed (exact; no use is ever dropped).
    In "hooks" and "functorch" modes every parameter is materialised, and in any mode where the
    rule finds that cheaper for a parameter used once (``LayerRule.prefers_grad_sample``).

    Every squared norm is an upper bound (``fastdp.ops.rounding``), kept in float64 while the parts
    (uses, cross terms, rounding slack of the clipped sums) are combined.
    """

    def __init__(self, calls: List[ModuleCall], *, materialise_all: bool, mean: bool, loss_scale=None):
        batch_sizes = {call.rows for call in calls}
        _check_batch_sizes(batch_sizes)
        self.batch_size = batch_sizes.pop()
        self.forward = calls[0].forward
        self.first_row = 0  # where this forward's samples start among all of the backward's (``_process``)
        # With a mean loss each output gradient carries 1/B; per-sample gradients are B times it.
        self.scale = float(self.batch_size) if mean else 1.0
        # A GradScaler's S multiplies every output gradient: norms are divided by it, clipped sums keep it.
        self.loss_scale = loss_scale
        self.device = calls[0].device
        self.rule_calls: List[ModuleCall] = []
        # id(p) -> (p, per-sample grads summed over its calls), of the loss as computed (without ``scale``,
        # which multiplies their norms and clip factors instead: no scaled copy)
        self.materialised: Dict[int, tuple] = {}
        materialised_calls, cross_factors = _split_calls(calls, materialise_all)
        for call in calls:
            if id(call) not in materialised_calls:
                self.rule_calls.append(call)
                continue
            grad_samples = call.grad_samples  # formed in the backward already (_reduce_in_backward)
            if grad_samples is None:
                grad_samples = call.rule.grad_sample(call.module, call.inputs, call.grad_output)
            call.grad_samples = call.inputs = call.grad_output = None  # the per-sample gradients replace them
            for name, grads in grad_samples.items():
                param = call.params[name]
                if id(param) in self.materialised:
                    grads = self.materialised[id(param)][1] + grads
                self.materialised[id(param)] = (param, grads)
        self.norm_sq = self._norm_sq_by_param(cross_factors)

    def total_norm_sq(self) -> torch.Tensor:
        """Each sample's squared norm over all of this step's parameters, float64 [B] (an upper bound)."""
        total = torch.zeros(self.batch_size, dtype=torch.float64, device=self.device)
        for norm_sq in self.norm_sq.values():
            total += norm_sq
        return total

    def norms(self) -> torch.Tensor:
        return self.total_norm_sq().sqrt()

    def _norm_sq_by_param(self, cross_factors: Dict[int, list]) -> Dict[int, torch.Tensor]:
        """id(p) → an upper bound of each sample's squared gradient norm for p, float64 ``[B]``: the
        rules' bounds, plus the cross terms of a shared parameter's uses (``cross_factors``: id(p) → the
        outer factors of each use), raised by the clipped sums' rounding slack (``‖G_i‖ + s_i``)."""
        norm_sq, slack = {}, {}
        for call in self.rule_calls:
            call_norm_sq, call_slack = call.norm_parts or call.rule.norm_bounds(call.module, call.inputs, call.grad_output)
            call.norm_parts = None
            for name, value in call_norm_sq.items():
                key = id(call.params[name])
                value = value.double() * self.scale**2
                norm_sq[key] = norm_sq[key] + value if key in norm_sq else value
            for name, value in call_slack.items():
                key = id(call.params[name])
                value = value.double() * self.scale
                slack[key] = slack[key] + value if key in slack else value
        for key, uses in cross_factors.items():
            cross = sum(  # upper bounds of the uses' inner products: the total stays an upper bound
                outer_inner_product(uses[u], uses[v]) for u in range(len(uses)) for v in range(u + 1, len(uses))
            )
            norm_sq[key] = (norm_sq[key] + 2 * self.scale**2 * cross.double()).clamp(min=0)  # NaN stays NaN
        for key, (_, grads) in self.materialised.items():
            norm_sq[key] = rounding.norm_sq_upper(grads) * self.scale**2
        for key, value in slack.items():  # clip what is computed: ‖G_i‖ + its rounding bound
            norm_sq[key] = (norm_sq[key].sqrt() + value).square()
        if self.loss_scale is not None:
            norm_sq = {key: value / self.loss_scale.double().square() for key, value in norm_sq.items()}
        return norm_sq

    def mark_overflow(self, target_of) -> None:
        """Leave inf in every parameter's gradient (``target_of(p)``), so GradScaler.step skips the step."""
        params = [p for call in self.rule_calls for p in call.params.values()]
        params += [p for p, _ in self.materialised.values()]
        for param in {id(p): p for p in params}.values():
            target_of(param).fill_(float("inf"))

    def accumulate_clipped(self, factors: Dict[int, torch.Tensor], target_of, drop_rows=None) -> None:
        """Add each parameter's ``sum_i c_{i,p} g_{i,p}`` (factors keyed by id(p)) into ``target_of(p)`` in place,
        call by call, freeing each call's activations (or per-sample gradients) once its sum is formed.
        ``drop_rows``: samples to zero everywhere first (c = 0 alone is not enough: 0 * inf is NaN)."""
        for call in self.rule_calls:
            if drop_rows is not None:
                call.inputs, call.grad_output = call.rule.zero_samples(call.module, call.inputs, call.grad_output, drop_rows)
            call_factors = {name: factors[id(p)] * self.scale for name, p in call.params.items()}
            targets = {name: target_of(p) for name, p in call.params.items()}
            call.rule.add_clipped_grad(call.module, call.inputs, call.grad_output, call_factors, targets)
            call.inputs = call.grad_output = None
        for key in list(self.materialised):
            param, grads = self.materialised.pop(key)
            if drop_rows is not None:
                grads = zero_rows(grads, drop_rows)
            add_clipped_sum_of_grad_samples(target_of(param), factors[key] * self.scale, grads)
            del grads


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
        elif not any(key in shared for key in keys) and (
            call.grad_samples is not None  # reduced in the backward: as it was decided there
            or call.norm_parts is None and call.rule.prefers_grad_sample(call.module, call.inputs, call.grad_output)
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


def _starts(sizes: List[int]) -> List[int]:
    """The first index of each of consecutive blocks of the given sizes."""
    starts, start = [], 0
    for size in sizes:
        starts.append(start)
        start += size
    return starts


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
    """The batch size of a forward's first tensor argument (positional first, then keyword), or None."""
    dim = 0 if batch_first else 1
    for value in (*args, *kwargs.values()):
        if isinstance(value, PackedSequence):
            return int(value.batch_sizes[0]) if value.batch_sizes.numel() else 0
        if isinstance(value, torch.Tensor) and value.dim() > dim:
            return value.shape[dim]
    return None


