"""Tensor helpers (Opacus's ``opacus.utils.tensor_utils``): im2col unfolds and per-sample norms."""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

_Size = Union[int, Sequence[int]]


def _tuple(value: _Size, n: int) -> Tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _same_padding(kernel: Tuple[int, ...], dilation: Tuple[int, ...]) -> List[int]:
    """F.pad amounts (last dim first) for padding="same": total d·(k-1), the extra on the right."""
    pads = []
    for k, d in reversed(list(zip(kernel, dilation))):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


def _padded(input: torch.Tensor, padding, kernel, dilation, n: int) -> torch.Tensor:
    if padding == "valid":
        return input
    if padding == "same":
        return F.pad(input, _same_padding(kernel, dilation))
    pad = _tuple(padding, n)
    return F.pad(input, [p for q in reversed(pad) for p in (q, q)])


def unfold2d(input: torch.Tensor, *, kernel_size: _Size, padding: Union[_Size, str], stride: _Size,
             dilation: _Size) -> torch.Tensor:
    """im2col of ``input`` [B, C, H, W]: ``[B, C·kh·kw, L]`` with L the output positions (as ``F.unfold``),
    for integer, tuple, "same" or "valid" padding."""
    kernel, dil = _tuple(kernel_size, 2), _tuple(dilation, 2)
    x = _padded(input, padding, kernel, dil, 2)
    return F.unfold(x, kernel, dilation=dil, stride=_tuple(stride, 2))


def unfold3d(tensor: torch.Tensor, *, kernel_size: _Size, padding: Union[_Size, str], stride: _Size,
             dilation: _Size) -> torch.Tensor:
    """im2col of ``tensor`` [B, C, D, H, W]: ``[B, C·kd·kh·kw, L]`` (the 3-D ``F.unfold``)."""
    kernel, dil, step = _tuple(kernel_size, 3), _tuple(dilation, 3), _tuple(stride, 3)
    x = _padded(tensor, padding, kernel, dil, 3)
    batch, channels = x.shape[:2]
    for dim, (k, d, s) in enumerate(zip(kernel, dil, step)):  # windows of span d·(k-1)+1, every s
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)[..., ::d]
    # x: [B, C, oD, oH, oW, kd, kh, kw] -> [B, C·kd·kh·kw, oD·oH·oW]
    x = x.permute(0, 1, 5, 6, 7, 2, 3, 4)
    return x.reshape(batch, channels * kernel[0] * kernel[1] * kernel[2], -1)


def calc_sample_norms(named_params, *, flat: bool = True) -> List[torch.Tensor]:
    """Per-sample norms of ``(name, per-sample tensor [B, ...])`` pairs: one overall vector (``flat``)
    or one per tensor."""
    norms = [p.reshape(len(p), -1).norm(2, dim=-1) for _, p in named_params]
    return [torch.stack(norms, dim=0).norm(2, dim=0)] if flat else norms


def calc_sample_norms_one_layer(param: torch.Tensor) -> torch.Tensor:
    """Per-sample norms of one per-sample tensor [B, ...]."""
    return param.reshape(len(param), -1).norm(2, dim=-1)


def sum_over_all_but_batch_and_last_n(tensor: torch.Tensor, n_dims: int) -> torch.Tensor:
    """Sum over every dimension but the first and the last ``n_dims``."""
    if tensor.dim() == n_dims + 1:
        return tensor
    dims = list(range(1, tensor.dim() - n_dims))
    return tensor.sum(dim=dims)


__all__: List[str] = ["unfold2d", "unfold3d", "calc_sample_norms", "calc_sample_norms_one_layer",
                      "sum_over_all_but_batch_and_last_n"]
