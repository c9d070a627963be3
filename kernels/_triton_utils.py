"""Small helpers shared by the Triton kernels: launch configs, input checks, fallbacks, fp32 dot.

Under ``TRITON_INTERPRET=1`` (CPU tests) nothing can be timed, so a kernel runs with one
fixed small config whose 16-wide blocks make the test shapes cross tile edges; on a
GPU it is autotuned over a short list of configs (``FASTDP_AUTOTUNE_CONFIGS=N`` keeps the
first N of each list, so that a time-limited GPU session compiles less). Importing this module with the
interpreter on also corrects the interpreter's bf16 arithmetic (see ``_fix_interpreter_bf16``).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Dict, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from fastdp.ops import rounding

#: input dtypes the kernels handle; anything else runs the op's torch reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: the block size used for every blocked dimension under the interpreter (tl.dot needs ≥ 16).
INTERPRETER_BLOCK = 16


def use_interpreter() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read once, when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot_fp32(x, y, acc):
    """acc + x @ y, accumulated in fp32.

    fp32 operands use "tf32x3", not TF32 (Triton's default): norms decide clipping, and
    TF32's 10-bit mantissa would move them by ~1e-3, while tf32x3 (each operand split into
    two TF32 parts, three tensor-core products) keeps close to fp32 accuracy (~1e-6) on
    tensor cores instead of IEEE FMAs. fp16/bf16 operands take the tensor-core path, whose
    products are exact.
    """
    if x.dtype == tl.float32:
        return tl.dot(x, y, acc, input_precision="tf32x3", out_dtype=tl.float32)
    else:
        return tl.dot(x, y, acc, out_dtype=tl.float32)


def dot_fp32_error(width: int, dtype: torch.dtype) -> float:
    """``dot_fp32``'s error bound for a length-``width`` dot product, relative to Σ|x_k y_k| (the norm
    bounds of ``fastdp.ops.rounding`` use it). fp32 operands as tf32x3 lose each operand's remainder
    below two TF32 parts and the low×low product: ≤ 3·2⁻²² per product. Tensor cores accumulate in
    fp32, possibly truncating (2⁻²³ per rounding), one rounding per instruction of k products (k = 8
    for TF32, 16 for bf16/fp16, whose products are exact) plus the k-term sum inside it."""
    if dtype == torch.float32:
        products, roundings = 3 * 2.0**-22, 3 * -(-width // 8) + 8
    else:
        products, roundings = 0.0, -(-width // 16) + 16
    return (1 + products) * (1 + rounding.gamma(roundings, 2.0**-23)) - 1


def _fix_interpreter_bf16() -> None:
    """Make the CPU interpreter treat bf16 as the GPU does, so that tests see GPU numerics.

    Triton 3.9's interpreter stores bf16 as raw uint16 bits, and (1) its ``create_dot``
    hands those bits to numpy as integers, so every bf16 tl.dot is garbage; (2) its
    fp32 → bf16 cast truncates, where the GPU rounds to nearest even. Widening dot
    operands to fp32 first is exact (as on tensor cores: bf16 products are exact and
    summed in fp32); the cast is redone by torch, which rounds to nearest even. Only the
    interpreter is touched; GPU compilation is not.
    """
    from triton.runtime import interpreter

    builder_type = type(interpreter.interpreter_builder)
    if getattr(builder_type, "fastdp_bf16_fixed", False):
        return
    original_dot, original_cast = builder_type.create_dot, builder_type.cast_impl

    def create_dot(self, a, b, acc, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original_dot(self, a, b, acc, *args, **kwargs)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder_type.create_dot, builder_type.cast_impl = create_dot, cast_impl
    builder_type.fastdp_bf16_fixed = True


if use_interpreter():
    _fix_interpreter_bf16()


AUTOTUNE_CONFIGS_VARIABLE = "FASTDP_AUTOTUNE_CONFIGS"


def autotune_configs(configs: Sequence[triton.Config]) -> list:
    """The configs to autotune over: all, or the first N with ``FASTDP_AUTOTUNE_CONFIGS=N``.

    Each config is compiled before it is timed, so a short list makes the first call of every
    kernel shape cheaper (tests, a time-limited GPU session); with N = 1 nothing is timed at all.
    Each list starts with its smallest tiles. Read when a kernel module is imported.
    """
    value = os.environ.get(AUTOTUNE_CONFIGS_VARIABLE, "").strip()
    if not value:
        return list(configs)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"{AUTOTUNE_CONFIGS_VARIABLE} must be a whole number ≥ 1 (how many of each kernel's autotune "
            f"configs to try), got {value!r}; unset it to autotune over all of them"
        )
    return list(configs)[: int(value)]


class Launcher:
    """A kernel with its launch config: autotuned over ``configs`` on a GPU, ``interpreter_config`` on CPU.

    ``grid`` is a function of the config's meta-parameters (a dict), as for ``triton.autotune``.
    ``reset_to_zero`` names output buffers that the kernel only partly writes, so that
    autotuning's trial runs leave nothing behind (see ``triton.autotune``).
    """

    def __init__(self, kernel, configs: Sequence[triton.Config], key: Sequence[str],
                 interpreter_config: Dict[str, int], reset_to_zero: Sequence[str] = ()):
        self.interpret = use_interpreter()
        self.configs = autotune_configs(configs)
        self.interpreter_config = dict(interpreter_config)
        if self.interpret:
            self.kernel = kernel
        else:
            tune = triton.autotune(configs=self.configs, key=list(key), reset_to_zero=list(reset_to_zero) or None)
            self.kernel = tune(kernel)

    def smallest(self, name: str) -> int:
        """The smallest value meta-parameter ``name`` can take (to size per-tile scratch)."""
        if self.interpret:
            return self.interpreter_config[name]
        return min(config.kwargs[name] for config in self.configs)

    def __call__(self, grid: Callable[[dict], tuple], *args, **kwargs) -> None:
        if self.interpret:
            meta = dict(self.interpreter_config)
            self.kernel[grid(meta)](*args, **kwargs, **meta)
        else:
            self.kernel[grid](*args, **kwargs)


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors with the interpreter on."""
    if use_interpreter():
        return
    for tensor in tensors:
        if not tensor.is_cuda:
            raise ValueError(
                f"triton kernels need CUDA tensors, got a tensor on {tensor.device}; move it to CUDA, "
                "or unset FASTDP_BACKEND=triton (or set TRITON_INTERPRET=1 to run kernels on CPU)"
            )


