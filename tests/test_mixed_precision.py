"""bf16 autocast, bf16 weights, and fp16 with a GradScaler, against the fp32 microbatch reference.

Tolerances (normwise, relative to the whole update; the errors measured here were 3-6x smaller):
bf16 2e-2 for updates and per-sample norms, fp16 2e-3. Norms are float32 whatever the compute dtype.
"""

import copy

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from fastdp import PrivacyEngine  # noqa: E402

from . import hf_tiny  # noqa: E402

BF16_RTOL, FP16_RTOL = 2e-2, 2e-3


def _reference(factory, batch):
    torch.manual_seed(0)
    model = factory()
    per_sample = hf_tiny.microbatch_grads(copy.deepcopy(model), batch, hf_tiny.lm_loss)
    norms, _ = hf_tiny.reference_clipped_sum(per_sample, 1.0)
    max_grad_norm = float(norms.median())
    return model, norms, max_grad_norm, hf_tiny.reference_clipped_sum(per_sample, max_grad_norm)[1]


def _autocast(dtype):
    def wrap(gsm):
        def forward(**inputs):
            with torch.autocast("cpu", dtype=dtype):
                return gsm(**inputs)

        return forward

    return wrap


@pytest.mark.parametrize("weights", ["fp32_autocast", "bf16"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_step_is_close_to_fp32_microbatching(family, weights):
    batch = hf_tiny.lm_batch(pad_last=2)
    model, norms, max_grad_norm, expected = _reference(getattr(hf_tiny, family), batch)
    if weights == "bf16":
        update, gsm = hf_tiny.dp_step(model.to(torch.bfloat16), batch, hf_tiny.lm_loss, max_grad_norm)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    else:
        update, gsm = hf_tiny.dp_step(model, batch, hf_tiny.lm_loss, max_grad_norm, wrap=_autocast(torch.bfloat16))
    assert gsm.per_sample_norms.dtype == torch.float32
    torch.testing.assert_close(gsm.per_sample_norms.double(), norms, rtol=BF16_RTOL, atol=0)
    hf_tiny.assert_close(update, expected, rtol=BF16_RTOL)


def _private_fp16(model, batch, max_grad_norm, scaler):
    dataset = TensorDataset(batch["input_ids"], batch["attention_mask"], batch["labels"])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant="rdp")
    gsm, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=len(dataset)),
        noise_multiplier=0.0, max_grad_norm=max_grad_norm, grad_scaler=scaler,
    )
    return engine, gsm, optimizer, loader


def _scaled_step(gsm, optimizer, scaler, ids, mask, labels):
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        output = gsm(input_ids=ids, attention_mask=mask)
    scaler.scale(hf_tiny.lm_loss(output, {"labels": labels})).backward()
    scaler.step(optimizer)
    scaler.update()


def test_fp16_grad_scaler_unscales_before_clipping():
    batch = hf_tiny.lm_batch(pad_last=2)
    model, norms, max_grad_norm, expected = _reference(hf_tiny.gpt2, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    engine, gsm, optimizer, loader = _private_fp16(model, batch, max_grad_norm, scaler)
    assert loader.sample_rate == 1.0  # every sample in every batch: the step is the reference's
    _scaled_step(gsm, optimizer, scaler, *batch.values())
    torch.testing.assert_close(gsm.per_sample_norms.double(), norms, rtol=FP16_RTOL, atol=0)  # not 4096x
    update = {n: (before[n] - p.detach()) * hf_tiny.BATCH for n, p in model.named_parameters()}
    hf_tiny.assert_close(update, expected, rtol=FP16_RTOL)
    assert len(engine.accountant) == 1


def test_fp16_overflow_skips_the_step_and_its_accounting():
    batch = hf_tiny.lm_batch()
    torch.manual_seed(0)
    model = hf_tiny.gpt2()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # fp16 activations' gradients overflow
    engine, gsm, optimizer, _ = _private_fp16(model, batch, 1.0, scaler)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _scaled_step(gsm, optimizer, scaler, *batch.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # skipped
    assert len(engine.accountant) == 0 and gsm.skipped_samples == 0  # not counted, no sample dropped
    assert scaler.get_scale() < 2.0**100  # the scaler saw the overflow and backed off
    scaler.update(2.0**8)
    _scaled_step(gsm, optimizer, scaler, *batch.values())
    assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert len(engine.accountant) == 1


def test_stepping_past_the_scaler_is_refused():
    batch = hf_tiny.lm_batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    _, gsm, optimizer, _ = _private_fp16(hf_tiny.gpt2(), batch, 1.0, scaler)
    with torch.autocast("cpu", dtype=torch.float16):
        output = gsm(input_ids=batch["input_ids"])
    scaler.scale(hf_tiny.lm_loss(output, batch)).backward()
    with pytest.raises(ValueError, match="grad_scaler.step"):
        optimizer.step()  # the clipped sums are still scaled: noise would be 256x too small
    with pytest.raises(ValueError, match="GradScaler"):
        optimizer.attach_grad_scaler(object())
