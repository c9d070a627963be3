"""DPLSTM, DPGRU, DPRNN: nn.LSTM / nn.GRU / nn.RNN whose weights the engine can clip per sample.

Same constructor arguments, parameter names and state_dict keys as the torch modules (weights
load both ways), same outputs. The difference is how a layer and direction is computed:

- the input projection of all T steps is one GEMM, ``gx = x W_ihᵀ + b_ih`` [B, T, G·H];
- the recurrence runs step by step: ``gh = h_{t-1} W_hhᵀ + b_hh``, then the gates' pointwise
  part (``fastdp.ops.rnn_cells``: fused CUDA kernels where the extension is available);
- under a GradSampleModule, ``gx`` is marked with ``capture_internal``: its gradient is every
  step's gate gradient, which with the recorded ``x`` and stacked ``h_{t-1}`` makes W_ih and
  W_hh linear layers over T for ``fastdp.engine.rules.rnn``. A GRU's hidden term enters its
  n-gate through ``r ⊙ (h W_hnᵀ + b_hn)``, so W_hh gets its own capture point: zeros [B, T, 3H]
  added to each step's ``gh`` (a "tap"), whose gradient is ``∂loss/∂gh`` of every step. An
  LSTM's projection ``h_t = W_hr m_t`` (proj_size) is tapped the same way.

The routed forward hands this module detached weights, so autograd never forms the non-private
weight gradient. PackedSequence inputs run padded (batch in the caller's order) with each
sample's steps past its length masked: the state is carried unchanged and the output is zero,
so padded steps get exactly zero gradient and ``h_n`` is the state at each sample's last step.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..engine.capture import capture_internal, is_capturing_internally
from ..engine.rules import register_rule
from ..engine.rules.rnn import SEQUENCE_LINEAR_RULE, SequenceLinear, WeightTerm
from ..ops.rnn_cells import cell_impl, is_torch_reference

logger = logging.getLogger(__name__)

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_logged_backends = set()


def _cell(mode: str, gates: torch.Tensor):
    """The pointwise step of an LSTM or GRU for tensors like ``gates``; says once per (cell, device
    type, choice) in the log which implementation runs."""
    name = f"{mode.lower()}_cell_pointwise"
    impl = cell_impl(name, gates)
    which = "the pure-torch path" if is_torch_reference(name, impl) else "the fused kernel of fastdp.csrc"
    key = (mode, gates.device.type, which)
    if key not in _logged_backends:
        _logged_backends.add(key)
        logger.info("fastdp.layers: %s cells on %s run %s (%s)", mode, gates.device.type, which, name)
    return impl


class DPRNNBase(nn.Module):
    """The shared machinery of DPLSTM, DPGRU and DPRNN (``mode`` as nn.RNNBase: LSTM, GRU, RNN_TANH, RNN_RELU).

    Use the subclasses, or ``ModuleValidator.fix(model)``, which swaps torch's layers for them
    with the same weights (``from_module``). Under ``PrivacyEngine.make_private`` their weights
    are clipped per sample as linear layers over the time steps (``fastdp.engine.rules.rnn``);
    outside it they are plain recurrent layers (computed one time step at a time, without cuDNN).
    """

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if mode not in GATES:
            raise ValueError(f"mode must be one of {sorted(GATES)}, got {mode!r}")
        for name, value, low in (("input_size", input_size, 0), ("hidden_size", hidden_size, 1),
                                 ("num_layers", num_layers, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
            raise ValueError(f"proj_size must be an int >= 0, got {proj_size!r}")
        if proj_size and mode != "LSTM":
            raise ValueError("proj_size is only supported by DPLSTM; leave it 0")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size ({proj_size}) must be smaller than hidden_size ({hidden_size})")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={dropout} with num_layers=1 has no effect: dropout applies between recurrent layers",
                UserWarning,
            )
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = proj_size
        factory = {"device": device, "dtype": dtype}
        gate_size = GATES[mode] * hidden_size
        state_size = proj_size or hidden_size
        directions = 2 if bidirectional else 1
        #: per (layer, direction), in nn's order: the names of its parameters (None where absent)
        self._cell_names: List[Dict[str, Optional[str]]] = []
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else state_size * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                names = {
                    "weight_ih": f"weight_ih{suffix}", "weight_hh": f"weight_hh{suffix}",
                    "bias_ih": f"bias_ih{suffix}" if bias else None, "bias_hh": f"bias_hh{suffix}" if bias else None,
                    "weight_hr": f"weight_hr{suffix}" if proj_size else None,
                }
                shapes = {
                    "weight_ih": (gate_size, layer_input_size), "weight_hh": (gate_size, state_size),
                    "bias_ih": (gate_size,), "bias_hh": (gate_size,), "weight_hr": (proj_size, hidden_size),
                }
                for role, name in names.items():
                    if name is not None:
                        self.register_parameter(name, nn.Parameter(torch.empty(shapes[role], **factory)))
                self._cell_names.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As nn.RNNBase: every parameter uniform in ±1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op (nn.RNNBase compacts cuDNN weights here; these layers use no cuDNN RNN)."""

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        """The parameters per layer and direction, in nn.RNNBase's order (as its ``all_weights``)."""
        return [[getattr(self, n) for n in names.values() if n is not None] for names in self._cell_names]

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            text += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if self.mode == "RNN_RELU":
            text += ", nonlinearity='relu'"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.bidirectional:
            text += ", bidirectional=True"
        return text

    @classmethod
    def _from_module_kwargs(cls, module: nn.RNNBase) -> dict:
        return {}

    @classmethod
    def from_module(cls, module: nn.RNNBase) -> "DPRNNBase":
        """The DP twin of a torch recurrent layer: same configuration, weights (copied), trainability, mode."""
        like = next(module.parameters(), None)
        layer = cls(
            module.input_size, module.hidden_size, num_layers=module.num_layers, bias=module.bias,
            batch_first=module.batch_first, dropout=module.dropout, bidirectional=module.bidirectional,
            device=None if like is None else like.device, dtype=None if like is None else like.dtype,
            **cls._from_module_kwargs(module),
        )
        layer.load_state_dict(module.state_dict())
        for name, param in module.named_parameters():
            layer._parameters[name].requires_grad_(param.requires_grad)
        return layer.train(module.training)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, input, hx=None):
        """As the torch layer's forward: ``(output, h_n)``, for an LSTM ``(output, (h_n, c_n))``.

        Args:
            input: ``[T, B, input_size]`` (``[B, T, input_size]`` with ``batch_first``),
                ``[T, input_size]`` unbatched, or a PackedSequence (its padded steps get exactly
                zero gradient, and ``h_n`` is each sample's state at its last step).
            hx: the initial state, ``h_0`` ``[num_layers·directions, B, hidden_size]`` (for an
                LSTM the pair ``(h_0, c_0)``); zeros when None.

        Raises:
            ValueError: for an input of the wrong rank, feature size or with no time step.
        """
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input, batch_first=True)  # the caller's batch order
            unbatched = False
        else:
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                raise ValueError(
                    f"input must be a 2-D (unbatched) or 3-D tensor or a PackedSequence, got "
                    f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}"
                )
            unbatched, lengths = input.dim() == 2, None
            x = input.unsqueeze(0) if unbatched else (input if self.batch_first else input.transpose(0, 1))
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"input has {x.shape[-1]} features but input_size={self.input_size}; pass [..., {self.input_size}]"
            )
        if x.shape[1] == 0:
            raise ValueError("input has sequence length 0; pass at least one time step")
        h0, c0 = self._initial_state(hx, x, unbatched)
        mask = None if lengths is None else torch.arange(x.shape[1]) < lengths[:, None]
        mask = None if mask is None else mask.to(x.device)

        directions = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                c_start = None if c0 is None else c0[k]
                out, h, c = self._run_direction(k, direction == 1, layer_input, h0[k], c_start, mask)
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, 2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output, h_n = layer_input, torch.stack(h_n)
        c_n = torch.stack(c_n) if self.mode == "LSTM" else None

        if packed:
            output = self._pack_like(output, lengths, input)
        elif unbatched:
            output, h_n = output.squeeze(0), h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        elif not self.batch_first:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if self.mode == "LSTM" else h_n)

    def _initial_state(self, hx, x: torch.Tensor, unbatched: bool):
        """(h_0, c_0) as [layers·directions, B, ·] (c_0 None unless LSTM), zeros where not given."""
        batch = x.shape[0]
        count = self.num_layers * (2 if self.bidirectional else 1)
        h_size, c_size = self.proj_size or self.hidden_size, self.hidden_size
        if hx is None:
            h0 = x.new_zeros(count, batch, h_size)
            return h0, (x.new_zeros(count, batch, c_size) if self.mode == "LSTM" else None)
        if self.mode == "LSTM":
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise ValueError("hx of an LSTM must be a tuple (h_0, c_0); pass both or neither")
            states = [(hx[0], h_size, "h_0"), (hx[1], c_size, "c_0")]
        else:
            if not isinstance(hx, torch.Tensor):
                raise ValueError(f"hx must be a tensor h_0, got {type(hx).__name__}")
            states = [(hx, h_size, "hx")]
        result = []
        for state, size, name in states:
            expected = (count, size) if unbatched else (count, batch, size)
            if tuple(state.shape) != expected:
                raise ValueError(
                    f"{name} must have shape {expected} (layers·directions, batch, size), got {tuple(state.shape)}"
                )
            result.append(state.unsqueeze(1) if unbatched else state)
        return result[0], (result[1] if self.mode == "LSTM" else None)

    @staticmethod
    def _pack_like(output: torch.Tensor, lengths: torch.Tensor, like: PackedSequence) -> PackedSequence:
        """``output`` [B, T, ·] (caller's order) packed with ``like``'s batch_sizes and indices, as nn does."""
        if like.sorted_indices is not None:
            order = like.sorted_indices.to(output.device)
            output, lengths = output.index_select(0, order), lengths.index_select(0, like.sorted_indices.cpu())
        data = pack_padded_sequence(output, lengths, batch_first=True, enforce_sorted=True).data
        return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)

    def _taps(self, spec: SequenceLinear, inputs, gx: torch.Tensor, width: int):
        """Zeros [B, T, width] marked as a capture point, one slice per step, to be added where a
        per-step tensor is formed: their gradient is that tensor's gradient at every step. None
        when the engine is not capturing (then nothing is added). In ``gx``'s dtype, the dtype of
        the projections they are added to (under autocast too), so they change no result."""
        if not is_capturing_internally(self):
            return None
        zeros = gx.new_zeros(gx.shape[0], gx.shape[1], width)
        tapped = capture_internal(self, zeros, inputs, spec.param_names())
        return None if tapped is zeros else tapped.unbind(1)

    def _run_direction(self, k: int, reverse: bool, x, h, c, mask):
        """One layer and direction over the whole sequence: (output [B, T, ·], h_T, c_T)."""
        names = self._cell_names[k]
        w_ih, w_hh, w_hr = getattr(self, names["weight_ih"]), getattr(self, names["weight_hh"]), None
        b_ih = None if names["bias_ih"] is None else getattr(self, names["bias_ih"])
        b_hh = None if names["bias_hh"] is None else getattr(self, names["bias_hh"])
        biases_ih = tuple(n for n in (names["bias_ih"],) if n is not None)
        biases_hh = tuple(n for n in (names["bias_hh"],) if n is not None)
        steps = x.shape[1]
        h_prev: List[Optional[torch.Tensor]] = [None] * steps  # the state each step starts from, by time
        stacked_h_prev = lambda: torch.stack(h_prev, 1)  # noqa: E731  (recorded once the loop has run)

        gx = F.linear(x, w_ih, b_ih)  # every step's input projection in one GEMM
        hh_taps = projection_taps = None
        if self.mode == "GRU":
            ih = SequenceLinear((WeightTerm(names["weight_ih"]),), biases_ih)
            gx = capture_internal(self, gx, (ih, x), ih.param_names())
            hh = SequenceLinear((WeightTerm(names["weight_hh"]),), biases_hh)
            hh_taps = self._taps(hh, lambda: (hh, stacked_h_prev()), gx, w_hh.shape[0])
        else:  # LSTM / RNN: the gates are gx + gh, one gradient for both projections
            terms = (WeightTerm(names["weight_ih"], 0), WeightTerm(names["weight_hh"], 1))
            gates = SequenceLinear(terms, biases_ih + biases_hh)
            gx = capture_internal(self, gx, lambda: (gates, x, stacked_h_prev()), gates.param_names())
        if names["weight_hr"] is not None:
            w_hr = getattr(self, names["weight_hr"])
            cell_outputs: List[Optional[torch.Tensor]] = [None] * steps  # m_t = o ⊙ tanh(c_t), projected to h_t
            projection = SequenceLinear((WeightTerm(names["weight_hr"]),))
            recorded = lambda: (projection, torch.stack(cell_outputs, 1))  # noqa: E731
            projection_taps = self._taps(projection, recorded, gx, w_hr.shape[0])

        cell = _cell(self.mode, gx) if self.mode in ("LSTM", "GRU") else None
        gx_steps = gx.unbind(1)
        outputs: List[Optional[torch.Tensor]] = [None] * steps
        zero = x.new_zeros(())
        for t in range(steps - 1, -1, -1) if reverse else range(steps):
            h_prev[t] = h
            gh = F.linear(h, w_hh, b_hh)
            c_new = None
            if self.mode == "LSTM":
                h_new, c_new = cell(gx_steps[t], gh, c)
                if w_hr is not None:
                    cell_outputs[t] = h_new
                    h_new = F.linear(h_new, w_hr)
                    if projection_taps is not None:
                        h_new = h_new + projection_taps[t]
            elif self.mode == "GRU":
                if hh_taps is not None:
                    gh = gh + hh_taps[t]
                h_new = cell(gx_steps[t], gh, h)
            else:
                pre_activation = gx_steps[t] + gh
                h_new = torch.tanh(pre_activation) if self.mode == "RNN_TANH" else torch.relu(pre_activation)
            if mask is None:
                h, c, outputs[t] = h_new, c_new, h_new
            else:  # past its length a sample keeps its state and outputs zero
                valid = mask[:, t : t + 1]
                h = torch.where(valid, h_new, h)
                c = None if c_new is None else torch.where(valid, c_new, c)
                outputs[t] = torch.where(valid, h_new, zero)
        return torch.stack(outputs, 1), h, c


