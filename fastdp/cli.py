"""The ``fastdp`` command line: privacy arithmetic without writing a script.

``fastdp epsilon`` prints the ε a schedule (σ, sample rate, steps or epochs, δ) spends under each
accountant; ``fastdp noise-multiplier`` the smallest σ that meets a target ε; ``fastdp audit``
trains a tiny model with canaries and prints the ε lower bound it proves (``fastdp.audit``);
``fastdp bench`` runs the benchmark of a source checkout. ``fastdp COMMAND --help`` lists a command's flags, and
bad input is a one-line error naming the flag.

For developers: every subcommand is one entry of ``COMMANDS`` (name, help, its arguments, the
function that runs it); to add one, append a ``Command``. Run functions import what they need
themselves, so ``fastdp --help`` and argument errors answer without loading numpy, scipy or
torch. Errors name flags, never Python arguments: a ``Command``'s ``flag_names`` maps the
Python names its errors may mention to flags, where they differ from the flags' dests.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

NOTES = {
    "rdp": "upper bound (Renyi DP, Balle et al. 2020 conversion)",
    "prv": "upper bound (PRV, eps_error 0.01)",
    "pld": "upper bound (PLD, pessimistic)",
    "gdp": "approximate (CLT), may under-report",
}
ORDER = ["rdp", "prv", "pld", "gdp"]
ACCOUNTANT_CHOICES = ORDER + ["all"]


@dataclass(frozen=True)
class Command:
    """One subcommand.

    ``add_arguments(parser)`` declares its flags; ``run(args)`` does the work and returns an exit
    status (None = 0), raising ``ValueError`` for bad input. ``flag_names``: Python argument
    names its errors may use that are not simply a flag's dest (e.g. ``target_delta`` for
    ``--delta``). ``forward``: hand every following argument to ``run`` unparsed (as a list).
    """

    name: str
    help: str
    run: Callable
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    flag_names: Dict[str, str] = field(default_factory=dict)
    forward: bool = False


def _accountant_names(choice: str) -> List[str]:
    return ORDER if choice == "all" else [choice]


def _add_schedule(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-rate", type=float, required=True, help="Poisson sample rate q")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--steps", type=int, help="number of optimizer steps")
    group.add_argument("--epochs", type=float, help="epochs (steps = int(epochs / sample_rate))")
    parser.add_argument("--delta", type=float, required=True, help="target delta")


def _epsilon_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--noise-multiplier", type=float, required=True, help="noise multiplier sigma")
    _add_schedule(parser)
    parser.add_argument("--accountant", choices=ACCOUNTANT_CHOICES, default="all")


def _epsilon(args) -> None:
    from . import accountants
    from .accountants.utils import steps_from_epochs

    steps = steps_from_epochs(epochs=args.epochs, steps=args.steps, sample_rate=args.sample_rate)
    rows = []
    for name in _accountant_names(args.accountant):
        acc = accountants.create_accountant(name)
        acc.history = [(args.noise_multiplier, args.sample_rate, steps)]
        rows.append(f"{name:<11}{acc.get_epsilon(args.delta):>10.4f}  {NOTES.get(name, '')}")
    print(f"sigma={args.noise_multiplier:g}  q={args.sample_rate:g}  steps={steps}  delta={args.delta:g}")
    print(f"{'accountant':<11}{'epsilon':>10}  note")
    print("\n".join(rows))


def _noise_multiplier_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target-epsilon", type=float, required=True)
    _add_schedule(parser)
    parser.add_argument("--accountant", choices=ACCOUNTANT_CHOICES, default="prv")


def _noise_multiplier(args) -> None:
    from . import accountants

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


def _audit_arguments(parser: argparse.ArgumentParser) -> None:
    from .audit.cli import add_arguments

    add_arguments(parser)


def _audit(args) -> Optional[int]:
    from .audit.cli import main

    return main(args)


def _bench(args: List[str]) -> int:
    """``fastdp bench ...`` is ``python -m bench ...``; bench/ lives next to the fastdp package in a checkout."""
    checkout = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")])))
    return subprocess.call([sys.executable, "-m", "bench", *args], env=env)


COMMANDS: List[Command] = [
    Command("epsilon", "epsilon spent by a training run", _epsilon, _epsilon_arguments,
            flag_names={"num_steps": "--steps"}),
    Command("noise-multiplier", "smallest sigma that meets a target epsilon", _noise_multiplier,
            _noise_multiplier_arguments, flag_names={"target_delta": "--delta"}),
    Command("audit", "empirical privacy audit: an epsilon lower bound from one training run (Steinke et al. 2023)",
            _audit, _audit_arguments, flag_names={"dataset": "--samples"}),
    Command("bench", "training-step benchmark: forwards to python -m bench (source checkout)", _bench, forward=True),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdp", description="fastdp: fast differentially private training")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help,
                                    add_help=not command.forward)
        command.add_arguments(sub)
        sub.set_defaults(command_entry=command, command_parser=sub)
    return parser


def in_flag_terms(message: str, parser: argparse.ArgumentParser, flag_names: Dict[str, str]) -> str:
    """``message`` with every Python argument name of the parser's flags replaced by the flag."""
    names = {action.dest: action.option_strings[-1] for action in parser._actions if action.option_strings}
    names.update(flag_names)
    pattern = r"\b(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")\b"
    return re.sub(pattern, lambda match: names[match.group(1)], message)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    forwarded = {command.name: command for command in COMMANDS if command.forward}
    if argv[:1] and argv[0] in forwarded:
        return forwarded[argv[0]].run(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    command, parser = args.command_entry, args.command_parser
    try:
        return command.run(args) or 0
    except ValueError as error:
        parser.error(in_flag_terms(str(error), parser, command.flag_names))  # usage of this subcommand, exit 2


if __name__ == "__main__":
    sys.exit(main())
