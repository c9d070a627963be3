"""A whole DP step (forward, backward, per-sample clipping, noise, update) as one CUDA graph.

With fixed-shape batches (``make_private(..., padded_batch_size=N)``) a DP step launches the same
kernels every time, so a CUDA graph can replay them without Python or launch overhead, which
dominates small models. Three things a plain ``torch.cuda.graph`` capture of the step would get
wrong, and this wrapper does not:

- **Accounting.** A replay runs no Python, so the accountant hook inside ``optimizer.step()``
  would record the capture and never a replayed step: ε would be far too small. Here the hook is
  held back during the capture and called after every replay.
- **Noise.** A noise seed drawn on the host (a CPU generator, secure mode) would be frozen into
  the graph: the same noise every step. Only CUDA generators are accepted (the default one, or a
  ``torch.Generator("cuda")`` registered with the graph); each replay advances their Philox
  offset, so every step draws fresh noise.
- **Frozen settings.** σ, C, the expected batch size and the optimizer's hyperparameters (``lr``,
  ...) are baked into the captured kernels. Changing one afterwards raises rather than being
  ignored (the accountant would read the new σ while the graph adds the old noise).

A batch whose shapes or non-tensor values differ from the first one (a Poisson batch larger than
``padded_batch_size``) runs as an ordinary eager step, with a warning once. On a CPU the wrapper
runs every step eagerly, so the same training loop works everywhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Callable, List, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .optimizers import DPOptimizer
from .optimizers.distributed_dp_optimizer import DistributedDPOptimizer
from .optimizers.dp_optimizer import AdaptiveClipping


def capture_refusals(optimizer, device: torch.device) -> List[str]:
    """Why ``optimizer``'s step cannot be replayed from a CUDA graph on ``device`` (empty: it can)."""
    if not isinstance(optimizer, DPOptimizer):
        return [f"optimizer must be the DPOptimizer that make_private returns, got {type(optimizer).__name__}"]
    refusals = []
    if isinstance(optimizer, DistributedDPOptimizer):
        refusals.append("distributed DP optimizers are not supported by make_graphed_dp_step yet; step eagerly")
    if optimizer.secure_mode:
        refusals.append("secure_mode draws the noise on the host (os.urandom), which a graph replay cannot redo; "
                        "step eagerly, or drop secure_mode")
    if isinstance(optimizer.clipping_policy, AdaptiveClipping):
        refusals.append("clipping='adaptive' updates the clipping bound on the host after each step; "
                        "use flat, per_layer or automatic clipping")
    if optimizer.grad_scaler is not None:
        refusals.append("a grad_scaler decides on the host whether to skip a step; use bf16 (no scaler) instead")
    if device.type == "cuda":
        generator = optimizer.generator
        if generator is not None and generator.device.type != "cuda":
            refusals.append("noise_generator is a CPU generator: its draw would be frozen into the graph, the same "
                            "noise every step; pass torch.Generator('cuda') or None")
        for group in optimizer.param_groups:
            if group.get("capturable") is False:
                refusals.append(f"{type(optimizer.original_optimizer).__name__}(capturable=False) cannot be replayed "
                                "in a CUDA graph; construct it with capturable=True")
                break
    return refusals


def _plain(batch):
    """A dict for a Mapping that pytree would keep whole (e.g. HF's BatchEncoding), so its tensors are found."""
    return dict(batch) if isinstance(batch, Mapping) and not isinstance(batch, dict) else batch


def _same_value(a, b) -> bool:
    try:
        return a is b or bool(a == b)
    except (RuntimeError, ValueError, TypeError):  # e.g. arrays: no single truth value
        return False


def _frozen_settings(optimizer: DPOptimizer) -> tuple:
    """What a captured step bakes in: changing any of it after the capture must not go unnoticed."""
    groups = [
        {key: value for key, value in group.items() if key != "params" and not isinstance(value, torch.Tensor)}
        for group in optimizer.param_groups
    ]
    policy = {key: value for key, value in vars(optimizer.clipping_policy).items() if not isinstance(value, torch.Tensor)}
    return (optimizer.noise_multiplier, optimizer.expected_batch_size, optimizer.loss_reduction,
            type(optimizer.clipping_policy).__name__, repr(policy), repr(groups))


