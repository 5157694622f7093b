"""``mailsys trace ID|MESSAGE-ID|ADDRESS``: a message's journey, one step per line.

This module owns the command: finding the journeys a query names (by queue id, by Message-ID
with or without its angle brackets, or by an address the message was from, to or read by),
gathering each one's events (the SMTP transaction that queued it, its deliveries, what readers
did with it, and the messages linked to it, such as its bounce) and printing them with their
time offset, what happened and the rule behind it (mailsys.journey.steps).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from mailsys.config import load
from mailsys.journey.events import JourneyEvent, normalize_message_id
from mailsys.journey.steps import steps_of
from mailsys.journey.store import JourneyStore, JourneyStoreError, Link

EXIT_OK = 0
EXIT_NOT_FOUND = 1
# An address can name thousands of messages: show the newest journeys, and say so.
DEFAULT_LIMIT = 20
# Links are followed this far (a bounce of a bounce is not sent, RFC 3464 §2, so 2 would do).
MAX_LINKED = 10

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# C0 controls (but tab), DEL and C1 controls: a header or a peer's EHLO name must not move the
# cursor or change the colours of the administrator's terminal.
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


class TraceError(ValueError):
    """The trace cannot be made; one line for the administrator."""


@dataclass
class Journey:
    """The events of one message (or of a transaction refused before it was queued)."""

    queue_id: str | None
    events: list[JourneyEvent]
    links: list[Link] = field(default_factory=list)

    @property
    def message_id(self) -> str | None:
        """The Message-ID the message carried, if an event named it."""
        return next((e.message_id for e in self.events if e.message_id), None)

    @property
    def started(self) -> float:
        return self.events[0].at if self.events else 0.0


# -- finding journeys ----------------------------------------------------------------------------

def find_journeys(store: JourneyStore, query: str, *, since: float | None = None,
                  limit: int = DEFAULT_LIMIT) -> tuple[list[Journey], int]:
    """The journeys ``query`` names, newest first for an address, and how many were left out.

    Messages linked to a found one (its bounce, or the message a bounce reports) follow it.
    """
    roots = _roots(store, query.strip(), since)
    shown = roots[:limit]
    journeys: list[Journey] = []
    seen: set[str] = set()
    for root in shown:
        for journey in _with_linked(store, root, seen):
            if since is None or any(e.at >= since for e in journey.events):
                journeys.append(journey)
    return journeys, max(0, len(roots) - limit)


_Root = str | tuple[str, int | None]  # a queue id, or (session, txn) never queued


def _roots(store: JourneyStore, query: str, since: float | None) -> list[_Root]:
    if not query:
        return []
    for candidate in dict.fromkeys((query, query.upper())):
        if store.events_of_queue_id(candidate):
            return [candidate]
    message_id = normalize_message_id(query)
    if message_id:
        queue_ids = store.queue_ids_of_message_id(message_id)
        if queue_ids:
            return list(queue_ids)
    if "@" not in query:
        return []
    roots: list[_Root] = []
    for event in store.events_of_address(query, since=since):
        root: _Root
        if event.queue_id:
            root = event.queue_id
        elif event.session:
            root = (event.session, event.txn)
        else:
            continue
        if root not in roots:
            roots.append(root)
    return _queued_instead(store, roots)


def _queued_instead(store: JourneyStore, roots: list[_Root]) -> list[_Root]:
    """Roots with each session or transaction that queued messages replaced by their ids.

    An address on a transaction event (MAIL, RCPT) names that transaction's message; on a
    session event (AUTH) it names every message the session queued, or the session itself.
    """
    result: list[_Root] = []
    for root in roots:
        replaced: list[_Root] = [root]
        if isinstance(root, tuple):
            session, txn = root
            queued = [e.queue_id for e in store.events_of_session(session)
                      if e.queue_id and (txn is None or e.txn == txn)]
            if queued:
                replaced = list(dict.fromkeys(queued))
        for item in replaced:
            if item not in result:
                result.append(item)
    return result


def _with_linked(store: JourneyStore, root: _Root, seen: set[str]) -> list[Journey]:
    if isinstance(root, tuple):
        return [Journey(None, _transaction(store, *root))]
    journeys: list[Journey] = []
    todo = [root]
    while todo and len(journeys) < MAX_LINKED:
        queue_id = todo.pop(0)
        if queue_id in seen:
            continue
        seen.add(queue_id)
        links = store.links_of(queue_id)
        journeys.append(Journey(queue_id, journey_events(store, queue_id), links))
        for link in links:
            other = link.parent if link.queue_id == queue_id else link.queue_id
            if other not in seen:
                todo.append(other)
    return journeys


def journey_events(store: JourneyStore, queue_id: str) -> list[JourneyEvent]:
    """The events of ``queue_id``, with those of the session transaction that queued it."""
    own = store.events_of_queue_id(queue_id)
    found = {e.id: e for e in own}
    sessions: dict[str, set[int | None]] = {}
    for event in own:
        if event.session:
            sessions.setdefault(event.session, set()).add(event.txn)
    for session, txns in sessions.items():
        end = max(e.at for e in own if e.session == session)
        for event in store.events_of_session(session):
            if event.queue_id not in (None, queue_id):
                continue  # another message of the same session
            if (event.txn is not None and event.txn in txns) or \
                    (event.txn is None and event.queue_id is None and event.at <= end):
                found.setdefault(event.id, event)
    return sorted(found.values(), key=_order)


def _transaction(store: JourneyStore, session: str, txn: int | None) -> list[JourneyEvent]:
    events = store.events_of_session(session)
    mine = [e for e in events if e.txn == txn and txn is not None]
    if not mine:
        return sorted(events, key=_order)
    end = max(e.at for e in mine)
    return sorted([e for e in events if e in mine or (e.txn is None and e.at <= end
                                                      and e.queue_id is None)], key=_order)


def _order(event: JourneyEvent) -> tuple[float, int]:
    return (event.at, event.id or 0)


# -- rendering -----------------------------------------------------------------------------------

def offset_text(seconds: float) -> str:
    """A time offset from a journey's start: +0.004s, +12.5s, +5m02s, +2h03m, +1d02h."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"+{seconds:.3f}s" if seconds < 10 else f"+{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"+{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"+{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"+{whole // 86400}d{whole % 86400 // 3600:02d}h"


