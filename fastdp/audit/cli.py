"""``fastdp audit``: train a tiny model with canaries and print ε_lower beside ε_upper.

``add_arguments(parser)`` declares its flags on the ``fastdp audit`` parser (an entry of
``fastdp.cli.COMMANDS``); ``main(args)`` runs it. One row per (σ, fault, seed), so one command gives a whole table. Errors name the flag.
"""

from __future__ import annotations

import argparse
import math

MODELS = ("linear", "mlp")  # fastdp.audit.tasks.MODELS, repeated so building the parser imports no torch
KINDS = ("gradient", "input")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train a tiny model on synthetic data with m canaries (each included with probability 1/2), guess which "
        "went in, and print the epsilon lower bound this proves beside the accountants' epsilon."
    )
    parser.add_argument("--model", choices=MODELS, default="mlp", help="built-in tiny model (default mlp)")
    parser.add_argument("--noise-multiplier", type=float, nargs="+", required=True, help="sigma (several: one row each)")
    parser.add_argument("--sample-rate", type=float, required=True, help="Poisson sample rate q")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound C (default 1)")
    parser.add_argument("--canaries", type=int, default=1000, help="number of canaries m (default 1000)")
    parser.add_argument("--kind", choices=KINDS, default="gradient", help="canary kind (default gradient)")
    parser.add_argument("--samples", type=int, default=1000, help="real training samples (default 1000)")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default 0.5)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta of both bounds (default 1e-5)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of epsilon_lower (default 0.95)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="audit seeds (one row each)")
    parser.add_argument(
        "--fault", nargs="+", default=["none"],
        help="break the DP step on purpose: none, no-clipping, noise-scale=F (several: one row each)",
    )
    parser.add_argument("--plot", metavar="PATH", help="write a score histogram (needs matplotlib); PATH gets -N per row when there are several")


def _cell(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "inf"


def main(args) -> None:
    from .runner import run_audit
    from .tasks import tiny_task

    if args.samples < 1:
        raise ValueError(f"samples must be >= 1, got {args.samples}")
    rows = []  # a ValueError names its Python argument; fastdp.cli rewrites it as the flag
    for sigma in args.noise_multiplier:
        for fault in args.fault:
            for seed in args.seeds:
                model, data = tiny_task(args.model, num_samples=args.samples, seed=seed)
                result = run_audit(
                    model, data, noise_multiplier=sigma, sample_rate=args.sample_rate, steps=args.steps,
                    max_grad_norm=args.max_grad_norm, canaries=args.canaries, kind=args.kind, lr=args.lr,
                    delta=args.delta, confidence=args.confidence, seed=seed, fault=fault,
                )
                rows.append((fault, seed, result))
    names = list(rows[0][2].epsilon_upper)
    print(f"fastdp audit: model={args.model} kind={args.kind} m={args.canaries} q={args.sample_rate:g} "
          f"steps={args.steps} C={args.max_grad_norm:g} delta={args.delta:g} confidence={args.confidence:g}")
    print("| sigma | fault | seed | " + " | ".join(f"eps_upper {n}" for n in names)
          + " | eps_lower | correct/guesses | seconds | verdict |")
    print("|---" * (len(names) + 7) + "|")
    for fault, seed, result in rows:
        verdict = "LEAK (eps_lower > eps_upper)" if result.leak_detected else "consistent"
        print(f"| {result.noise_multiplier:g} | {fault} | {seed} | "
              + " | ".join(_cell(result.epsilon_upper[n]) for n in names)
              + f" | {result.epsilon_lower:.3f} | {result.correct}/{result.guesses} | {result.seconds:.1f} | {verdict} |")
    if args.plot:
        from .plot import plot_audit

        for index, (_, _, result) in enumerate(rows):
            print("plot:", plot_audit(result, args.plot if len(rows) == 1 else _numbered(args.plot, index)))


def _numbered(path: str, index: int) -> str:
    stem, dot, suffix = path.rpartition(".")
    return f"{stem}-{index}.{suffix}" if dot else f"{path}-{index}"
