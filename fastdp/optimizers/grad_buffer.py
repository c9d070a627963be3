"""The gradient buffer: a DP optimizer's gradients live in flat buffers, each allocated whole.

Why one flat buffer: the step adds one noise draw over every parameter and, across processes,
sums one tensor; if the gradients lived apart, the step would first concatenate them (a full-size
copy) and draw a full-size noise tensor beside it (~3× the gradients at the step's peak). Here the
engine adds each layer's clipped sum into the parameter's view of the buffer, in place; the noise
and the 1/E[B] scale are applied to the buffer in place, chunk by chunk (one fused kernel on GPU);
a distributed optimizer reduces the buffer itself. The storage is never freed, so its addresses
are static (CUDA graphs) and the allocator sees no full-size churn, unless ``zero_grad()`` (torch's
default ``set_to_none=True``) releases it, as torch releases gradients: it is then allocated again, whole,
by the next backward's first clipped sum (``zero_grad(set_to_none=False)`` keeps it, zeroed).

Layout and dtype: the optimizer's trainable parameters in order, one buffer per (device,
accumulation dtype); float32 for float32/bfloat16/float16 parameters, float64 for float64. Clipped
sums are summed in float32 even for bf16/fp16 parameters, so rounding to the parameter dtype
happens once per step, when the released gradient is written to ``p.grad`` (a second buffer in the
parameter dtype, allocated once: torch requires ``p.grad`` in the parameter's dtype). Such a
parameter therefore keeps fp32 master gradients (4 + 2 bytes per bf16 parameter), as mixed-precision
training with fp32 master gradients does.

What the buffer holds, in turn: zeros; the clipped sums of the backward passes since (``p.grad``
and, after ``clip_and_accumulate``, ``p.summed_grad`` are views of it); after the noise pass, the
released gradient (``p.grad``). ``zero()`` (optimizer ``zero_grad``, or the end of an abandoned
logical batch) starts over: a partial sum never survives into another step.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and narrower floats, float64 for float64: what clipped sums are summed in."""
    return torch.promote_types(dtype, torch.float32)


