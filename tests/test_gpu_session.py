"""bench/gpu_session.sh, the one-call GPU validation: its CPU dry run, its time caps, its summary.

A device is lent rarely and for minutes, so the script must work the first time it meets one:
``--dry-run`` runs every stage here (CUDA hidden, Triton's interpreter, tiny shapes) and these
tests check what it leaves in $OUT. The dry run's step table is cut to one model (GPU_SESSION_MODELS)
to keep CI short; the default model and method lists are checked against the bench's names instead.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from bench import gpu_summary
from bench.methods import METHODS
from bench.models import MODELS

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "bench" / "gpu_session.sh"
SESSION_FILES = {"env.txt", "cuda_ext.txt", "tests.txt", "steps.md", "steps.json", "kernels.txt", "summary.md", "logs.tgz"}


def run_session(tmp_path: Path, *args: str, timeout: float = 600, **env: str):
    """Run the script with $OUT and its scratch folder under tmp_path; (process, out, work)."""
    out, work = tmp_path / "out", tmp_path / "work"
    environment = dict(os.environ, OUT=str(out), GPU_SESSION_WORK=str(work), GPU_SESSION_WHEELS=str(tmp_path / "none"),
                       PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    for name in list(environment):
        if name.startswith("GPU_CAP_") or name in ("GPU_SESSION_METHODS", "FASTDP_AUTOTUNE_CONFIGS"):
            del environment[name]
    environment.update(env)
    process = subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO_ROOT, env=environment, capture_output=True,
                             text=True, timeout=timeout)
    return process, out, work


def stages(work: Path) -> dict:
    """{stage: (status, detail)} from the stage table, in order."""
    with open(work / "stages.tsv") as table:
        return {row[0]: (row[1], row[3]) for row in csv.reader(table, delimiter="\t")}


def make_wheel(folder: Path, name: str = "fastdp_probe", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel, to check that carried wheels are installed offline and importable."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as wheel:
        for file, text in files.items():
            wheel.writestr(file, text)
        wheel.writestr(f"{info}/RECORD", "".join(f"{file},,\n" for file in [*files, f"{info}/RECORD"]))
    return path


@pytest.mark.slow
def test_dry_run_runs_every_stage_on_cpu(tmp_path):
    make_wheel(tmp_path / "wheels")
    process, out, work = run_session(tmp_path, "all", "--dry-run", GPU_SESSION_MODELS="mlp",
                                     GPU_SESSION_WHEELS=str(tmp_path / "wheels"),
                                     # the default methods, without the Opacus rows an installed opacus would add
                                     GPU_SESSION_METHODS="nonprivate,fastdp-bk,fastdp-bk-per_layer,fastdp-bk-cudagraph")
    log = process.stdout + process.stderr
    assert process.returncode == 0, log
    assert {path.name for path in out.iterdir()} == SESSION_FILES, log  # the device tool returns at most 8

    found = stages(work)
    assert list(found) == ["env", "ext", "tests", "steps", "kernels"], found
    assert found["ext"][0] == "skipped: no CUDA"
    assert (out / "cuda_ext.txt").read_text().strip() == "skipped: no CUDA"
    for stage in ("env", "tests", "steps", "kernels"):
        assert found[stage][0] == "ok", (stage, found[stage], log)

    env = (out / "env.txt").read_text()
    assert "wheels: installing fastdp_probe-0.1-py3-none-any.whl offline" in env, env
    assert "carried wheel fastdp_probe: 0.1" in env, env  # installed, and on the PYTHONPATH of what follows
    assert "device: cpu (no CUDA)" in env and "mode: dry run on CPU" in env, env
    assert json.loads((work / "env.json").read_text())["torch cuda"] is None

    tests_line = found["tests"][1]
    assert re.search(r"\b\d+ passed\b", tests_line) and "failed" not in tests_line and "error" not in tests_line, tests_line

    rows = json.loads((out / "steps.json").read_text())["rows"]
    assert [(row["model"], row["method"]) for row in rows] == [
        ("mlp", "nonprivate"), ("mlp", "fastdp-bk"), ("mlp", "fastdp-bk-per_layer")]
    assert all(row["ok"] and row["median_ms"] > 0 for row in rows), rows
    assert "fastdp-bk-cudagraph skipped: no CUDA" in found["steps"][1]
    assert (out / "steps.md").read_text().startswith("# fastdp training-step benchmark")

    kernels = (out / "kernels.txt").read_text()
    for command in ("bench.bench_kernels_linear --smoke", "bench.bench_kernels_conv_embedding_norms --smoke",
                    "bench.bench_kernels_linear --dtype bfloat16 --smoke"):
        assert f"### python -m {command}\n" in kernels, command
    assert "Traceback" not in kernels

    summary = (out / "summary.md").read_text()
    assert process.stdout.rstrip().endswith(summary.rstrip())  # printed last, to paste
    assert "ext skipped: no CUDA" in summary and "kernels ok" in summary
    assert re.search(r"kernel checks\*\*: \d+ kernel results against their torch references, all within bounds", summary)
    table = [line for line in summary.splitlines() if line.startswith("| mlp |")]
    assert len(table) == 3 and all(re.match(r"\| mlp \| \S+ \| [\d.]+ \| [\d.]+× \|", line) for line in table), table

    with tarfile.open(out / "logs.tgz") as archive:
        names = set(archive.getnames())
    assert {"./stages.tsv", "./steps.txt", "./steps/logs/mlp-fastdp-bk.log"} <= names, names
    assert not any(name.startswith("./site") for name in names)


def test_a_stage_past_its_cap_is_cut_and_the_next_stage_still_runs(tmp_path):
    started = time.monotonic()
    process, out, work = run_session(tmp_path, "ext", "--dry-run", timeout=120, GPU_CAP_ENV="1")
    assert process.returncode == 1, process.stdout + process.stderr
    assert time.monotonic() - started < 30  # cut at 1 s (SIGKILL 5 s later at worst), not run to its end
    found = stages(work)
    assert found["env"][0] == "timed out" and found["ext"][0] == "skipped: no CUDA", found
    assert "env timed out" in (out / "summary.md").read_text()
    assert (out / "env.txt").exists() and (out / "logs.tgz").exists()


def test_bad_arguments_are_refused_with_the_stage_names(tmp_path):
    process, _, _ = run_session(tmp_path, "everything", timeout=60)
    assert process.returncode == 2 and "unknown stage or option 'everything'" in process.stderr
    assert "all env ext tests steps kernels finetune" in process.stderr
    process, _, _ = run_session(tmp_path, "--dry-run", timeout=60)
    assert process.returncode == 2 and "name the stages to run" in process.stderr


def test_default_model_and_method_lists_name_real_bench_entries():
    """The GPU run's lists are not exercised in full here (the dry run times one model): a typo would
    cost a device call, so each name must be a bench model or method."""
    text = SCRIPT.read_text()
    models = re.search(r"GPU_SESSION_MODELS:-([^}]+)}", text).group(1).split(",")
    assert models == ["mlp", "resnet18", "gpt2", "lstm"]
    methods = re.search(r"GPU_SESSION_METHODS:-([^}]+)}", text).group(1).split(",")
    methods += re.search(r'methods\+=",([^"]+)"', text).group(1).split(",")
    methods += re.search(r"GPU_FINETUNE_METHODS:-([^}]+)}", text).group(1).split(",")
    assert set(models) <= set(MODELS) and set(methods) <= set(METHODS), (models, methods)


def test_kernel_checks_flag_errors_beyond_the_bound_and_nan():
    good = ("device: x\n\nB=2 T=3 d=4 p=5 float32 (cost model picks ghost)\n"
            "  triton direct norm   0.1 ms   1.0x GEMM  rel. error 3.0e-07\n\n"
            "conv a, B=3, torch.bfloat16 (T=1, d=2, p=3)\n  check: rel. error ghost / direct / grad_sample  1.0e-03 / 2.0e-03 / 4.0e-03\n")
    line = gpu_summary.kernel_checks(good)
    assert line.startswith("4 kernel results") and "all within bounds" in line and "bfloat16 4.0e-03" in line, line
    for bad in (good.replace("3.0e-07", "5.0e-04"), good.replace("3.0e-07", "nan"), good.replace("4.0e-03", "3.0e-02")):
        assert gpu_summary.kernel_checks(bad).startswith("**FAILED**: 1 of 4"), bad  # 3e-2: beyond even bf16's bound
    assert gpu_summary.kernel_checks("device: x\n") == "no kernel check ran"


def test_summary_table_ratios_and_goals(tmp_path):
    """On GPU each fastdp row is held to issue 16's goal; Opacus ratios are against the model's fastest Opacus row."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "steps").mkdir(parents=True)
    out.mkdir()
    (work / "stages.tsv").write_text("env\tok\t3\tNVIDIA H200\nsteps\tok\t100\t\n")

    def row(method, ms, mem, ratio=None, mem_ratio=None):
        return {"model": "gpt2", "method": method, "ok": True, "median_ms": ms, "samples_per_s": 1.0,
                "peak_mem_bytes": mem, "time_ratio": ratio, "mem_ratio": mem_ratio, "note": ""}

    rows = [row("nonprivate", 10.0, 1 << 30, 1.0, 1.0), row("fastdp-bk", 11.0, 1 << 30, 1.1, 1.0),
            row("fastdp-bk-per_layer", 12.0, 1 << 30, 1.2, 1.0), row("opacus-ghost", 40.0, 4 << 30, 4.0, 4.0),
            row("opacus-hooks", 20.0, 2 << 30, 2.0, 2.0),
            {"model": "gpt2", "method": "fastdp-bk-cudagraph", "ok": False, "error": "RuntimeError: capture failed"}]
    header = {"device": "cuda: NVIDIA H200", "steps": "3 warm-up + 10 timed", "dtype": "fp32", "tf32": "on"}
    (work / "steps" / "results.json").write_text(json.dumps({"header": header, "rows": rows}))
    text = gpu_summary.summary(work, out)
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| gpt2 |")}
    assert "| 1.10× | ≤ 1.15×: met |" in lines["fastdp-bk"] and "| 0.55× hooks | 0.50× hooks |" in lines["fastdp-bk"]
    assert "≤ 1.15×: missed" in lines["fastdp-bk-per_layer"]
    assert "error: RuntimeError: capture failed" in lines["fastdp-bk-cudagraph"]
    assert "- **stages**: env ok (3 s; NVIDIA H200) · steps ok (100 s)" in text
    assert "environment**: missing" in text and "TF32 on" in text


def test_summary_without_any_results_says_what_is_missing(tmp_path):
    (tmp_path / "out").mkdir()
    assert gpu_summary.main([str(tmp_path / "work"), str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "stages**: none finished" in text and "no step results" in text


def test_autotune_configs_keeps_the_first_n(monkeypatch):
    triton = pytest.importorskip("triton")
    from fastdp.kernels._triton_utils import AUTOTUNE_CONFIGS_VARIABLE, autotune_configs

    configs = [triton.Config({"BLOCK": size}) for size in (16, 32, 64)]
    monkeypatch.delenv(AUTOTUNE_CONFIGS_VARIABLE, raising=False)
    assert autotune_configs(configs) == configs
    monkeypatch.setenv(AUTOTUNE_CONFIGS_VARIABLE, "2")
    assert autotune_configs(configs) == configs[:2]
    monkeypatch.setenv(AUTOTUNE_CONFIGS_VARIABLE, "9")
    assert autotune_configs(configs) == configs
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(AUTOTUNE_CONFIGS_VARIABLE, bad)
        with pytest.raises(ValueError, match="FASTDP_AUTOTUNE_CONFIGS must be a whole number"):
            autotune_configs(configs)
