"""Peak memory of a training step, each (model, method) in its own process, as ratios to non-private.

    python -m bench.bench_memory                                   # issue 15's models × methods, on CPU
    python -m bench.bench_memory --baseline-root /tmp/base         # also each DP method with another checkout's
                                                                   # fastdp: before and after in one run
    python -m bench.bench_memory --quick                           # scaled-down models (a smoke run)
    python -m bench.bench_memory --budget 512                      # also the largest batch within 512 MiB

A child process builds the model and one fixed batch (``bench.models``), lets the method wrap the
model and make its optimizer (``bench.methods``: the same σ = 1, C = 1, mean loss and SGD as
``python -m bench``), then runs ``--steps`` whole training steps (forward, backward, clipping, noise,
optimizer step, zero_grad). Measured from just before the first step, so everything a step keeps
(gradients, a gradient buffer, optimizer state) counts, as non-private training's gradients do:

- **allocated** (CPU): the peak of live tensor bytes in torch's CPU allocator over the steps, above
  what was live before them (``torch.profiler`` memory events: exact and deterministic);
  CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated before the steps.
- **resident** (CPU): the growth of the peak resident set size (``bench.step.PeakMemory``: coarse,
  it also sees allocator caching and libraries' scratch). Children run with a fixed glibc mmap
  threshold (``MALLOC_MMAP_THRESHOLD_``), so a freed large tensor leaves the resident set at once.

Writes results.json and results.md (date, machine, command, versions; one table per model with the
ratios and issue 15's goals) to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "MEMORY_RESULT "
BASELINE = "nonprivate"
DEFAULT_METHODS = ["nonprivate", "nonprivate-kept-grads", "fastdp-bk", "fastdp-bk-per_layer", "opacus-hooks", "opacus-ghost"]
#: the second baseline: non-private training whose gradients stay allocated between steps, as fastdp's buffer does
KEPT_GRADS = "nonprivate-kept-grads"
#: the glibc setting of every child: allocations above it are mapped and unmapped on free
MMAP_THRESHOLD = 1 << 16

#: issue 15's goals, method -> (models whose bound it is, bound on allocated peak / non-private's)
TRANSFORMERS = ("gpt2-d768-t256", "gpt2-d512-t1024")


def goal(model: str, method: str) -> Optional[float]:
    """Issue 15's bound on the peak ratio: per_layer ≤ 1.05 everywhere; flat ≤ 1.3 on transformer-shaped
    models, ≤ 1.5 on the others."""
    if method == "fastdp-bk-per_layer":
        return 1.05
    if method == "fastdp-bk":
        return 1.3 if model.split("@")[0] in TRANSFORMERS else 1.5
    return None


# -- the models (bench.models' building blocks at issue 15's sizes) ---------------------------------
def _specs(quick: bool) -> Dict[str, Callable]:
    import torch.nn as nn

    from bench.models import GPT2LM, EmbeddingBagClassifier, ModelSpec, RecurrentClassifier, ResNet18GN, _images, _tokens, mlp

    def mlp_spec():
        widths, batch = ((64, 32, 32, 10), 32) if quick else ((3072, 1024, 1024, 10), 256)
        return ModelSpec("mlp", f"MLP {'-'.join(map(str, widths))}, B={batch}", mlp(widths), batch,
                         _images((widths[0],), 10))

    def resnet_spec():
        width, size, batch = (8, 16, 8) if quick else (64, 32, 32)
        return ModelSpec("resnet18", f"ResNet18-GroupNorm width {width}, {size}×{size}, B={batch}", ResNet18GN(width),
                         batch, _images((3, size, size), 10))

    def gpt2_spec(name, dim, length, batch, heads):
        vocab, layers = (1000, 2) if quick else (50257, 2)
        if quick:
            dim, length, heads = dim // 8, length // 8, 4
        return lambda: ModelSpec(
            name, f"GPT-2-shaped LM, {layers} layers, d={dim}, {heads} heads, vocab {vocab}, tied head, T={length}, B={batch}",
            GPT2LM(vocab, length, dim, layers, heads), batch, _tokens(vocab, length),
        )

    def lstm_spec():
        vocab, emb, hidden, length, batch = (1000, 16, 32, 16, 8) if quick else (10000, 128, 256, 128, 64)
        return ModelSpec("lstm", f"LSTM classifier emb {emb}, hidden {hidden}, T={length}, B={batch}",
                         RecurrentClassifier(nn.LSTM, vocab, emb, hidden), batch, _tokens(vocab, length, classes=10))

    def embbag_spec():
        vocab, length, batch = (1000, 16, 32) if quick else (50000, 50, 256)
        return ModelSpec("embbag", f"EmbeddingBag(mean) classifier vocab {vocab}, {length} tokens/bag, B={batch}",
                         EmbeddingBagClassifier(vocab), batch, _tokens(vocab, length, classes=4))

    return {
        "mlp": mlp_spec,
        "resnet18": resnet_spec,
        "gpt2-d768-t256": gpt2_spec("gpt2-d768-t256", 768, 256, 8, 12),
        "gpt2-d512-t1024": gpt2_spec("gpt2-d512-t1024", 512, 1024, 2, 8),
        "lstm": lstm_spec,
        "embbag": embbag_spec,
    }


MODELS = ["mlp", "resnet18", "gpt2-d768-t256", "gpt2-d512-t1024", "lstm", "embbag"]


# -- one measurement (the child process) ---------------------------------------------------------
class AllocationPeak:
    """Peak live tensor bytes over a block, above those live when it starts. CPU: torch.profiler's memory
    events of the CPU allocator; CUDA: the caching allocator's counters."""

    def __init__(self, device):
        self.device = device
        self.peak_bytes: Optional[int] = None
        self.held_bytes: Optional[int] = None  # still live at the end (what the steps keep)
        self._profile = None

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            self.held_bytes = torch.cuda.memory_allocated(self.device) - self._start
            return False
        self._profile.__exit__(*exc)
        events = [e for e in self._profile.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
        live = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            live += event.nbytes()
            peak = max(peak, live)
        self.peak_bytes, self.held_bytes = peak, live
        return False


def use_fastdp_from(root: Optional[str]) -> None:
    """Import ``fastdp`` from the checkout ``root`` (its submodules follow), ``bench`` still from this one."""
    if not root:
        return
    sys.path.insert(0, str(root))
    try:
        import fastdp  # noqa: F401
    finally:
        sys.path.remove(str(root))
    found = Path(sys.modules["fastdp"].__file__).resolve()
    if not found.is_relative_to(Path(root).resolve()):
        raise RuntimeError(f"fastdp was imported from {found}, not from --fastdp-root {root}")


def worker(args) -> dict:
    """One process: build, prepare, measure ``--steps`` steps; never raises."""
    import torch

    from bench.methods import METHODS, RunSettings
    from bench.step import PeakMemory, _error_text, configure_device

    result = {"model": args.model, "method": args.method, "version": args.version, "ok": False}
    try:
        use_fastdp_from(args.fastdp_root)
        device = configure_device(args)
        spec = _specs(args.quick)[args.model]()
        result.update(description=spec.description, batch_size=args.batch or spec.batch_size)
        spec.model.to(device)
        batch_size = args.batch or spec.batch_size
        x, y = spec.make_batch(batch_size, device, torch.Generator().manual_seed(1))
        settings = RunSettings(device=device)
        prepared = METHODS[args.method](spec, x, y, settings)
        gc.collect()
        started = time.process_time()
        if args.measure == "resident":  # without the profiler, whose event buffers would be resident too
            resident = PeakMemory(device)
            resident.reset()
            for _ in range(args.steps):
                prepared.step()
            result.update(resident_peak_bytes=resident.peak_bytes())
        else:
            with AllocationPeak(device) as allocated:
                for _ in range(args.steps):
                    prepared.step()
            result.update(allocated_peak_bytes=allocated.peak_bytes, allocated_held_bytes=allocated.held_bytes)
        result.update(
            ok=True, cpu_s=time.process_time() - started, note=prepared.note,
            parameter_bytes=sum(p.numel() * p.element_size() for p in spec.model.parameters()),
        )
    except Exception as error:  # every failure is a row
        result["error"] = _error_text(error)
        import traceback

        traceback.print_exc()
    return result


# -- the run (the parent process) ----------------------------------------------------------------
def run_child(model: str, method: str, version: str, root: Optional[str], args, log_dir: Path) -> dict:
    """Both measures of one (model, method, version), each in a fresh process (one row)."""
    row = run_measure("allocated", model, method, version, root, args, log_dir)
    if row.get("ok") and args.device == "cpu":
        resident = run_measure("resident", model, method, version, root, args, log_dir)
        row["resident_peak_bytes"] = resident.get("resident_peak_bytes")
        if not resident.get("ok"):
            row["note"] = "; ".join(filter(None, [row.get("note"), "resident: " + resident.get("error", "?")]))
    return row


def largest_batch(model: str, method: str, version: str, root: Optional[str], row: dict, args, log_dir: Path) -> None:
    """With ``--budget``: the largest batch whose allocated peak fits the budget, searched with measurements
    (each in its own process): a line through the peaks at the row's batch and at half of it proposes a
    batch, then bisection between the largest batch measured to fit and the smallest measured not to, until
    they are within 1/32 of each other or ``--budget-probes`` ran. Sets ``largest_batch`` (measured to fit)
    and ``first_batch_over`` (measured not to; None when no probe went over)."""
    budget = args.budget * 2**20
    peaks = {row["batch_size"]: row["allocated_peak_bytes"]}

    def peak(batch: int) -> Optional[int]:
        if batch not in peaks:
            probe = run_measure("allocated", model, method, version, root, args, log_dir, batch=batch)
            peaks[batch] = probe["allocated_peak_bytes"] if probe.get("ok") else None
        return peaks[batch]

    batch = row["batch_size"]
    half = max(1, batch // 2)
    if half != batch and peak(half) is not None and peaks[batch] > peaks[half]:
        per_sample = (peaks[batch] - peaks[half]) / (batch - half)
        guess = max(1, int((budget - (peaks[batch] - per_sample * batch)) // per_sample))
    else:
        guess = batch * 2
    fits = [b for b, v in peaks.items() if v is not None and v <= budget]
    over = [b for b, v in peaks.items() if v is None or v > budget]
    lo, hi = max(fits, default=0), min(over, default=None)
    for _ in range(args.budget_probes):
        if hi is not None and hi - lo <= max(1, lo // 32):
            break
        if hi is None:
            candidate = max(guess, 2 * lo) if guess > lo else 2 * lo
        else:
            candidate = guess if lo < guess < hi else (lo + hi) // 2
        candidate = max(candidate, 1)
        value = peak(candidate)
        if value is not None and value <= budget:
            lo = candidate
        else:
            hi = candidate
        guess = (lo + hi) // 2 if hi is not None else 2 * lo
    if lo:
        row.update(largest_batch=lo, largest_batch_peak_bytes=peaks[lo], first_batch_over=hi)


def run_measure(measure: str, model: str, method: str, version: str, root: Optional[str], args, log_dir: Path,
                batch: Optional[int] = None) -> dict:
    from bench.methods import BACKEND_OF_METHOD
    from bench.step import run_for_result

    command = [sys.executable, "-m", "bench.bench_memory", "--worker", "--model", model, "--method", method,
               "--version", version, "--steps", str(args.steps), "--device", args.device, "--measure", measure]
    command += ["--quick"] if args.quick else []
    command += ["--batch", str(batch)] if batch else []
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--fastdp-root", root] if root else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    env.pop("FASTDP_BACKEND", None)
    if method in BACKEND_OF_METHOD:
        env["FASTDP_BACKEND"] = BACKEND_OF_METHOD[method]
    failed = {"model": model, "method": method, "version": version, "ok": False}
    log = log_dir / f"{model}-{method}-{version}-{measure}{f'-b{batch}' if batch else ''}.log"
    return run_for_result(command, env=env, cwd=REPO_ROOT, log=log, timeout=args.timeout, failed=failed,
                          prefix=RESULT_PREFIX)


def add_ratios(rows: List[dict]) -> None:
    """Each row's peaks over its model's non-private peaks (the non-private row is shared by both versions)."""
    base = {r["model"]: r for r in rows if r["method"] == BASELINE and r.get("ok")}
    kept = {r["model"]: r for r in rows if r["method"] == KEPT_GRADS and r.get("ok")}
    for row in rows:
        reference = base.get(row["model"])
        for kind in ("allocated", "resident"):
            value, ref = row.get(f"{kind}_peak_bytes"), (reference or {}).get(f"{kind}_peak_bytes")
            row[f"{kind}_ratio"] = value / ref if row.get("ok") and value is not None and ref else None
        value, ref = row.get("allocated_peak_bytes"), (kept.get(row["model"]) or {}).get("allocated_peak_bytes")
        row["allocated_ratio_kept"] = value / ref if row.get("ok") and value is not None and ref else None


def _bytes(value) -> str:
    from bench.report import _bytes as fmt

    return fmt(value)


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def markdown(header: dict, rows: List[dict]) -> str:
    lines = ["# Peak memory of one training step", ""]
    lines += [f"- **{key}**: {str(value).replace('|', '/')}" for key, value in header.items()]
    for model in dict.fromkeys(r["model"] for r in rows):
        model_rows = [r for r in rows if r["model"] == model]
        description = next((r["description"] for r in model_rows if r.get("description")), "")
        lines += ["", f"## {model} — {description}", "",
                  "| method | version | allocated peak | × non-private | × kept grads | resident peak | × non-private "
                  "| goal | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in model_rows:
            bound = goal(model, row["method"])
            met = ""
            if bound is not None and row.get("allocated_ratio") is not None:
                met = f"≤ {bound}: {'met' if row['allocated_ratio'] <= bound else 'not met'}"
                if row.get("allocated_ratio_kept") is not None:
                    met += f" ({'met' if row['allocated_ratio_kept'] <= bound else 'not met'} vs kept grads)"
            version = row["version"] if row["method"].startswith("fastdp") else "—"
            if not row.get("ok"):
                lines.append(f"| {row['method']} | {version} | — | — | — | — | — | {met} | error: {row.get('error', '?')} |")
                continue
            lines.append(
                f"| {row['method']} | {version} | {_bytes(row['allocated_peak_bytes'])} | {_ratio(row['allocated_ratio'])} "
                f"| {_ratio(row.get('allocated_ratio_kept'))} | {_bytes(row.get('resident_peak_bytes'))} | {_ratio(row.get('resident_ratio'))} | {met} "
                f"| {row.get('note', '')} |"
            )
    budget_rows = [r for r in rows if r.get("largest_batch")]
    if budget_rows:
        lines += ["", f"## Largest batch within {header.get('budget', '?')}", "",
                  "| model | method | version | largest batch measured to fit | its peak | smallest measured over |",
                  "|---|---|---|---|---|---|"]
        for r in budget_rows:
            version = r["version"] if r["method"].startswith("fastdp") else "—"
            lines.append(f"| {r['model']} | {r['method']} | {version} | {r['largest_batch']} "
                         f"| {_bytes(r['largest_batch_peak_bytes'])} | {r.get('first_batch_over') or '—'} |")
    lines += ["", LEGEND]
    return "\n".join(lines) + "\n"


LEGEND = """\
- **allocated peak**: CPU: the peak of live tensor bytes in torch's CPU allocator during the steps, above
  what was live before the first step (torch.profiler memory events; exact). CUDA: max_memory_allocated
  above memory_allocated before the first step. Gradients, gradient buffers and optimizer state made by
  the steps count (non-private training's gradients count too).
- **resident peak**: CPU: growth of the peak resident set size over the steps (VmHWM, reset before the first
  step), children run with MALLOC_MMAP_THRESHOLD_=65536; coarse (allocator caching, library scratch).
- **× non-private**: peak / the non-private peak of the same model (the non-fastdp rows run once and serve both versions);
  non-private frees its gradients every step (`zero_grad(set_to_none=True)`), so its gradients grow layer by
  layer while the activations are freed. **× kept grads**: peak / `nonprivate-kept-grads`, non-private
  training whose gradients stay allocated (`set_to_none=False`, as with DDP bucket views or a flat gradient
  buffer): the like-for-like baseline of fastdp's persistent gradient buffer, which is allocated whole
  when the first backward reaches a layer, beside the activations still held.
- **version**: `before` = fastdp from --baseline-root, `after` = this checkout (same bench code, same models).
- **goal**: issue 15: per_layer ≤ 1.05× non-private on every model; flat (fastdp-bk) ≤ 1.3× on the
  transformer-shaped models, ≤ 1.5× on the others (judged on the allocated peak).
- DP methods: σ = 1, C = 1, mean loss, fixed batch, SGD (no momentum); fastdp-bk-per_layer: one bound C/√n
  per parameter. Opacus rows need Opacus importable.
"""


def write(out_dir: Path, header: dict, rows: List[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    add_ratios(rows)
    (out_dir / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(header, rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {','.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma list of python -m bench's methods")
    parser.add_argument("--baseline-root", default=None,
                        help="another checkout whose fastdp also runs every DP method (rows 'before')")
    parser.add_argument("--steps", type=int, default=2, help="training steps measured (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    parser.add_argument("--quick", action="store_true", help="scaled-down models")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per process")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default <temp>/fastdp-bench/<date>-memory)")
    parser.add_argument("--budget", type=float, default=None,
                        help="MiB: also the largest batch whose allocated peak fits it (searched by measurement)")
    parser.add_argument("--budget-probes", type=int, default=6, help="measurements per search with --budget (default 6)")
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--version", default="after", help=argparse.SUPPRESS)
    parser.add_argument("--fastdp-root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("allocated", "resident"), default="allocated", help=argparse.SUPPRESS)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
        return 0
    from bench.__main__ import _comma_list, environment_header
    from bench.methods import METHODS
    from bench.report import default_out_dir

    try:
        models = _comma_list(args.models, MODELS, "model")
        methods = _comma_list(args.methods, list(METHODS), "method")
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be a positive number of MiB, got {args.budget}")
    if args.steps < 1:
        parser.error(f"--steps must be ≥ 1, got {args.steps}")
    if args.baseline_root and not (Path(args.baseline_root) / "fastdp" / "__init__.py").exists():
        parser.error(f"--baseline-root {args.baseline_root} has no fastdp/ package")
    methods = [BASELINE] + [m for m in methods if m != BASELINE]
    header = environment_header("python -m bench.bench_memory " + shlex.join(argv), args.device)
    header.update({"preset": "quick" if args.quick else "issue 15 sizes", "steps measured": args.steps,
                   "cpu threads per process": args.threads})
    if args.budget:
        header["budget"] = f"{args.budget:g} MiB of allocated peak"
    if args.baseline_root:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.baseline_root, capture_output=True,
                                text=True).stdout.strip()
        header["before"] = f"fastdp of {args.baseline_root} (commit {commit or 'unknown'})"
    out_dir = args.out or default_out_dir("memory")
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench_memory: {', '.join(models)} × {', '.join(methods)} → {out_dir}", flush=True)
    rows: List[dict] = []
    for model in models:
        for method in methods:
            versions = [("after", None)]
            if args.baseline_root and method.startswith("fastdp"):  # the others do not run fastdp
                versions.insert(0, ("before", args.baseline_root))
            for version, root in versions:
                row = run_child(model, method, version, root, args, log_dir)
                if args.budget and row.get("ok"):
                    largest_batch(model, method, version, root, row, args, log_dir)
                rows.append(row)
                write(out_dir, header, rows)
                text = (f"allocated {_bytes(row['allocated_peak_bytes'])} ({_ratio(row.get('allocated_ratio'))}), "
                        f"resident {_bytes(row.get('resident_peak_bytes'))} ({_ratio(row.get('resident_ratio'))})"
                        if row.get("ok") else "error: " + row.get("error", "?"))
                print(f"  {model:16s} {method:20s} {version:6s} {text}", flush=True)
    print(f"bench_memory: wrote {out_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
