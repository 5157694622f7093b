"""The journey writer: emit() only queues; one thread writes batches, prunes, and stops cleanly."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from mailsys.journey.interfaces import IJourneyRecorder
from mailsys.journey.store import JourneyStore
from mailsys.journey.writer import JourneyWriter

from .journey_support import T0, ThreadCallReactor


class Fired:
    """Whether a Deferred has fired, for wait_for."""

    def __init__(self, d: Deferred[Any]) -> None:
        self.done = False
        d.addBoth(self._fire)

    def _fire(self, result: object) -> object:
        self.done = True
        return result

    def __call__(self) -> bool:
        return self.done


def start(tmp_path: Path, reactor: ThreadCallReactor, **options: Any) -> JourneyWriter:
    options.setdefault("flush_interval", 0.01)
    writer = JourneyWriter(tmp_path / "journey.sqlite", reactor, **options)
    writer.startService()
    return writer


def stop(writer: JourneyWriter, reactor: ThreadCallReactor) -> None:
    reactor.wait_for(Fired(writer.stopService()), "the writer to stop")


def stored(tmp_path: Path) -> JourneyStore:
    return JourneyStore(tmp_path / "journey.sqlite", readonly=True)


def test_the_writer_is_a_recorder(tmp_path: Path) -> None:
    """The writer is held to IJourneyRecorder, as the no-op and memory recorders are."""
    reactor = ThreadCallReactor()
    writer = JourneyWriter(tmp_path / "j.sqlite", reactor)
    assert verifyObject(IJourneyRecorder, writer)


def test_emitted_events_reach_the_store_with_the_reactor_time(tmp_path: Path) -> None:
    """An event emitted is on disk after flush(), stamped with the reactor's time, cleaned."""
    reactor = ThreadCallReactor(now=T0 + 5)
    writer = start(tmp_path, reactor)
    writer.emit("smtp.auth", session="S1", user="demo@example.test", mechanism="PLAIN",
                password="hunter2")
    writer.emit("spool.commit", queue_id="Q1", message_id="<m1@client.test>", size=10)
    reactor.wait_for(Fired(writer.flush()), "the flush")
    store = stored(tmp_path)
    [auth] = store.events_of_session("S1")
    assert auth.at == T0 + 5 and auth.fields == {"user": "demo@example.test",
                                                 "mechanism": "PLAIN"}
    assert store.queue_ids_of_message_id("m1@client.test") == ["Q1"]
    store.close()
    stop(writer, reactor)


def test_a_password_never_reaches_the_disk(tmp_path: Path) -> None:
    """Whatever a room passes, no secret or body byte is in the store's files."""
    reactor = ThreadCallReactor()
    writer = start(tmp_path, reactor)
    writer.emit("smtp.auth", session="S1", user="demo@example.test", password="Sekr1t-Pw",
                sasl_response="AGRlbW8AU2VrcjF0LVB3", body="Subject: Sekr1t-Body")
    stop(writer, reactor)
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"demo@example.test" in data
    for secret in (b"Sekr1t", b"AGRlbW8AU2VrcjF0LVB3"):
        assert secret not in data


