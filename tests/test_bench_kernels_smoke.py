"""bench/bench_kernels_*.py --smoke: the GPU kernel benchmarks' own code, run on CPU in triton's interpreter.

A GPU session runs these scripts rarely (``bash bench/gpu_session.sh all``); here every
section of them runs on tiny ragged shapes, so that a Python error, a skipped section or row,
or a kernel that disagrees with its torch reference shows up in CI first. Timings are not
checked (CPU, interpreter), only that each row printed one.
"""

import math
import os
import re

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402

pytest.importorskip("triton")

from bench import bench_kernels_conv_embedding_norms as conv_bench  # noqa: E402
from bench import bench_kernels_linear as linear_bench  # noqa: E402
from bench.kernel_timing import ERROR_BOUND  # noqa: E402
from fastdp.ops.linear import choose_linear_norm_method  # noqa: E402

TIME = r"(?P<ms>\S+) ms"
LINEAR_ROW = re.compile(rf"(?P<name>\S.*?)\s+{TIME}\s+(?P<ratio>\S+)x GEMM(?:\s+rel\. error (?P<error>\S+))?")
PLAIN_ROW = re.compile(rf"(?P<name>\S.*?)\s+{TIME}")
CHECK_ROW = re.compile(r"check: rel\. error(?P<what>.*?)\s{2,}(?P<errors>\S.*)")
NOISE_HEADER = re.compile(r"noise pass over (?P<n>\d+) fp32 values \(kernel noise: mean (?P<mean>\S+), std (?P<std>\S+)\)")


def sections(out: str) -> dict:
    """The report as {header: [row, ...]}: blocks after the device line, each a header and indented rows."""
    blocks = out.strip().split("\n\n")
    assert blocks[0].startswith("device: cpu (--smoke, TRITON_INTERPRET=1)"), blocks[0]
    result = {}
    for block in blocks[1:]:
        header, *rows = block.splitlines()
        assert rows and all(row.startswith("  ") for row in rows), block
        result[header] = [row.strip() for row in rows]
    return result


def match(pattern: re.Pattern, row: str) -> re.Match:
    found = pattern.fullmatch(row)
    assert found, f"unexpected row {row!r}"
    assert not math.isnan(float(found["ms"])), row
    return found


def check_errors(errors, bound: float, where: str) -> None:
    assert errors, where
    for error in errors:
        assert float(error) <= bound, f"{where}: relative error {error} > {bound}"  # nan fails too


def check_linear_output(out: str, dtype: str) -> None:
    report = sections(out)
    expected_headers = []
    for B, T, d, p in linear_bench.SMOKE_SHAPES:
        chosen = choose_linear_norm_method(B, T, d, p)
        header = f"B={B} T={T} d={d} p={p} {dtype} (cost model picks {chosen})"
        expected_headers.append(header)
        assert header in report, f"missing section {header!r}"
        rows = [match(LINEAR_ROW, row) for row in report[header]]
        names = [row["name"] for row in rows]
        kernels = ["direct norm", "ghost norm", "bias norm", "clipped GEMM", "bias clipped sum", "per-sample grads"]
        assert names == ["cuBLAS weight gradient", "materialise-then-norm (Opacus)", f"torch reference {chosen} norm"] + [
            f"triton {kernel}" for kernel in kernels
        ], header
        assert all(row["error"] is None for row in rows[:3]), header
        check_errors([row["error"] for row in rows[3:]], ERROR_BOUND[dtype], header)

    noise_headers = [header for header in report if header.startswith("noise pass")]
    assert len(noise_headers) == 1, list(report)
    noise = NOISE_HEADER.fullmatch(noise_headers[0])
    assert noise and int(noise["n"]) == linear_bench.SMOKE_NOISE_NUMEL, noise_headers[0]
    n = int(noise["n"])  # N(0, 1) draws: mean and std within 5 standard errors
    assert abs(float(noise["mean"])) < 5 / math.sqrt(n), noise_headers[0]
    assert abs(float(noise["std"]) - 1) < 5 / math.sqrt(2 * n), noise_headers[0]
    names = [match(PLAIN_ROW, row)["name"] for row in report[noise_headers[0]]]
    assert names == ["triton add_noise_and_scale", "torch randn + add + scale", "triton scale only (std = 0)"]
    assert list(report) == expected_headers + noise_headers


