"""The gradient buffer: a DP optimizer's gradients live in flat segments, each allocated whole.

Why flat: the step adds noise over every parameter and, across processes, sums the gradients; if they
lived apart, the step would first concatenate them (a full-size copy) and draw a full-size noise
tensor beside it (~3x the gradients at the step's peak). Here the engine adds each layer's clipped
sum into the parameter's view of its segment, in place; the noise and the 1/E[B] scale are applied
to each segment in place, chunk by chunk (one fused kernel per segment on GPU); a distributed
optimizer reduces each segment itself (one collective per segment).

Why segments rather than one buffer: a segment is allocated by the first clipped sum written into
it, so under per-layer clipping the gradients appear layer by layer as the backward frees the
activations, as non-private training's do, instead of all at the start of the backward beside every
activation. A segment holds consecutive parameters (optimizer order, one device and accumulation
dtype) up to ``segment_numel(total)`` elements, about 1/``SEGMENTS`` of the gradients (a larger
parameter is a segment of its own): at most one segment is allocated ahead of need, and a step
makes at most about ``SEGMENTS`` collectives and noise launches.

Storage lifetime: kept between steps, so its addresses are static (CUDA graphs) and the allocator
sees no churn, unless ``zero_grad()`` (torch's default ``set_to_none=True``) releases it, as torch
releases gradients: the next backward allocates the segments again as it writes them
(``zero_grad(set_to_none=False)`` keeps them, zeroed).

Dtype: float32 for float32/bfloat16/float16 parameters, float64 for float64. Clipped sums are
summed in float32 even for bf16/fp16 parameters, so rounding to the parameter dtype happens once per
step, when the released gradient is written to ``p.grad`` (a second segment in the parameter dtype,
allocated once: torch requires ``p.grad`` in the parameter's dtype). Such a parameter therefore keeps
fp32 master gradients (4 + 2 bytes per bf16 parameter), as mixed-precision training with fp32 master
gradients does.

What a segment holds, in turn: zeros; the clipped sums of the backward passes since (``p.grad``
and, after ``clip_and_accumulate``, ``p.summed_grad`` are views of it); after the noise pass, the
released gradient (``p.grad``). ``zero()`` (optimizer ``zero_grad``, or the end of an abandoned
logical batch) starts over: a partial sum never survives into another step.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch

#: about how many segments the gradients of one device and dtype are split into (see the module docstring)
SEGMENTS = 32
#: the smallest segment bound, in elements (256 KiB of float32): small models get few segments
MIN_SEGMENT_NUMEL = 1 << 16


def segment_numel(total: int) -> int:
    """The most elements a segment of parameters holds (unless one parameter alone is larger)."""
    return max(MIN_SEGMENT_NUMEL, -(-total // SEGMENTS))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and narrower floats, float64 for float64: what clipped sums are summed in."""
    return torch.promote_types(dtype, torch.float32)


class _Segment:
    """One flat buffer: consecutive parameters of one device and accumulation dtype, in optimizer order."""

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
        self.segments: List[_Segment] = []
        for (device, dtype), members in groups.items():
            bound = segment_numel(sum(p.numel() for p in members))
            run: List[torch.Tensor] = []
            run_numel = 0
            for p in members:
                if run and run_numel + p.numel() > bound:
                    self.segments.append(_Segment(device, dtype, run))
                    run, run_numel = [], 0
                run.append(p)
                run_numel += p.numel()
            self.segments.append(_Segment(device, dtype, run))
        self._segment_of = {id(p): segment for segment in self.segments for p in segment.params}
        self._accumulators: Dict[int, torch.Tensor] = {}  # id(p) -> the persistent view clipped sums go into
        #: clipped sums were added since the last ``clip_and_accumulate`` (a backward's, not yet moved)
        self.pending = False
        #: a virtual step (BatchMemoryManager) moved a partial sum of a logical batch into ``p.summed_grad``
        self.logical_batch_open = False
        #: never release the storage (``make_graphed_dp_step``: a captured graph writes into it)
        self.pinned = False

    def __contains__(self, p: torch.Tensor) -> bool:
        return id(p) in self._segment_of

    @property
    def allocated(self) -> bool:
        return any(segment.flat is not None for segment in self.segments)

    def accumulator(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """``p``'s view of the accumulation buffer, the same tensor every time (None: not covered)."""
        view = self._accumulators.get(id(p))
        if view is None:
            segment = self._segment_of.get(id(p))
            if segment is None:
                return None
            view = self._accumulators[id(p)] = segment.view(segment.allocate(), p)
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
        segment = self._segment_of[id(p)]
        return segment.view(segment.allocate(), p)

    def owns(self, tensor: Optional[torch.Tensor]) -> bool:
        """Whether ``tensor`` lives in one of these buffers (a gradient the engine or the step wrote)."""
        if tensor is None:
            return False
        storage = tensor.untyped_storage().data_ptr()
        buffers = [segment.flat for segment in self.segments] + [segment.released for segment in self.segments]
        buffers += [cast for segment in self.segments for cast in segment.cast.values()]
        return any(b is not None and b.untyped_storage().data_ptr() == storage for b in buffers)

    def zero_views(self, params: Iterable[torch.Tensor]) -> None:
        """Zeros in the views of ``params`` whose segment is allocated (allocating nothing)."""
        for p in params:
            segment = self._segment_of.get(id(p))
            if segment is not None and segment.flat is not None:
                segment.view(segment.flat, p).zero_()

    def zero(self) -> None:
        """Start over: zeros in every accumulation buffer (one memset each; the storage stays)."""
        for segment in self.segments:
            if segment.flat is not None:
                segment.flat.zero_()
        self.pending = self.logical_batch_open = False

    def release(self) -> None:
        """Start over by dropping the storage (``zero_grad(set_to_none=True)``, as torch frees gradients): the
        next clipped sum allocates the buffer again, zeroed, so it does not sit beside the next forward's
        activations. The caller sets every ``p.grad`` that viewed it to None. A ``pinned`` buffer (a CUDA
        graph writes into it) is zeroed instead."""
        if self.pinned:
            self.zero()
            return
        for segment in self.segments:
            segment.flat = segment.released = None
            segment.cast.clear()
        self._accumulators.clear()
        self.pending = self.logical_batch_open = False

    def flats(self, keep_sums: bool) -> List[Tuple[_Segment, torch.Tensor]]:
        """Each segment with the flat tensor the noise pass works on: the accumulation buffer itself, or (with
        ``keep_sums``) a copy in the segment's second buffer, so that ``p.summed_grad`` outlives the step."""
        out = []
        for segment in self.segments:
            flat = segment.allocate()
            if keep_sums:
                if segment.released is None:
                    segment.released = torch.empty_like(flat)
                segment.released.copy_(flat)
                flat = segment.released
            out.append((segment, flat))
        return out

    def publish(self, segment: _Segment, flat: torch.Tensor) -> None:
        """Point each parameter's ``p.grad`` at its part of ``flat``; a narrower parameter's gradient is
        rounded once into the segment's buffer of its dtype (allocated once)."""
        for p in segment.params:
            view = segment.view(flat, p)
            if p.dtype != flat.dtype:
                cast = segment.cast.get(p.dtype)
                if cast is None:
                    cast = segment.cast[p.dtype] = torch.empty(segment.numel, dtype=p.dtype, device=segment.device)
                view = segment.view(cast, p).copy_(view)
            p.grad = view
