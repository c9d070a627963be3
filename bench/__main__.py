"""Whole-training-step benchmark: every (model, method) in its own process, then one table.

    python -m bench                         # all models and methods on cuda if available, else cpu
    python -m bench --quick                 # scaled-down models, 2 warm-up + 3 timed steps: a CPU smoke run
    python -m bench --models mlp,gpt2 --methods nonprivate,fastdp-bk --plot

Writes results.json, results.md (and with --plot results.png) to --out, by default
<temp dir>/fastdp-bench/<date>-<device>/ (outside the source tree), plus
logs/<model>-<method>.log with each process's output.
See bench/README.md for what every column means.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List

import torch

from bench import report
from bench.methods import BACKEND_OF_METHOD, METHODS, OPACUS_METHODS, default_methods
from bench.models import MODELS
from bench.step import RESULT_PREFIX

REPO_ROOT = Path(__file__).resolve().parent.parent


def _comma_list(value: str, known, what: str) -> List[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(empty list)'}; choose from {', '.join(known)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=lambda v: _comma_list(v, list(MODELS), "model"), default=list(MODELS),
                        help=f"comma list (default all: {','.join(MODELS)})")
    parser.add_argument("--methods", type=lambda v: _comma_list(v, list(METHODS), "method"), default=None,
                        help="comma list (default: all that apply to the device)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true", help="scaled-down models, 2 warm-up + 3 timed steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (default 20; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 5; --quick 2)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default <temp dir>/fastdp-bench/<date>-<device>)")
    parser.add_argument("--plot", action="store_true", help="also write results.png (needs matplotlib)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="allow TF32 matmuls/convolutions on CUDA (default on)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast forward")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per (model, method) process (default 900; --quick 120)")
    parser.add_argument("--microbatch-samples", type=int, default=None,
                        help="samples microbatching times per step before extrapolating (0 = whole batch; default per model)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes at once (default 1; --quick 2): more than 1 only for smoke runs, they disturb each other's timings")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per process (default torch's choice; --quick 1)")
    return parser


def _resolve_device(value: str) -> str:
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {value!r}")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {value}: CUDA is not available here; use --device cpu")
    return value


def _device_name(device: str) -> str:
    if device.startswith("cuda"):  # asked in a child process: this one never holds GPU memory
        index = device.partition(":")[2] or "0"
        query = f"import torch; print(torch.cuda.get_device_name({index}))"
        out = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True, timeout=120)
        return out.stdout.strip() or "unknown CUDA device"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_header(command: str, device: str) -> dict:
    """What every results file records first: date, the command, device, versions, commit."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "device": f"{device}: {_device_name(device)}",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastdp": _version("fastdp"),
        "git commit": _git_commit(),
    }


def _header(args, device: str, argv: List[str]) -> dict:
    header = {
        **environment_header("python -m bench " + shlex.join(argv), device),
        "python": platform.python_version(),
        "cpu threads per process": args.threads or f"torch default ({torch.get_num_threads()})",
        "preset": "quick (scaled-down models)" if args.quick else "full",
        "steps": f"{args.warmup} warm-up + {args.steps} timed",
        "dtype": args.dtype + (" (autocast)" if args.dtype == "bf16" else ""),
    }
    if device.startswith("cuda"):
        header["tf32"] = "on" if args.tf32 else "off"
        header["cuda"] = torch.version.cuda
    if _version("opacus") != "not installed":
        header["opacus"] = _version("opacus")
    if args.jobs > 1:
        header["jobs"] = f"{args.jobs} processes at once: timings disturb each other"
    return header


def run_one(model: str, method: str, args, device: str, log_dir: Path) -> dict:
    """One (model, method) in a fresh Python process; always returns a row."""
    if method in OPACUS_METHODS and _version("opacus") == "not installed":
        return {"model": model, "method": method, "ok": False, "error": "opacus not installed"}
    command = [
        sys.executable, "-m", "bench.step", "--model", model, "--method", method, "--device", device,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype,
        "--tf32" if args.tf32 else "--no-tf32", "--verbose",
    ]
    if args.quick:
        command.append("--quick")
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.microbatch_samples is not None:
        command += ["--microbatch-samples", str(args.microbatch_samples)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("FASTDP_BACKEND", None)  # fastdp-bk is the automatic choice; fastdp-bk-<backend> forces one
    if method in BACKEND_OF_METHOD:
        env["FASTDP_BACKEND"] = BACKEND_OF_METHOD[method]
    row = {"model": model, "method": method, "ok": False}
    started = time.perf_counter()
    try:
        process = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"", expired.stderr or b"")
        output = [o.decode(errors="replace") if isinstance(o, bytes) else o for o in output]
        (log_dir / f"{model}-{method}.log").write_text(shlex.join(command) + "\n" + output[0] + output[1])
        return dict(row, error=f"timed out after {args.timeout:g} s (--timeout)")
    (log_dir / f"{model}-{method}.log").write_text(shlex.join(command) + "\n" + process.stdout + process.stderr)
    results = [line[len(RESULT_PREFIX):] for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if results:
        return dict(json.loads(results[-1]), process_s=round(time.perf_counter() - started, 2))
    last = (process.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(row, error=f"process exited with code {process.returncode} before printing a result: {last[:200]}")


def _describe(row: dict) -> str:
    if not row.get("ok"):
        return "error: " + row.get("error", "?")
    text = f"{row['median_ms']:.3g} ms" + (" (extrapolated)" if row.get("extrapolated") else "")
    return text + (f", {row['time_ratio']:.2f}× non-private" if row.get("time_ratio") else "")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = _resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.timeout = args.timeout if args.timeout is not None else (120.0 if args.quick else 900.0)
    args.jobs = args.jobs if args.jobs is not None else (2 if args.quick else 1)
    args.threads = args.threads if args.threads is not None else (1 if args.quick else 0)
    checks = (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--jobs", args.jobs, 1),
              ("--threads", args.threads, 0), ("--microbatch-samples", args.microbatch_samples or 0, 0))
    for name, value, low in checks:
        if value < low:
            parser.error(f"{name} must be ≥ {low}, got {value}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    methods = args.methods or default_methods(device.split(":")[0])
    if report.BASELINE in methods:  # the baseline first: every ratio needs it
        methods = [report.BASELINE] + [m for m in methods if m != report.BASELINE]

    header = _header(args, device, argv)
    slug = re.sub(r"[^a-z0-9]+", "-", (header["device"].split(": ", 1)[1] if device != "cpu" else "cpu").lower()).strip("-")
    out_dir = args.out or report.default_out_dir(slug)
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench: {len(args.models)} models × {len(methods)} methods on {header['device']} → {out_dir}", flush=True)

    rows: List[dict] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for model in args.models:
            for row in pool.map(lambda method: run_one(model, method, args, device, log_dir), methods):
                rows.append(row)
                report.write(out_dir, header, rows)  # after every row: an interrupted run keeps what it measured
                print(f"  {model:9s} {row['method']:18s} {_describe(row)}", flush=True)
    print(f"bench: done in {time.perf_counter() - started:.0f} s; wrote {out_dir / 'results.md'} and results.json")
    if args.plot:
        print(report.plot(out_dir, header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