def check_conv_embedding_norms_output(out: str, dtype: str) -> None:
    report = sections(out)
    bound = ERROR_BOUND[dtype]
    expected = {}  # header -> (what the check row compares, the timed rows)
    for name, c_in, c_out, size, k, stride, padding in conv_bench.SMOKE_CONV_SHAPES:
        out_size = (size + 2 * padding - k) // stride + 1
        T, d, p = out_size**2, c_in * k * k, c_out
        method = choose_linear_norm_method(conv_bench.SMOKE_BATCH, T, d, p)
        header = f"conv {name}, B={conv_bench.SMOKE_BATCH}, torch.{dtype} (T={T}, d={d}, p={p})"
        expected[header] = ("ghost / direct / grad_sample", [
            "cuDNN weight gradient (non-private)", f"triton norm ({method}, as dispatched)",
            "triton norm, ghost forced", "triton norm, direct forced", "triton per-sample gradients",
            "torch reference norm", "materialise-then-norm (Opacus)",
        ])
    for vocab, dim, batch, tokens in conv_bench.SMOKE_EMBEDDING_SHAPES:
        expected[f"embedding V={vocab} D={dim} B={batch} T={tokens}, torch.{dtype}"] = ("norm / clipped grad", [
            "embedding backward (non-private)", "triton norm", "torch reference norm", "triton clipped grad",
            "torch reference clipped grad", "materialise-then-norm (Opacus, [B, V, D])",
        ])
    for name, *_ in conv_bench.SMOKE_NORM_SHAPES:
        expected[f"norm {name}, torch.{dtype}"] = ("", ["triton per-sample weight grads", "torch reference"])

    assert list(report) == list(expected)
    for header, (what, names) in expected.items():
        check, *rows = report[header]
        found = CHECK_ROW.fullmatch(check)
        assert found and found["what"].strip() == what, f"{header}: check row {check!r}"
        errors = found["errors"].split(" / ")
        assert len(errors) == max(1, len(what.split(" / "))), f"{header}: {check!r}"
        check_errors(errors, bound, header)
        assert [match(PLAIN_ROW, row)["name"] for row in rows] == names, header


def assert_rejected(check, out: str, dtype: str) -> None:
    with pytest.raises(AssertionError):
        check(out, dtype)


def assert_check_can_fail(check, out: str, dtype: str) -> None:
    """The output checks reject a dropped section, a dropped row and a large or nan error."""
    blocks = out.strip().split("\n\n")
    assert_rejected(check, "\n\n".join(blocks[:-1]), dtype)
    lines = out.splitlines()
    row = next(i for i, line in enumerate(lines) if re.search(r"\d ms\b", line) and "rel. error" not in line)
    assert_rejected(check, "\n".join(lines[:row] + lines[row + 1:]), dtype)
    for bad in ("5.0e-01", "nan"):
        assert_rejected(check, re.sub(r"(rel\. error\D*?)\d\.\de[-+]\d\d", rf"\g<1>{bad}", out, count=1), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_kernels_linear_smoke(dtype, capsys):
    assert linear_bench.main(["--smoke", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    check_linear_output(out, dtype)
    assert_check_can_fail(check_linear_output, out, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_kernels_conv_embedding_norms_smoke(dtype, capsys):
    assert conv_bench.main(["--smoke", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    check_conv_embedding_norms_output(out, dtype)
    assert_check_can_fail(check_conv_embedding_norms_output, out, dtype)
