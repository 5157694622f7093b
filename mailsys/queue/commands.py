"""The ``mailsys queue`` commands: list, show, flush, hold, release and delete.

This module owns their command line and their output; what they do to the spool, and how a
running server is asked to do it, is mailsys.queue.control's business.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from mailsys.config import load
from mailsys.envelope import Envelope, Recipient
from mailsys.ownership import configured_account
from mailsys.queue.control import (
    QueueToolError,
    list_envelopes,
    load_envelope,
    run_command,
)
from mailsys.queue.spool import MESSAGE_SUFFIX

EXIT_OK = 0
EXIT_FAILED = 1


def add_queue_commands(commands: Any, config_option: argparse.ArgumentParser,
                       parser_class: type[argparse.ArgumentParser]) -> None:
    """Add ``queue ACTION`` to the ``mailsys`` parser's subcommands."""
    queue = commands.add_parser("queue", help="list and manage queued messages")
    actions = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True,
                                   parser_class=parser_class)
    listing = actions.add_parser("list", parents=[config_option],
                                 help="queued messages, their recipients and status")
    listing.set_defaults(run=_list)
    show = actions.add_parser("show", parents=[config_option],
                              help="one message: envelope, attempts and headers")
    show.add_argument("queue_id", metavar="ID")
    show.set_defaults(run=_show)
    flush = actions.add_parser("flush", parents=[config_option],
                               help="try deferred messages now (one, or all)")
    flush.add_argument("queue_id", metavar="ID", nargs="?")
    flush.set_defaults(run=_change, action="flush")
    for name, text in (("hold", "deliver nothing of a message until released"),
                       ("release", "release a held message"),
                       ("delete", "remove a message without delivering or bouncing it")):
        command = actions.add_parser(name, parents=[config_option], help=text)
        command.add_argument("queue_id", metavar="ID")
        command.set_defaults(run=_change, action=name)


def _spool(args: argparse.Namespace) -> Any:
    return load(args.config, check_files=False).storage.spool


def _change(args: argparse.Namespace) -> int:
    config = load(args.config, check_files=False)
    outcome = run_command(config.storage.spool, args.action, args.queue_id,
                          account=configured_account(config))
    if not outcome.ok:
        raise QueueToolError(outcome.message)
    print(outcome.message)
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    envelopes = list_envelopes(_spool(args))
    now = time.time()
    write: Callable[[str], Any] = sys.stdout.write
    for envelope in envelopes:
        flags = " (held)" if envelope.held else ""
        write(f"{envelope.queue_id}  {age(now - envelope.received_at):>6}  "
              f"{envelope.size:>9}  <{envelope.sender}>{flags}\n")
        for recipient in envelope.recipients:
            write(f"    {recipient_line(recipient, now)}\n")
    count = len(envelopes)
    write(f"{count} message{'s' if count != 1 else ''} in the queue\n")
    return EXIT_OK


def recipient_line(recipient: Recipient, now: float) -> str:
    parts = [f"<{recipient.address}>", recipient.status.value,
             f"attempts={len(recipient.attempts)}"]
    if recipient.next_attempt is not None and not recipient.status.is_final:
        wait = recipient.next_attempt - now
        parts.append(f"next={'now' if wait <= 0 else 'in ' + age(wait)}")
    if recipient.attempts:
        parts.append(f"last={recipient.attempts[-1].reply}")
    return "  ".join(parts)


def _show(args: argparse.Namespace) -> int:
    spool = _spool(args)
    envelope = load_envelope(spool, args.queue_id)
    now = time.time()
    write = sys.stdout.write
    for label, value in _envelope_fields(envelope, now):
        write(f"{label + ':':<14}{value}\n")
    for recipient in envelope.recipients:
        write(f"\nrecipient     <{recipient.address}> ({recipient.kind.value})\n")
        if recipient.original != recipient.address:
            write(f"  original    <{recipient.original}>\n")
        write(f"  status      {recipient.status.value}\n")
        if recipient.next_attempt is not None and not recipient.status.is_final:
            write(f"  next        {_when(recipient.next_attempt)}\n")
        if recipient.notices:
            write(f"  notices     {', '.join(recipient.notices)}\n")
        for attempt in recipient.attempts:
            tls = f" tls={attempt.tls}" if attempt.tls else ""
            host = f" {attempt.host}" if attempt.host else ""
            write(f"  {_when(attempt.at)} {attempt.status.value}{host}{tls}\n"
                  f"      {attempt.reply}\n")
    try:
        with open(spool / "queue" / (envelope.queue_id + MESSAGE_SUFFIX), "rb") as f:
            head = f.read(64 * 1024)
    except FileNotFoundError:
        return EXIT_OK  # delivered meanwhile
    end = head.find(b"\r\n\r\n")
    write("\n" + (head[:end] if end >= 0 else head).decode("utf-8", "replace")
          .replace("\r\n", "\n") + "\n")
    return EXIT_OK


def _envelope_fields(envelope: Envelope, now: float) -> list[tuple[str, str]]:
    fields = [
        ("queue id", envelope.queue_id),
        ("sender", f"<{envelope.sender}>"),
        ("arrived", f"{_when(envelope.received_at)} ({age(now - envelope.received_at)} ago)"),
        ("size", str(envelope.size)),
        ("client", f"{envelope.client_helo} [{envelope.client_address}] {envelope.protocol}"),
    ]
    if envelope.held:
        fields.append(("held", "yes"))
    for label, value in (("body", envelope.body), ("ret", envelope.ret),
                         ("envid", envelope.envid), ("auth user", envelope.auth_user)):
        if value:
            fields.append((label, value))
    if envelope.smtputf8:
        fields.append(("smtputf8", "yes"))
    return fields


def age(seconds: float) -> str:
    """A short duration: 42s, 5m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
