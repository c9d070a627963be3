"""Turn the per-(model, method) result rows into results.json, results.md and results.png.

A row is the dict ``bench.step`` prints, plus ``time_ratio`` / ``mem_ratio`` (to the
non-private row of the same model in the same run) added by ``add_ratios``.
"""

from __future__ import annotations

import datetime
import json
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

BASELINE = "nonprivate"

LEGEND = """\
Columns:
- **median ms**: median wall-clock time of one training step (forward, backward, per-sample
  clipping, noise, optimizer step) on a fixed batch, over the timed steps after the warm-up
  steps; on CUDA each step is bracketed by `torch.cuda.synchronize()`. *extrapolated*:
  microbatching ran only some samples of the batch and scaled its per-sample part to the
  whole batch (see the note).
- **samples/s**: batch size / median step time.
- **× non-private**: median step time / the `nonprivate` median of the same model in this run
  (1.00 = as fast as non-private training; larger is slower).
- **peak memory**: {memory}
- **mem × non-private**: peak memory / the `nonprivate` peak memory of the same model.
- DP methods: σ = 1.0, C = 1.0, flat clipping, mean loss, fixed batch (no Poisson sampling:
  the step is timed, not the data loader). Each (model, method) ran in its own process.
"""

MEMORY_LEGEND = {
    "cuda_max_allocated": (
        "`torch.cuda.max_memory_allocated()` over the warm-up and timed steps, counter reset "
        "after model and optimizer creation: the step's peak *including* persistent state "
        "(parameters, optimizer state, the batch), not a difference."
    ),
    "cpu_peak_rss_delta": (
        "CPU: growth of the process's peak resident set size over the RSS after model and "
        "optimizer creation (Linux `VmHWM`, reset through `/proc/self/clear_refs`); coarse, "
        "includes allocator caching. n/a where it cannot be measured."
    ),
}


def default_out_dir(name: str) -> Path:
    """Where a run writes without ``--out``: ``<temp dir>/fastdp-bench/<date>-<name>``, outside the
    source tree (a checkout stays clean; commit what you keep under bench/results/ yourself)."""
    return Path(tempfile.gettempdir()) / "fastdp-bench" / f"{datetime.date.today().isoformat()}-{name}"


def add_ratios(rows: List[dict]) -> None:
    """Set ``time_ratio`` and ``mem_ratio`` of every successful row against its model's baseline."""
    baselines = {row["model"]: row for row in rows if row["method"] == BASELINE and row.get("ok")}
    for row in rows:
        base = baselines.get(row["model"])
        ok = row.get("ok") and base is not None
        row["time_ratio"] = row["median_ms"] / base["median_ms"] if ok and base["median_ms"] > 0 else None
        peak, base_peak = row.get("peak_mem_bytes"), (base or {}).get("peak_mem_bytes")
        row["mem_ratio"] = peak / base_peak if ok and peak is not None and base_peak else None


def _bytes(value: Optional[int]) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row_line(row: dict) -> str:
    if not row.get("ok"):
        note = "; ".join(part for part in ("error: " + row.get("error", "unknown error"), row.get("note", "")) if part)
        return f"| {row['method']} | — | — | — | — | — | {_cell(note)} |"
    time = _ms(row["median_ms"]) + (" (extrapolated)" if row.get("extrapolated") else "")
    return (
        f"| {row['method']} | {time} | {row['samples_per_s']:,.0f} | {_ratio(row.get('time_ratio'))} "
        f"| {_bytes(row.get('peak_mem_bytes'))} | {_ratio(row.get('mem_ratio'))} | {_cell(row.get('note', ''))} |"
    )


def by_model(rows: List[dict]) -> Dict[str, List[dict]]:
    grouped: Dict[str, List[dict]] = {}
    for row in rows:
        grouped.setdefault(row["model"], []).append(row)
    return grouped


