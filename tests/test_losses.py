"""Per-sample token losses: each sample's loss depends on its own tokens only; HF's coupled loss is refused."""

import pytest
import torch
import torch.nn.functional as F

from fastdp.losses import check_model_loss, per_sample_lm_loss, per_sample_token_loss


def _data(seed=0, batch=4, seq=6, vocab=11):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, 3:] = -100
    labels[2, :2] = -100
    labels[3, :] = -100  # a sample with no valid token
    return logits, labels


@pytest.mark.parametrize("shift", [False, True])
def test_each_sample_is_its_own_token_mean(shift):
    logits, labels = _data()
    losses = per_sample_token_loss(logits, labels, shift_labels=shift)
    for i in range(labels.shape[0]):
        lg, lb = (logits[i, :-1], labels[i, 1:]) if shift else (logits[i], labels[i])
        valid = lb != -100
        expected = F.cross_entropy(lg[valid], lb[valid], reduction="mean") if valid.any() else torch.tensor(0.0)
        torch.testing.assert_close(losses[i], expected)


def test_a_sample_does_not_depend_on_the_others():
    logits, labels = _data()
    others_changed = labels.clone()
    others_changed[1:, :4] = -100  # the other samples' numbers of valid tokens change
    first_sample_grads = []
    for lab in (labels, others_changed):
        x = logits.clone().requires_grad_(True)
        per_sample_lm_loss(x, lab, reduction="sum").backward()
        first_sample_grads.append(x.grad[0])
    torch.testing.assert_close(first_sample_grads[0], first_sample_grads[1])


def test_reductions_and_mask():
    logits, labels = _data()
    losses = per_sample_token_loss(logits, labels)
    torch.testing.assert_close(per_sample_lm_loss(logits, labels, reduction="sum"), losses.sum())
    torch.testing.assert_close(per_sample_lm_loss(logits, labels), losses.sum() / 4)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(per_sample_lm_loss(logits, labels, sample_mask=mask), (losses * mask).sum() / 4)
    # with equal valid-token counts it is Hugging Face's / torch's batch-mean loss
    full = torch.randint(0, 11, (4, 6))
    torch.testing.assert_close(per_sample_lm_loss(logits, full), F.cross_entropy(logits.flatten(0, 1), full.flatten()))


def test_bad_arguments():
    logits, labels = _data()
    with pytest.raises(ValueError, match="reduction"):
        per_sample_lm_loss(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="labels"):
        per_sample_lm_loss(logits, labels[:, 1:])
    with pytest.raises(ValueError, match="sample_mask"):
        per_sample_lm_loss(logits, labels, sample_mask=torch.ones(3))


def test_check_model_loss():
    _, labels = _data()
    with pytest.raises(ValueError, match="per_sample_lm_loss"):
        check_model_loss({"labels": labels}, "mean")  # different valid counts: coupled
    with pytest.raises(ValueError, match="loss_reduction='mean'"):
        check_model_loss({"labels": torch.zeros(4, 6, dtype=torch.long)}, "sum")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        check_model_loss({"labels": torch.zeros(4, 6, dtype=torch.long), "num_items_in_batch": 24}, "mean")
    check_model_loss({"labels": torch.zeros(4, 6, dtype=torch.long)}, "mean")  # equal counts: exact
    check_model_loss({"labels": torch.zeros(4, dtype=torch.long)}, "mean")  # one label per sample


def test_hf_model_loss_refused_when_coupled():
    pytest.importorskip("transformers")
    from fastdp.engine.grad_sample_module import GradSampleModule

    from . import hf_tiny

    gsm = GradSampleModule(hf_tiny.gpt2())
    batch = hf_tiny.lm_batch(pad_last=2)  # sample 0 has fewer valid labels
    with pytest.raises(ValueError, match="per_sample_lm_loss"):
        gsm(**batch)
    out = gsm(**hf_tiny.lm_batch())  # no padding: HF's mean is the mean of per-sample means
    torch.testing.assert_close(out.loss, hf_tiny.lm_loss(out, hf_tiny.lm_batch()))
