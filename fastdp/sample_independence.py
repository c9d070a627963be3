"""A numerical probe: does each sample's gradient depend on that sample alone?

Per-sample clipping bounds one sample's effect on a step only if the loss is a sum (or mean) of
per-sample losses, each computed from its own sample. No library can check that from the code: a
forward that uses batch statistics (BatchNorm in training mode, a mean over the batch), a loss
that averages over the batch's valid tokens (Hugging Face's built-in losses with padding), an
in-batch contrastive loss (CLIP, SimCLR) or a layer run on rows that are not samples all make
one sample move the others' gradients. ``check_sample_independence`` tests it on real data, by
leave-one-out, for use in tests and at start-up:

    fastdp.check_sample_independence(model, lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]), (x, y))

For a few samples i it compares, in float64 on a copy of the model:

- leave-one-out: ``S(batch) - S(batch without i)`` against ``S({i})``, where ``S(b)`` is the summed
  per-sample gradient of batch ``b`` (``|b|·∇L(b)`` for a mean loss, ``∇L(b)`` for a sum): equal
  exactly when adding sample i changes nothing but its own term;
- what the engine clips: row i of the per-sample gradients of fastdp's hooks mode against ``S({i})``,
  which also catches a layer whose rows are not samples but happen to be as many.

nn.Dropout modules are switched off during the probe (their masks differ between batches); other
randomness in the model or ``loss_fn`` (functional dropout, augmentation) must be off too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn


@dataclass
class SampleIndependenceReport:
    """What the probe compared: the samples, and per sample the largest relative discrepancy of the
    leave-one-out test and of the engine's per-sample rows (0 when independent, up to rounding)."""

    samples: List[int]
    leave_one_out_error: List[float]
    engine_row_error: List[float]

    @property
    def max_error(self) -> float:
        return max(self.leave_one_out_error + self.engine_row_error, default=0.0)


def check_sample_independence(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    batch,
    *,
    samples: int = 3,
    loss_reduction: str = "mean",
    rtol: float = 1e-6,
    check_engine: bool = True,
) -> SampleIndependenceReport:
    """Raise ``ValueError`` if some sample's gradient depends on other samples, else return the report.

    ``model``: a plain module or a ``GradSampleModule`` (probed as it is wrapped). ``loss_fn(model,
    batch)``: the training loss of a batch, as a scalar (a mean over samples for
    ``loss_reduction="mean"``, a sum for ``"sum"``). ``batch``: a tensor, a tuple/list or dict of
    tensors, with samples along dim 0 (other values are passed as they are). ``samples``: how many
    samples to probe, spread over the batch (each costs three gradient evaluations). ``check_engine``:
    also compare fastdp's hooks-mode per-sample gradients with each sample's own. The model is
    copied (in float64); the original is not touched.
    """
    from .engine.grad_sample_module import check_loss_reduction

    loss_reduction = check_loss_reduction(loss_reduction)
    batch = _to_float64(batch)
    size = _batch_size(batch)
    if size < 2:
        raise ValueError(f"batch must hold at least 2 samples to compare them, got {size}")
    probed = sorted({round(k * (size - 1) / max(1, samples - 1)) for k in range(min(samples, size))})
    plain = _copy(model, engine=False)

    def summed(indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        named = _trainable(plain)
        try:
            loss = loss_fn(plain, _select(batch, indices))
        except (RuntimeError, ValueError) as error:
            if len(indices) != 1:
                raise
            raise ValueError(
                f"sample {indices[0]} alone cannot go through the model and loss ({error}), so its gradient "
                "depends on other samples (batch statistics in the forward?); per-sample clipping cannot bound it"
            ) from error
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        scale = float(len(indices)) if loss_reduction == "mean" else 1.0
        return {n: torch.zeros_like(p) if g is None else g * scale for (n, p), g in zip(named, grads)}

    report = SampleIndependenceReport(probed, [], [])
    with _dropout_off(plain):
        full = summed(range(size))
        floor = 1e-12 * _norm(full)  # samples whose own gradient is 0 are compared at the batch's scale
        rows = _engine_rows(model, loss_fn, batch, loss_reduction) if check_engine else None
        for i in probed:
            alone = summed([i])
            without = summed([j for j in range(size) if j != i])
            scale = max(_norm(alone), floor, 1e-300)
            report.leave_one_out_error.append(_distance({n: full[n] - without[n] for n in full}, alone) / scale)
            _check(i, "leave-one-out", report.leave_one_out_error[-1], rtol)
            if rows is not None:
                report.engine_row_error.append(_distance({n: rows[n][i] for n in full}, alone) / scale)
                _check(i, "fastdp's per-sample row", report.engine_row_error[-1], rtol)
    return report


def _check(sample: int, kind: str, error: float, rtol: float) -> None:
    if not error <= rtol:  # NaN fails too
        raise ValueError(
            f"sample {sample}'s gradient depends on other samples ({kind} differs from the sample's own gradient "
            f"by {error:.3g} relative): batch statistics in the forward (BatchNorm), a loss averaged over the "
            "batch's valid tokens, an in-batch contrastive loss or a layer whose rows are not samples couple "
            "samples, and per-sample clipping cannot bound them"
        )


def _copy(model: nn.Module, *, engine: bool) -> nn.Module:
    """A float64 copy: plain autograd (``engine=False``), or fastdp's hooks mode without clipping."""
    from .engine.grad_sample_module import GradSampleModule

    copied = copy.deepcopy(model).double()
    if not isinstance(copied, GradSampleModule):
        return GradSampleModule(copied, loss_reduction="sum", mode="hooks") if engine else copied
    copied.mode, copied.clipping, copied.grad_scaler = "hooks", None, None
    copied._capturing = engine  # not capturing: routed layers run their plain forward,
    copied._plain_autograd = not engine  # and their parameters get plain autograd gradients
    return copied


def _engine_rows(model: nn.Module, loss_fn, batch, loss_reduction: str) -> Dict[str, torch.Tensor]:
    """Per-sample gradients as fastdp's hooks mode attributes them to rows, on another copy."""
    gsm = _copy(model, engine=True)
    gsm.loss_reduction = loss_reduction
    with _dropout_off(gsm):
        loss_fn(gsm, batch).backward()
    size = _batch_size(batch)
    return {
        name: (p.grad_sample.double() if getattr(p, "grad_sample", None) is not None
               else torch.zeros((size, *p.shape), dtype=torch.float64))
        for name, p in _trainable(gsm)
    }


def _trainable(model: nn.Module):
    """(name, parameter) of the trainable parameters, named within the model a GradSampleModule wraps."""
    from .engine.grad_sample_module import GradSampleModule

    inner = model._module if isinstance(model, GradSampleModule) else model
    return [(n, p) for n, p in inner.named_parameters() if p.requires_grad]


class _dropout_off:
    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]

    def __enter__(self):
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m in self.modules:
            m.train()
        return False


def _to_float64(batch):
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to_float64(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_float64(v) for v in batch)
    return batch


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("batch holds no tensor with a batch dimension (dim 0)")


def _select(batch, indices: Sequence[int]):
    index = torch.as_tensor(list(indices), dtype=torch.long)
    if isinstance(batch, torch.Tensor):
        return batch.index_select(0, index.to(batch.device))
    if isinstance(batch, dict):
        return {k: _select(v, indices) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    return type(batch)(_select(v, indices) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for v in batch)


def _norm(grads: Dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(g.square().sum() for g in grads.values())))


def _distance(first: Dict[str, torch.Tensor], second: Dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((first[n] - second[n]).square().sum() for n in first)))
