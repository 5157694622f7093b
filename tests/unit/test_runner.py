"""The queue runner: delivery rounds, retries on schedule, concurrency, holds and shutdown."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsys.envelope import Attempt, Envelope, RecipientStatus, TargetKind
from mailsys.interfaces import IDeliveryAgent
from mailsys.queue.runner import DEFAULT_RETRY_SCHEDULE, WITHOUT_AGENT, QueueRunner
from mailsys.queue.spool import Spool, encode_envelope
from mailsys.replies import Reply
from tests.unit.test_spool import (
    ImmediateDiskPool,
    files,
    local_recipient,
    make_envelope,
    relay_recipient,
    result_of,
)

START = 1_700_000_000.0
DELIVERED = RecipientStatus.DELIVERED
DEFERRED = RecipientStatus.DEFERRED
FAILED = RecipientStatus.FAILED
SCHEDULED = RecipientStatus.SCHEDULED


@dataclass
class Call:
    queue_id: str
    address: str
    message_path: Path
    recovered: bool
    result: Deferred[Attempt]


# The reply codes a FakeAgent answers with, by outcome.
CODES = {DELIVERED: 250, DEFERRED: 451, FAILED: 550, RecipientStatus.SCHEDULED: 451}


@implementer(IDeliveryAgent)
class FakeAgent:
    """A delivery agent that answers from a script per address (``default`` once it runs out).

    An outcome is a RecipientStatus, an exception to raise, or None to leave the call waiting
    (answered later through ``answer``).
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.script: dict[str, list[RecipientStatus | Exception | None]] = {}
        self.calls: list[Call] = []
        self.default: RecipientStatus | Exception | None = DELIVERED

    def deliver(
        self, envelope: Envelope, recipient: Any, message_path: Path, *, recovered: bool = False
    ) -> Deferred[Attempt]:
        outcomes = self.script.get(recipient.address, [])
        outcome = outcomes.pop(0) if outcomes else self.default
        d: Deferred[Attempt] = Deferred()
        self.calls.append(Call(envelope.queue_id, recipient.address, message_path, recovered, d))
        if isinstance(outcome, Exception):
            raise outcome
        if outcome is not None:
            self.answer(self.calls[-1], outcome)
        return d

    def answer(self, call: Call, status: RecipientStatus) -> None:
        call.result.callback(
            Attempt(at=self.clock.seconds(), status=status, host="fake",
                    reply=Reply(CODES[status], "", f"{status} reply"))
        )

    @property
    def waiting(self) -> list[Call]:
        return [c for c in self.calls if not c.result.called]


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", ImmediateDiskPool())  # type: ignore[arg-type]
    s.recover()
    yield s
    s.close()


@pytest.fixture
def agent(clock: Clock) -> FakeAgent:
    return FakeAgent(clock)


def make_runner(
    spool: Spool, clock: Clock, *agents: tuple[TargetKind, Any], start: bool = True, **kw: Any
) -> QueueRunner:
    runner = QueueRunner(spool, dict(agents), clock, **kw)
    if start:
        runner.startService()
    return runner


def commit(spool: Spool, *recipients: Any, queue_id: str | None = None) -> Envelope:
    envelope = make_envelope(queue_id or spool.new_queue_id(), *recipients, received_at=START)
    result_of(spool.commit(envelope, b"Subject: t\r\n\r\nbody\r\n"))
    return envelope


def on_disk(spool: Spool, queue_id: str) -> Envelope | None:
    try:
        return spool.load(queue_id)
    except FileNotFoundError:
        return None


def test_fake_agents_provide_the_interface(clock: Clock) -> None:
    """The test agents are held to IDeliveryAgent."""
    assert verifyObject(IDeliveryAgent, FakeAgent(clock))


