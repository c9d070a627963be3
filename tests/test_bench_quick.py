"""The benchmark machinery (bench/): the --quick preset end to end, failures as rows, the report.

No timing assertions: CI machines are shared and slow; only that every (model, method)
produced a row, that the baseline and fastdp's default mode ran, and that the files exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import report
from bench.methods import default_methods
from bench.models import MODELS

from .subprocesses import run

REPO_ROOT = Path(__file__).resolve().parent.parent



def test_quick_preset_runs_every_model_and_method(tmp_path):
    out = tmp_path / "quick"
    process = run([sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--out", str(out)],
                  cwd=REPO_ROOT, timeout=900)  # on a timeout its per-method processes are killed too
    assert process.returncode == 0, process.stdout + process.stderr
    results = json.loads((out / "results.json").read_text())
    rows = {(row["model"], row["method"]): row for row in results["rows"]}
    expected = [(model, method) for model in MODELS for method in default_methods("cpu")]
    assert sorted(rows) == sorted(expected)
    for key, row in rows.items():
        if row["ok"]:
            assert row["median_ms"] > 0 and row["samples_per_s"] > 0 and len(row["times_ms"]) == 3, key
        else:
            assert isinstance(row["error"], str) and row["error"].strip(), key
    for model in MODELS:
        assert rows[model, "nonprivate"]["ok"], rows[model, "nonprivate"]
        assert rows[model, "nonprivate"]["time_ratio"] == pytest.approx(1.0)
        for method in ("fastdp-bk", "fastdp-hooks", "fastdp-functorch", "microbatch", "torchfunc"):
            row = rows[model, method]
            assert row["ok"], row  # gru torchfunc included: the model passes its initial state (bench/models.py)
            assert row["time_ratio"] > 0
    assert results["header"]["command"].startswith("python -m bench --quick")
    table = (out / "results.md").read_text()
    for model in MODELS:
        assert f"## {model} " in table
    assert "| fastdp-bk |" in table
    assert (out / "logs" / "mlp-fastdp-bk.log").exists()


def test_bad_model_name_is_a_one_line_error():
    process = subprocess.run(
        [sys.executable, "-m", "bench", "--models", "mlp,resnet50", "--quick"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 2
    assert "unknown model resnet50" in process.stderr and "choose from" in process.stderr


def test_failing_method_becomes_an_error_row(monkeypatch):
    from bench import methods, step

    def broken(spec, x, y, run):
        raise RuntimeError("this method is broken\nsecond line")

    monkeypatch.setitem(methods.METHODS, "nonprivate", broken)
    args = step.build_parser().parse_args(["--model", "mlp", "--method", "nonprivate", "--quick"])
    row = step.run(args)
    assert row["ok"] is False and row["error"] == "RuntimeError: this method is broken"


def test_a_process_past_its_timeout_becomes_an_error_row(tmp_path):
    from bench.__main__ import run_one

    args = SimpleNamespace(quick=True, steps=3, warmup=2, dtype="fp32", tf32=True, threads=1,
                           microbatch_samples=None, timeout=0.01)
    row = run_one("mlp", "nonprivate", args, "cpu", tmp_path)
    assert row["ok"] is False and "timed out" in row["error"]


def test_microbatch_extrapolates_only_when_capped():
    from bench import step

    args = step.build_parser().parse_args(["--model", "mlp", "--method", "microbatch", "--quick",
                                           "--steps", "1", "--warmup", "0", "--microbatch-samples", "4"])
    row = step.run(args)
    assert row["ok"] and row["extrapolated"] and "4 of 32" in row["note"]


def test_ratios_and_table_from_rows():
    rows = [
        {"model": "m", "method": "nonprivate", "ok": True, "median_ms": 10.0, "samples_per_s": 100.0,
         "peak_mem_bytes": 2 << 20, "mem_kind": "cpu_peak_rss_delta", "description": "a model"},
        {"model": "m", "method": "fastdp-bk", "ok": True, "median_ms": 25.0, "samples_per_s": 40.0,
         "peak_mem_bytes": 3 << 20, "mem_kind": "cpu_peak_rss_delta"},
        {"model": "m", "method": "opacus-hooks", "ok": False, "error": "opacus not installed"},
    ]
    report.add_ratios(rows)
    assert rows[1]["time_ratio"] == pytest.approx(2.5) and rows[1]["mem_ratio"] == pytest.approx(1.5)
    assert rows[2]["time_ratio"] is None
    table = report.markdown({"device": "cpu"}, rows)
    assert "## m — a model" in table
    assert "| fastdp-bk | 25 | 40 | 2.50× | 3.00 MiB | 1.50× |  |" in table
    assert "error: opacus not installed" in table


def test_plot_marks_failed_rows_with_their_reason_and_says_what_produced_it(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    texts = []
    annotate = Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda self, text, *a, **k: texts.append(text) or annotate(self, text, *a, **k))
    suptitles = []
    suptitle = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **k: suptitles.append(t) or suptitle(self, t, **k))
    rows = [
        {"model": "m", "method": "nonprivate", "ok": True, "median_ms": 10.0, "samples_per_s": 100.0},
        {"model": "m", "method": "fastdp-bk", "ok": True, "median_ms": 25.0, "samples_per_s": 40.0},
        {"model": "m", "method": "opacus-hooks", "ok": False, "error": "opacus not installed\ntraceback..."},
        {"model": "n", "method": "nonprivate", "ok": False, "error": "RuntimeError: out of memory"},
        {"model": "n", "method": "fastdp-bk", "ok": True, "median_ms": 5.0, "samples_per_s": 40.0},
    ]
    report.add_ratios(rows)
    header = {"device": "cpu: test CPU", "preset": "quick (scaled-down models)", "cpu threads per process": 1,
              "dtype": "fp32", "date": "2026-12-03"}
    assert report.plot(tmp_path, header, rows) == f"wrote {tmp_path / 'results.png'}"
    assert (tmp_path / "results.png").stat().st_size > 0
    assert "2.50×" in texts and "failed: opacus not installed" in texts
    assert "failed: RuntimeError: out of memory" in texts and "no ratio: the non-private baseline failed" in texts
    assert "quick (scaled-down models)" in suptitles[0] and "threads: 1" in suptitles[0]
