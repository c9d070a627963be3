"""Routing a module's forward so that one backward hands the engine (inputs, output gradient).

A routed module runs its own forward with its trainable parameters *detached*, so
autograd never forms their (non-private) gradients — that GEMM would be thrown
away. The output then passes through ``CaptureOutputGrad``, an identity whose
inputs include the real parameters: this keeps the output attached to the graph
even when nothing upstream requires grad (the first layer), and its backward
receives exactly the gradient of the loss with respect to this call's output.

A module whose rule ``captures_internally`` (the DP recurrent and attention layers) is not
wrapped at its output: its forward marks internal tensors with ``capture_internal`` (the
input projection of all time steps, ...), each one a ``ModuleCall`` of its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import types
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .rules import LayerRule


class ModuleCall:
    """One call of a routed module in a forward pass: what its rule needs in the backward."""

    __slots__ = (
        "module", "rule", "inputs", "params", "grad_output", "batch_first", "forward", "rows", "device", "norm_parts",
        "grad_samples",
    )

    def __init__(
        self, module: nn.Module, rule: LayerRule, inputs, params: Dict[str, nn.Parameter], batch_first: bool = False
    ):
        self.module = module
        self.rule = rule
        self.inputs = inputs  # a tuple, or a function returning it, called once in the backward
        self.params = params  # the trainable parameters at call time, by name
        self.grad_output: Optional[torch.Tensor] = None
        self.batch_first = batch_first  # True: inputs and grad_output are batch-first whatever the model's layout
        self.forward = None  # the top-level forward whose samples the call's rows are (set by the engine)
        # set by the engine in the backward: the number of rows (samples) and the device of the output gradient,
        # and, for a call reduced there, its rule's (norm bounds, clipped-sum slack) or its per-sample gradients
        self.rows: Optional[int] = None
        self.device: Optional[torch.device] = None
        self.norm_parts = None
        self.grad_samples = None


class CaptureOutputGrad(torch.autograd.Function):
    """Identity on ``output``; its backward reports the output gradient to ``on_grad``."""

    @staticmethod
    def forward(ctx, on_grad: Callable, call: ModuleCall, output: torch.Tensor, *params: torch.Tensor):
        ctx.on_grad, ctx.call, ctx.num_params = on_grad, call, len(params)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        on_grad, call = ctx.on_grad, ctx.call
        if call is None:
            raise RuntimeError(
                "a second backward through one forward (retain_graph=True): each of its samples would be "
                "clipped twice and move the step by up to 2·C; sum the losses and call backward once"
            )
        ctx.on_grad = ctx.call = None  # the graph may outlive this backward; the activations must not
        if callable(call.inputs):  # recorded after the tensor was used (see capture_internal)
            call.inputs = call.inputs()
        on_grad(call, grad_output)
        return (None, None, grad_output) + (None,) * ctx.num_params


@contextlib.contextmanager
def detached_parameters(module: nn.Module, names: List[str]):
    """Within the block, ``module.<name>`` is a detached view of the parameter."""
    saved = {name: module._parameters[name] for name in names}
    try:
        for name, param in saved.items():
            module._parameters[name] = param.detach()
        yield
    finally:
        module._parameters.update(saved)


def positional_inputs(forward: Callable, args: tuple, kwargs: dict) -> tuple:
    """All of a call's arguments as one positional tuple (rules take positional inputs only)."""
    if not kwargs:
        return args
    bound = inspect.signature(forward).bind(*args, **kwargs)
    bound.apply_defaults()
    if bound.kwargs:
        raise ValueError(
            f"{type(forward.__self__).__name__}.forward received keyword-only arguments "
            f"{sorted(bound.kwargs)}, which layer rules cannot see; pass them positionally"
        )
    return bound.args


_CALLS_BATCH_FIRST = contextvars.ContextVar("fastdp_calls_batch_first", default=False)


@contextlib.contextmanager
def calls_batch_first():
    """Module calls made inside are recorded as batch-first, whatever the model's ``batch_first``.

    For a layer that calls a submodule in its own layout rather than the model's: DPMultiheadAttention
    runs ``out_proj`` on its batch-first ``[N, L, E]`` even in a sequence-first model, so the engine
    must not read that call's second dimension as the batch.
    """
    token = _CALLS_BATCH_FIRST.set(True)
    try:
        yield
    finally:
        _CALLS_BATCH_FIRST.reset(token)


