"""PEFT LoRA and plain freezing: only trainable parameters cost per-sample work, frozen ones never
move, and the LoRA update equals microbatching (Opacus #820: LoRA updates silently corrupted)."""

import pytest

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a renamed transformers API

import torch  # noqa: E402

from fastdp.engine import grad_sample_module  # noqa: E402

from . import hf_tiny  # noqa: E402
from .hf_tiny import check_step_equals_microbatching  # noqa: E402


def _lora(factory, targets, **config):
    def make():
        # init_lora_weights=False: B is random too, so lora_A's gradient is not structurally zero
        lora = peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False, **config
        )
        return peft.get_peft_model(factory(), lora)

    return make


@pytest.fixture
def recorded_calls(monkeypatch):
    """The modules whose calls reached the engine's backward step."""
    seen = []
    original = grad_sample_module._BackwardStep

    def recording(calls, **kwargs):
        seen.extend(call.module for call in calls)
        return original(calls, **kwargs)

    monkeypatch.setattr(grad_sample_module, "_BackwardStep", recording)
    return seen


CASES = {
    "gpt2-c_attn": (_lora(hf_tiny.gpt2, ["c_attn"], fan_in_fan_out=True), hf_tiny.lm_batch, hf_tiny.lm_loss),
    "llama-q_v": (_lora(hf_tiny.llama, ["q_proj", "v_proj"]), hf_tiny.lm_batch, hf_tiny.lm_loss),
    "bert-classifier": (
        _lora(hf_tiny.bert, ["query", "value"], modules_to_save=["classifier"]),
        hf_tiny.classification_batch,
        hf_tiny.classification_loss,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_step_equals_microbatching_and_frozen_weights_cost_nothing(case, recorded_calls):
    factory, make_batch, loss_fn = CASES[case]
    torch.manual_seed(0)
    frozen_before = {n: p.detach().clone() for n, p in factory().named_parameters() if not p.requires_grad}
    gsm = check_step_equals_microbatching(factory, make_batch(), loss_fn)
    model = gsm._module
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None and torch.equal(param, frozen_before[name]), name
    # per-sample work only for modules that own a trainable parameter (no frozen base layer)
    assert recorded_calls and all(any(p.requires_grad for p in m.parameters(recurse=False)) for m in recorded_calls)


def test_plain_freezing():
    def partly_frozen():
        model = hf_tiny.gpt2(tied=False)
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("transformer.h.1") or name.startswith("lm_head")
        return model

    check_step_equals_microbatching(partly_frozen, hf_tiny.lm_batch(pad_last=3), hf_tiny.lm_loss)


def test_parameter_used_outside_its_module_is_refused():
    """A LoRA embedding adapter reads its weights directly in the wrapper's forward: autograd would give
    them a non-private gradient; the engine refuses instead of corrupting the update."""
    factory = _lora(hf_tiny.gpt2, ["wte"])
    model = factory()
    gsm = grad_sample_module.GradSampleModule(model)
    batch = hf_tiny.lm_batch()
    with pytest.raises(ValueError, match="outside the engine's capture"):
        hf_tiny.lm_loss(gsm(**hf_tiny.model_inputs(batch)), batch).backward()
