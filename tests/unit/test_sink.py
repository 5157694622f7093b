"""The queue sink: what an SMTP session calls to hand over an accepted message."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from zope.interface.verify import verifyObject

from mailsys.envelope import Envelope, TargetKind
from mailsys.interfaces import IMessageSink
from mailsys.queue.runner import QueueRunner
from mailsys.queue.sink import QueueSink
from mailsys.queue.spool import Spool
from mailsys.smtp.policy import SubmissionPolicy
from mailsys.smtp.server import ListenerRole
from mailsys.smtp.testing import SessionDriver, StaticRouter, make_factory, memory_portal
from tests.unit.test_runner import FakeAgent
from tests.unit.test_spool import (
    ImmediateDiskPool,
    failure_of,
    files,
    local_recipient,
    make_envelope,
    result_of,
)


class RecordingRunner:
    """Stands in for QueueRunner.enqueue, recording what was scheduled."""

    def __init__(self, error: Exception | None = None) -> None:
        self.enqueued: list[Envelope] = []
        self.error = error

    def enqueue(self, envelope: Envelope) -> None:
        if self.error is not None:
            raise self.error
        self.enqueued.append(envelope)


@pytest.fixture
def pool() -> ImmediateDiskPool:
    return ImmediateDiskPool()


@pytest.fixture
def spool(tmp_path: Path, pool: ImmediateDiskPool) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", pool)  # type: ignore[arg-type]
    s.recover()
    yield s
    s.close()


def sink_for(spool: Spool, runner: Any) -> QueueSink:
    return QueueSink(spool, runner)


def test_provides_the_message_sink_interface(spool: Spool) -> None:
    """QueueSink provides IMessageSink."""
    assert verifyObject(IMessageSink, sink_for(spool, RecordingRunner()))


def test_queue_ids_come_from_the_spool(spool: Spool) -> None:
    """new_queue_id() hands out the spool's ids."""
    queue_id = sink_for(spool, RecordingRunner()).new_queue_id()
    assert len(queue_id) == 19 and queue_id.isalnum()


def test_submit_fires_after_the_commit_then_schedules(
    spool: Spool, pool: ImmediateDiskPool
) -> None:
    """submit() fires only once the commit is durable, and only then enqueues the envelope."""
    runner = RecordingRunner()
    sink = sink_for(spool, runner)
    pool.hold_syncs = True
    envelope = make_envelope(sink.new_queue_id())
    fired: list[object] = []
    sink.submit(envelope, b"message").addCallback(fired.append)
    assert fired == [] and runner.enqueued == []
    pool.release_syncs()
    assert fired == [None]
    assert runner.enqueued == [envelope]


def test_failed_commit_fails_submit_and_schedules_nothing(
    spool: Spool, pool: ImmediateDiskPool
) -> None:
    """If the commit fails, submit() fails (the server answers 451) and nothing is kept."""
    runner = RecordingRunner()
    pool.fail_syncs = OSError(5, "Input/output error")
    d = sink_for(spool, runner).submit(make_envelope(spool.new_queue_id()), b"message")
    assert isinstance(failure_of(d).value, OSError)
    assert runner.enqueued == [] and files(spool.queue_dir) == []


def test_scheduling_error_does_not_fail_a_committed_message(spool: Spool) -> None:
    """A committed message is acknowledged even if scheduling it fails (it is logged)."""
    sink = sink_for(spool, RecordingRunner(RuntimeError("bug")))
    envelope = make_envelope(spool.new_queue_id())
    with capturedLogs() as events:
        assert result_of(sink.submit(envelope, b"message")) is None
    assert any(e.get("queue_id") == envelope.queue_id and "log_failure" in e for e in events)
    assert files(spool.queue_dir) == [f"{envelope.queue_id}.env", f"{envelope.queue_id}.msg"]


def test_submit_does_not_wait_for_delivery(spool: Spool) -> None:
    """With a real runner, submit() fires while the delivery is still in flight."""
    clock = Clock()
    agent = FakeAgent(clock)
    agent.default = None
    runner = QueueRunner(spool, {TargetKind.LOCAL: agent}, clock)
    runner.startService()
    sink = sink_for(spool, runner)
    envelope = make_envelope(sink.new_queue_id(), local_recipient("alice@example.test"))
    assert result_of(sink.submit(envelope, b"message")) is None
    assert len(agent.waiting) == 1


def test_session_logs_queued_before_the_runner_logs_about_the_message(
    spool: Spool, pool: ImmediateDiskPool
) -> None:
    """Through a real session, sink and runner, the session's "queued" line is the first line
    about the message: the runner's lines (here: relay disabled) come after it."""
    pool.hold_syncs = True  # the commit completes later, as with the real disk threads
    clock = Clock()
    runner = QueueRunner(spool, {TargetKind.LOCAL: FakeAgent(clock)}, clock)
    runner.startService()
    driver = SessionDriver(make_factory(role=ListenerRole.SUBMISSIONS,
                                        policy=SubmissionPolicy(StaticRouter({"example.test"},
                                                                             {"alice"})),
                                        sink=sink_for(spool, runner), clock=clock,
                                        portal=memory_portal({"alice@example.test": "pw"})))
    driver.send(b"EHLO client.test\r\n")
    assert driver.codes(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwdw==\r\n") == [235]
    with capturedLogs() as events:
        codes = driver.codes(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.test>\r\n"
                             b"DATA\r\nSubject: s\r\n\r\nhi\r\n.\r\n")
        pool.release_syncs()
    assert codes == [250, 250, 354]
    assert driver.lines()[-1].startswith("250 2.0.0")
    about = [formatEvent(e) for e in events if e.get("queue_id")]
    assert about and about[0].endswith(" queued"), about
    assert any("Relay disabled" in line for line in about[1:]), about
