"""DPMultiheadAttention: nn.MultiheadAttention whose projections the engine can clip per sample.

Same constructor arguments, parameters (``in_proj_weight`` or ``q/k/v_proj_weight``,
``in_proj_bias``, ``bias_k``, ``bias_v``, ``out_proj``), state_dict keys and outputs as
nn.MultiheadAttention, so weights load both ways and code that reads ``in_proj_weight`` keeps
working. That is why the parameters stay where torch has them, rather than in nn.Linear
submodules behind state_dict hooks: the in-projection is marked as an internal capture point
(``capture_internal``) instead, one per call:

- self-attention (query is key is value, packed weights): ``qkv = x W_inᵀ + b_in`` is one
  linear layer over the L positions, captured as it is;
- otherwise the three projections are joined along features, ``[q | k | v]`` (each zero-padded
  to the longer sequence), and captured once: each weight (or row block of ``in_proj_weight``)
  is a linear layer on its own input and columns, ``in_proj_bias`` gets ``Σ_t`` of the whole.
  One capture point, because ``in_proj_weight``/``in_proj_bias`` serve all three projections;
- ``bias_k``/``bias_v`` (add_bias_kv) are broadcast to [N, 1, E] and captured: that tensor's
  gradient is their per-sample gradient (tiny).

``out_proj`` is an ordinary nn.Linear handled by the Linear rule, called as a module on the
batch-first ``[N, L, E]`` attention output (``calls_batch_first``), so the layer works in a
batch-first or sequence-first model whatever its own ``batch_first``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from ..engine.capture import calls_batch_first, capture_internal, is_capturing_internally
from ..engine.rules import register_rule
from ..engine.rules.rnn import SEQUENCE_LINEAR_RULE, SequenceLinear, WeightTerm


def _float_mask(mask: Optional[torch.Tensor], name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean mask (True = not attended) as an additive float mask, as torch does."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise ValueError(f"{name} must be a bool or floating tensor, got {mask.dtype}")
    return mask.to(dtype)


class DPMultiheadAttention(nn.Module):
    """nn.MultiheadAttention (same arguments, parameters, state_dict and outputs) for DP training.

    ``ModuleValidator.fix(model)`` swaps torch's layer for this one with the same weights
    (``from_module``). Its in-projection (packed or separate q/k/v weights, ``bias_k``/``bias_v``)
    is clipped per sample as linear layers over the positions and ``out_proj`` by the Linear
    rule; its ``batch_first`` need not match the GradSampleModule's.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        sizes = {"embed_dim": embed_dim, "num_heads": num_heads, "kdim": kdim, "vdim": vdim}
        for name, value in sizes.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = bool(add_zero_attn)
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """As nn.MultiheadAttention."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention) -> "DPMultiheadAttention":
        """The DP twin of an nn.MultiheadAttention: same configuration, weights (copied), trainability, mode."""
        like = next(module.parameters())
        layer = cls(
            module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
            vdim=module.vdim, batch_first=module.batch_first, device=like.device, dtype=like.dtype,
        )
        layer.load_state_dict(module.state_dict())
        own = dict(layer.named_parameters())
        for name, param in module.named_parameters():
            own[name].requires_grad_(param.requires_grad)
        return layer.train(module.training)

    #: torch's Transformer layers call this on their attention module (their inference fast path)
    merge_masks = nn.MultiheadAttention.merge_masks

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """As nn.MultiheadAttention's forward: ``(attn_output, attn_weights or None)``.

        ``query`` ``[L, N, E]`` (``[N, L, E]`` with ``batch_first``, ``[L, E]`` unbatched), ``key``
        and ``value`` likewise with length S; ``key_padding_mask``, ``attn_mask``,
        ``need_weights``, ``average_attn_weights`` and ``is_causal`` as in torch.

        Raises:
            ValueError: inputs that torch refuses too (query, key and value not all 3-D or all 2-D,
                mask shapes, ``is_causal`` without ``attn_mask``), naming the argument.
        """
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key and value must all be 3-D (batched) or all 2-D (unbatched), got "
                f"{query.dim()}-D, {key.dim()}-D, {value.dim()}-D"
            )
        batched = query.dim() == 3
        # batch-first [N, T, ·] views, keeping "query is key is value" (self-attention) visible
        originals = (query, key, value)
        views = {}
        for tensor in originals:
            if id(tensor) not in views:
                if not batched:
                    views[id(tensor)] = tensor.unsqueeze(0)
                else:
                    views[id(tensor)] = tensor if self.batch_first else tensor.transpose(0, 1)
        query, key, value = (views[id(t)] for t in originals)
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        batch, tgt_len, _ = query.shape
        src_len = key.shape[1]
        if query.shape[-1] != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"query, key, value must have {self.embed_dim}, {self.kdim}, {self.vdim} features, got "
                f"{query.shape[-1]}, {key.shape[-1]}, {value.shape[-1]}"
            )
        if key.shape[:2] != value.shape[:2] or key.shape[0] != batch:
            raise ValueError(
                f"key {tuple(key.shape)} and value {tuple(value.shape)} must match query's batch and each other's length"
            )
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs attn_mask as well (a hint, as in torch); pass the causal mask")

        key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        use_causal_hint = is_causal and key_padding_mask is None and not need_weights
        attn_mask = None if use_causal_hint else _float_mask(attn_mask, "attn_mask", query.dtype)
        if attn_mask is not None:
            expected = [(tgt_len, src_len), (batch * self.num_heads, tgt_len, src_len)]
            if not batched:
                expected.append((self.num_heads, tgt_len, src_len))
            if tuple(attn_mask.shape) not in expected:
                shapes = " or ".join(map(str, expected))
                raise ValueError(f"attn_mask must have shape {shapes}, got {tuple(attn_mask.shape)}")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, src_len):
            raise ValueError(
                f"key_padding_mask must have shape {(batch, src_len)}, got {tuple(key_padding_mask.shape)}"
            )

        q, k, v = self._project(query, key, value)
        extra_keys = 0
        if self.bias_k is not None:
            k = torch.cat([k, self._broadcast_capture("bias_k", batch)], 1)
            v = torch.cat([v, self._broadcast_capture("bias_v", batch)], 1)
            extra_keys += 1
        heads, head_dim = self.num_heads, self.head_dim
        q = q.reshape(batch, tgt_len, heads, head_dim).transpose(1, 2)  # [N, H, L, hd]
        k = k.reshape(batch, k.shape[1], heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, v.shape[1], heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, heads, 1, head_dim)], 2)
            v = torch.cat([v, v.new_zeros(batch, heads, 1, head_dim)], 2)
            extra_keys += 1
        if extra_keys:  # the appended keys are attended by everyone
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, extra_keys))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, extra_keys))
        keys = k.shape[2]
        mask = None  # additive, broadcast to [N, H, L, keys]
        if attn_mask is not None:
            mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.reshape(-1, heads, tgt_len, keys)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, keys)
            mask = padding if mask is None else mask + padding
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / head_dim), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0:
                weights = F.dropout(weights, p=dropout_p)
            attended = torch.matmul(weights, v)
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            attended = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal=use_causal_hint)
            weights = None
        attended = attended.transpose(1, 2).reshape(batch, tgt_len, self.embed_dim)
        with calls_batch_first():  # out_proj's rows are this layer's samples in any model layout
            output = self.out_proj(attended)
        if not batched:
            return output.squeeze(0), (None if weights is None else weights.squeeze(0))
        # sequence-first: contiguous [L, N, E], as torch returns it (the layers after see torch's layout)
        return (output if self.batch_first else output.transpose(0, 1).contiguous()), weights

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """q [N, L, E], k, v [N, S, E] (batch-first inputs), the in-projection marked for the engine."""
        E = self.embed_dim
        bias_names = () if self.in_proj_bias is None else ("in_proj_bias",)
        if self._qkv_same_embed_dim and query is key and key is value:
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # one linear layer over the L positions
            spec = SequenceLinear((WeightTerm("in_proj_weight"),), bias_names)
            return capture_internal(self, qkv, (spec, query), spec.param_names()).chunk(3, -1)
        blocks = [(0, E), (E, 2 * E), (2 * E, 3 * E)]
        if self._qkv_same_embed_dim:
            weights = [self.in_proj_weight[start:stop] for start, stop in blocks]
            names, rows = ["in_proj_weight"] * 3, blocks
        else:
            weights = [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]
            names, rows = ["q_proj_weight", "k_proj_weight", "v_proj_weight"], [None] * 3
        biases = [None] * 3 if self.in_proj_bias is None else list(self.in_proj_bias.chunk(3))
        sources = (query, key, value)
        q, k, v = (F.linear(x, w, b) for x, w, b in zip(sources, weights, biases))
        if not is_capturing_internally(self):
            return q, k, v
        # One captured tensor [q | k | v] (zero-padded to the longer sequence): in_proj_weight and
        # in_proj_bias serve all three projections, so they must be one call of the rule.
        inputs = []  # distinct input tensors (key is value in encoder-decoder attention)
        terms = []
        for x, name, row_span, column_span in zip(sources, names, rows, blocks):
            index = next((i for i, seen in enumerate(inputs) if seen is x), None)
            if index is None:
                inputs.append(x)
                index = len(inputs) - 1
            terms.append(WeightTerm(name, index, row_span, column_span))
        spec = SequenceLinear(tuple(terms), bias_names)
        tgt_len, src_len = q.shape[1], k.shape[1]
        length = max(tgt_len, src_len)
        joined = torch.cat([F.pad(p, (0, 0, 0, length - p.shape[1])) for p in (q, k, v)], -1)
        joined = capture_internal(self, joined, (spec, *inputs), spec.param_names())
        return joined[:, :tgt_len, :E], joined[:, :src_len, E : 2 * E], joined[:, :src_len, 2 * E :]

    def _broadcast_capture(self, name: str, batch: int) -> torch.Tensor:
        """Parameter ``name`` [1, 1, E] broadcast to [N, 1, E], whose gradient is its per-sample gradient."""
        spec = SequenceLinear(biases=(name,))
        return capture_internal(self, getattr(self, name).expand(batch, 1, self.embed_dim), (spec,), spec.param_names())


register_rule(SEQUENCE_LINEAR_RULE, DPMultiheadAttention)