def safe(text: str) -> str:
    """``text`` with control characters shown as escapes, safe to print on a terminal."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def render_text(journeys: list[Journey], left_out: int, out: TextIO) -> None:
    """Each journey: a heading, its links, then one step per line."""
    for number, journey in enumerate(journeys):
        if number:
            out.write("\n")
        out.write(safe(_heading(journey)) + "\n")
        for link in journey.links:
            out.write(safe("  " + _link_text(journey, link)) + "\n")
        start = journey.started
        for event in journey.events:
            offset = offset_text(event.at - start)
            for _, step, _ in steps_of(event):
                rule = f"  — {step.rule}" if step.rule else ""
                out.write(safe(f"  {offset:>9}  {step.text}{rule}") + "\n")
    if left_out:
        out.write(f"\n({left_out} older journey{'s' if left_out != 1 else ''} not shown; "
                  f"narrow with --since or raise --limit)\n")


def _heading(journey: Journey) -> str:
    started = _utc(journey.started)
    message_id = f" <{journey.message_id}>" if journey.message_id else ""
    if journey.queue_id is None:
        return f"transaction not queued{message_id}, started {started}"
    return f"message {journey.queue_id}{message_id}, started {started}"


def _link_text(journey: Journey, link: Link) -> str:
    if link.queue_id == journey.queue_id:
        return f"{link.relation} of message {link.parent}"
    return f"{link.relation} {link.queue_id} was sent about this message"


def render_json(query: str, journeys: list[Journey], left_out: int, out: TextIO) -> None:
    """The same journeys as one JSON document, every step with its fields."""
    document: dict[str, Any] = {"query": query, "left_out": left_out, "journeys": []}
    for journey in journeys:
        start = journey.started
        steps = []
        for event in journey.events:
            for kind, step, fields in steps_of(event):
                steps.append({"at": event.at, "offset": round(event.at - start, 6),
                              "kind": kind, "text": step.text, "rule": step.rule,
                              "queue_id": event.queue_id, "session": event.session,
                              "fields": fields})
        document["journeys"].append({
            "queue_id": journey.queue_id, "message_id": journey.message_id,
            "started": start,
            "links": [{"queue_id": link.queue_id, "parent": link.parent,
                       "relation": link.relation} for link in journey.links],
            "steps": steps,
        })
    # ensure_ascii: escapes every control character, whatever a peer put in a field.
    json.dump(document, out, indent=2, ensure_ascii=True)
    out.write("\n")


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


# -- the command ---------------------------------------------------------------------------------

def parse_since(text: str, now: Callable[[], float] = time.time) -> float:
    """``--since``: a duration back from now (30m, 2h, 7d) or a date and time (ISO 8601)."""
    match = _DURATION.match(text.strip())
    if match:
        return now() - float(match.group(1)) * _UNITS[match.group(2).lower()]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {text!r}: expected a duration (30m, 2h, 7d) or a date and time "
            f"(2026-12-07 or 2026-12-07T05:30)") from None
    return moment.timestamp()  # local time when no offset is given, as `date` shows it


def _configured_store(args: argparse.Namespace) -> Path:
    """The store the configuration names ([journey] path)."""
    return load(args.config, check_files=False).journey.path


def add_trace_command(commands: Any, config_option: argparse.ArgumentParser,
                      parser_class: type[argparse.ArgumentParser],
                      store_path: Callable[[argparse.Namespace], Path] | None = None) -> None:
    """Add ``trace`` to the ``mailsys`` parser's subcommands.

    ``store_path`` finds the store from the parsed arguments (the configuration's); --store wins.
    """
    trace = commands.add_parser("trace", parents=[config_option], help=(
        "a message's journey, step by step, found by queue id, Message-ID or address"))
    trace.add_argument("query", metavar="ID|MESSAGE-ID|ADDRESS",
                       help="a queue id, a Message-ID (with or without <>), or an address")
    trace.add_argument("--since", type=parse_since, metavar="WHEN",
                       help="only journeys active since then: 30m, 2h, 7d or 2026-12-07T05:30")
    trace.add_argument("--json", action="store_true", help="one JSON document, with all fields")
    trace.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                       help=f"show at most N journeys of an address (default {DEFAULT_LIMIT})")
    trace.add_argument("--store", type=Path, metavar="PATH",
                       help="the journey store (default: [journey] path of the configuration)")
    trace.set_defaults(run=lambda args: run_trace(args, store_path))


def run_trace(args: argparse.Namespace,
              store_path: Callable[[argparse.Namespace], Path] | None = None,
              out: TextIO | None = None) -> int:
    """Print the journeys ``args.query`` names; exit status 1 when there is none."""
    out = sys.stdout if out is None else out
    path: Path = args.store or (store_path or _configured_store)(args)
    try:
        store = JourneyStore(path, readonly=True)
    except JourneyStoreError as exc:
        raise TraceError(str(exc)) from None
    try:
        journeys, left_out = find_journeys(store, args.query, since=args.since,
                                           limit=max(1, args.limit))
    except Exception as exc:  # sqlite3.Error: a damaged or foreign file
        raise TraceError(f"{path}: cannot read the journey store: {exc}") from None
    finally:
        store.close()
    if not journeys:
        within = " in that time" if args.since is not None else ""
        raise TraceError(f"no journey of {safe(args.query)} is recorded{within}")
    if args.json:
        render_json(args.query, journeys, left_out, out)
    else:
        render_text(journeys, left_out, out)
    return EXIT_OK