class _Group:
    """One flat buffer: the parameters of one device and accumulation dtype, in optimizer order."""

    def __init__(self, device: torch.device, dtype: torch.dtype, params: List[torch.Tensor]):
        self.device, self.dtype, self.params = device, dtype, params
        self.offsets: Dict[int, int] = {}
        numel = 0
        for p in params:
            self.offsets[id(p)] = numel
            numel += p.numel()
        self.numel = numel
        self.flat: Optional[torch.Tensor] = None  # the accumulation buffer (allocated on first use)
        self.released: Optional[torch.Tensor] = None  # keep_summed_grad: the released gradient's own buffer
        self.cast: Dict[torch.dtype, torch.Tensor] = {}  # p.grad of narrower parameters, per dtype

    def allocate(self) -> torch.Tensor:
        if self.flat is None:
            self.flat = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        return self.flat

    def view(self, flat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        start = self.offsets[id(p)]
        return flat[start : start + p.numel()].view_as(p)


class GradBuffer:
    """The flat gradient buffers of one optimizer's parameters (see the module docstring)."""

    def __init__(self, params: List[torch.Tensor]):
        groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
        for p in params:
            groups.setdefault((p.device, accumulation_dtype(p.dtype)), []).append(p)
        self.groups = [_Group(device, dtype, members) for (device, dtype), members in groups.items()]
        self._group_of = {id(p): group for group in self.groups for p in group.params}
        self._accumulators: Dict[int, torch.Tensor] = {}  # id(p) -> the persistent view clipped sums go into
        #: clipped sums were added since the last ``clip_and_accumulate`` (a backward's, not yet moved)
        self.pending = False
        #: a virtual step (BatchMemoryManager) moved a partial sum of a logical batch into ``p.summed_grad``
        self.logical_batch_open = False
        #: never release the storage (``make_graphed_dp_step``: a captured graph writes into it)
        self.pinned = False

    def __contains__(self, p: torch.Tensor) -> bool:
        return id(p) in self._group_of

    @property
    def allocated(self) -> bool:
        return any(group.flat is not None for group in self.groups)

    def accumulator(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """``p``'s view of the accumulation buffer, the same tensor every time (None: not covered)."""
        view = self._accumulators.get(id(p))
        if view is None:
            group = self._group_of.get(id(p))
            if group is None:
                return None
            view = self._accumulators[id(p)] = group.view(group.allocate(), p)
        return view

    def take_grad(self, p: torch.Tensor) -> torch.Tensor:
        """``p``'s accumulator, with a ``p.grad`` set by hand (not a view of these buffers) added to it, as
        autograd adds gradients up (``p`` must be covered)."""
        view = self.accumulator(p)
        grad = p.grad
        if grad is not None and grad is not view and not self.owns(grad):
            view.add_(grad.detach())
        return view

    def check_clearable(self) -> None:
        """Refuse to clear a backward's clipped sums once they are added to an open logical batch's sum."""
        if self.logical_batch_open and self.pending:
            raise ValueError(
                "zero_grad() between a backward and its (virtual) optimizer step inside a logical batch "
                "(BatchMemoryManager): that backward's clipped sums are already added to the logical batch's "
                "sum and cannot be taken out; call optimizer.step() after every backward"
            )

    def fresh_view(self, p: torch.Tensor) -> torch.Tensor:
        """A new view object of ``p``'s accumulated sum (``p.summed_grad``: Opacus marks it as processed, an
        attribute that must not stick to the persistent view)."""
        group = self._group_of[id(p)]
        return group.view(group.allocate(), p)

    def owns(self, tensor: Optional[torch.Tensor]) -> bool:
        """Whether ``tensor`` lives in one of these buffers (a gradient the engine or the step wrote)."""
        if tensor is None:
            return False
        storage = tensor.untyped_storage().data_ptr()
        buffers = [group.flat for group in self.groups] + [group.released for group in self.groups]
        buffers += [cast for group in self.groups for cast in group.cast.values()]
        return any(b is not None and b.untyped_storage().data_ptr() == storage for b in buffers)

    def zero(self) -> None:
        """Start over: zeros in every accumulation buffer (one memset each; the storage stays)."""
        for group in self.groups:
            if group.flat is not None:
                group.flat.zero_()
        self.pending = self.logical_batch_open = False

    def release(self) -> None:
        """Start over by dropping the storage (``zero_grad(set_to_none=True)``, as torch frees gradients): the
        next clipped sum allocates the buffer again, zeroed, so it does not sit beside the next forward's
        activations. The caller sets every ``p.grad`` that viewed it to None. A ``pinned`` buffer (a CUDA
        graph writes into it) is zeroed instead."""
        if self.pinned:
            self.zero()
            return
        for group in self.groups:
            group.flat = group.released = None
            group.cast.clear()
        self._accumulators.clear()
        self.pending = self.logical_batch_open = False

    def flats(self, keep_sums: bool) -> List[Tuple[_Group, torch.Tensor]]:
        """Each group with the flat tensor the noise pass works on: the accumulation buffer itself, or (with
        ``keep_sums``) a copy in the group's second buffer, so that ``p.summed_grad`` outlives the step."""
        out = []
        for group in self.groups:
            flat = group.allocate()
            if keep_sums:
                if group.released is None:
                    group.released = torch.empty_like(flat)
                group.released.copy_(flat)
                flat = group.released
            out.append((group, flat))
        return out

    def publish(self, group: _Group, flat: torch.Tensor) -> None:
        """Point each parameter's ``p.grad`` at its part of ``flat``; a narrower parameter's gradient is
        rounded once into the group's buffer of its dtype (allocated once)."""
        for p in group.params:
            view = group.view(flat, p)
            if p.dtype != flat.dtype:
                cast = group.cast.get(p.dtype)
                if cast is None:
                    cast = group.cast[p.dtype] = torch.empty(group.numel, dtype=p.dtype, device=group.device)
                view = group.view(cast, p).copy_(view)
            p.grad = view
