"""GPU timings of the Triton linear-layer kernels and the noise pass against their baselines.

    python -m bench.bench_kernels_linear [--dtype float32|bfloat16|float16] [--noise-numel 124000000] [--smoke]

Per shape (B, T, d, p) it prints milliseconds (triton.testing.do_bench, median) for:

- cuBLAS: the non-private weight gradient ``g.flatten(0, 1).T @ a.flatten(0, 1)`` — the cost
  the per-sample work is measured against (the ratio column is time / this);
- materialise-then-norm as Opacus does it: ``torch.bmm(g.mT, a)`` then square-sum;
- the Triton kernels: direct norm, ghost norm, bias norm, clipped GEMM, bias clipped sum,
  per-sample gradients; and the torch reference of the norm the cost model picks.

Then the noise pass over a flat fp32 buffer: the Triton kernel against the torch reference
(randn, add, scale). Before timing, each kernel's result is checked against its torch reference
and the relative error printed. fp32 cuBLAS baselines run in IEEE fp32 (TF32 off); the kernels' fp32 dots use tf32x3
(rerun with torch.backends.cuda.matmul.allow_tf32 = True for the TF32 baseline).
Nothing is written to disk. Without CUDA (or triton) it says so and exits 0.

``--smoke`` runs the same code on CPU tensors in triton's interpreter (TRITON_INTERPRET=1),
with tiny ragged shapes, a small noise buffer and perf_counter timings: a check that the
script itself runs (tests/test_bench_kernels_smoke.py), not a benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from bench.kernel_timing import can_run, cpu_milliseconds, gpu_milliseconds

# (B, T, d, p)
SHAPES = [
    (64, 256, 768, 768),    # GPT-2-small attention projection
    (512, 1, 3072, 1024),   # MLP layer, T = 1
    (16, 256, 768, 3072),   # GPT-2-small MLP up-projection
    (64, 128, 1024, 1024),
]

# --smoke: tiny and ragged (not multiples of the interpreter's 16-wide blocks); both norm methods
SMOKE_SHAPES = [
    (3, 5, 7, 9),     # direct
    (2, 1, 6, 4),     # T = 1: ghost (Goodfellow)
    (3, 2, 20, 17),   # ghost (Gram)
    (2, 19, 5, 3),    # direct, T over one block
]
SMOKE_NOISE_NUMEL = 4099


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def materialise_then_norm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Opacus: per-sample gradients [B, p, d], then their squared norms."""
    return torch.bmm(g.mT, a).float().square().sum((1, 2))


def bench_shape(B: int, T: int, d: int, p: int, dtype: torch.dtype, device: str, milliseconds) -> None:
    from fastdp.kernels import linear_clipped_grad, linear_direct_norm, linear_ghost_norm, linear_grad_sample
    from fastdp.ops import linear as linear_ops

    a = torch.randn(B, T, d, device=device, dtype=dtype)
    g = torch.randn(B, T, p, device=device, dtype=dtype)
    c = torch.rand(B, device=device)
    chosen = linear_ops.choose_linear_norm_method(B, T, d, p)
    norm_op = linear_ops.linear_norm_sq_ghost if chosen == "ghost" else linear_ops.linear_norm_sq_direct
    reference_norm = norm_op.torch_reference

    cases = [
        ("direct norm", linear_direct_norm.linear_norm_sq_direct, linear_ops.linear_norm_sq_direct, (a, g)),
        ("ghost norm", linear_ghost_norm.linear_norm_sq_ghost, linear_ops.linear_norm_sq_ghost, (a, g)),
        ("bias norm", linear_direct_norm.linear_bias_norm_sq, linear_ops.linear_bias_norm_sq, (g,)),
        ("clipped GEMM", linear_clipped_grad.linear_clipped_grad, linear_ops.linear_clipped_grad, (a, g, c)),
        ("bias clipped sum", linear_clipped_grad.linear_bias_clipped_grad, linear_ops.linear_bias_clipped_grad, (g, c)),
        ("per-sample grads", linear_grad_sample.linear_grad_sample, linear_ops.linear_grad_sample, (a, g)),
    ]
    print(f"\nB={B} T={T} d={d} p={p} {str(dtype)[6:]} (cost model picks {chosen})")
    gemm_ms = milliseconds(lambda: g.flatten(0, 1).T @ a.flatten(0, 1))
    rows = [("cuBLAS weight gradient", gemm_ms, "")]
    try:
        rows.append(("materialise-then-norm (Opacus)", milliseconds(lambda: materialise_then_norm(a, g)), ""))
    except torch.cuda.OutOfMemoryError:
        rows.append(("materialise-then-norm (Opacus)", float("nan"), "out of memory"))
    torch.cuda.empty_cache()
    rows.append((f"torch reference {chosen} norm", milliseconds(lambda: reference_norm(a, g)), ""))
    for name, kernel, op, args in cases:
        error = relative_error(kernel(*args), op.torch_reference(*args))  # also runs the autotuning
        rows.append((f"triton {name}", milliseconds(lambda: kernel(*args)), f"rel. error {error:.1e}"))
    width = max(len(name) for name, _, _ in rows)
    for name, ms, note in rows:
        print(f"  {name:<{width}}  {ms:9.3f} ms  {ms / gemm_ms:7.2f}x GEMM  {note}")


def bench_noise(numel: int, device: str, milliseconds) -> None:
    from fastdp.kernels import noise
    from fastdp.ops import noise as noise_ops

    flat = torch.randn(numel, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    kernel_ms = milliseconds(lambda: noise.add_noise_and_scale(flat, 1.0, 0.5, generator))
    torch_ms = milliseconds(lambda: noise_ops.add_noise_and_scale.torch_reference(flat, 1.0, 0.5, generator))
    scale_ms = milliseconds(lambda: noise.add_noise_and_scale(flat, 0.0, 0.5, generator))
    z = torch.zeros(numel, device=device)
    noise.add_noise_and_scale(z, 1.0, 1.0, generator)
    print(f"\nnoise pass over {numel} fp32 values "
          f"(kernel noise: mean {z.mean().item():+.1e}, std {z.std().item():.5f})")
    print(f"  triton add_noise_and_scale      {kernel_ms:9.3f} ms")
    print(f"  torch randn + add + scale       {torch_ms:9.3f} ms")
    print(f"  triton scale only (std = 0)     {scale_ms:9.3f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--noise-numel", type=int, default=None,
                        help=f"flat buffer size (default ~124M as GPT-2 small; --smoke: {SMOKE_NOISE_NUMEL})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU in triton's interpreter: checks that the script runs")
    args = parser.parse_args(argv)
    if not can_run("bench_kernels_linear", args.smoke):
        return 0
    import triton  # after can_run: TRITON_INTERPRET must be set first under --smoke
    if args.smoke:
        device, milliseconds, shapes, noise_numel = "cpu", cpu_milliseconds, SMOKE_SHAPES, SMOKE_NOISE_NUMEL
        device_name = f"cpu (--smoke, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})"
    else:
        device, milliseconds, shapes, noise_numel = "cuda", gpu_milliseconds, SHAPES, 124_000_000
        device_name = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.noise_numel is not None:
        noise_numel = args.noise_numel
    dtype = getattr(torch, args.dtype)
    print(f"device: {device_name}, torch {torch.__version__}, triton {triton.__version__}")
    for shape in shapes:
        bench_shape(*shape, dtype, device, milliseconds)
    bench_noise(noise_numel, device, milliseconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
