"""Tiny Hugging Face models from configs (random weights, no downloads) and the DP-step reference.

Shared by the tests of HF models, LoRA, mixed precision, checkpointing and torch.compile.
Importing this module needs transformers: tests call ``pytest.importorskip("transformers")`` first.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict

import torch
import transformers
from torch import nn

from fastdp.engine.grad_sample_module import GradSampleModule
from fastdp.losses import per_sample_lm_loss
from fastdp.optimizers import DPOptimizer

transformers.logging.set_verbosity_error()

BATCH, SEQ, VOCAB, HIDDEN = 3, 8, 100, 32
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)


def gpt2(tied: bool = True):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def llama(tied: bool = False):
    config = transformers.LlamaConfig(
        **COMMON, num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=tied,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def bert(num_labels: int = 3):
    config = transformers.BertConfig(**COMMON, **NO_DROPOUT, max_position_embeddings=16, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config)


def bert_mlm():
    """Masked LM: decoder weight tied to the word embeddings, and its bias also the head's own parameter."""
    config = transformers.BertConfig(**COMMON, **NO_DROPOUT, max_position_embeddings=16)
    return transformers.BertForMaskedLM(config)


def roberta(num_labels: int = 3):
    config = transformers.RobertaConfig(
        **COMMON, **NO_DROPOUT, max_position_embeddings=16 + 2, num_labels=num_labels, pad_token_id=1
    )
    return transformers.RobertaForSequenceClassification(config)


def lm_batch(seed: int = 0, pad_last: int = 0) -> Dict[str, torch.Tensor]:
    """Causal-LM batch; the last ``pad_last`` tokens of sample 0 are padding (masked, label -100)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    labels = ids.clone()
    if pad_last:
        mask[0, -pad_last:] = 0
        labels[0, -pad_last:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def mlm_batch(seed: int = 0) -> Dict[str, torch.Tensor]:
    """Masked-LM batch: a different number of scored (masked) tokens per sample, the rest -100."""
    batch = lm_batch(seed)
    scored = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    for i in range(BATCH):
        scored[i, : i + 2] = True
    batch["labels"] = torch.where(scored, batch["input_ids"], torch.full_like(batch["input_ids"], -100))
    batch["input_ids"] = torch.where(scored, torch.full_like(batch["input_ids"], 1), batch["input_ids"])  # [MASK]
    return batch


def mlm_loss(output, batch, reduction: str = "mean"):
    return per_sample_lm_loss(output.logits, batch["labels"], reduction=reduction)


def classification_batch(seed: int = 0, classes: int = 3) -> Dict[str, torch.Tensor]:
    """Sequence-classification batch with right padding of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -3:] = 0
    ids[1, -3:] = 1  # RoBERTa's padding id
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, classes, (BATCH,), generator=gen)}


def lm_loss(output, batch, reduction: str = "mean"):
    return per_sample_lm_loss(output.logits, batch["labels"], reduction=reduction, shift_labels=True)


def classification_loss(output, batch, reduction: str = "mean"):
    return nn.functional.cross_entropy(output.logits.float(), batch["labels"], reduction=reduction)


def model_inputs(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def trainable(model: nn.Module) -> Dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def microbatch_grads(model: nn.Module, batch, loss_fn: Callable) -> Dict[str, torch.Tensor]:
    """Per-sample gradients ``[B, *p.shape]`` of each sample's own loss, one sample at a time."""
    params = trainable(model)
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        sample = {k: v[i : i + 1] for k, v in batch.items()}
        loss = loss_fn(model(**model_inputs(sample)), sample, "sum")
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)])
    return {name: torch.stack([row[k] for row in rows]) for k, name in enumerate(params)}


def reference_clipped_sum(per_sample: Dict[str, torch.Tensor], max_grad_norm: float):
    norms = torch.sqrt(sum(g.flatten(1).double().square().sum(1) for g in per_sample.values()))
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return norms, {n: torch.einsum("b,b...->...", factors.to(g.dtype), g) for n, g in per_sample.items()}


def dp_step(model: nn.Module, batch, loss_fn: Callable, max_grad_norm: float, wrap: Callable = lambda m: m, **kwargs):
    """One σ=0 DP-SGD step (lr 1, mean loss) through fastdp; returns ``{name: B × (before - after)}``,
    the clipped sum of per-sample gradients, and the GradSampleModule."""
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    gsm = GradSampleModule(model, **kwargs)
    optimizer = DPOptimizer(
        torch.optim.SGD(list(trainable(model).values()), lr=1.0),
        noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=BATCH,
    )
    optimizer.attach(gsm)
    loss_fn(wrap(gsm)(**model_inputs(batch)), batch).backward()
    optimizer.step()
    update = {n: (before[n] - p.detach()) * BATCH for n, p in trainable(model).items()}
    return update, gsm


def assert_close(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], rtol: float = 1e-4):
    """Normwise relative error of each parameter, against the whole update's norm (so a parameter
    whose own update is ~0 is judged by the model's scale, not by its own rounding noise)."""
    assert actual.keys() == expected.keys()
    scale = float(torch.sqrt(sum(e.double().square().sum() for e in expected.values())))
    for name in expected:
        error = float((actual[name].double() - expected[name].double()).norm())
        assert error <= rtol * scale, f"{name}: relative error {error / scale:.3g} > {rtol}"


def check_step_equals_microbatching(factory: Callable, batch, loss_fn: Callable, rtol: float = 1e-4, **kwargs):
    """A σ=0 fastdp step equals the microbatch reference, with the bound at the median norm (some
    samples clipped, some not). Returns the GradSampleModule."""
    torch.manual_seed(0)
    model = factory()
    reference_model = copy.deepcopy(model)
    per_sample = microbatch_grads(reference_model, batch, loss_fn)
    norms, _ = reference_clipped_sum(per_sample, 1.0)
    max_grad_norm = float(norms.median())
    _, expected = reference_clipped_sum(per_sample, max_grad_norm)
    update, gsm = dp_step(model, batch, loss_fn, max_grad_norm, **kwargs)
    torch.testing.assert_close(gsm.per_sample_norms.double(), norms, rtol=rtol, atol=0)
    assert_close(update, expected, rtol)
    return gsm
