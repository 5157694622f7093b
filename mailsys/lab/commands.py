"""The ``mailsys lab`` command line: ``up``, ``status``, ``down``, ``fault``, ``clock`` and
``scenario``, each with ``--dir``.

cli.py hands its subparsers here (``add_lab_commands``); the work is mailsys.lab.control's and
mailsys.lab.scenarios'. A failure is one line on stderr and exit status 1; ``status`` exits 0
up, 1 partly up, 3 down; ``scenario run`` exits 0 only when the expected outcome happened.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailsys.lab import scenarios
from mailsys.lab.control import Lab
from mailsys.lab.faults import FAULTS
from mailsys.lab.plan import DEFAULT_DIRECTORY, DEFAULT_DOMAINS, DEFAULT_NETWORK, LabError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d``: seconds."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30m, 2h or 1d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def add_lab_commands(commands: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add ``lab up|status|down`` to the ``mailsys`` subcommands."""
    lab = commands.add_parser("lab", help="a teaching lab: several mail domains on this machine")
    actions = lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True,
                                 parser_class=parser_class)
    directory = parser_class(add_help=False)
    directory.add_argument("--dir", type=Path, default=DEFAULT_DIRECTORY, metavar="DIR",
                           help=f"where the lab keeps its state (default: {DEFAULT_DIRECTORY})")
    up = actions.add_parser("up", parents=[directory],
                            help="start the lab DNS and one mail system per domain")
    up.add_argument("--domains", type=int, default=DEFAULT_DOMAINS, metavar="N",
                    help=f"how many domains: alpha.test, beta.test ... (default: "
                         f"{DEFAULT_DOMAINS})")
    up.add_argument("--net", default=DEFAULT_NETWORK, metavar="CIDR",
                    help=f"the loopback network of the lab's addresses (default: "
                         f"{DEFAULT_NETWORK})")
    up.add_argument("--time-scale", type=float, default=1.0, metavar="N",
                    help="run the queues' clock N times as fast (retries, delay notices and "
                         "expiry come sooner); `lab clock` changes it later")
    up.set_defaults(run=_up)
    status = actions.add_parser("status", parents=[directory],
                                help="say what runs; exit 0 up, 1 partly up, 3 down")
    status.set_defaults(run=_status)
    down = actions.add_parser("down", parents=[directory],
                              help="stop every process of the lab (mail and users are kept)")
    down.set_defaults(run=_down)

    fault = actions.add_parser("fault", parents=[directory],
                               help="inject a fault into one lab domain, or clear it")
    fault.add_argument("domain", metavar="DOMAIN")
    fault.add_argument("fault", choices=FAULTS, metavar="FAULT",
                       help=f"one of: {', '.join(FAULTS)}")
    fault.set_defaults(run=_fault)

    clock = actions.add_parser("clock",
                               help="hurry the queue clock of every lab server")
    clock_actions = clock.add_subparsers(dest="clock_command", metavar="ACTION", required=True,
                                         parser_class=parser_class)
    advance = clock_actions.add_parser("advance", parents=[directory],
                                       help="move the queue clock forward: 30m, 2h, 1d")
    advance.add_argument("amount", type=parse_duration, metavar="DURATION")
    advance.set_defaults(run=_clock)
    rate = clock_actions.add_parser("rate", parents=[directory],
                                    help="run the queue clock N times as fast from now on")
    rate.add_argument("amount", type=float, metavar="N")
    rate.set_defaults(run=_clock)
    for name, text in (("show", "say how far ahead the queue clock is"),
                       ("reset", "back to real time")):
        clock_actions.add_parser(name, parents=[directory], help=text).set_defaults(
            run=_clock, amount=None)

    scenario = actions.add_parser("scenario",
                                  help="lessons that send mail and show its journey")
    scenario_actions = scenario.add_subparsers(dest="scenario_command", metavar="ACTION",
                                               required=True, parser_class=parser_class)
    scenario_actions.add_parser("list", parents=[directory],
                                help="the scenarios, one a line").set_defaults(run=_list)
    run = scenario_actions.add_parser("run", parents=[directory],
                                      help="run one scenario (or all); exit 0 when it "
                                           "went as expected")
    run.add_argument("name", metavar="NAME", help="a scenario's name, or all")
    run.set_defaults(run=_scenario)


def _lab_command(step: Callable[[], int]) -> int:
    """Run one lab action; a LabError is the one-line failure every mailsys command prints
    (mailsys.cli's convention) and exit status 1."""
    try:
        return step()
    except LabError as exc:
        print(f"mailsys: {exc}", file=sys.stderr)
        return 1


def _said(answer: Callable[[], str]) -> Callable[[], int]:
    """An action whose answer is one line to print, then status 0."""

    def step() -> int:
        print(answer(), flush=True)
        return 0

    return step


def _run(action: str, args: argparse.Namespace) -> int:
    lab = Lab(args.dir)

    def step() -> int:
        if action == "up":
            lab.up(args.domains, args.net, args.time_scale)
            return 0
        if action == "status":
            return lab.status()
        return lab.down()

    return _lab_command(step)


def _fault(args: argparse.Namespace) -> int:
    return _lab_command(_said(lambda: Lab(args.dir).fault(args.domain, args.fault)))


def _clock(args: argparse.Namespace) -> int:
    return _lab_command(_said(lambda: Lab(args.dir).clock(args.clock_command, args.amount)))


def _list(args: argparse.Namespace) -> int:
    width = max(len(s.name) for s in scenarios.SCENARIOS)
    for scenario in scenarios.SCENARIOS:
        print(f"{scenario.name:<{width}}  {scenario.summary}")
    return 0


def _scenario(args: argparse.Namespace) -> int:
    lab = Lab(args.dir)
    names = ([s.name for s in scenarios.SCENARIOS] if args.name == "all" else [args.name])
    failed = []
    try:
        for number, name in enumerate(names):
            if number:
                print("\n" + "=" * 72 + "\n", flush=True)
            if not scenarios.run_scenario(lab, name, sys.stdout):
                failed.append(name)
    except LabError as exc:
        print(f"mailsys: {exc}", file=sys.stderr)
        return 1
    if len(names) > 1:
        print(f"\n{len(names) - len(failed)} of {len(names)} scenarios went as expected"
              + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _up(args: argparse.Namespace) -> int:
    return _run("up", args)


def _status(args: argparse.Namespace) -> int:
    return _run("status", args)


def _down(args: argparse.Namespace) -> int:
    return _run("down", args)
