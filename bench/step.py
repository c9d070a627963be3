"""Time one (model, method) in this process and print one result line.

    python -m bench.step --model mlp --method fastdp-bk [--device cuda] [--quick] ...

``python -m bench`` runs this once per (model, method) in a fresh process, so allocator
state, compiled kernels and peak-memory counters never leak from one method to the next.
The result is one line ``BENCH_RESULT {json}`` on stdout; any failure (out of memory, an
unsupported layer, a missing library) becomes ``"ok": false`` with the error text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

RESULT_PREFIX = "BENCH_RESULT "


def _proc_status_kib(key: str):
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), or None where there is no procfs."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the timed region, started after model and optimizer creation.

    CUDA: torch.cuda.max_memory_allocated (absolute: parameters, optimizer state, batch and
    the step's temporaries). CPU: the growth of the peak resident set size over the RSS at
    the start (Linux: the peak is reset through /proc/self/clear_refs), else unknown.
    """

    def __init__(self, device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_delta"
        self.base_kib = None

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current RSS
            self.base_kib = _proc_status_kib("VmRSS")
        except OSError:
            self.base_kib = None

    def peak_bytes(self):
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = _proc_status_kib("VmHWM")
        if self.base_kib is None or peak is None:
            return None
        return max(0, peak - self.base_kib) * 1024


def run_for_result(command: list, *, env: dict, cwd, log, timeout: float, failed: dict, prefix: str) -> dict:
    """Run a benchmark child process and return the JSON it printed last after ``prefix``; ``failed`` plus an
    ``error`` when it timed out or printed none. Its command line and output go to ``log`` (a Path)."""
    import shlex
    import subprocess

    try:
        process = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        output = [o.decode(errors="replace") if isinstance(o, bytes) else (o or "") for o in (expired.stdout, expired.stderr)]
        log.write_text(shlex.join(command) + "\n" + "".join(output))
        return dict(failed, error=f"timed out after {timeout:g} s (--timeout)")
    log.write_text(shlex.join(command) + "\n" + process.stdout + process.stderr)
    results = [line[len(prefix):] for line in process.stdout.splitlines() if line.startswith(prefix)]
    if results:
        return json.loads(results[-1])
    last = (process.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(failed, error=f"process exited with code {process.returncode} before printing a result: {last[:200]}")


def _error_text(error: BaseException) -> str:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "CUDA out of memory"
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
    return text if len(text) <= 300 else text[:297] + "..."


def configure_device(args):
    """The torch device of ``args.device``, with ``args.threads`` CPU threads and TF32 per ``args.tf32``."""
    import torch

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    return device


def run(args) -> dict:
    import torch

    from bench.methods import METHODS, RunSettings
    from bench.models import build

    device = configure_device(args)
    result = {"model": args.model, "method": args.method, "ok": False}
    prepared = None
    try:
        spec = build(args.model, quick=args.quick)
        result.update(description=spec.description, batch_size=spec.batch_size)
        spec.model.to(device)
        generator = torch.Generator().manual_seed(1)
        x, y = spec.make_batch(spec.batch_size, device, generator)
        settings = RunSettings(device=device, dtype=args.dtype, microbatch_samples=args.microbatch_samples)
        prepared = METHODS[args.method](spec, x, y, settings)
        memory = PeakMemory(device)
        memory.reset()
        times = []
        for i in range(args.warmup + args.steps):
            settings.sync()
            start = time.perf_counter()
            reported = prepared.step()
            settings.sync()
            if i >= args.warmup:
                times.append(reported if reported is not None else time.perf_counter() - start)
        median = statistics.median(times)
        result.update(
            ok=True,
            median_ms=median * 1e3,
            min_ms=min(times) * 1e3,
            times_ms=[t * 1e3 for t in times],
            samples_per_s=spec.batch_size / median,
            peak_mem_bytes=memory.peak_bytes(),
            mem_kind=memory.kind,
            extrapolated=prepared.extrapolated,
            note=prepared.note,
        )
    except Exception as error:  # every failure is a row, never a crash of the whole run
        result["error"] = _error_text(error)
        if prepared is not None and prepared.note:  # e.g. why a layer ran through a fallback
            result["note"] = prepared.note
        if args.verbose:
            traceback.print_exc()
    return result


def build_parser() -> argparse.ArgumentParser:
    from bench.methods import METHODS
    from bench.models import MODELS

    parser = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="the scaled-down models")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast forward")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA")
    parser.add_argument("--microbatch-samples", type=int, default=None,
                        help="microbatch: samples timed per step (0 = whole batch; default: per model)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a failure to stderr")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or (args.microbatch_samples or 0) < 0:
        raise SystemExit(
            f"--steps must be ≥ 1, --warmup and --microbatch-samples ≥ 0; got {args.steps}, {args.warmup}, "
            f"{args.microbatch_samples}"
        )
    from bench.methods import BACKEND_OF_METHOD

    if args.method in BACKEND_OF_METHOD:  # python -m bench sets it too; this covers direct use
        os.environ.setdefault("FASTDP_BACKEND", BACKEND_OF_METHOD[args.method])
    result = run(args)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