class _Route:
    """What a routed module needs at call time. Kept on the module, and the routed forward is a
    bound method, so ``copy.deepcopy`` of a routed model yields a copy routed to its own state."""

    #: ``args -> args`` applied to a capturing call's positional arguments (the engine expands index
    #: inputs shared by the whole batch, e.g. position ids ``[1, T]``, to one row per sample)
    prepare_args: Optional[Callable[[tuple], tuple]] = None
    #: ``(call, captured tensor) -> None``, told of every new call: the engine maps its rows to samples
    on_call: Optional[Callable[["ModuleCall", torch.Tensor], None]] = None

    def __init__(self, rule: LayerRule, capturing: Callable[[], bool], on_grad: Callable, original_forward: Callable):
        self.rule, self.capturing, self.on_grad, self.original_forward = rule, capturing, on_grad, original_forward
        #: the real trainable parameters while a ``captures_internally`` module runs its forward
        self.internal_params: Optional[Dict[str, nn.Parameter]] = None


def _routed_forward(module: nn.Module, *args, **kwargs):
    route = module.__dict__["_fastdp_route"]
    params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if not params or not route.capturing() or not torch.is_grad_enabled():
        return route.original_forward(*args, **kwargs)
    if route.prepare_args is not None:
        args = route.prepare_args(args)
    if route.rule.captures_internally:  # the forward marks its own capture points (capture_internal)
        route.internal_params = params
        try:
            with detached_parameters(module, list(params)):
                return route.original_forward(*args, **kwargs)
        finally:
            route.internal_params = None
    with detached_parameters(module, list(params)):
        output = route.original_forward(*args, **kwargs)
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"{type(module).__name__} returned {type(output).__name__}; fastdp's per-layer capture needs "
            "modules with trainable parameters to return one tensor (wrap it, or register a rule for "
            "the module that produces the tensor)"
        )
    inputs = tuple(
        a.detach() if isinstance(a, torch.Tensor) else a
        for a in positional_inputs(route.original_forward, args, kwargs)
    )
    batch_first = _CALLS_BATCH_FIRST.get() or route.rule.batch_first_layout
    call = ModuleCall(module, route.rule, inputs, params, batch_first=batch_first)
    if route.on_call is not None:
        route.on_call(call, output)
    return CaptureOutputGrad.apply(route.on_grad, call, output, *params.values())


def _detached_inputs(inputs: tuple) -> tuple:
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in inputs)


def is_capturing_internally(module: nn.Module) -> bool:
    """Whether ``capture_internal`` would capture now (lets a forward skip work only a capture needs)."""
    route = module.__dict__.get("_fastdp_route")
    return route is not None and route.internal_params is not None and torch.is_grad_enabled()


def capture_internal(module: nn.Module, tensor: torch.Tensor, inputs, param_names) -> torch.Tensor:
    """Mark ``tensor``, computed inside ``module``'s forward, as a capture point of the engine.

    For modules whose rule ``captures_internally`` (recurrent layers: a loop of steps has no
    single output whose gradient gives the weight gradients). When ``module`` is routed and
    capturing, returns ``tensor`` through ``CaptureOutputGrad`` as one ``ModuleCall`` whose
    parameters are the named real ones that are trainable; otherwise ``tensor`` unchanged. The
    rule then receives ``inputs`` and the gradient of the loss with respect to ``tensor``, both
    batch-first (the capture point's own layout, whatever the model's). ``inputs`` is a tuple, or
    a function returning it, called once in the backward, for inputs that only exist after
    ``tensor`` has been used (the hidden states of a recurrence that consumes ``tensor``).
    """
    if not is_capturing_internally(module):
        return tensor
    route = module.__dict__["_fastdp_route"]
    params = {name: route.internal_params[name] for name in param_names if name in route.internal_params}
    if not params:
        return tensor
    if callable(inputs):
        recorded = inputs
        inputs = lambda: _detached_inputs(recorded())  # noqa: E731
    else:
        inputs = _detached_inputs(inputs)
    call = ModuleCall(module, route.rule, inputs, params, batch_first=True)
    if route.on_call is not None:
        route.on_call(call, tensor)
    return CaptureOutputGrad.apply(route.on_grad, call, tensor, *params.values())


def route(
    module: nn.Module, rule: LayerRule, capturing: Callable[[], bool], on_grad: Callable, prepare_args=None,
    on_call=None,
) -> Callable[[], None]:
    """Route ``module``'s forward through the capture; returns a function that undoes it."""
    if "_fastdp_route" in module.__dict__:
        raise ValueError(f"{type(module).__name__} is already routed by another GradSampleModule")
    had_instance_forward = "forward" in module.__dict__
    module._fastdp_route = _Route(rule, capturing, on_grad, module.forward)
    module._fastdp_route.prepare_args = prepare_args
    module._fastdp_route.on_call = on_call
    module.forward = types.MethodType(_routed_forward, module)

    def unroute():
        route_state = module.__dict__.pop("_fastdp_route")
        if had_instance_forward:
            module.forward = route_state.original_forward
        else:
            del module.forward

    return unroute
