"""Per-sample losses for token-level tasks (language modelling, masked LM, token classification).

Per-sample clipping bounds one sample's influence only if each sample's loss depends on that
sample alone. Hugging Face's built-in loss (``model(..., labels=labels).loss``) averages over all
valid tokens of the *batch*: sample i's weight is 1 / (valid tokens in the whole batch), so
adding or removing another sample rescales every unclipped gradient and the sensitivity is no
longer the clipping bound. The helpers here average each sample over its own valid tokens
(labels equal to ``ignore_index``, -100 by default, are left out), then over the batch::

    logits = model(input_ids=ids, attention_mask=mask).logits      # no labels=
    loss = per_sample_lm_loss(logits, labels, shift_labels=True)   # causal LM: token t predicts t+1
    loss.backward()

``GradSampleModule`` refuses a model loss computed from ``labels=`` unless it provably equals
this one (see ``check_model_loss``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def per_sample_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift_labels: bool = False
) -> torch.Tensor:
    """Each sample's cross-entropy averaged over its own valid tokens: float32 ``[B]``.

    ``logits [B, T, V]``, ``labels [B, T]``. ``shift_labels=True`` (causal LM, as Hugging Face
    does inside its models) scores ``logits[:, t]`` against ``labels[:, t + 1]``. A sample with
    no valid token has loss 0 (and gradient 0). Computed in float32 whatever the logits' dtype.
    """
    if logits.dim() < 3 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"logits must be [B, T, V] and labels [B, T] with the same B, T; got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if shift_labels:
        logits, labels = logits[:, :-1], labels[:, 1:]
    batch = logits.shape[0]
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(batch, -1)
    valid = (labels != ignore_index).reshape(batch, -1).sum(1)
    return token_loss.sum(1) / valid.clamp(min=1)


def per_sample_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift_labels: bool = False,
    sample_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``sum_i loss_i`` (reduction="sum") or ``sum_i loss_i / B`` ("mean", B = rows of the batch),
    with ``loss_i`` sample i's mean token loss (``per_sample_token_loss``).

    ``reduction`` must equal make_private's ``loss_reduction``. ``sample_mask [B]`` (the 0/1
    mask of fixed-shape padded Poisson batches) leaves padding rows out; B still counts them,
    as the engine does.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {REDUCTIONS} (the loss_reduction of make_private), got {reduction!r}"
        )
    losses = per_sample_token_loss(logits, labels, ignore_index=ignore_index, shift_labels=shift_labels)
    if sample_mask is not None:
        if sample_mask.shape != losses.shape:
            raise ValueError(f"sample_mask must have shape [B] = {tuple(losses.shape)}, got {tuple(sample_mask.shape)}")
        losses = losses * sample_mask.to(losses.dtype)
    total = losses.sum()
    return total / losses.shape[0] if reduction == "mean" and losses.shape[0] > 0 else total


def check_model_loss(model_kwargs: dict, loss_reduction: str, ignore_index: int = -100) -> None:
    """Refuse a loss a model computed itself from ``labels=`` (Hugging Face) when it couples samples.

    HF's losses are batch means over the valid labels (those not equal to ``ignore_index``). With
    ``loss_reduction="mean"`` and every sample having the same number of valid labels (before and
    after the causal shift, for token labels), that mean is exactly the mean of per-sample means,
    so it is accepted; otherwise each sample's weight depends on the others: one label of -100 in a
    sequence-classification batch changes every other sample's weight (and a sample whose own
    gradient is zero still moves the step).
    """
    fix = (
        "call the model without labels= and compute a per-sample loss: fastdp.losses.per_sample_lm_loss(logits, "
        "labels, ...) for token labels, F.cross_entropy(logits, labels, reduction='sum') / len(labels) for one label "
        "per sample"
    )
    if loss_reduction != "mean":
        raise ValueError(f"the model computed a batch-mean loss from labels=, which needs loss_reduction='mean'; {fix}")
    if model_kwargs.get("num_items_in_batch") is not None:
        raise ValueError(f"num_items_in_batch divides every sample's loss by a batch statistic; {fix}")
    labels = model_kwargs["labels"]
    if not isinstance(labels, torch.Tensor) or labels.dim() == 0 or labels.shape[0] <= 1:
        return
    views = (labels[:, None],) if labels.dim() == 1 else (labels, labels[:, 1:])  # one label per sample, or tokens
    for view in views:
        counts = (view != ignore_index).reshape(view.shape[0], -1).sum(1)
        if bool(counts.min() != counts.max()):
            raise ValueError(
                "the model's loss averages over all valid labels of the batch, and samples have different "
                f"numbers of them (labels == {ignore_index}), so each sample's weight depends on the others; {fix}"
            )
