"""The journey store: events on disk in SQLite, indexed by queue id, Message-ID and address.

Why SQLite (the standard library's sqlite3) and not JSON lines: ``mailsys trace`` asks "every
event of this queue id / Message-ID / address" and the answer must not mean reading 30 days of
lines; SQLite keeps those indexes with the rows, in one file, updated in the same transaction as
the event, and lets the command read while the server writes (WAL mode: readers never block the
writer). Retention and the size bound are a DELETE of the oldest rows, not a rewrite of a file.

One process writes (the server's journey writer thread, mailsys.journey.writer); any number read.
Each connection belongs to the thread that opened it. Everything here blocks: never call it on the
reactor thread.
"""

from __future__ import annotations

import json
import json.encoder
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailsys.journey.events import JourneyEvent, addresses_of

DEFAULT_PATH = Path("var/journey.sqlite")
DEFAULT_RETENTION = 30 * 86400.0
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# When over the size bound, delete down to this share of it, so the next batch does not at
# once trigger another round of deletes.
_SHRINK_TO = 0.9
_SCHEMA_VERSION = 1
# Events whose addresses are indexed although they carry a queue id (see append_rows).
_ADDRESS_KINDS = frozenset({"spool.commit", "dsn.created"})
# An event as the writer thread hands it over: at, kind, queue id, Message-ID, session, fields.
Row = tuple[float, str, str | None, str | None, str | None, Mapping[str, Any]]


def _make_dumps() -> Callable[[Any], str]:
    """A compact JSON encoder of cleaned fields, built once.

    ``JSONEncoder.encode`` builds its C encoder again on every call, which is a third of the
    cost of encoding a small dict; the writer encodes every event, so the C encoder is made
    here once and reused. Cleaned fields are trees of plain values (no cycles, nothing the
    encoder cannot take), so the cycle check is off. Where the C accelerator is missing the
    standard encoder does the same work.
    """
    standard = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    quote = getattr(json.encoder, "c_encode_basestring", None)
    if make is None or quote is None:
        return standard.encode
    # The arguments JSONEncoder.iterencode passes (markers, default, string encoder, indent,
    # separators, sort_keys, skipkeys, allow_nan), with no markers: no cycle check.
    encoder = make(None, standard.default, quote, None, ":", ",", False, False, True)
    join = "".join

    def dumps(value: Any) -> str:
        return join(encoder(value, 0))

    sample = {"text": "é\"\n<", "list": [1, 2.5, None, True, {"k": "v"}], "none": None}
    if dumps(sample) != standard.encode(sample):  # a Python whose accelerator differs
        return standard.encode
    return dumps


_DUMPS = _make_dumps()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    queue_id TEXT,
    message_id TEXT COLLATE NOCASE,
    session TEXT,
    fields TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_queue_id ON events (queue_id) WHERE queue_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_message_id ON events (message_id)
    WHERE message_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_session ON events (session) WHERE session IS NOT NULL;