def test_emit_returns_at_once_while_the_disk_is_stuck(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that blocks does not block emit(); the backlog is bounded and drops are counted."""
    unblock = threading.Event()
    entered = threading.Event()
    real_append = JourneyStore.append_rows

    def stuck_append(self: JourneyStore, events: Any) -> int:
        entered.set()
        unblock.wait(10)
        return real_append(self, events)

    monkeypatch.setattr(JourneyStore, "append_rows", stuck_append)
    reactor = ThreadCallReactor()
    writer = start(tmp_path, reactor, max_pending=100, batch_size=10)
    writer.emit("smtp.connect", session="S0")
    assert entered.wait(10)
    began = time.monotonic()
    for n in range(150):
        writer.emit("smtp.connect", session=f"S{n}", client="127.0.0.1")
    assert time.monotonic() - began < 0.5
    assert writer.dropped == 50
    unblock.set()
    reactor.wait_for(Fired(writer.flush()), "the flush")
    assert writer.written == 101
    stop(writer, reactor)


def test_events_are_written_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many events emitted at once are written in a few transactions, not one each."""
    calls: list[int] = []
    real_append = JourneyStore.append_rows

    def counting_append(self: JourneyStore, events: Any) -> int:
        events = list(events)
        calls.append(len(events))
        return real_append(self, events)

    monkeypatch.setattr(JourneyStore, "append_rows", counting_append)
    reactor = ThreadCallReactor()
    writer = JourneyWriter(tmp_path / "journey.sqlite", reactor, batch_size=500,
                           flush_interval=5.0)
    for n in range(1200):  # before start: they wait for the thread
        writer.emit("smtp.rcpt", session="S1", txn=1, recipient=f"r{n}@example.test")
    writer.startService()
    reactor.wait_for(Fired(writer.flush()), "the flush")
    assert sum(calls) == 1200 and len(calls) == 3
    stop(writer, reactor)


def test_a_failing_store_drops_the_batch_and_recovers(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk error loses that batch only, is logged once, and writing resumes after it."""
    real_append = JourneyStore.append_rows
    failures = [OSError(28, "No space left on device")] * 2

    def failing_append(self: JourneyStore, events: Any) -> int:
        if failures:
            raise failures.pop()
        return real_append(self, events)

    monkeypatch.setattr(JourneyStore, "append_rows", failing_append)
    reactor = ThreadCallReactor()
    writer = start(tmp_path, reactor)
    for n in range(2):
        writer.emit("spool.commit", queue_id=f"LOST{n}")
        reactor.wait_for(Fired(writer.flush()), "a flush")
    writer.emit("spool.commit", queue_id="KEPT")
    reactor.wait_for(Fired(writer.flush()), "a flush")
    assert writer.dropped == 2 and writer.written == 1
    store = stored(tmp_path)
    assert store.events_of_queue_id("KEPT") and not store.events_of_queue_id("LOST0")
    store.close()
    stop(writer, reactor)


def test_stop_writes_what_is_pending_and_later_events_are_dropped(tmp_path: Path) -> None:
    """Stopping writes every event emitted before it; the store is then closed to new ones."""
    reactor = ThreadCallReactor()
    writer = start(tmp_path, reactor, flush_interval=60.0)
    for n in range(5):
        writer.emit("spool.commit", queue_id=f"Q{n}")
    stop(writer, reactor)
    writer.emit("spool.commit", queue_id="AFTER")
    assert writer.dropped == 1
    store = stored(tmp_path)
    assert store.count() == 5
    store.close()


def test_events_survive_a_restart_of_the_writer(tmp_path: Path) -> None:
    """A second writer on the same store keeps the first one's events (server restart)."""
    reactor = ThreadCallReactor()
    for run in range(2):
        writer = start(tmp_path, reactor)
        writer.emit("spool.commit", queue_id=f"RUN{run}")
        stop(writer, reactor)
    store = stored(tmp_path)
    assert store.events_of_queue_id("RUN0") and store.events_of_queue_id("RUN1")
    store.close()


def test_concurrent_emitters_lose_nothing(tmp_path: Path) -> None:
    """Events emitted from several threads at once are all recorded."""
    reactor = ThreadCallReactor()
    writer = start(tmp_path, reactor, batch_size=64)

    def emit_many(thread: int) -> None:
        for n in range(500):
            writer.emit("relay.reply", queue_id=f"T{thread}", host="mx.b.test", n=n)

    threads = [threading.Thread(target=emit_many, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    stop(writer, reactor)
    store = stored(tmp_path)
    assert store.count() == 2000
    assert [e.fields["n"] for e in store.events_of_queue_id("T3")] == list(range(500))
    store.close()


def test_the_writer_applies_retention(tmp_path: Path) -> None:
    """The writer thread forgets events older than the retention, on its prune schedule."""
    reactor = ThreadCallReactor(now=T0)
    clock = [T0]
    writer = start(tmp_path, reactor, retention=86400.0, prune_interval=0.0,
                   wall_clock=lambda: clock[0])
    writer.emit("spool.commit", queue_id="OLD")
    reactor.wait_for(Fired(writer.flush()), "the flush")
    reactor.now = clock[0] = T0 + 2 * 86400
    writer.emit("spool.commit", queue_id="NEW")
    reactor.wait_for(Fired(writer.flush()), "the flush")

    def forgotten() -> bool:
        store = stored(tmp_path)
        try:
            return not store.events_of_queue_id("OLD")
        finally:
            store.close()

    reactor.wait_for(forgotten, "retention")
    stop(writer, reactor)
    store = stored(tmp_path)
    assert store.events_of_queue_id("NEW")
    store.close()


def test_an_unwritable_store_turns_recording_off(tmp_path: Path) -> None:
    """A store that cannot be opened drops events and stops cleanly: mail goes on."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    reactor = ThreadCallReactor()
    writer = JourneyWriter(blocker / "journey.sqlite", reactor, flush_interval=0.01)
    writer.startService()
    writer.emit("spool.commit", queue_id="Q1")
    reactor.wait_for(Fired(writer.flush()), "the flush")
    assert writer.dropped == 1
    stop(writer, reactor)


def test_the_writer_counts_its_thread_cpu_and_says_so_when_it_stops(tmp_path: Path) -> None:
    """The writer thread's CPU time is kept and logged at stop with the events written."""
    reactor = ThreadCallReactor()
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        writer = start(tmp_path, reactor)
        for n in range(200):
            writer.emit("spool.commit", queue_id=f"Q{n}", sender="a@b.test", size=n)
        stop(writer, reactor)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert writer.cpu_seconds > 0
    [stopped] = [e for e in seen if "writer stopped" in e.get("log_format", "")]
    assert stopped["written"] == 200 and stopped["cpu"] == writer.cpu_seconds
