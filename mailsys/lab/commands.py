"""The ``mailsys lab`` command line: ``up``, ``status`` and ``down``, each with ``--dir``.

cli.py hands its subparsers here (``add_lab_commands``); the work is mailsys.lab.control's. A
failure is one line on stderr and exit status 1; ``status`` exits 0 up, 1 partly up, 3 down.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mailsys.lab.control import Lab
from mailsys.lab.plan import DEFAULT_DIRECTORY, DEFAULT_DOMAINS, DEFAULT_NETWORK, LabError


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
    up.set_defaults(run=_up)
    status = actions.add_parser("status", parents=[directory],
                                help="say what runs; exit 0 up, 1 partly up, 3 down")
    status.set_defaults(run=_status)
    down = actions.add_parser("down", parents=[directory],
                              help="stop every process of the lab (mail and users are kept)")
    down.set_defaults(run=_down)


def _run(action: str, args: argparse.Namespace) -> int:
    lab = Lab(args.dir)
    try:
        if action == "up":
            lab.up(args.domains, args.net)
            return 0
        if action == "status":
            return lab.status()
        return lab.down()
    except LabError as exc:
        # The one-line failure every mailsys command prints (mailsys.cli's convention).
        print(f"mailsys: {exc}", file=sys.stderr)
        return 1


def _up(args: argparse.Namespace) -> int:
    return _run("up", args)


def _status(args: argparse.Namespace) -> int:
    return _run("status", args)


def _down(args: argparse.Namespace) -> int:
    return _run("down", args)