class GraphedDPStep:
    """``graphed(batch)`` does one DP step on ``batch``: ``step_fn(batch)`` (forward and
    ``loss.backward()``, returning what you want reported, e.g. the loss), then ``optimizer.step()``.

    The first call runs eagerly (it also compiles and tunes the kernels and creates the optimizer
    state) and then captures the step; later calls copy the batch into the captured buffers and
    replay. Tensors in the batch are moved to the parameters' device. The returned value is the
    captured output, overwritten by the next call: ``.item()`` or ``.clone()`` it to keep it.
    Call ``optimizer.zero_grad()`` or not: each step starts from zero gradients anyway.
    """

    def __init__(self, step_fn: Callable[[Any], Any], optimizer: DPOptimizer):
        params = optimizer.params if isinstance(optimizer, DPOptimizer) else []
        self.device = params[0].device if params else torch.device("cpu")
        refusals = capture_refusals(optimizer, self.device)
        if refusals:
            raise ValueError(refusals[0])
        self.step_fn, self.optimizer, self.params = step_fn, optimizer, params
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.replays = 0
        self._warned_eager = False

    # -- eager steps -------------------------------------------------------------------------------
    def _to_device(self, batch):
        leaves, spec = tree_flatten(_plain(batch))
        moved = [leaf.to(self.device, non_blocking=True) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        return tree_unflatten(moved, spec)

    def _eager_step(self, batch):
        self.optimizer.zero_grad(set_to_none=False)  # the buffer stays where a captured graph expects it
        output = self.step_fn(batch)
        self.optimizer.step()
        return output

    def __call__(self, batch):
        if self.optimizer._skip_next or self.optimizer._skipped_steps:
            raise ValueError("make_graphed_dp_step replays whole steps; BatchMemoryManager's virtual steps do not "
                             "combine with it (pick a padded_batch_size that fits in memory)")
        if self.device.type != "cuda":
            return self._eager_step(self._to_device(batch))
        if self.graph is None:
            return self._first_step_and_capture(self._to_device(batch))
        if _frozen_settings(self.optimizer) != self._settings:
            raise ValueError("noise_multiplier, max_grad_norm, expected_batch_size or an optimizer hyperparameter "
                             "(e.g. lr) changed after the step was captured, and a replay would use the old value; "
                             "make a new make_graphed_dp_step, or pass lr as a tensor (capturable optimizers)")
        leaves, spec = tree_flatten(_plain(batch))
        reason = self._mismatch(leaves, spec)
        if reason:
            if not self._warned_eager:
                warnings.warn(f"make_graphed_dp_step: {reason}; this step runs eagerly (not replayed)", RuntimeWarning)
                self._warned_eager = True
            return self._eager_step(self._to_device(batch))
        for static, leaf in zip(self._static_leaves, leaves):
            if isinstance(static, torch.Tensor):
                static.copy_(leaf, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        for p, grad in zip(self.params, self._static_grads):
            p.grad = grad  # after an eager step in between, p.grad pointed elsewhere
        if self.optimizer.step_hook is not None:  # the accounting that the replay could not run
            self.optimizer.step_hook(self.optimizer)
        return self._static_output

    def _mismatch(self, leaves, spec) -> str:
        if spec != self._spec:
            return "the batch's structure differs from the first batch's"
        for static, leaf in zip(self._static_leaves, leaves):
            if isinstance(static, torch.Tensor):
                if not isinstance(leaf, torch.Tensor) or leaf.shape != static.shape or leaf.dtype != static.dtype:
                    got = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                    return (f"a batch tensor has shape {got}, the captured one {tuple(static.shape)} (a Poisson batch "
                            "larger than padded_batch_size? see fastdp.data.suggested_padded_batch_size)")
            elif not _same_value(leaf, static):
                return f"a non-tensor batch entry is {leaf!r}, the captured one {static!r}"
        return ""

    # -- capture -----------------------------------------------------------------------------------
    def _first_step_and_capture(self, batch):
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
            output = self._eager_step(batch)
        current.wait_stream(side)
        eager_grads = [p.grad for p in self.params]

        leaves, self._spec = tree_flatten(batch)
        self._static_leaves = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        static_batch = tree_unflatten(self._static_leaves, self._spec)
        graph = torch.cuda.CUDAGraph()
        generator = self.optimizer.generator
        if generator is not None and generator is not torch.cuda.default_generators[generator.device.index or 0]:
            if not hasattr(graph, "register_generator_state"):
                raise ValueError("this torch cannot replay a non-default CUDA generator in a graph; "
                                 "pass noise_generator=None (the default CUDA generator; seed it with torch.manual_seed)")
            graph.register_generator_state(generator)
        hook, self.optimizer.step_hook = self.optimizer.step_hook, None
        if self.optimizer.grad_buffer is not None:  # the graph writes into it: zero_grad() must not free it
            self.optimizer.grad_buffer.pinned = True
        try:
            with torch.cuda.graph(graph):
                # captured too: each replay starts by zeroing the gradient buffer (allocated by the eager step
                # and kept: set_to_none=False, so its address is static), which holds the previous released gradient
                self.optimizer.zero_grad(set_to_none=False)
                self._static_output = self.step_fn(static_batch)
                self.optimizer.step()
        finally:
            self.optimizer.step_hook = hook
        self._static_grads = [p.grad for p in self.params]
        for p, grad in zip(self.params, eager_grads):  # the capture computed nothing: show the eager step's
            p.grad = grad
        self._settings = _frozen_settings(self.optimizer)
        self.graph = graph
        return output


def make_graphed_dp_step(step_fn: Callable[[Any], Any], optimizer: DPOptimizer) -> GraphedDPStep:
    """Wrap a DP training step so that, on CUDA, it runs as one CUDA-graph replay per batch.

    ``step_fn(batch)`` runs the forward pass and ``loss.backward()`` on one batch from the
    (padded) DPDataLoader and returns what to report; the wrapper zeroes the gradients before it
    and calls ``optimizer.step()`` after it. See ``GraphedDPStep`` and this module's docstring.

    >>> step = make_graphed_dp_step(lambda b: train_step(model, b), optimizer)
    >>> for batch in loader:
    ...     loss = step(batch)
    """
    return GraphedDPStep(step_fn, optimizer)
