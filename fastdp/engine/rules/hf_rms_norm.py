"""Hugging Face's RMSNorm classes (Llama and the decoders that copy it), by class name.

Their forward is ``weight * (x / sqrt(mean(x²) + variance_epsilon))``, with x̂ computed in
float32 and cast back to the input dtype before the product: nn.RMSNorm's per-sample gradient
``sum_t g ⊙ x̂``, with x̂ kept in float32 here (for float32 inputs identical; for bf16/fp16 it
skips one rounding of x̂). Only classes whose forward was checked to be exactly this are
listed: Gemma's ``(1 + weight)`` and similar variants are not (they get the functorch fallback).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from . import register_rule_by_name
from .rms_norm import RMSNormRule

HF_RMS_NORMS = tuple(
    f"transformers.models.{package}.modeling_{package}.{name}"
    for package, name in (
        ("llama", "LlamaRMSNorm"),
        ("mistral", "MistralRMSNorm"),
        ("qwen2", "Qwen2RMSNorm"),
        ("qwen3", "Qwen3RMSNorm"),
        ("phi3", "Phi3RMSNorm"),
    )
)


class HFRMSNormRule(RMSNormRule):
    """Normalised over the last dim, which is the weight's; ``variance_epsilon`` instead of ``eps``."""

    module_types = ()

    def view(self, module: nn.Module, x: torch.Tensor) -> Tuple[int, int, int, int]:
        return x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1], 1

    def eps(self, module: nn.Module, x: torch.Tensor) -> float:
        return module.variance_epsilon


register_rule_by_name(HFRMSNormRule(), *HF_RMS_NORMS)
