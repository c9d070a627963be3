"""The one-page summary of a GPU session (bench/gpu_session.sh): stage statuses, kernel checks, step table.

    python -m bench.gpu_summary WORK OUT     # writes OUT/summary.md and prints it

Reads what the session's stages left: WORK/stages.tsv (a line per finished stage: name, status,
seconds, detail), WORK/env.json (the env stage), WORK/steps/results.json (``python -m bench``) and
OUT/kernels.txt (the kernel benchmarks, whose "rel. error" checks are held to
``bench.kernel_timing.ERROR_BOUND``). gpu_session.sh runs it after every stage, so a session cut
short still has a summary; whatever a stage did not produce is said to be missing.

The table is the one to paste into bench/results/ and the README: per model and method the median
step time and peak memory, each as a ratio to non-private and to the fastest Opacus row of the same
model, and issue 16's step-time goal for fastdp's rows.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from bench import report

#: issue 16's goals on GPU: fastdp's step time / non-private's, per bench model
STEP_TIME_GOALS = {"mlp": 1.5, "resnet18": 1.5, "gpt2": 1.15, "lstm": 3.0}

DTYPE_IN_HEADER = re.compile(r"\b(?:torch\.)?(bfloat16|float16|float32)\b")
ERROR_VALUE = re.compile(r"nan|[-+]?inf|\d+(?:\.\d+)?e[-+]\d+", re.IGNORECASE)
NOTE_WIDTH = 140


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_stages(path: Path) -> List[Tuple[str, str, str, str]]:
    """(name, status, seconds, detail) of every finished stage, in order."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [tuple(field.strip() for field in (line.split("\t") + ["", "", "", ""])[:4]) for line in lines if line.strip()]


def kernel_checks(text: str) -> str:
    """One line on the kernel benchmarks' correctness checks: how many, the largest error per dtype, failures."""
    from bench.kernel_timing import ERROR_BOUND  # imports torch: only when there is a kernel report

    dtype, header, checked, largest, failures = None, "", 0, {}, []
    for line in text.splitlines():
        if line.strip() and not line.startswith(" "):  # a section header names the dtype
            header = line.strip()
            found = DTYPE_IN_HEADER.search(line)
            dtype = found.group(1) if found else dtype
            continue
        if "rel. error" not in line or dtype is None:
            continue
        for value in ERROR_VALUE.findall(line.split("rel. error", 1)[1]):
            error = float(value)
            checked += 1
            largest[dtype] = max(largest.get(dtype, 0.0), error) if not math.isnan(error) else math.nan
            if not error <= ERROR_BOUND[dtype]:  # nan fails too
                failures.append(f"{header} / {line.strip().split('  ')[0]}: {value} > {ERROR_BOUND[dtype]:g}")
    if not checked:
        return "no kernel check ran"
    worst = ", ".join(f"{dtype} {error:.1e}" for dtype, error in largest.items())
    if failures:
        shown = "; ".join(failures[:5]) + (f"; and {len(failures) - 5} more" if len(failures) > 5 else "")
        return f"**FAILED**: {len(failures)} of {checked} kernel results off their torch reference beyond the bound: {shown}"
    return f"{checked} kernel results against their torch references, all within bounds (largest relative error: {worst})"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return report._cell(text if len(text) <= NOTE_WIDTH else text[: NOTE_WIDTH - 3] + "...")


def _goal(row: dict, on_gpu: bool) -> str:
    goal = STEP_TIME_GOALS.get(row["model"])
    if goal is None or not row["method"].startswith("fastdp") or row.get("time_ratio") is None:
        return ""
    if not on_gpu:
        return f"≤ {goal:g}× (GPU goal)"
    return f"≤ {goal:g}×: {'met' if row['time_ratio'] <= goal else 'missed'}"


def step_table(rows: List[dict], on_gpu: bool) -> List[str]:
    lines = [
        "| model | method | step ms | × non-private | goal | peak memory | mem × non-private | × Opacus | mem × Opacus | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, model_rows in report.by_model(rows).items():
        opacus = [r for r in model_rows if r["method"].startswith("opacus") and r.get("ok")]
        fastest = min(opacus, key=lambda r: r["median_ms"]) if opacus else None
        for row in model_rows:
            if not row.get("ok"):
                error = "error: " + row.get("error", "unknown error")
                lines.append(f"| {model} | {row['method']} | — | — | | — | — | — | — | {_short(error)} |")
                continue
            vs_opacus = mem_vs_opacus = "—"
            if fastest is not None:
                name = fastest["method"].removeprefix("opacus-")
                vs_opacus = f"{row['median_ms'] / fastest['median_ms']:.2f}× {name}"
                if row.get("peak_mem_bytes") is not None and fastest.get("peak_mem_bytes"):
                    mem_vs_opacus = f"{row['peak_mem_bytes'] / fastest['peak_mem_bytes']:.2f}× {name}"
            time = report._ms(row["median_ms"]) + (" (extrapolated)" if row.get("extrapolated") else "")
            lines.append(
                f"| {model} | {row['method']} | {time} | {report._ratio(row.get('time_ratio'))} | {_goal(row, on_gpu)} "
                f"| {report._bytes(row.get('peak_mem_bytes'))} | {report._ratio(row.get('mem_ratio'))} "
                f"| {vs_opacus} | {mem_vs_opacus} | {_short(row.get('note', ''))} |"
            )
    return lines


def summary(work: Path, out: Path) -> str:
    env = _read_json(work / "env.json") or {}
    stages = read_stages(work / "stages.tsv")
    steps = _read_json(work / "steps" / "results.json")
    lines = ["# fastdp GPU session summary", ""]
    if env:
        facts = [env.get("device", "?"), f"torch {env.get('torch', '?')} (CUDA {env.get('torch cuda')})",
                 f"triton {env.get('triton', '?')}", f"opacus {env.get('opacus', '?')}",
                 f"autotune in steps and kernels: {env.get('FASTDP_AUTOTUNE_CONFIGS', '?')}", f"commit {env.get('git commit', '?')}",
                 env.get("date", "?"), env.get("mode", "")]
        lines.append("- **environment**: " + " · ".join(str(fact) for fact in facts if fact))
    else:
        lines.append("- **environment**: missing (the env stage did not finish)")
    described = [f"{name} {status} ({seconds} s{'; ' + detail if detail else ''})" for name, status, seconds, detail in stages]
    lines.append("- **stages**: " + (" · ".join(described) if described else "none finished"))
    if steps is not None:
        header = steps.get("header", {})
        settings = [header.get("preset", ""), header.get("dtype", ""), f"TF32 {header['tf32']}" if "tf32" in header else "",
                    header.get("steps", "") + " steps per row, each row its own process"]
        lines.append("- **steps**: " + ", ".join(s for s in settings if s) + "; time = median step, memory = peak "
                     "(CUDA: torch.cuda.max_memory_allocated); × Opacus = against the fastest Opacus row of the model")
    kernels = out / "kernels.txt"
    if kernels.is_file():
        lines.append("- **kernel checks**: " + kernel_checks(kernels.read_text(errors="replace")))
    lines.append("")
    if steps is None or not steps.get("rows"):
        lines.append("(no step results: the steps stage did not run or wrote no row)")
    else:
        on_gpu = str(steps.get("header", {}).get("device", "")).startswith("cuda")
        lines += step_table(steps["rows"], on_gpu)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 2:
        print("usage: python -m bench.gpu_summary WORK OUT  (the folders gpu_session.sh uses)", file=sys.stderr)
        return 2
    work, out = Path(argv[0]), Path(argv[1])
    text = summary(work, out)
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
