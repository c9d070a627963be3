"""bench/bench_memory.py end to end on the quick models: one process per (model, method), the ratios to
both non-private baselines, and the largest-batch search under a budget."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench.bench_memory import add_ratios, markdown

from .subprocesses import run

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_run_measures_every_method_and_searches_the_budget(tmp_path):
    out = tmp_path / "memory"
    methods = "nonprivate,nonprivate-kept-grads,fastdp-bk-per_layer"
    process = run([sys.executable, "-m", "bench.bench_memory", "--quick", "--models", "mlp", "--methods", methods,
                   "--steps", "2", "--budget", "1", "--budget-probes", "2", "--out", str(out)],
                  cwd=REPO_ROOT, timeout=600)
    assert process.returncode == 0, process.stdout + process.stderr
    rows = {row["method"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert sorted(rows) == sorted(methods.split(","))
    for method, row in rows.items():
        assert row["ok"] and row["allocated_peak_bytes"] > 0 and row["resident_peak_bytes"] > 0, row
        # the search ends with a batch measured to fit and one measured not to (or its probes ran out)
        assert 0 < row["largest_batch_peak_bytes"] <= 2**20, row
    assert rows["nonprivate"]["allocated_ratio"] == 1.0 and rows["nonprivate-kept-grads"]["allocated_ratio_kept"] == 1.0
    # kept gradients cost memory: the like-for-like baseline peaks higher than non-private that frees them
    assert rows["nonprivate-kept-grads"]["allocated_peak_bytes"] > rows["nonprivate"]["allocated_peak_bytes"]
    text = (out / "results.md").read_text()
    assert "| fastdp-bk-per_layer | after |" in text and "## Largest batch within 1 MiB" in text


def test_ratios_and_goals_in_the_report():
    rows = [
        {"model": "mlp", "method": "nonprivate", "version": "after", "ok": True, "allocated_peak_bytes": 100},
        {"model": "mlp", "method": "nonprivate-kept-grads", "version": "after", "ok": True, "allocated_peak_bytes": 150},
        {"model": "mlp", "method": "fastdp-bk-per_layer", "version": "after", "ok": True, "allocated_peak_bytes": 155},
        {"model": "mlp", "method": "fastdp-bk", "version": "after", "ok": False, "error": "boom"},
    ]
    add_ratios(rows)
    assert rows[2]["allocated_ratio"] == 1.55 and abs(rows[2]["allocated_ratio_kept"] - 155 / 150) < 1e-12
    text = markdown({"date": "today"}, rows)
    assert "≤ 1.05: not met (met vs kept grads)" in text
    assert "error: boom" in text
