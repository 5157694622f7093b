"""The journey writer: the recorder the server runs, and the one thread that writes the store.

``emit`` runs on the reactor thread (or any other) and only appends a tuple to a deque; the
writer thread wakes every ``flush_interval`` seconds, or as soon as a batch is full, cleans the
fields, writes everything pending in one SQLite transaction, and now and then applies retention
and the size bound. Recording therefore never waits for the disk. If the disk cannot keep up,
events beyond ``max_pending`` are dropped and counted, rather than growing memory without bound;
if the store fails (disk full), the batch is dropped and logged: a journey is a record, and
recording it must never hold up or break the mail itself.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from typing_extensions import override
from zope.interface import implementer

from mailsys.journey.events import clean_fields, normalize_message_id
from mailsys.journey.interfaces import IJourneyRecorder
from mailsys.journey.store import (
    DEFAULT_MAX_BYTES,
    DEFAULT_RETENTION,
    JourneyStore,
    Row,
)

log = Logger()

# How often retention and the size bound are applied, in seconds.
PRUNE_INTERVAL = 3600.0

_Pending = tuple[float, str, str | None, str | None, str | None, dict[str, Any]]


class _Reactor(Protocol):
    """What the writer needs of the reactor: its time, and a way back from the thread."""

    def seconds(self) -> float: ...

    def callFromThread(self, f: Callable[..., Any], /, *args: Any) -> Any: ...  # noqa: N802


@implementer(IJourneyRecorder)
class JourneyWriter(Service):
    """Records journey events into the store at ``path``, from one writer thread."""

    def __init__(self, path: Path, reactor: _Reactor, *,
                 retention: float = DEFAULT_RETENTION, max_bytes: int = DEFAULT_MAX_BYTES,
                 flush_interval: float = 0.5, batch_size: int = 1000,
                 max_pending: int = 100_000, prune_interval: float = PRUNE_INTERVAL,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._reactor = reactor
        self._retention = retention
        self._max_bytes = max_bytes
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._prune_interval = prune_interval
        self._wall_clock = wall_clock
        # Tuples to write, and Deferreds (flush markers) that fire once what precedes is written.
        self._pending: deque[_Pending | Deferred[None]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        # Events emitted before start wait for the thread; after stop they are dropped.
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self._store_failed = False
        self.dropped = 0  # events not recorded: backlog full, or the store failed
        self.written = 0
        # CPU time of the writer thread spent writing and pruning (time.thread_time): the
        # recording's cost to the process, logged when the writer stops.
        self.cpu_seconds = 0.0

    # -- IJourneyRecorder ------------------------------------------------------------------------

    def emit(self, kind: str, queue_id: str | None = None, message_id: str | None = None,
             session: str | None = None, **fields: Any) -> None:
        pending = self._pending
        if len(pending) >= self._max_pending or self._closed:
            self.dropped += 1
            return
        pending.append((self._reactor.seconds(), kind, queue_id, message_id, session, fields))
        if len(pending) >= self._batch_size:
            self._wake.set()

    # -- control ---------------------------------------------------------------------------------

    def flush(self) -> Deferred[None]:
        """A Deferred that fires once every event emitted before this call is in the store."""
        marker: Deferred[None] = Deferred()
        if self._closed:
            marker.callback(None)
            return marker
        self._pending.append(marker)
        self._wake.set()
        return marker

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # twisted.application
        self._stopping = False
        self._closed = False
        self._stopped = Deferred()
        self._thread = threading.Thread(target=self._run, name="mailsys-journey", daemon=True)
        self._thread.start()

    @override
    def stopService(self) -> Deferred[None]:
        """Write what is pending, close the store; the Deferred fires when the thread is done."""
        super().stopService()  # type: ignore[no-untyped-call]  # twisted.application
        stopped = self._stopped
        self._closed = True  # later events are dropped: the store is closing
        if self._thread is None or stopped is None:
            return succeed(None)
        self._thread = None
        self._stopping = True
        self._wake.set()
        return stopped

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        store: JourneyStore | None = None
        try:
            store = JourneyStore(self.path, retention=self._retention,
                                 max_bytes=self._max_bytes)
        except Exception:
            log.failure("journey: cannot open the store at {path}; recording is off",
                        path=str(self.path))
        last_prune = float("-inf")
        try:
            while True:
                self._wake.wait(self._flush_interval)
                self._wake.clear()
                stopping = self._stopping
                started = time.thread_time()
                self._write_pending(store)
                now = self._wall_clock()
                if store is not None and now - last_prune >= self._prune_interval:
                    last_prune = now
                    self._prune(store, now)
                if stopping:
                    self._write_pending(store)
                self.cpu_seconds += time.thread_time() - started
                if stopping:
                    break
        finally:
            if store is not None:
                store.close()
            log.info("journey: writer stopped; {written} events written, {dropped} dropped, "
                     "{cpu:.3f} s of writer thread CPU", written=self.written,
                     dropped=self.dropped, cpu=self.cpu_seconds)
            stopped = self._stopped
            if stopped is not None:
                self._reactor.callFromThread(stopped.callback, None)

    def _write_pending(self, store: JourneyStore | None) -> None:
        pending = self._pending
        while pending:
            batch: list[Row] = []
            markers: list[Deferred[None]] = []
            while pending and len(batch) < self._batch_size:
                item = pending.popleft()
                if isinstance(item, Deferred):
                    markers.append(item)
                    break  # what precedes the marker goes in this batch, the rest in the next
                at, kind, queue_id, message_id, session, fields = item
                if message_id is not None:
                    message_id = normalize_message_id(message_id)
                batch.append((at, kind, queue_id, message_id, session, clean_fields(fields)))
            if batch:
                self._write(store, batch)
            for marker in markers:
                self._reactor.callFromThread(marker.callback, None)

    def _write(self, store: JourneyStore | None, batch: list[Row]) -> None:
        if store is None:
            self.dropped += len(batch)
            return
        try:
            self.written += store.append_rows(batch)
        except Exception:
            self.dropped += len(batch)
            if not self._store_failed:  # once per failure streak, not once per batch
                log.failure("journey: cannot write to {path}; events are dropped until it can",
                            path=str(self.path))
            self._store_failed = True
        else:
            if self._store_failed:
                log.info("journey: writing to {path} again", path=str(self.path))
            self._store_failed = False

    def _prune(self, store: JourneyStore, now: float) -> None:
        try:
            deleted = store.prune(now)
        except Exception:
            log.failure("journey: retention of {path} failed", path=str(self.path))
            return
        if deleted:
            log.info("journey: forgot {count} old events", count=deleted)