class DPLSTM(DPRNNBase):
    """nn.LSTM (same arguments, parameters, state_dict and outputs) for DP training.

    ``proj_size`` (LSTM with projections) is supported; the projection weight is clipped like
    the others. On a GPU the cell's pointwise step runs a fused CUDA kernel when the extension
    builds (``csrc/``), else torch ops; the log says which (logger ``fastdp.layers.rnn``).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype)

    @classmethod
    def _from_module_kwargs(cls, module: nn.LSTM) -> dict:
        return {"proj_size": module.proj_size}


class DPGRU(DPRNNBase):
    """nn.GRU (same arguments, parameters, state_dict and outputs) for DP training.

    On a GPU the cell's pointwise step runs a fused CUDA kernel when the extension builds
    (``csrc/``), else torch ops; the log says which (logger ``fastdp.layers.rnn``).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, device, dtype)


class DPRNN(DPRNNBase):
    """nn.RNN (tanh or relu; same arguments, parameters, state_dict and outputs) for DP training.

    Raises:
        ValueError: ``nonlinearity`` other than ``"tanh"`` or ``"relu"``.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional, 0, device, dtype)
        self.nonlinearity = nonlinearity

    @classmethod
    def _from_module_kwargs(cls, module: nn.RNN) -> dict:
        return {"nonlinearity": module.nonlinearity}


register_rule(SEQUENCE_LINEAR_RULE, DPRNNBase)
