"""The questions the journey web page asks of the store: recent messages and a search over
them, one message's journey as steps with their evidence, the steps recorded since the last look
(for live updates), and who may see which journey.

Everything here blocks (SQLite): the web page runs it in a disk thread through ``JourneyReader``,
which keeps one read-only connection per thread (a connection belongs to the thread that opened
it). The words of each step are mailsys.journey.steps', the same as ``mailsys trace`` prints.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from pathlib import Path
from typing import Any, TypeVar

from mailsys.journey.events import JourneyEvent
from mailsys.journey.steps import steps_of
from mailsys.journey.store import JourneyStore, JourneyStoreError
from mailsys.journey.trace import Journey, find_journeys, journey_events

# The most messages one page of the list shows.
PAGE_SIZE = 50
# Kinds whose ``user`` field is the person who sent or read the message.
_SENT_BY = frozenset({"smtp.auth"})
_READ_BY = frozenset({"pop3.retr", "pop3.dele", "imap.fetch", "imap.flags", "imap.move",
                      "imap.expunge"})

T = TypeVar("T")


@dataclass(frozen=True)
class StepView:
    """One line of a journey as the page shows it: the words, the rule, the evidence."""

    event_id: int
    at: float
    offset: float
    kind: str
    text: str
    rule: str
    fields: dict[str, Any]


@dataclass
class MessageSummary:
    """One row of the message list."""

    queue_id: str
    started: float
    message_id: str | None = None
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    subject: str | None = None
    submitted_by: str | None = None
    status: str = "queued"


class JourneyReader:
    """Read-only access to the store at ``path``, one connection per calling thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()

    def call(self, query: Callable[..., T], *args: Any, empty: T) -> T:
        """``query(store, *args)`` on this thread's connection; ``empty`` when no store exists
        yet (recording has not written its first event)."""
        store: JourneyStore | None = getattr(self._local, "store", None)
        if store is None:
            try:
                store = JourneyStore(self.path, readonly=True)
            except JourneyStoreError:
                return empty
            self._local.store = store
        return query(store, *args)


# -- who may see what ----------------------------------------------------------------------------

def involves(events: Iterable[JourneyEvent], mailbox: str) -> bool:
    """True if ``mailbox`` sent the message (the submission account that queued it) or received
    it (the mailbox it was delivered to, or a reader of it).

    The envelope sender alone does not count: on port 25 anyone may write any address there.
    """
    mailbox = mailbox.lower()
    for event in events:
        fields = event.fields
        if event.kind in _SENT_BY or event.kind in _READ_BY:
            if str(fields.get("user") or "").lower() == mailbox:
                return True
        elif event.kind == "delivery.maildir":
            if str(fields.get("mailbox") or "").lower() == mailbox:
                return True
        elif event.kind == "spool.commit":
            routes = fields.get("routes")
            for route in routes if isinstance(routes, list) else ():
                if isinstance(route, dict) and \
                        str(route.get("mailbox") or "").lower() == mailbox:
                    return True
    return False


def decoded_header(value: str) -> str:
    """A header field's value with its encoded words decoded (RFC 2047 §6); the value as it
    came when they cannot be."""
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


# -- the list ------------------------------------------------------------------------------------

def summarize(queue_id: str, events: list[JourneyEvent]) -> MessageSummary:
    """The list row of the message ``queue_id`` from its journey's events."""
    summary = MessageSummary(queue_id, events[0].at if events else 0.0)
    outcomes: dict[str, str] = {}
    for event in events:
        fields = event.fields
        if event.message_id and summary.message_id is None:
            summary.message_id = event.message_id
        if event.kind == "smtp.auth" and fields.get("user") and \
                str(fields.get("reply", "")).startswith("2"):
            summary.submitted_by = str(fields["user"])
        elif event.kind == "smtp.data" and event.queue_id == queue_id:
            subject = fields.get("subject")
            if isinstance(subject, str):
                summary.subject = decoded_header(subject)
        elif event.kind == "spool.commit" and event.queue_id == queue_id:
            summary.sender = str(fields.get("sender") or "")
            recipients = fields.get("recipients")
            if isinstance(recipients, list):
                summary.recipients = [str(r) for r in recipients]
        elif event.kind == "delivery.attempt" and event.queue_id == queue_id:
            outcomes[str(fields.get("recipient"))] = str(fields.get("status") or "")
        elif event.kind == "delivery.maildir" and event.queue_id == queue_id:
            outcomes.setdefault(str(fields.get("recipient")), "delivered")
    if outcomes:
        states = set(outcomes.values())
        summary.status = ("delivered" if states == {"delivered"}
                          else "failed" if "failed" in states
                          else "deferred" if "deferred" in states else "in progress")
    return summary


def search(store: JourneyStore, query: str, since: float | None, until: float | None,
           viewer: str | None, limit: int = PAGE_SIZE) -> list[MessageSummary]:
    """Messages matching ``query`` (queue id, Message-ID, address, or "" for the most recent)
    active within [since, until], newest first; only those ``viewer`` sent or received unless
    ``viewer`` is None (an administrator)."""
    query = query.strip()
    if not query and viewer is not None:
        query = viewer  # a user's own messages are found through their address
    if query:
        journeys, _ = find_journeys(store, query, since=since, limit=limit * 2)
        found = [(j.queue_id, j.events) for j in journeys if j.queue_id is not None]
    else:
        found = [(queue_id, journey_events(store, queue_id))
                 for queue_id in store.recent_queue_ids(since=since, limit=limit * 2)]
    rows: list[MessageSummary] = []
    seen: set[str] = set()
    for queue_id, events in found:
        if queue_id is None or queue_id in seen or not events:
            continue
        seen.add(queue_id)
        if until is not None and events[0].at > until:
            continue
        if viewer is not None and not involves(events, viewer):
            continue
        rows.append(summarize(queue_id, events))
    rows.sort(key=lambda row: row.started, reverse=True)
    return rows[:limit]


# -- one journey ---------------------------------------------------------------------------------

def journey(store: JourneyStore, queue_id: str, viewer: str | None) -> list[Journey] | None:
    """The journey of ``queue_id`` with the messages linked to it (its bounce ...), or None if
    nothing is recorded of it or ``viewer`` (None: an administrator) may not see it."""
    if not store.events_of_queue_id(queue_id):
        return None
    journeys, _ = find_journeys(store, queue_id, limit=1)
    if not journeys or journeys[0].queue_id != queue_id:
        return None
    if viewer is not None:
        if not involves(journeys[0].events, viewer):
            return None
        journeys = [j for j in journeys if j is journeys[0] or involves(j.events, viewer)]
    return journeys


def steps(journey: Journey) -> list[StepView]:
    """The lines of ``journey`` in order, each with the id of the event it came from."""
    start = journey.started
    lines: list[StepView] = []
    for event in journey.events:
        for kind, step, fields in steps_of(event):
            lines.append(StepView(event.id or 0, event.at, event.at - start, kind, step.text,
                                  step.rule, fields))
    return lines


def steps_after(store: JourneyStore, queue_id: str, after: int,
                viewer: str | None) -> tuple[list[StepView], int] | None:
    """The steps of ``queue_id`` from events stored after event id ``after``, and the new last
    id; None if ``viewer`` may not see the journey."""
    events = journey_events(store, queue_id)
    if not events or (viewer is not None and not involves(events, viewer)):
        return None
    whole = Journey(queue_id, events)
    fresh = [line for line in steps(whole) if line.event_id > after]
    last = max([after, *(e.id or 0 for e in events)])
    return fresh, last