def test_local_recipient_is_delivered_and_the_message_removed(
    spool: Spool, clock: Clock, agent: FakeAgent
) -> None:
    """An enqueued message goes to the agent at once; delivered, it leaves the spool."""
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    envelope = commit(spool, local_recipient("alice@example.test"))
    with capturedLogs() as events:
        runner.enqueue(envelope)
    assert [(c.queue_id, c.address, c.recovered) for c in agent.calls] == [
        (envelope.queue_id, "alice@example.test", False)
    ]
    assert agent.calls[0].message_path == spool.message_path(envelope.queue_id)
    assert files(spool.queue_dir) == []
    assert len(runner) == 0
    assert envelope.recipients[0].status is DELIVERED
    texts = [e["log_format"] for e in events]
    assert any("status={status}" in t and "mailbox={mailbox}" in t for t in texts)
    assert all(e.get("queue_id") == envelope.queue_id for e in events)


def test_deferred_recipient_is_retried_on_the_schedule(spool: Spool, clock: Clock) -> None:
    """A temporary failure is written to the envelope and retried after 1m, then 5m, ..."""
    agent = FakeAgent(clock)
    agent.script = {"alice@example.test": [DEFERRED, DEFERRED, DELIVERED]}
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    envelope = commit(spool, local_recipient("alice@example.test"))
    runner.enqueue(envelope)
    assert len(agent.calls) == 1
    stored = on_disk(spool, envelope.queue_id)
    assert stored is not None
    assert stored.recipients[0].status is DEFERRED
    assert stored.recipients[0].next_attempt == START + 60
    clock.advance(59)
    assert len(agent.calls) == 1
    clock.advance(1)
    assert len(agent.calls) == 2
    clock.advance(299)
    assert len(agent.calls) == 2
    clock.advance(1)
    assert len(agent.calls) == 3
    assert on_disk(spool, envelope.queue_id) is None
    assert clock.getDelayedCalls() == []


def test_retry_schedule_ends_with_every_two_hours(spool: Spool, clock: Clock) -> None:
    """The default schedule waits 1m, 5m, 15m, 30m, 1h, then 2h for every further retry."""
    agent = FakeAgent(clock)
    agent.default = DEFERRED
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    envelope = commit(spool, local_recipient("alice@example.test"))
    runner.enqueue(envelope)
    times = [clock.seconds()]
    for _ in range(7):
        (call,) = clock.getDelayedCalls()
        clock.advance(call.getTime() - clock.seconds())
        times.append(clock.seconds())
    assert [b - a for a, b in itertools.pairwise(times)] == [
        60, 300, 900, 1800, 3600, 7200, 7200
    ]
    assert len(agent.calls) == 8
    assert DEFAULT_RETRY_SCHEDULE == (60, 300, 900, 1800, 3600, 7200)


def test_retry_schedule_is_configurable(spool: Spool, clock: Clock) -> None:
    """A custom retry schedule is used instead of the default."""
    agent = FakeAgent(clock)
    agent.default = DEFERRED
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent), retry_schedule=(10, 20))
    runner.enqueue(commit(spool, local_recipient("alice@example.test")))
    for delay in (10, 20, 20):
        clock.advance(delay)
    assert len(agent.calls) == 4


def test_one_failed_and_one_delivered_is_finished(spool: Spool, clock: Clock) -> None:
    """A message leaves the spool when every recipient is final, failed ones included."""
    agent = FakeAgent(clock)
    agent.script = {"a@example.test": [FAILED], "b@example.test": [DELIVERED]}
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    envelope = commit(spool, local_recipient("a@example.test"), local_recipient("b@example.test"))
    runner.enqueue(envelope)
    assert on_disk(spool, envelope.queue_id) is None


def test_message_stays_until_the_last_recipient_is_final(spool: Spool, clock: Clock) -> None:
    """With one recipient delivered and one deferred, only the deferred one is tried again."""
    agent = FakeAgent(clock)
    agent.script = {"a@example.test": [DELIVERED], "b@example.test": [DEFERRED, FAILED]}
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    envelope = commit(spool, local_recipient("a@example.test"), local_recipient("b@example.test"))
    runner.enqueue(envelope)
    stored = on_disk(spool, envelope.queue_id)
    assert stored is not None
    assert [r.status for r in stored.recipients] == [DELIVERED, DEFERRED]
    clock.advance(60)
    assert [c.address for c in agent.calls] == [
        "a@example.test", "b@example.test", "b@example.test"
    ]
    assert on_disk(spool, envelope.queue_id) is None


