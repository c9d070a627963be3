"""Picture of one audit: the canary scores of included vs excluded canaries, ε_lower vs ε_upper.

matplotlib is optional (``pip install matplotlib``); only this module needs it, and it draws on
a bare ``Figure`` so no pyplot backend is switched for the caller.
"""

from __future__ import annotations

import math

import numpy as np


def plot_audit(result, path: str) -> str:
    """Write a histogram of ``result``'s canary scores (in vs out) titled with its ε's to ``path``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("fastdp audit --plot needs matplotlib: pip install matplotlib") from None
    scores, included = np.asarray(result.scores), np.asarray(result.included, dtype=bool)
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    bins = np.histogram_bin_edges(scores, bins=50)
    axes.hist(scores[included], bins=bins, alpha=0.6, label=f"included ({included.sum()})")
    axes.hist(scores[~included], bins=bins, alpha=0.6, label=f"excluded ({(~included).sum()})")
    axes.set_xlabel("canary score" + (" (clipped contributions)" if result.kind == "gradient" else " (loss drop)"))
    axes.set_ylabel("canaries")
    upper = ", ".join(f"{k} {v:.2f}" if math.isfinite(v) else f"{k} inf" for k, v in result.epsilon_upper.items())
    axes.set_title(
        f"σ={result.noise_multiplier:g} q={result.sample_rate:g} steps={result.steps}"
        f"{' fault=' + result.fault if result.fault else ''}\n"
        f"ε_lower {result.epsilon_lower:.2f} ({result.confidence:g}) vs ε_upper {upper}  (δ={result.delta:g})",
        fontsize=9,
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path
