"""bench/bench_largest_batch.py: the batch search, out-of-memory classification, and the --quick run end to end.

No timing assertions (CI machines are shared and slow); the --quick run uses a fake memory
limit, so the largest batches it must find are known exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import bench_largest_batch as largest


@pytest.mark.parametrize("max_batch", [1, 7, 16, 33])
@pytest.mark.parametrize("start", [1, 3, 8, 40])
def test_search_finds_every_limit_exactly(max_batch, start):
    for limit in range(0, 40):
        probed = []

        def fits(batch):
            probed.append(batch)
            return batch <= limit

        found = largest.largest_fitting(fits, start, max_batch)
        assert found == min(limit, max_batch), (limit, probed)
        assert len(set(probed)) == len(probed) and all(1 <= b <= max_batch for b in probed), probed
        if 0 < found < max_batch:  # the boundary itself was probed on both sides
            assert found in probed and found + 1 in probed, probed
        if found == 0:
            assert 1 in probed, probed
        assert len(probed) <= 2 * math.ceil(math.log2(max_batch + 1)) + 2, probed


def test_search_rejects_a_non_positive_max_batch():
    with pytest.raises(ValueError, match="max_batch"):
        largest.largest_fitting(lambda batch: True, 1, 0)


def test_measurement_batches():
    assert largest.measurement_batches(9, 11) == [9]  # fits less than non-private: timed at its own largest
    assert largest.measurement_batches(13, 11) == [11, 13]  # at non-private's largest and at its own
    assert largest.measurement_batches(5, None) == [5]


def _worker_args(method="nonprivate", batch=3):
    argv = ["--worker", "probe", "--method", method, "--batch", str(batch), "--quick", "--seq-len", "8",
            "--device", "cpu", "--steps", "1", "--warmup", "0", "--dtype", "fp32"]
    return largest.build_parser().parse_args(argv)


@pytest.mark.parametrize("error, is_oom", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
])
def test_worker_tells_out_of_memory_from_other_failures(monkeypatch, error, is_oom):
    from bench import methods

    def failing_method(spec, x, y, run):
        def step():
            raise error

        return methods.Prepared(step)

    monkeypatch.setitem(methods.METHODS, "nonprivate", failing_method)
    result = largest.worker(_worker_args())
    assert result["ok"] is False and result["oom"] is is_oom and result["error"]


def test_worker_probe_runs_the_real_step():
    result = largest.worker(_worker_args(batch=2))
    assert result["ok"] is True and result["oom"] is False and result["batch_size"] == 2


def test_fake_limit_is_per_method_or_for_all():
    args = _worker_args(method="fastdp-bk", batch=10)
    args.fake_max_batch = "nonprivate=11,fastdp-bk=9"
    assert largest.fake_out_of_memory(args)["oom"] is True
    args.batch = 9
    assert largest.fake_out_of_memory(args) is None
    args.fake_max_batch = "12"
    args.batch = 13
    assert largest.fake_out_of_memory(args)["oom"] is True


@pytest.mark.parametrize("argv, message", [
    (["--fake-max-batch", "nosuch=3"], "unknown method nosuch"),
    (["--fake-max-batch", "fastdp-bk=x"], "--fake-max-batch: expected"),
    (["--methods", "nonprivate,nosuch"], "unknown method nosuch"),
    (["--seq-len", "100"], "--seq-len 100 is longer"),
    (["--max-batch", "0"], "--max-batch must be ≥ 1"),
])
def test_bad_options_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        largest.main(["--quick", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_quick_run_finds_the_fake_limits_and_writes_the_results(tmp_path):
    out = tmp_path / "largest"
    argv = ["--quick", "--methods", "nonprivate,fastdp-bk", "--fake-max-batch", "nonprivate=11,fastdp-bk=9",
            "--out", str(out)]
    assert largest.main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    header, rows = results["header"], {row["method"]: row for row in results["rows"]}
    assert header["command"] == "python -m bench.bench_largest_batch " + " ".join(argv)
    for key in ("date", "device", "torch", "fastdp", "git commit", "model", "dtype", "fake memory limit"):
        assert header[key], key
    assert sorted(rows) == ["fastdp-bk", "nonprivate"]
    for method, limit in (("nonprivate", 11), ("fastdp-bk", 9)):
        row = rows[method]
        assert row["ok"] and row["largest_batch"] == limit and not row["capped"], row
        verdicts = {probe["batch_size"]: probe["fits"] for probe in row["probes"]}
        assert verdicts[limit] is True and verdicts[limit + 1] is False, verdicts
        assert all(fits == (batch <= limit) for batch, fits in verdicts.items()), verdicts
        [measurement] = row["measurements"]  # fastdp-bk fits less: timed only at its own largest
        assert measurement["ok"] and measurement["batch_size"] == limit
        assert measurement["tokens_per_s"] == pytest.approx(measurement["samples_per_s"] * 32)
        assert measurement["throughput_ratio"] > 0 and len(measurement["times_ms"]) == 3
    assert rows["nonprivate"]["probes"][0]["batch_size"] == 4  # --quick's --start-batch
    assert rows["fastdp-bk"]["probes"][0]["batch_size"] == 11  # DP methods start at non-private's largest
    assert rows["nonprivate"]["measurements"][0]["throughput_ratio"] == pytest.approx(1.0)
    assert rows["fastdp-bk"]["largest_ratio"] == pytest.approx(9 / 11)

    table = (out / "results.md").read_text()
    assert "| nonprivate | 11 | 1.00× |" in table and "| fastdp-bk | 9 | 0.82× |" in table
    assert "## Throughput" in table and "fake memory limit" in table
    assert (out / "logs" / "fastdp-bk-measure-9.log").exists()