def test_relay_without_agent_is_deferred_on_the_retry_schedule(
    spool: Spool, clock: Clock, agent: FakeAgent
) -> None:
    """A RELAY recipient without a relay agent is deferred (451 4.3.2 relay disabled) and checked
    again on the retry schedule, one timer at a time, never in a busy loop."""
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent), retry_schedule=(60, 300))
    envelope = commit(spool, local_recipient("a@example.test"), relay_recipient("x@remote.test"))
    with capturedLogs() as events:
        runner.enqueue(envelope)
    stored = on_disk(spool, envelope.queue_id)
    assert stored is not None
    assert [r.status for r in stored.recipients] == [DELIVERED, DEFERRED]
    waiting = stored.recipients[1]
    assert [a.reply for a in waiting.attempts] == [WITHOUT_AGENT[TargetKind.RELAY][0]]
    assert str(waiting.attempts[0].reply).startswith("451 4.3.2 Relay disabled")
    assert waiting.next_attempt == START + 60
    (line,) = [e for e in events if e.get("to") == "x@remote.test"]
    assert line["queue_id"] == envelope.queue_id and line["status"] is DEFERRED
    assert [c.getTime() for c in clock.getDelayedCalls()] == [START + 60]
    clock.advance(59)
    assert len(runner.envelopes()[0].recipients[1].attempts) == 1
    clock.advance(1)
    stored = on_disk(spool, envelope.queue_id)
    assert stored is not None and len(stored.recipients[1].attempts) == 2
    assert stored.recipients[1].next_attempt == START + 360
    assert [c.getTime() for c in clock.getDelayedCalls()] == [START + 360]
    assert [c.address for c in agent.calls] == ["a@example.test"]  # never handed to an agent


def test_relay_without_agent_fails_at_max_lifetime(
    spool: Spool, clock: Clock, agent: FakeAgent
) -> None:
    """At max_lifetime a recipient waiting for a relay agent fails with 5.4.7, saying that
    relaying is disabled, and the message leaves the queue; nothing stays scheduled."""
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent), retry_schedule=(60, 300),
                         max_lifetime=1000.0)
    envelope = commit(spool, relay_recipient("x@remote.test"))
    runner.enqueue(envelope)
    clock.advance(999)
    assert on_disk(spool, envelope.queue_id) is not None
    clock.advance(1)
    recipient = envelope.recipients[0]
    assert recipient.status is FAILED
    assert str(recipient.attempts[-1].reply) == (
        "554 5.4.7 Delivery time expired: relaying is disabled on this server")
    assert recipient.attempts[-1].at == START + 1000
    assert on_disk(spool, envelope.queue_id) is None and len(runner) == 0
    assert clock.getDelayedCalls() == []


def test_waiting_recipient_goes_out_at_once_when_relay_is_enabled(
    spool: Spool, clock: Clock, agent: FakeAgent
) -> None:
    """After a restart with a relay agent, a recipient that waited for one is tried at once,
    not at the next check the waiting scheduled."""
    first = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    envelope = commit(spool, relay_recipient("x@remote.test"))
    first.enqueue(envelope)
    assert result_of(first.stopService()) is None
    relay = FakeAgent(clock)
    second = make_runner(spool, clock, (TargetKind.LOCAL, agent), (TargetKind.RELAY, relay),
                         start=False)
    second.load(spool.recover())
    second.startService()
    clock.advance(0)
    assert [c.address for c in relay.calls] == ["x@remote.test"]
    assert on_disk(spool, envelope.queue_id) is None


def test_agent_raising_is_a_temporary_failure(spool: Spool, clock: Clock) -> None:
    """An agent that raises, fails its Deferred or answers nonsense defers the recipient."""
    agent = FakeAgent(clock)
    agent.script = {"a@example.test": [RuntimeError("boom"), DELIVERED]}
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    envelope = commit(spool, local_recipient("a@example.test"))
    runner.enqueue(envelope)
    stored = on_disk(spool, envelope.queue_id)
    assert stored is not None
    (attempt,) = stored.recipients[0].attempts
    assert attempt.status is DEFERRED and str(attempt.reply).startswith("451 4.3.0")
    clock.advance(60)
    assert on_disk(spool, envelope.queue_id) is None


