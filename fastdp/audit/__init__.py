"""Empirical privacy auditing: an ε lower bound from one training run (Steinke, Nasr, Jagielski 2023).

    from fastdp.audit import run_audit, tiny_task
    model, data = tiny_task("mlp")
    result = run_audit(model, data, noise_multiplier=2.0, sample_rate=0.1, steps=200)
    print(result.summary())          # ε_lower (95%) beside the accountants' ε_upper

Files: ``bound.py`` (the paper's bound), ``canaries.py`` (gradient / input canaries),
``scoring.py``, ``runner.py`` (one audited DP-SGD run), ``faults.py`` (broken steps that the
audit must catch), ``plot.py`` (optional matplotlib), ``cli.py`` (``fastdp audit``).
Names load on first use, so ``fastdp audit --help`` imports no torch.
"""

import importlib

_EXPORTS = {
    "run_audit": "runner", "AuditResult": "runner", "epsilon_upper": "runner",
    "p_value": "bound", "epsilon_lower_bound": "bound", "audit_from_scores": "bound",
    "plot_audit": "plot", "tiny_task": "tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
