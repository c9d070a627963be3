"""Activation checkpointing: recomputed forwards neither double-count nor drop a layer.

Non-reentrant checkpointing re-runs routed forwards during the backward; only the original
capture node is backpropagated, so each call is delivered once. Reentrant checkpointing runs the
segment's backward as a nested backward: the engine finishes with the outer one.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastdp.engine.clipping import FlatClipping
from fastdp.engine.grad_sample_module import GradSampleModule


class Blocks(nn.Module):
    """Embedding, two checkpointable blocks, head; ``head_checkpointed`` puts the last layer inside a
    segment, so the backward's first captured call comes from a recomputation."""

    def __init__(self, checkpointing=None, head_checkpointed=False):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(8, 5)
        self.checkpointing, self.head_checkpointed = checkpointing, head_checkpointed

    def _run(self, fn, x):
        if self.checkpointing is None:
            return fn(x)
        return checkpoint(fn, x, use_reentrant=self.checkpointing == "reentrant")

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + self._run(block, h)
        if self.head_checkpointed:
            return self._run(lambda t: self.head(t).mean(1), h)
        return self.head(h).mean(1)


def _step(model, ids, y, max_grad_norm):
    gsm = GradSampleModule(model, clipping=FlatClipping(max_grad_norm))
    nn.functional.cross_entropy(gsm(ids), y).backward()
    return gsm.per_sample_norms, {n: p.grad for n, p in model.named_parameters()}, gsm.backward_passes


@pytest.mark.parametrize("head_checkpointed", [False, True])
@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant"])
def test_torch_checkpoint_on_and_off_give_the_same_step(checkpointing, head_checkpointed):
    torch.manual_seed(0)
    plain = Blocks(None, head_checkpointed)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = checkpointing
    ids, y = torch.randint(0, 20, (6, 5)), torch.randint(0, 5, (6,))
    norms, grads, passes = _step(plain, ids, y, 0.5)
    norms_ck, grads_ck, passes_ck = _step(checkpointed, ids, y, 0.5)
    assert passes == passes_ck == 1  # one finish per backward, whatever nesting
    torch.testing.assert_close(norms_ck, norms)
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_gradient_checkpointing_on_and_off_give_the_same_step(family, use_reentrant):
    pytest.importorskip("transformers")
    from . import hf_tiny

    factory = getattr(hf_tiny, family)
    batch = hf_tiny.lm_batch(pad_last=2)

    def with_checkpointing():
        model = factory()
        model.train()
        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model

    torch.manual_seed(0)
    update, gsm = hf_tiny.dp_step(factory(), batch, hf_tiny.lm_loss, 0.5)
    torch.manual_seed(0)
    update_ck, gsm_ck = hf_tiny.dp_step(with_checkpointing(), batch, hf_tiny.lm_loss, 0.5)
    assert any(getattr(m, "gradient_checkpointing", False) for m in gsm_ck._module.modules())
    torch.testing.assert_close(gsm_ck.per_sample_norms, gsm.per_sample_norms)
    hf_tiny.assert_close(update_ck, update, rtol=1e-5)