def markdown(header: dict, rows: List[dict]) -> str:
    lines = ["# fastdp training-step benchmark", ""]
    lines += [f"- **{key}**: {_cell(str(value))}" for key, value in header.items()]
    for model, model_rows in by_model(rows).items():
        description = next((r["description"] for r in model_rows if r.get("description")), "")
        lines += ["", f"## {model}" + (f" — {description}" if description else ""), ""]
        lines += [
            "| method | median ms | samples/s | × non-private | peak memory | mem × non-private | note |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [_row_line(row) for row in model_rows]
    kinds = sorted({row["mem_kind"] for row in rows if row.get("mem_kind")})
    memory = " ".join(MEMORY_LEGEND[kind] for kind in kinds) or "n/a (no successful row)"
    lines += ["", LEGEND.format(memory=memory)]
    return "\n".join(lines)


def write(out_dir: Path, header: dict, rows: List[dict]) -> None:
    """results.json (header + rows) and results.md; called after every row, so partial runs keep their rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    add_ratios(rows)
    (out_dir / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(header, rows))


def _short_reason(row: dict, width: int = 60) -> str:
    """Why a row has no ratio, on one plot line: its error's first line (cut to ``width``)."""
    if row.get("ok"):
        return "no ratio: the non-private baseline failed"
    reason = "failed: " + ((row.get("error") or "unknown error").strip().splitlines() or ["unknown error"])[0]
    return reason if len(reason) <= width else reason[: width - 1] + "…"


def plot_title(header: dict) -> str:
    """What produced the numbers: device, preset, threads, dtype, date (the plot alone must say it)."""
    parts = [header.get("device", ""), header.get("preset", ""), f"threads: {header.get('cpu threads per process', '?')}",
             header.get("dtype", ""), header.get("date", "")]
    return "  ·  ".join(str(part) for part in parts if part)


def plot(out_dir: Path, header: dict, rows: List[dict]) -> str:
    """results.png: per model, each method's step time relative to non-private (log scale).

    A row without a ratio (failed, or its model's baseline failed) gets no bar but its reason in
    red, so a missing method is visibly missing, not silently left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return "--plot: matplotlib is not installed (pip install matplotlib); no results.png written"
    models = by_model(rows)
    if not models:
        return "--plot: no rows; no results.png written"
    columns = min(3, len(models))
    rows_of_plots = -(-len(models) // columns)
    height = 0.35 * max(map(len, models.values())) + 1.2
    figure, axes = plt.subplots(rows_of_plots, columns, figsize=(5.5 * columns, height * rows_of_plots), squeeze=False)
    for axis in axes.flat[len(models):]:
        axis.set_visible(False)
    for axis, (model, model_rows) in zip(axes.flat, models.items()):
        names = [r["method"] + (" *" if r.get("extrapolated") else "") for r in model_rows]
        ratios = [r.get("time_ratio") for r in model_rows]
        measured = [ratio for ratio in ratios if ratio is not None] or [1.0]
        low, high = min(0.5, min(measured) / 1.5), max(2.0, max(measured) * 3)
        drawn = [y for y, ratio in enumerate(ratios) if ratio is not None]
        axis.barh(drawn, [ratios[y] for y in drawn],
                  color=["tab:gray" if model_rows[y]["method"] == BASELINE else "tab:blue" for y in drawn])
        axis.set_yticks(range(len(names)), names)
        axis.set_ylim(len(names) - 0.5, -0.5)  # first row on top
        axis.set_xscale("log")
        axis.set_xlim(low, high)
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}×"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_title(model)
        axis.set_xlabel("step time / non-private (log scale)")
        for y, (row, ratio) in enumerate(zip(model_rows, ratios)):
            if ratio is None:
                axis.annotate(_short_reason(row), (low, y), xytext=(3, 0), textcoords="offset points",
                              va="center", fontsize=7, color="tab:red")
            else:
                axis.annotate(f"{ratio:.2f}×", (ratio, y), xytext=(3, 0), textcoords="offset points", va="center",
                              fontsize=8)
    figure.suptitle(plot_title(header), fontsize=9)
    notes = ["* extrapolated from a subset of the batch"] if any(r.get("extrapolated") for r in rows) else []
    if any(r.get("time_ratio") is None for r in rows):
        notes.append("red: no measurement (the reason is in results.md and logs/)")
    if notes:
        figure.text(0.01, 0.005, ";  ".join(notes), fontsize=8, va="bottom")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    path = out_dir / "results.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"wrote {path}"
