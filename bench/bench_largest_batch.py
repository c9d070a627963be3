"""Largest batch that fits in GPU memory, then throughput there: GPT-2-medium-shaped fine-tuning.

    python -m bench.bench_largest_batch                       # gpt2-medium, bf16 weights, T=512, on cuda
    python -m bench.bench_largest_batch --methods nonprivate,fastdp-bk --max-batch 256
    python -m bench.bench_largest_batch --quick               # CPU smoke run: tiny model, fake memory limit

The question it answers: at the largest batch that fits non-privately, is fastdp's throughput
≥ 0.9× non-private's (flat clipping), and is the largest batch fastdp fits ≥ 0.9× non-private's?

Per method: the largest batch is searched by doubling from --start-batch until a batch does not
fit (DP methods start at non-private's largest and, when that does not fit, step down by 1, 2,
4, ... until one does), then by bisection; every probe runs
--probe-steps whole training steps in a fresh process, so allocator fragmentation never carries
over from one probe to the next, and counts as "does not fit" only on an out-of-memory error.
Then each method is timed (median of --steps steps after --warmup) at min(non-private's largest,
its own largest) and, when that differs, at its own largest. Writes results.json and results.md
(with device, versions, date and command) and logs/ to --out. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

from bench.report import _bytes, default_out_dir
from bench.step import run_for_result

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "LARGEST_BATCH_RESULT "
BASELINE = "nonprivate"
DEFAULT_METHODS = ["nonprivate", "fastdp-bk", "fastdp-bk-per_layer", "opacus-ghost"]
TARGET_RATIO = 0.9  # the bar: ≥ 0.9× non-private's throughput and largest batch

#: GPT-2 shapes (layers, width, heads, vocabulary, position table); the output head is tied to the token embedding
MODEL_SHAPES = {
    "gpt2": dict(layers=12, dim=768, heads=12, vocab=50257, context=1024),
    "gpt2-medium": dict(layers=24, dim=1024, heads=16, vocab=50257, context=1024),
    "gpt2-large": dict(layers=36, dim=1280, heads=20, vocab=50257, context=1024),
}
QUICK_SHAPE = dict(layers=2, dim=64, heads=4, vocab=1000, context=64)

DTYPES = {
    "bf16": "bf16 weights (model.to(torch.bfloat16)), no autocast; per-sample norms accumulate in fp32",
    "bf16-autocast": "fp32 weights, torch.autocast(bfloat16) around forward and loss",
    "fp32": "fp32 weights, no autocast",
}


class ProbeFailed(RuntimeError):
    """A probe failed for another reason than running out of memory: the method's search stops there."""