@pytest.mark.parametrize("answer", [fail(RuntimeError("boom")), succeed("not an attempt")])
def test_agent_failing_its_deferred_is_a_temporary_failure(
    spool: Spool, clock: Clock, answer: Deferred[Any]
) -> None:
    """A failed Deferred or a non-Attempt answer defers the recipient and keeps the message."""
    answer.addErrback(lambda f: f)  # handed over below; silence "unhandled error" at collection

    @implementer(IDeliveryAgent)
    class Broken:
        def deliver(self, envelope: Envelope, recipient: Any, message_path: Path, *,
                    recovered: bool = False) -> Any:
            return answer

    runner = make_runner(spool, clock, (TargetKind.LOCAL, Broken()))
    envelope = commit(spool, local_recipient("a@example.test"))
    runner.enqueue(envelope)
    stored = on_disk(spool, envelope.queue_id)
    assert stored is not None and stored.recipients[0].status is DEFERRED


def test_max_concurrent_deliveries_in_flight(spool: Spool, clock: Clock, agent: FakeAgent) -> None:
    """No more than max_concurrent deliveries are in flight; the rest wait their turn in order."""
    agent.default = None
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent), max_concurrent=3)
    envelopes = [commit(spool, local_recipient(f"u{i}@example.test")) for i in range(10)]
    for envelope in envelopes:
        runner.enqueue(envelope)
    assert len(agent.calls) == 3 and runner.in_flight == 3
    while agent.waiting:
        agent.answer(agent.waiting[0], DELIVERED)
        assert runner.in_flight <= 3
    assert [c.queue_id for c in agent.calls] == [e.queue_id for e in envelopes]
    assert files(spool.queue_dir) == []


def test_held_message_is_not_delivered(spool: Spool, clock: Clock, agent: FakeAgent) -> None:
    """A held envelope stays in the spool untouched, whether enqueued or recovered."""
    held = make_envelope(spool.new_queue_id(), local_recipient("a@example.test"))
    held.held = True
    result_of(spool.commit(held, b"x"))
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent), start=False)
    runner.load([held])
    runner.startService()
    clock.advance(0)
    other = commit(spool, local_recipient("b@example.test"))
    other.held = True
    runner.enqueue(other)
    clock.advance(86400)
    assert agent.calls == []
    assert len(files(spool.queue_dir)) == 4


def test_recovered_messages_start_after_the_service_starts(
    spool: Spool, clock: Clock, agent: FakeAgent
) -> None:
    """Envelopes loaded at start-up are delivered once started, marked recovered for the agent."""
    envelope = commit(spool, local_recipient("a@example.test"))
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent), start=False)
    runner.load(spool.recover())
    clock.advance(3600)
    assert agent.calls == []
    runner.startService()
    assert agent.calls == []  # not inside startService: on the next reactor turn
    clock.advance(0)
    assert [(c.queue_id, c.recovered) for c in agent.calls] == [(envelope.queue_id, True)]
    assert files(spool.queue_dir) == []


def test_new_messages_are_handed_over_not_recovered(
    spool: Spool, clock: Clock, agent: FakeAgent
) -> None:
    """A message enqueued while running reaches its agent with recovered=False."""
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    envelope = commit(spool, local_recipient("a@example.test"))
    runner.enqueue(envelope)
    assert [(c.queue_id, c.recovered) for c in agent.calls] == [(envelope.queue_id, False)]
    assert files(spool.queue_dir) == []


def test_recovered_deferred_recipient_waits_for_its_time(
    spool: Spool, clock: Clock, agent: FakeAgent
) -> None:
    """A recovered recipient deferred until later is tried at its next_attempt, not before."""
    recipient = local_recipient("a@example.test")
    recipient.record(Attempt(START - 10, DEFERRED, "maildir", Reply(451, "", "")), START + 500)
    commit(spool, recipient)
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent), start=False)
    runner.load(spool.recover())
    runner.startService()
    clock.advance(499)
    assert agent.calls == []
    clock.advance(1)
    assert len(agent.calls) == 1


