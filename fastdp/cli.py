"""The ``fastdp`` command line: privacy arithmetic without writing a script."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from . import accountants
from .accountants.utils import steps_from_epochs

NOTES = {
    "rdp": "upper bound (Renyi DP, Balle et al. 2020 conversion)",
    "prv": "upper bound (PRV, eps_error 0.01)",
    "pld": "upper bound (PLD, pessimistic)",
    "gdp": "approximate (CLT), may under-report",
}
ORDER = ["rdp", "prv", "pld", "gdp"]


def _accountant_names(choice: str) -> List[str]:
    return [name for name in ORDER if name in accountants.available_accountants()] if choice == "all" else [choice]


def _add_schedule(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-rate", type=float, required=True, help="Poisson sample rate q")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--steps", type=int, help="number of optimizer steps")
    group.add_argument("--epochs", type=float, help="epochs (steps = int(epochs / sample_rate))")
    parser.add_argument("--delta", type=float, required=True, help="target delta")


def _epsilon(args) -> None:
    steps = steps_from_epochs(epochs=args.epochs, steps=args.steps, sample_rate=args.sample_rate)
    rows = []
    for name in _accountant_names(args.accountant):
        acc = accountants.create_accountant(name)
        acc.history = [(args.noise_multiplier, args.sample_rate, steps)]
        rows.append(f"{name:<11}{acc.get_epsilon(args.delta):>10.4f}  {NOTES.get(name, '')}")
    print(f"sigma={args.noise_multiplier:g}  q={args.sample_rate:g}  steps={steps}  delta={args.delta:g}")
    print(f"{'accountant':<11}{'epsilon':>10}  note")
    print("\n".join(rows))


def _noise_multiplier(args) -> None:
    rows = []
    for name in _accountant_names(args.accountant):
        sigma = accountants.get_noise_multiplier(
            target_epsilon=args.target_epsilon,
            target_delta=args.delta,
            sample_rate=args.sample_rate,
            epochs=args.epochs,
            steps=args.steps,
            accountant=name,
        )
        rows.append(f"{name:<11}{sigma:>10.4f}")
    print(f"target epsilon={args.target_epsilon:g}  delta={args.delta:g}  q={args.sample_rate:g}")
    print(f"{'accountant':<11}{'sigma':>10}")
    print("\n".join(rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdp", description="fastdp: fast differentially private training")
    commands = parser.add_subparsers(dest="command", required=True)
    choices = ORDER + ["all"]

    eps = commands.add_parser("epsilon", help="epsilon spent by a training run")
    eps.add_argument("--noise-multiplier", type=float, required=True, help="noise multiplier sigma")
    _add_schedule(eps)
    eps.add_argument("--accountant", choices=choices, default="all")
    eps.set_defaults(run=_epsilon)

    sig = commands.add_parser("noise-multiplier", help="smallest sigma that meets a target epsilon")
    sig.add_argument("--target-epsilon", type=float, required=True)
    _add_schedule(sig)
    sig.add_argument("--accountant", choices=choices, default="prv")
    sig.set_defaults(run=_noise_multiplier)

    from .audit.cli import add_parser as add_audit_parser  # `fastdp audit` lives in fastdp/audit/cli.py

    add_audit_parser(commands)

    # handled in main() before parsing: every argument goes to the benchmark's own parser
    commands.add_parser("bench", help="training-step benchmark: forwards to python -m bench (source checkout)", add_help=False)
    return parser


def _bench(args: List[str]) -> int:
    """``fastdp bench ...`` is ``python -m bench ...``; bench/ lives next to the fastdp package in a checkout."""
    checkout = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")])))
    return subprocess.call([sys.executable, "-m", "bench", *args], env=env)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