CREATE TABLE IF NOT EXISTS addresses (
    address TEXT NOT NULL COLLATE NOCASE,
    event_id INTEGER NOT NULL,
    PRIMARY KEY (address, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS links (
    queue_id TEXT NOT NULL,
    parent TEXT NOT NULL,
    relation TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    PRIMARY KEY (queue_id, parent, relation)
);
CREATE INDEX IF NOT EXISTS links_parent ON links (parent);
"""


class JourneyStoreError(Exception):
    """The store cannot be opened or read; the message is one line for the administrator."""


@dataclass(frozen=True)
class Link:
    """Message ``queue_id`` is related to message ``parent`` (a bounce to what it reports ...)."""

    queue_id: str
    parent: str
    relation: str


class JourneyStore:
    """One connection to the journey database at ``path`` (created when writable)."""

    def __init__(self, path: Path, *, retention: float = DEFAULT_RETENTION,
                 max_bytes: int = DEFAULT_MAX_BYTES, readonly: bool = False) -> None:
        self.path = Path(path)
        self.retention = retention
        self.max_bytes = max_bytes
        self.readonly = readonly
        try:
            if readonly:
                if not self.path.exists():
                    raise JourneyStoreError(f"{self.path}: no journey store here (is recording "
                                            f"on, and has the server run?)")
                self._db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True,
                                           isolation_level=None, timeout=10.0)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
                self._create()
        except sqlite3.Error as exc:
            raise JourneyStoreError(f"{self.path}: cannot open the journey store: {exc}") from None

    def _create(self) -> None:
        db = self._db
        # auto_vacuum must be chosen before the first table exists; INCREMENTAL lets the size
        # bound give pages back to the file system after deleting old events.
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("PRAGMA journal_mode = WAL")
        # A journey is a record, not mail: after a power cut the last batch may be lost, never
        # the database. NORMAL in WAL mode syncs at checkpoints only.
        db.execute("PRAGMA synchronous = NORMAL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise JourneyStoreError(f"{self.path}: written by a newer mailsys "
                                    f"(schema {version})")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection (a WAL checkpoint happens when the last one closes)."""
        self._db.close()

    # -- writing ---------------------------------------------------------------------------------

    def append(self, events: Iterable[JourneyEvent]) -> int:
        """Store ``events`` in one transaction, with their index rows; return how many."""
        return self.append_rows((e.at, e.kind, e.queue_id, e.message_id, e.session, e.fields)
                                for e in events)

    def append_rows(self, rows: Iterable[Row]) -> int:
        """Store events given as (at, kind, queue id, Message-ID, session, cleaned fields).

        The writer thread's form: no JourneyEvent is built for an event only to be stored.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            # One writer holds the write lock from here: the ids can be numbered in advance,
            # so each table takes its rows in one executemany (the loop runs in C).
            next_id = db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0] + 1
            event_rows: list[tuple[Any, ...]] = []
            address_rows: list[tuple[str, int]] = []
            link_rows: list[tuple[str, str, str, int]] = []
            dumps = _DUMPS
            for event_id, (at, kind, queue_id, message_id, session, fields) in enumerate(
                    rows, start=next_id):
                event_rows.append((event_id, at, kind, queue_id, message_id, session,
                                   dumps(fields)))
                # The addresses a journey is found by enter it before the queue id exists (MAIL,
                # RCPT, AUTH) or when the message is queued; later events repeat them.
                if queue_id is None or kind in _ADDRESS_KINDS:
                    for address in addresses_of(fields):
                        address_rows.append((address, event_id))
                parent = fields.get("parent")
                if queue_id and isinstance(parent, str) and parent:
                    link_rows.append((queue_id, parent, str(fields.get("relation") or "parent"),
                                      event_id))
            db.executemany("INSERT INTO events (id, at, kind, queue_id, message_id, session,"
                           " fields) VALUES (?, ?, ?, ?, ?, ?, ?)", event_rows)
            if address_rows:
                db.executemany("INSERT OR IGNORE INTO addresses (address, event_id)"
                               " VALUES (?, ?)", address_rows)
            if link_rows:
                db.executemany("INSERT OR IGNORE INTO links (queue_id, parent, relation,"
                               " event_id) VALUES (?, ?, ?, ?)", link_rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return len(event_rows)

    def prune(self, now: float) -> int:
        """Forget events older than the retention, then the oldest beyond the size bound.

        Returns how many events were deleted.
        """
        deleted = 0
        last_old = self._last_id_before(now - self.retention)
        if last_old is not None:
            deleted += self._delete_up_to(last_old)
        if self.used_bytes() > self.max_bytes:
            target = self.max_bytes * _SHRINK_TO
            while self.used_bytes() > target:
                total = self._db.execute("SELECT count(*) FROM events").fetchone()[0]
                if not total:
                    break
                # The oldest tenth at a time: sizes of events vary, so aim and measure again.
                row = self._db.execute("SELECT id FROM events ORDER BY id LIMIT 1 OFFSET ?",
                                       (max(1, total // 10) - 1,)).fetchone()
                deleted += self._delete_up_to(row[0])
            # The pragma frees one page per step, and execute() steps once: executescript()
            # runs it to the end.
            self._db.executescript("PRAGMA incremental_vacuum;")
            # In WAL mode the file shrinks at a checkpoint.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return deleted

    def _last_id_before(self, at: float) -> int | None:
        """The id of the last event before time ``at``, or None if there is none.

        Events are numbered in the order they happened (one writer, times taken on the reactor
        thread in emit order), so a binary search over ids finds it without an index on time;
        that index would cost every insert for the sake of an hourly delete.
        """
        db = self._db
        first = db.execute("SELECT id, at FROM events ORDER BY id LIMIT 1").fetchone()
        if first is None or first[1] >= at:
            return None
        low = int(first[0])
        high = int(db.execute("SELECT max(id) FROM events").fetchone()[0])
        while low < high:
            middle = (low + high + 1) // 2
            row = db.execute("SELECT id, at FROM events WHERE id >= ? ORDER BY id LIMIT 1",
                             (middle,)).fetchone()
            if row is not None and row[1] < at:
                low = min(int(row[0]), high)
            else:
                high = middle - 1
        return low

    def _delete_up_to(self, last_id: int) -> int:
        """Delete the events up to id ``last_id``, with their index rows."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM addresses WHERE event_id <= ?", (last_id,))
            db.execute("DELETE FROM links WHERE event_id <= ?", (last_id,))
            count = db.execute("DELETE FROM events WHERE id <= ?", (last_id,)).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return int(count)

    def used_bytes(self) -> int:
        """Bytes of the database file in use (free pages not counted)."""
        db = self._db
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(page_size * (pages - free))

    # -- reading ---------------------------------------------------------------------------------

    def count(self) -> int:
        """How many events are stored."""
        return int(self._db.execute("SELECT count(*) FROM events").fetchone()[0])

    def events_of_queue_id(self, queue_id: str) -> list[JourneyEvent]:
        """Every event recorded with ``queue_id``, oldest first."""
        return self._events("queue_id = ?", (queue_id,))

    def events_of_session(self, session: str) -> list[JourneyEvent]:
        """Every event of one session, oldest first."""
        return self._events("session = ?", (session,))

    def queue_ids_of_message_id(self, message_id: str) -> list[str]:
        """The queue ids that carried the message with ``message_id`` (without brackets)."""
        rows = self._db.execute(
            "SELECT queue_id, min(at) FROM events WHERE message_id = ? AND queue_id IS NOT NULL"
            " GROUP BY queue_id ORDER BY min(at)", (message_id,))
        return [row[0] for row in rows]

    def events_of_address(self, address: str, since: float | None = None,
                          limit: int = 10000) -> list[JourneyEvent]:
        """Events naming ``address`` (sender, recipient, user ...), newest first."""
        sql = ("SELECT e.id, e.at, e.kind, e.queue_id, e.message_id, e.session, e.fields"
               " FROM addresses a JOIN events e ON e.id = a.event_id WHERE a.address = ?")
        args: list[Any] = [address.strip().strip("<>").lower()]
        if since is not None:
            sql += " AND e.at >= ?"
            args.append(since)
        sql += " ORDER BY e.at DESC, e.id DESC LIMIT ?"
        args.append(limit)
        return [_event(row) for row in self._db.execute(sql, args)]

    def links_of(self, queue_id: str) -> list[Link]:
        """Links from and to ``queue_id``: its parents and the messages made from it."""
        rows = self._db.execute(
            "SELECT queue_id, parent, relation FROM links WHERE queue_id = ? OR parent = ?"
            " ORDER BY event_id", (queue_id, queue_id))
        return [Link(*row) for row in rows]

    def recent_queue_ids(self, since: float | None = None, limit: int = 50) -> list[str]:
        """The most recently active queue ids, newest first."""
        sql = "SELECT queue_id, max(at) AS last FROM events WHERE queue_id IS NOT NULL"
        args: list[Any] = []
        if since is not None:
            sql += " AND id > ?"
            args.append(self._last_id_before(since) or 0)
        sql += " GROUP BY queue_id ORDER BY last DESC LIMIT ?"
        args.append(limit)
        return [row[0] for row in self._db.execute(sql, args)]

    def _events(self, condition: str, args: Sequence[Any]) -> list[JourneyEvent]:
        rows = self._db.execute(
            "SELECT id, at, kind, queue_id, message_id, session, fields FROM events"
            f" WHERE {condition} ORDER BY at, id", args)
        return [_event(row) for row in rows]


def _event(row: Sequence[Any]) -> JourneyEvent:
    event_id, at, kind, queue_id, message_id, session, fields = row
    try:
        decoded = json.loads(fields)
    except ValueError:
        decoded = {}
    return JourneyEvent(at=at, kind=kind, queue_id=queue_id, message_id=message_id,
                        session=session, fields=decoded if isinstance(decoded, dict) else {},
                        id=event_id)
