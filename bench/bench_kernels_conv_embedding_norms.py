"""GPU timings of the Triton conv, embedding and norm-layer kernels against their baselines.

    python -m bench.bench_kernels_conv_embedding_norms [--dtype float32|bfloat16|float16] [--batch 256] [--smoke]

Per shape it prints milliseconds (triton.testing.do_bench, median) for:

- conv (ResNet18 layers at 32×32): the non-private cuDNN weight gradient; the Triton norm
  (ghost or direct, as chosen, and both forced); the Triton per-sample gradients; the torch
  reference norm; and materialise-then-norm as Opacus does it (unfold, per-sample einsum, norm).
- embedding (vocab 50257, D 768, B 16, T 256): the non-private embedding backward; the Triton
  norm and clipped gradient; their torch references; materialise-then-norm ([B, V, D]).
- norm layers (GroupNorm / LayerNorm / RMSNorm): the Triton per-sample weight gradient and its
  torch reference.

Before timing, every kernel result is checked against its torch reference and the largest
relative error printed. fp32 cuDNN baselines run in IEEE fp32 (TF32 off); the kernels' fp32 dots
use tf32x3. Nothing is written to disk. Without CUDA (or triton) it says so and exits 0.

``--smoke`` runs the same code on CPU tensors in triton's interpreter (TRITON_INTERPRET=1),
with tiny ragged shapes and perf_counter timings: a check that the script itself runs
(tests/test_bench_kernels_smoke.py), not a benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from bench.kernel_timing import can_run, cpu_milliseconds, gpu_milliseconds

# (name, B, C_in, C_out, H=W of the input, kernel, stride, padding) — CIFAR ResNet18 convs
CONV_SHAPES = [
    ("conv1 3->64 3x3 @32", 3, 64, 32, 3, 1, 1),
    ("layer1 64->64 3x3 @32", 64, 64, 32, 3, 1, 1),
    ("layer2 64->128 3x3 s2 @32", 64, 128, 32, 3, 2, 1),
    ("layer2 128->128 3x3 @16", 128, 128, 16, 3, 1, 1),
    ("layer3 256->256 3x3 @8", 256, 256, 8, 3, 1, 1),
    ("256->256 3x3 @4", 256, 256, 4, 3, 1, 1),
    ("layer4 512->512 3x3 @4", 512, 512, 4, 3, 1, 1),
    ("shortcut 128->256 1x1 s2 @16", 128, 256, 16, 1, 2, 0),
]

# (name, input shape [B, M, C, S] of the common view, num_groups, rms)
NORM_SHAPES = [
    ("GroupNorm(32, 64) @32x32, B=256", (256, 1, 64, 1024), 32, False),
    ("GroupNorm(32, 256) @8x8, B=256", (256, 1, 256, 64), 32, False),
    ("LayerNorm(768), B=16 T=256", (16, 256, 768, 1), 1, False),
    ("RMSNorm(4096), B=8 T=512", (8, 512, 4096, 1), 1, True),
]

# (vocab, D, B, T)
EMBEDDING_SHAPES = [(50257, 768, 16, 256)]

# --smoke: tiny and ragged (not multiples of the interpreter's 16-wide blocks); convs at batch SMOKE_BATCH
SMOKE_BATCH = 3
SMOKE_CONV_SHAPES = [
    ("3->4 3x3 @5 (direct)", 3, 4, 5, 3, 1, 1),
    ("5->6 3x3 s2 @7", 5, 6, 7, 3, 2, 1),
    ("8->20 3x3 @2 (ghost)", 8, 20, 2, 3, 1, 1),
    ("4->3 1x1 s2 @6", 4, 3, 6, 1, 2, 0),
]
SMOKE_NORM_SHAPES = [
    ("GroupNorm(2, 6) @3x3, B=3", (3, 1, 6, 9), 2, False),
    ("LayerNorm(7), B=2 T=5", (2, 5, 7, 1), 1, False),
    ("RMSNorm(9), B=3 T=4", (3, 4, 9, 1), 1, True),
]
SMOKE_EMBEDDING_SHAPES = [(11, 7, 3, 5), (37, 20, 2, 17)]  # few ids: rows repeat within and across samples


def timed(label: str, fn, milliseconds):
    """A report row: label and fn's median time (by milliseconds(fn))."""
    return label, f"{milliseconds(fn):8.3f} ms"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def report(title: str, rows) -> None:
    print(f"\n{title}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def bench_conv(shapes, batch: int, dtype: torch.dtype, device: str, milliseconds) -> None:
    from fastdp.kernels import conv_norm
    from fastdp.ops import conv as conv_ops

    for name, c_in, c_out, size, k, stride, padding in shapes:
        x = torch.randn(batch, c_in, size, size, device=device, dtype=dtype)
        weight = torch.randn(c_out, c_in, k, k, device=device, dtype=dtype)
        out_size = (size + 2 * padding - k) // stride + 1
        g = torch.randn(batch, c_out, out_size, out_size, device=device, dtype=dtype)
        x_padded = F.pad(x, [padding] * 4)
        geometry = ((k, k), (stride, stride), (1, 1), 1)

        def cudnn_weight_grad():
            torch.ops.aten.convolution_backward(
                g, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, (False, True, False)
            )

        def materialise_then_norm():  # Opacus: unfold, per-sample gradients [B, C_out, d], norm
            patches = F.unfold(x, k, padding=padding, stride=stride)  # [B, d, T]
            grads = torch.einsum("bot,bdt->bod", g.flatten(2), patches)
            return grads.float().flatten(1).square().sum(1)

        expected = conv_ops.conv_weight_norm_sq.torch_reference(x_padded, g, *geometry)
        errors = {
            "ghost": relative_error(conv_norm.ghost_norm_sq(x_padded, g, *geometry), expected),
            "direct": relative_error(conv_norm.direct_norm_sq(x_padded, g, *geometry), expected),
            "grad_sample": relative_error(
                conv_norm.conv_weight_grad_sample(x_padded, g, *geometry),
                conv_ops.conv_weight_grad_sample.torch_reference(x_padded, g, *geometry),
            ),
        }
        T, d, p = out_size * out_size, c_in * k * k, c_out
        method = "ghost" if conv_norm.choose_linear_norm_method(batch, T, d, p) == "ghost" else "direct"
        norm_ref = conv_ops.conv_weight_norm_sq.torch_reference
        rows = [
            ("check: rel. error ghost / direct / grad_sample", " / ".join(f"{e:.1e}" for e in errors.values())),
            timed("cuDNN weight gradient (non-private)", cudnn_weight_grad, milliseconds),
            timed(f"triton norm ({method}, as dispatched)",
                  lambda: conv_norm.conv_weight_norm_sq(x_padded, g, *geometry), milliseconds),
            timed("triton norm, ghost forced", lambda: conv_norm.ghost_norm_sq(x_padded, g, *geometry), milliseconds),
            timed("triton norm, direct forced", lambda: conv_norm.direct_norm_sq(x_padded, g, *geometry), milliseconds),
            timed("triton per-sample gradients",
                  lambda: conv_norm.conv_weight_grad_sample(x_padded, g, *geometry), milliseconds),
            timed("torch reference norm", lambda: norm_ref(x_padded, g, *geometry), milliseconds),
            timed("materialise-then-norm (Opacus)", materialise_then_norm, milliseconds),
        ]
        report(f"conv {name}, B={batch}, {dtype} (T={T}, d={d}, p={p})", rows)
        torch.cuda.empty_cache()


def bench_embedding(vocab: int, dim: int, batch: int, tokens: int, dtype: torch.dtype, device: str,
                    milliseconds) -> None:
    from fastdp.kernels import embedding as embedding_kernels
    from fastdp.ops import embedding as embedding_ops

    ids_2d = torch.randint(0, vocab, (batch, tokens), device=device)
    grad_output = torch.randn(batch, tokens, dim, device=device, dtype=dtype)
    ids = ids_2d.reshape(-1)
    sample_of_token = torch.arange(batch, device=device).repeat_interleave(tokens)
    token_grads = grad_output.reshape(-1, dim)
    clip_factors = torch.rand(batch, device=device)
    args = (ids, sample_of_token, token_grads)

    def non_private_backward():
        torch.ops.aten.embedding_dense_backward(grad_output, ids_2d, vocab, -1, False)

    def materialise_then_norm():  # Opacus: per-sample [B, V, D] gradients, then their norms
        grads = torch.zeros(batch, vocab, dim, device=device, dtype=dtype)
        grads.view(batch * vocab, dim).index_add_(0, sample_of_token * vocab + ids, token_grads)
        return grads.float().flatten(1).square().sum(1)

    norm_sq, norm_sq_ref = embedding_kernels.embedding_norm_sq, embedding_ops.embedding_norm_sq.torch_reference
    clipped = embedding_kernels.embedding_clipped_grad
    clipped_ref = embedding_ops.embedding_clipped_grad.torch_reference
    errors = (
        relative_error(norm_sq(*args, batch, vocab, -1), norm_sq_ref(*args, batch, vocab, -1)),
        relative_error(clipped(*args, clip_factors, vocab, -1), clipped_ref(*args, clip_factors, vocab, -1)),
    )
    rows = [
        ("check: rel. error norm / clipped grad", " / ".join(f"{e:.1e}" for e in errors)),
        timed("embedding backward (non-private)", non_private_backward, milliseconds),
        timed("triton norm", lambda: norm_sq(*args, batch, vocab, -1), milliseconds),
        timed("torch reference norm", lambda: norm_sq_ref(*args, batch, vocab, -1), milliseconds),
        timed("triton clipped grad", lambda: clipped(*args, clip_factors, vocab, -1), milliseconds),
        timed("torch reference clipped grad", lambda: clipped_ref(*args, clip_factors, vocab, -1), milliseconds),
    ]
    needed = batch * vocab * dim * torch.finfo(dtype).bits // 8
    if device != "cuda" or needed < torch.cuda.mem_get_info()[0] // 2:  # --smoke: tiny, on CPU
        rows.append(timed("materialise-then-norm (Opacus, [B, V, D])", materialise_then_norm, milliseconds))
    report(f"embedding V={vocab} D={dim} B={batch} T={tokens}, {dtype}", rows)


def bench_norm_layers(shapes, dtype: torch.dtype, device: str, milliseconds) -> None:
    from fastdp.kernels import norm_layers
    from fastdp.ops import norms as norm_ops

    for name, shape, num_groups, rms in shapes:
        x = torch.randn(shape, device=device, dtype=dtype)
        grad = torch.randn(shape, device=device, dtype=dtype)
        args = (x, grad, num_groups, 1e-5, rms)
        kernel, reference = norm_layers.norm_weight_grad_sample, norm_ops.norm_weight_grad_sample.torch_reference
        rows = [
            ("check: rel. error", f"{relative_error(kernel(*args), reference(*args)):.1e}"),
            timed("triton per-sample weight grads", lambda: kernel(*args), milliseconds),
            timed("torch reference", lambda: reference(*args), milliseconds),
        ]
        report(f"norm {name}, {dtype}", rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size of the conv shapes (default 256; --smoke: {SMOKE_BATCH})")
    parser.add_argument("--only", choices=["conv", "embedding", "norms"], help="run one group of kernels")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU in triton's interpreter: checks that the script runs")
    args = parser.parse_args(argv)
    if not can_run("bench_kernels_conv_embedding_norms", args.smoke):
        return 0
    if args.smoke:
        device, milliseconds, batch = "cpu", cpu_milliseconds, SMOKE_BATCH
        conv_shapes, embedding_shapes, norm_shapes = SMOKE_CONV_SHAPES, SMOKE_EMBEDDING_SHAPES, SMOKE_NORM_SHAPES
        device_name = f"cpu (--smoke, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})"
    else:
        device, milliseconds, batch = "cuda", gpu_milliseconds, 256
        conv_shapes, embedding_shapes, norm_shapes = CONV_SHAPES, EMBEDDING_SHAPES, NORM_SHAPES
        device_name = torch.cuda.get_device_name()
        torch.backends.cudnn.allow_tf32 = False  # fp32 baselines in IEEE fp32, as in bench_kernels_linear
    if args.batch is not None:
        batch = args.batch
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"device: {device_name}, torch {torch.__version__}")
    if args.only in (None, "conv"):
        bench_conv(conv_shapes, batch, dtype, device, milliseconds)
    if args.only in (None, "embedding"):
        for shape in embedding_shapes:
            bench_embedding(*shape, dtype, device, milliseconds)
    if args.only in (None, "norms"):
        bench_norm_layers(norm_shapes, dtype, device, milliseconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