def test_one_timer_for_the_whole_queue(spool: Spool, clock: Clock, agent: FakeAgent) -> None:
    """However many messages wait for a retry, the runner keeps one timer, for the earliest."""
    agent.default = DEFERRED
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    for i in range(20):
        runner.enqueue(commit(spool, local_recipient(f"u{i}@example.test")))
        clock.advance(1)
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == START + 60


def test_finished_envelope_found_at_start_up_is_removed(
    spool: Spool, clock: Clock, agent: FakeAgent
) -> None:
    """A recovered envelope whose recipients are all final is removed without a delivery."""
    recipient = local_recipient("a@example.test")
    recipient.record(Attempt(START, DELIVERED, "maildir", Reply(250, "", "")))
    commit(spool, recipient)
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent), start=False)
    runner.load(spool.recover())
    runner.startService()
    clock.advance(0)
    assert agent.calls == [] and files(spool.queue_dir) == []


def test_stop_waits_for_deliveries_in_flight(spool: Spool, clock: Clock, agent: FakeAgent) -> None:
    """stopService fires only after the deliveries in flight and their envelope writes are done."""
    agent.default = None
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent), max_concurrent=1)
    first = commit(spool, local_recipient("a@example.test"))
    second = commit(spool, local_recipient("b@example.test"))
    runner.enqueue(first)
    runner.enqueue(second)
    stopped = runner.stopService()
    assert not stopped.called
    agent.answer(agent.calls[0], DEFERRED)
    assert stopped.called
    assert len(agent.calls) == 1  # the queued delivery was not started
    stored = on_disk(spool, first.queue_id)
    assert stored is not None and stored.recipients[0].status is DEFERRED
    assert on_disk(spool, second.queue_id) == second
    assert clock.getDelayedCalls() == []


def test_stop_with_nothing_in_flight_fires_at_once(spool: Spool, clock: Clock) -> None:
    """stopService of an idle runner fires immediately."""
    runner = make_runner(spool, clock, (TargetKind.LOCAL, FakeAgent(clock)))
    assert runner.stopService().called