def check_activations(a: torch.Tensor, g: torch.Tensor) -> None:
    """a: [B, T, d] layer input, g: [B, T, p] output gradient, same B and T."""
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"a and g must be [B, T, d] and [B, T, p] with the same B, T; got a {tuple(a.shape)}, "
            f"g {tuple(g.shape)} (reshape to the sequence view first)"
        )


def check_clip_factors(c: torch.Tensor, batch: int) -> None:
    """c: one clip factor per sample."""
    if c.dim() != 1 or c.shape[0] != batch:
        raise ValueError(f"c must be [B] = [{batch}] clip factors, got shape {tuple(c.shape)}")


def reference_unless_handled(op, *checked: int, check: Callable = None):
    """Decorator of a kernel's wrapper: the inputs the kernels do not cover (``kernel_handles`` of the
    positional arguments at ``checked``: empty, float64, mixed dtypes) run ``op``'s torch reference, which
    then defines the result; the rest must be where the kernels run (``check_device``). ``check``, given
    the checked arguments, validates them first, for the reference as well."""

    def decorate(wrapper: Callable) -> Callable:
        @functools.wraps(wrapper)
        def run(*args, **kwargs):
            tensors = [args[i] for i in checked]
            if check is not None:
                check(*tensors)
            if not kernel_handles(*tensors):
                return op.torch_reference(*args, **kwargs)
            check_device(*(arg for arg in args if isinstance(arg, torch.Tensor)))
            return wrapper(*args, **kwargs)

        return run

    return decorate


def kernel_handles(*tensors: torch.Tensor) -> bool:
    """Whether the kernels cover these inputs: non-empty, one shared dtype from KERNEL_DTYPES.

    Everything else (empty batches, float64, mixed dtypes) runs the torch reference, which
    then defines the result exactly.
    """
    dtype = tensors[0].dtype
    return dtype in KERNEL_DTYPES and all(t.dtype == dtype and t.numel() > 0 for t in tensors)