# -- the search ---------------------------------------------------------------------------------
def largest_fitting(fits: Callable[[int], bool], start: int, max_batch: int) -> int:
    """The largest batch ≤ max_batch for which ``fits`` is true (0 if batch 1 does not fit).

    Assumes memory grows with the batch (fits is monotone). From ``start``: if it fits, double
    the batch until one does not; if it does not, step down by 1, 2, 4, ... until one fits (DP
    methods start at non-private's largest batch and usually fit close below it). Then bisect
    between the largest batch that fitted and the smallest that did not. No batch is probed twice.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
    start = min(max(1, start), max_batch)
    if fits(start):
        fitting, failing = start, None
        while failing is None:
            if fitting == max_batch:
                return fitting
            batch = min(2 * fitting, max_batch)
            if fits(batch):
                fitting = batch
            else:
                failing = batch
    else:
        fitting, failing, step = 0, start, 1
        while start - step >= 1:
            if fits(start - step):
                fitting = start - step
                break
            failing, step = start - step, 2 * step
    while failing - fitting > 1:  # invariant: fitting fits (or is 0), failing does not
        middle = (fitting + failing) // 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return fitting


def measurement_batches(largest: int, nonprivate_largest: Optional[int]) -> List[int]:
    """Where a method is timed: min(non-private's largest, its own largest), and its own largest if different."""
    return sorted({min(nonprivate_largest or largest, largest), largest})


# -- the model ----------------------------------------------------------------------------------
def model_description(model: str, quick: bool, seq_len: int) -> str:
    shape = QUICK_SHAPE if quick else MODEL_SHAPES[model]
    name = "tiny GPT-2-shaped LM (--quick)" if quick else f"{model}-shaped LM"
    return (f"{name}: {shape['layers']} layers, d={shape['dim']}, {shape['heads']} heads, vocab {shape['vocab']}, "
            f"tied embeddings, T={seq_len}")


def build_spec(model: str, quick: bool, seq_len: int, dtype: str, batch: int, device):
    """bench.models' GPT2LM at the requested shape, built on ``device`` (seeded: every method and probe
    gets the same weights), in bf16 for ``dtype="bf16"``."""
    import torch

    from bench.models import GPT2LM, ModelSpec, _tokens

    shape = QUICK_SHAPE if quick else MODEL_SHAPES[model]
    torch.manual_seed(0)
    with device:  # built in place: no host copy of a large model
        lm = GPT2LM(shape["vocab"], shape["context"], shape["dim"], shape["layers"], shape["heads"])
    if dtype == "bf16":
        lm.to(torch.bfloat16)
    return ModelSpec(model, model_description(model, quick, seq_len), lm, batch, _tokens(shape["vocab"], seq_len))


# -- one probe or measurement (the child process) -----------------------------------------------
def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def worker(args) -> dict:
    """One process: build, prepare the method, run steps at --batch; never raises."""
    import torch

    from bench.methods import METHODS, RunSettings
    from bench.step import PeakMemory, _error_text, configure_device

    device = configure_device(args)
    result = {"method": args.method, "batch_size": args.batch, "kind": args.worker, "ok": False, "oom": False}
    try:
        spec = build_spec(args.model, args.quick, args.seq_len, args.dtype, args.batch, device)
        x, y = spec.make_batch(args.batch, device, torch.Generator().manual_seed(1))
        settings = RunSettings(device=device, dtype="bf16" if args.dtype == "bf16-autocast" else "fp32")
        prepared = METHODS[args.method](spec, x, y, settings)
        memory = PeakMemory(device)
        memory.reset()
        warmup, timed = (0, args.probe_steps) if args.worker == "probe" else (args.warmup, args.steps)
        times = []
        for i in range(warmup + timed):
            settings.sync()
            start = time.perf_counter()
            reported = prepared.step()
            settings.sync()
            if i >= warmup:
                times.append(reported if reported is not None else time.perf_counter() - start)
        result.update(ok=True, peak_mem_bytes=memory.peak_bytes(), mem_kind=memory.kind, note=prepared.note)
        if args.worker == "measure":
            median = statistics.median(times)
            result.update(median_ms=median * 1e3, min_ms=min(times) * 1e3, times_ms=[t * 1e3 for t in times],
                          samples_per_s=args.batch / median, tokens_per_s=args.batch * args.seq_len / median)
    except Exception as error:  # every failure is a result; out of memory is the expected one
        result["oom"] = _is_out_of_memory(error)
        result["error"] = _error_text(error)
        if not result["oom"]:
            traceback.print_exc()
    return result


# -- the run (the parent process) ---------------------------------------------------------------
def fake_limits(spec: str) -> Dict[str, int]:
    """``"11"`` → {"*": 11} (every method); ``"nonprivate=11,fastdp-bk=9"`` → {method: the largest batch that "fits"}."""
    if re.fullmatch(r"\s*\d+\s*", spec):
        return {"*": int(spec)}
    limits = {}
    for part in spec.split(","):
        method, _, value = part.strip().partition("=")
        if not method or not value.strip().isdigit():
            raise ValueError(f"--fake-max-batch: expected N or METHOD=N,METHOD=N,..., got {part.strip()!r}")
        limits[method] = int(value)
    return limits


def fake_out_of_memory(args) -> Optional[dict]:
    """The result of a probe or measurement above --fake-max-batch, made without importing torch or
    building anything (only the verdict matters, and it keeps CPU test runs short); None otherwise."""
    limits = fake_limits(args.fake_max_batch) if args.fake_max_batch else {}
    limit = limits.get(args.method, limits.get("*"))
    if limit is None or args.batch <= limit:
        return None
    return {"method": args.method, "batch_size": args.batch, "kind": args.worker, "ok": False, "oom": True,
            "error": f"fake out of memory: batch {args.batch} > --fake-max-batch {limit}"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_largest_batch", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="gpt2-medium")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                        help="bf16: bf16 weights (default); bf16-autocast: fp32 weights + autocast; fp32")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default 512; --quick 32)")
    parser.add_argument("--methods", default=None,
                        help=f"comma list (default {','.join(DEFAULT_METHODS)}); any of python -m bench's methods")
    parser.add_argument("--max-batch", type=int, default=None, help="upper end of the search (default 1024; --quick 16)")
    parser.add_argument("--start-batch", type=int, default=None,
                        help="first batch probed for non-private (default 8; --quick 4); DP methods start at "
                             "non-private's largest")
    parser.add_argument("--nonprivate-largest", type=int, default=None,
                        help="take non-private's largest batch from an earlier run instead of searching it "
                             "(non-private is still timed there): splits a long run over several calls")
    parser.add_argument("--fake-max-batch", default=None,
                        help="N or METHOD=N,...: treat a larger batch as out of memory (tests the search on "
                             "CPU; --quick default 11)")
    parser.add_argument("--device", default=None, help="auto (cuda if available), cpu, cuda or cuda:N (default auto; --quick cpu)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, small search, fake memory limit")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 10; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 3; --quick 1)")
    parser.add_argument("--probe-steps", type=int, default=2,
                        help="training steps a probe must survive to count as fitting (default 2)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process (default 600; --quick 120)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (--quick 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default <temp dir>/fastdp-bench/<date>-<device>-largest-batch)")
    # the child process's side: one probe or measurement
    parser.add_argument("--worker", choices=("probe", "measure"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _resolve_defaults(args, parser) -> None:
    from bench.__main__ import _comma_list, _resolve_device
    from bench.methods import METHODS

    quick = args.quick
    defaults = dict(seq_len=(32, 512), max_batch=(16, 1024), start_batch=(4, 8), steps=(3, 10), warmup=(1, 3),
                    timeout=(120.0, 600.0), threads=(1, 0), device=("cpu", "auto"), fake_max_batch=("11", None))
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if quick else full_value)
    try:
        args.device = _resolve_device(args.device)
        args.methods = _comma_list(args.methods, list(METHODS), "method") if args.methods else list(DEFAULT_METHODS)
        unknown = sorted(set(fake_limits(args.fake_max_batch)) - set(METHODS) - {"*"}) if args.fake_max_batch else []
        if unknown:
            raise ValueError(f"--fake-max-batch: unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(str(error))
    if BASELINE in args.methods:  # first: every other method starts from and is timed at its largest batch
        args.methods = [BASELINE] + [m for m in args.methods if m != BASELINE]
    checks = (("--seq-len", args.seq_len, 1), ("--max-batch", args.max_batch, 1), ("--start-batch", args.start_batch, 1),
              ("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--probe-steps", args.probe_steps, 1),
              ("--threads", args.threads, 0), ("--nonprivate-largest", args.nonprivate_largest or 1, 1))
    for name, value, low in checks:
        if value < low:
            parser.error(f"{name} must be ≥ {low}, got {value}")
    context = (QUICK_SHAPE if quick else MODEL_SHAPES[args.model])["context"]
    if args.seq_len > context:
        parser.error(f"--seq-len {args.seq_len} is longer than the model's {context} positions; use ≤ {context}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout:g}")


def _header(args, argv: List[str]) -> dict:
    import torch

    from bench.__main__ import _version, environment_header

    header = {
        **environment_header("python -m bench.bench_largest_batch " + shlex.join(argv), args.device),
        "model": model_description(args.model, args.quick, args.seq_len),
        "dtype": f"{args.dtype}: {DTYPES[args.dtype]}",
        "optimizer": "SGD lr 1e-3; DP: σ = 1.0, C = 1.0, mean loss, fixed batch (no Poisson sampling)",
        "search": (f"doubling from {args.start_batch} (DP methods: from non-private's largest, stepping down by "
                   "1, 2, 4, ... if it does not fit) then bisection, "
                   f"≤ --max-batch {args.max_batch}; a probe = {args.probe_steps} training steps in a fresh process"),
        "timing": f"median of {args.steps} steps after {args.warmup} warm-up, each measurement in a fresh process",
    }
    if args.device.startswith("cuda"):
        header["tf32"] = "on" if args.tf32 else "off"
        header["cuda"] = torch.version.cuda
        header["PYTORCH_CUDA_ALLOC_CONF"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "(unset)")
    if _version("opacus") != "not installed":
        header["opacus"] = _version("opacus")
    if args.threads:
        header["cpu threads per process"] = args.threads
    if args.fake_max_batch:
        header["fake memory limit"] = (f"--fake-max-batch {args.fake_max_batch}: a larger batch counts as out of "
                                       "memory without running; the largest batches below are not measurements")
    if args.nonprivate_largest:
        header["non-private largest batch"] = f"{args.nonprivate_largest}, given (--nonprivate-largest), not searched"
    return header


def run_child(kind: str, method: str, batch: int, args, log_dir: Path) -> dict:
    """One probe or measurement in a fresh Python process; always returns a result."""
    from bench.methods import BACKEND_OF_METHOD

    command = [
        sys.executable, "-m", "bench.bench_largest_batch", "--worker", kind, "--method", method, "--batch", str(batch),
        "--model", args.model, "--dtype", args.dtype, "--seq-len", str(args.seq_len), "--device", args.device,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--probe-steps", str(args.probe_steps),
        "--tf32" if args.tf32 else "--no-tf32",
    ]
    command += ["--quick"] if args.quick else []
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--fake-max-batch", args.fake_max_batch] if args.fake_max_batch else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("FASTDP_BACKEND", None)
    if method in BACKEND_OF_METHOD:
        env["FASTDP_BACKEND"] = BACKEND_OF_METHOD[method]
    log = log_dir / f"{method}-{kind}-{batch}.log"
    failed = {"method": method, "batch_size": batch, "kind": kind, "ok": False, "oom": False}
    return run_for_result(command, env=env, cwd=REPO_ROOT, log=log, timeout=args.timeout, failed=failed,
                          prefix=RESULT_PREFIX)


def search_method(method: str, start: int, args, log_dir: Path) -> dict:
    """The largest batch ``method`` fits (a row); each probe in its own process."""
    row = {"method": method, "ok": False, "probes": []}

    def fits(batch: int) -> bool:
        result = run_child("probe", method, batch, args, log_dir)
        row["probes"].append({"batch_size": batch, "fits": result["ok"], "peak_mem_bytes": result.get("peak_mem_bytes")})
        print(f"  {method:20s} probe batch {batch:5d}: {'fits' if result['ok'] else result.get('error', '?')}", flush=True)
        if not result["ok"] and not result["oom"]:
            raise ProbeFailed(result.get("error", "unknown error"))
        if result.get("note"):
            row["note"] = result["note"]
        return result["ok"]

    try:
        largest = largest_fitting(fits, start, args.max_batch)
    except ProbeFailed as error:
        return dict(row, error=f"probe failed: {error}")
    if largest == 0:
        return dict(row, error="out of memory at batch 1")
    return dict(row, ok=True, largest_batch=largest, capped=largest == args.max_batch)


def measure_method(row: dict, batches: List[int], args, log_dir: Path) -> None:
    row["measurements"] = []
    for batch in batches:
        result = run_child("measure", row["method"], batch, args, log_dir)
        keep = ("batch_size", "ok", "error", "median_ms", "min_ms", "times_ms", "samples_per_s", "tokens_per_s",
                "peak_mem_bytes", "mem_kind")
        row["measurements"].append({key: result[key] for key in keep if key in result})
        text = f"{result['tokens_per_s']:,.0f} tokens/s" if result["ok"] else "error: " + result.get("error", "?")
        print(f"  {row['method']:20s} timed at batch {batch:5d}: {text}", flush=True)


def add_ratios(rows: List[dict], nonprivate_largest: Optional[int]) -> None:
    """Largest batch and throughput of every row relative to non-private (at non-private's largest batch)."""
    base = next((r for r in rows if r["method"] == BASELINE and r.get("ok")), None)
    base_speed = None
    if base is not None:
        base_speed = next((m["tokens_per_s"] for m in base.get("measurements", []) if m.get("ok")), None)
    for row in rows:
        if row.get("ok") and nonprivate_largest:
            row["largest_ratio"] = row["largest_batch"] / nonprivate_largest
        for measurement in row.get("measurements", []):
            ok = measurement.get("ok") and base_speed
            measurement["throughput_ratio"] = measurement["tokens_per_s"] / base_speed if ok else None


def _ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(header: dict, rows: List[dict]) -> str:
    lines = ["# Largest batch that fits, and throughput there", ""]
    lines += [f"- **{key}**: {_cell(value)}" for key, value in header.items()]
    lines += ["", "## Largest batch", "",
              "| method | largest batch | × non-private | probes (batch: ✓ fits, ✗ out of memory) | note |",
              "|---|---|---|---|---|"]
    for row in rows:
        probes = " ".join(f"{p['batch_size']}{'✓' if p['fits'] else '✗'}" for p in row.get("probes", []))
        if row.get("ok"):
            largest = f"{row['largest_batch']}" + (" (= --max-batch)" if row.get("capped") else "")
            note = row.get("note", "")
        else:
            largest, note = "—", "; ".join(filter(None, ["error: " + row.get("error", "?"), row.get("note", "")]))
        lines.append(f"| {row['method']} | {largest} | {_ratio(row.get('largest_ratio'))} | {probes} | {_cell(note)} |")
    lines += ["", "## Throughput", "",
              "| method | batch | median ms | samples/s | tokens/s | × non-private | peak memory |",
              "|---|---|---|---|---|---|---|"]
    for row in rows:
        for m in row.get("measurements", []):
            if m.get("ok"):
                lines.append(f"| {row['method']} | {m['batch_size']} | {m['median_ms']:.4g} | {m['samples_per_s']:,.1f} "
                             f"| {m['tokens_per_s']:,.0f} | {_ratio(m.get('throughput_ratio'))} "
                             f"| {_bytes(m.get('peak_mem_bytes'))} |")
            else:
                lines.append(f"| {row['method']} | {m['batch_size']} | — | — | — | — | error: {_cell(m.get('error', '?'))} |")
    lines += ["", f"## Against the target (≥ {TARGET_RATIO}× non-private for both)", ""]
    if any(row["method"] == BASELINE and row.get("capped") for row in rows):
        lines.append("- non-private fitted --max-batch itself: its real largest batch is unknown; raise --max-batch")
    for row in rows:
        if row["method"] == BASELINE or not row.get("ok"):
            continue
        speeds = [m for m in row.get("measurements", []) if m.get("throughput_ratio") is not None]
        if row.get("largest_ratio") is None or not speeds:
            lines.append(f"- {row['method']}: n/a (no non-private baseline or no measurement)")
            continue
        best = max(speeds, key=lambda m: m["throughput_ratio"])
        met = row["largest_ratio"] >= TARGET_RATIO and best["throughput_ratio"] >= TARGET_RATIO
        lines.append(f"- {row['method']}: largest batch {row['largest_ratio']:.2f}×, throughput "
                     f"{best['throughput_ratio']:.2f}× (at batch {best['batch_size']}): {'met' if met else 'not met'}")
    lines += ["", LEGEND]
    return "\n".join(lines) + "\n"


LEGEND = """\
- **largest batch**: the largest batch size whose probe (a few whole training steps: forward,
  backward, per-sample clipping, noise, optimizer step) ran without an out-of-memory error, each
  probe in a fresh process; "(= --max-batch)" means the search stopped at its upper end.
- **× non-private** (largest batch): largest batch / non-private's largest batch.
- **throughput**: each method is timed at min(non-private's largest, its own largest) and, when
  that differs, at its own largest; tokens/s = batch × T / median step time.
- **× non-private** (throughput): tokens/s / non-private's tokens/s at non-private's largest batch.
- **peak memory**: CUDA `torch.cuda.max_memory_allocated()` over the timed run (parameters,
  optimizer state and batch included); CPU: growth of the peak resident set size.
"""


def write(out_dir: Path, header: dict, rows: List[dict], nonprivate_largest: Optional[int]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    add_ratios(rows, nonprivate_largest)
    (out_dir / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(header, rows))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:  # the child side
        if args.method is None or args.batch is None or args.batch < 1 or args.seq_len is None or args.device is None:
            parser.error("--worker needs --method, --batch ≥ 1, --seq-len and --device (the parent passes them)")
        result = fake_out_of_memory(args) or worker(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    _resolve_defaults(args, parser)
    from bench.__main__ import _version
    from bench.methods import OPACUS_METHODS

    header = _header(args, argv)
    slug = re.sub(r"[^a-z0-9]+", "-", (header["device"].split(": ", 1)[1] if args.device != "cpu" else "cpu").lower())
    out_dir = args.out or default_out_dir(f"{slug.strip('-')}-largest-batch")
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench_largest_batch: {', '.join(args.methods)} on {header['device']} → {out_dir}", flush=True)

    started = time.perf_counter()
    rows: List[dict] = []
    nonprivate_largest = args.nonprivate_largest
    for method in args.methods:
        if method in OPACUS_METHODS and _version("opacus") == "not installed":
            row = {"method": method, "ok": False, "probes": [], "error": "opacus not installed"}
        elif method == BASELINE and nonprivate_largest:
            row = {"method": method, "ok": True, "probes": [], "largest_batch": nonprivate_largest,
                   "capped": False, "note": "largest batch given by --nonprivate-largest"}
        else:
            row = search_method(method, nonprivate_largest or args.start_batch, args, log_dir)
            if method == BASELINE and row["ok"]:
                nonprivate_largest = row["largest_batch"]
        if row["ok"]:
            measure_method(row, measurement_batches(row["largest_batch"], nonprivate_largest), args, log_dir)
        rows.append(row)
        write(out_dir, header, rows, nonprivate_largest)  # after every method: an interrupted run keeps its rows
    print(f"bench_largest_batch: done in {time.perf_counter() - started:.0f} s; wrote {out_dir / 'results.md'} "
          "and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