def test_failed_envelope_update_keeps_the_attempt_in_memory(
    spool: Spool, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the envelope cannot be rewritten, the runner keeps going and retries on schedule."""
    agent = FakeAgent(clock)
    agent.script = {"a@example.test": [DEFERRED, DELIVERED]}
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    monkeypatch.setattr(spool, "update", lambda envelope: fail(OSError(28, "No space")))
    envelope = commit(spool, local_recipient("a@example.test"))
    runner.enqueue(envelope)
    assert envelope.recipients[0].status is DEFERRED
    clock.advance(60)
    assert len(agent.calls) == 2 and on_disk(spool, envelope.queue_id) is None


def test_message_deleted_from_the_spool_is_forgotten(
    spool: Spool, clock: Clock, agent: FakeAgent
) -> None:
    """If the envelope vanished from the spool during a round, the runner drops the message."""
    agent.default = None
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    envelope = commit(spool, local_recipient("a@example.test"))
    runner.enqueue(envelope)
    result_of(spool.remove(envelope.queue_id))
    agent.answer(agent.calls[0], DEFERRED)
    assert len(runner) == 0 and files(spool.queue_dir) == []
    assert clock.getDelayedCalls() == []


def test_enqueue_twice_delivers_once(spool: Spool, clock: Clock, agent: FakeAgent) -> None:
    """A second enqueue of the same message is ignored."""
    agent.default = None
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    envelope = commit(spool, local_recipient("a@example.test"))
    runner.enqueue(envelope)
    runner.enqueue(envelope)
    assert len(agent.calls) == 1


def test_synchronous_agents_do_not_recurse(spool: Spool, clock: Clock, agent: FakeAgent) -> None:
    """A long backlog answered synchronously is worked through in a loop, not a deep recursion."""
    agent.script = {"first@example.test": [None]}
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent), max_concurrent=1)
    runner.enqueue(commit(spool, local_recipient("first@example.test")))
    for i in range(1000):
        # Written by hand: a thousand fsync'd commits would make this test slow for nothing.
        envelope = make_envelope(f"R{i:05d}", local_recipient("a@example.test"))
        spool.envelope_path(envelope.queue_id).write_bytes(encode_envelope(envelope))
        spool.message_path(envelope.queue_id).write_bytes(b"x")
        runner.enqueue(envelope)
    assert len(agent.calls) == 1
    agent.answer(agent.calls[0], DELIVERED)
    assert len(agent.calls) == 1001 and files(spool.queue_dir) == []


def test_invalid_arguments_are_refused(spool: Spool, clock: Clock) -> None:
    """A zero concurrency limit or an empty retry schedule is refused at construction."""
    with pytest.raises(ValueError):
        QueueRunner(spool, {}, clock, max_concurrent=0)
    with pytest.raises(ValueError):
        QueueRunner(spool, {}, clock, retry_schedule=())


def test_stop_fires_even_when_the_envelope_write_fails(spool: Spool, clock: Clock) -> None:
    """Stopping while a delivery's envelope write fails still fires stopService."""
    agent = FakeAgent(clock)
    agent.default = None
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    envelope = commit(spool, local_recipient("a@example.test"))
    runner.enqueue(envelope)
    stopped = runner.stopService()
    spool.update = lambda envelope: fail(OSError(5, "EIO"))  # type: ignore[method-assign]
    agent.answer(agent.calls[0], DEFERRED)
    assert result_of(stopped) is None


class BrokenNotifier:
    """A notifier whose ``owes`` raises: a bug after the deliveries of a round."""

    def __init__(self) -> None:
        self.broken = True

    def notify(self, envelope: Envelope, message_path: Path) -> Deferred[bool]:
        return succeed(False)

    def owes(self, envelope: Envelope) -> bool:
        if self.broken:
            raise RuntimeError("bug")
        return False


def test_a_bug_at_the_end_of_a_round_does_not_leave_the_message_stuck(
    spool: Spool, clock: Clock
) -> None:
    """An exception after the deliveries ends the round all the same: stopService fires, the
    message is tried again on its schedule and its attempts reach the envelope."""
    agent = FakeAgent(clock)
    agent.script = {"a@example.test": [DEFERRED, DELIVERED]}
    runner = make_runner(spool, clock, (TargetKind.LOCAL, agent))
    notifier = BrokenNotifier()
    runner.notifier = notifier  # type: ignore[assignment]
    envelope = commit(spool, local_recipient("a@example.test"))
    with capturedLogs() as events:
        runner.enqueue(envelope)
    assert any("internal error at the end of a delivery round" in str(e.get("log_format"))
               for e in events)
    notifier.broken = False
    clock.advance(DEFAULT_RETRY_SCHEDULE[0])
    assert len(agent.calls) == 2 and on_disk(spool, envelope.queue_id) is None
    assert runner.stopService().called


@implementer(IDeliveryAgent)
class FullMailboxAgent:
    """A local agent whose recipient's mailbox stays over quota."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def deliver(self, envelope: Envelope, recipient: Any, message_path: Path, *,
                recovered: bool = False) -> Deferred[Attempt]:
        return succeed(Attempt(at=self.clock.seconds(), status=DEFERRED, host="maildir",
                               reply=Reply(452, "4.2.2", "Mailbox full, will retry")))


def test_mailbox_still_full_at_max_lifetime_fails_with_5_2_2(spool: Spool, clock: Clock) -> None:
    """A recipient deferred for a full mailbox until its message expires fails with 552 5.2.2
    (RFC 3463 X.2.2), not the generic 5.4.7."""
    runner = make_runner(spool, clock, (TargetKind.LOCAL, FullMailboxAgent(clock)),
                         retry_schedule=(60, 300), max_lifetime=1000.0)
    envelope = commit(spool, local_recipient("a@example.test"))
    runner.enqueue(envelope)
    clock.advance(1000)
    recipient = envelope.recipients[0]
    assert recipient.status is FAILED
    assert str(recipient.attempts[-1].reply) == "552 5.2.2 Mailbox full: delivery time expired"
