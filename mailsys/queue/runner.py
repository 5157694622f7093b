"""The queue runner: decides when each open recipient of a spooled message is tried, and by whom.

It owns the in-memory view of the queue (every envelope in the spool), one timer for the earliest
due retry, and the limit on deliveries in flight. Delivery itself belongs to the agents (Maildir,
relay); durability belongs to the Spool, which the runner asks to rewrite or drop envelopes.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from mailsys.envelope import Attempt, Envelope, Recipient, RecipientStatus, TargetKind
from mailsys.interfaces import IDeliveryAgent
from mailsys.queue.spool import Spool

log = Logger(namespace="mailsys.queue.runner")

# Seconds to wait after the 1st, 2nd, ... temporary failure; the last value repeats.
DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)

REPLY_AGENT_ERROR = "451 4.3.0 Temporary local problem, will retry"


@dataclass(eq=False)
class _Entry:
    """One message in the runner's view of the queue."""

    envelope: Envelope
    # In the spool at start-up: an earlier process may have delivered some copies already.
    recovered: bool
    # A round is running: deliveries in flight or queued, or the spool write after them.
    busy: bool = False
    pending: int = 0  # deliveries of the current round not done yet
    attempted: int = 0  # deliveries of the current round that produced an Attempt
    due: float | None = None  # the heap entry of this time is the live one; others are stale
    waiting_logged: set[TargetKind] = field(default_factory=set)


class QueueRunner(Service):
    """Runs delivery rounds for spooled messages: now for new ones, on schedule for retries.

    Wiring: construct, call ``load(spool.recover())`` before the service starts, hand the runner
    to the QueueSink (which calls ``enqueue`` after each commit), and start it as a child service.
    """

    def __init__(
        self,
        spool: Spool,
        agents: Mapping[TargetKind, IDeliveryAgent],
        clock: IReactorTime,
        max_concurrent: int = 32,
        retry_schedule: Sequence[float] = DEFAULT_RETRY_SCHEDULE,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if not retry_schedule or min(retry_schedule) <= 0:
            raise ValueError("retry_schedule needs at least one positive delay")
        self._spool = spool
        self._clock = clock
        self._max_concurrent = max_concurrent
        self._retry_schedule = tuple(float(s) for s in retry_schedule)
        self._agents: dict[TargetKind, Callable[..., object]] = {
            kind: agent.deliver for kind, agent in agents.items()
        }
        self._recovery_aware = {
            kind: _accepts_recovered(deliver) for kind, deliver in self._agents.items()
        }
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._sequence = itertools.count()
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0
        self._jobs: deque[tuple[_Entry, Recipient]] = deque()
        self._in_flight = 0
        self._pumping = False
        self._active_rounds = 0
        self._idle_waiters: list[Deferred[None]] = []

    # -- what the rest of the system calls -----------------------------------------------------

    def load(self, envelopes: Iterable[Envelope]) -> None:
        """Take over the envelopes found by ``Spool.recover()`` at start-up (before starting).

        They are marked recovered, so the Maildir writer looks for copies written before the crash.
        """
        for envelope in envelopes:
            self._add(envelope, recovered=True)

    def enqueue(self, envelope: Envelope) -> None:
        """A message was just committed: try its open recipients now (when running)."""
        self._add(envelope, recovered=False)

    def envelope(self, queue_id: str) -> Envelope | None:
        """The live envelope of a queued message, or None (for status views)."""
        entry = self._entries.get(queue_id)
        return entry.envelope if entry is not None else None

    def __len__(self) -> int:
        """How many messages the runner holds (all of the spool it was told about)."""
        return len(self._entries)

    @property
    def in_flight(self) -> int:
        """Deliveries handed to agents and not yet answered."""
        return self._in_flight

    @override
    def startService(self) -> None:
        Service.startService(self)
        # Recovered messages were put on the heap by load(); a timer for "now" starts them on
        # the next reactor turn, after every other service has started.
        self._arm_timer()

    @override
    def stopService(self) -> Deferred[None]:
        """Stop starting deliveries; fire when those in flight and their spool writes are done.

        Deliveries not yet handed to an agent are simply not made: the spool still has them.
        """
        Service.stopService(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        dropped, self._jobs = list(self._jobs), deque()
        for entry, _recipient in dropped:
            self._delivery_done(entry)
        if self._active_rounds == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    # -- scheduling ----------------------------------------------------------------------------

    def _add(self, envelope: Envelope, recovered: bool) -> None:
        queue_id = envelope.queue_id
        if queue_id in self._entries:
            log.warn("{queue_id}: already queued, ignoring a second enqueue", queue_id=queue_id)
            return
        entry = self._entries[queue_id] = _Entry(envelope, recovered)
        if self.running:
            self._start_round(entry)
        else:
            self._schedule(entry)

    def _next_due(self, entry: _Entry) -> float | None:
        """When the entry next has a recipient to try, or None if it waits for nothing we do."""
        envelope = entry.envelope
        if envelope.held:
            return None
        if envelope.is_finished:
            return self._clock.seconds()  # due for removal
        due: float | None = None
        for recipient in envelope.recipients:
            if recipient.status.is_final or recipient.kind not in self._agents:
                continue
            at = recipient.next_attempt
            if at is None:
                return self._clock.seconds()
            due = at if due is None else min(due, at)
        return due

    def _schedule(self, entry: _Entry) -> None:
        """Put the entry on the heap at its next due time (one heap entry stays live)."""
        due = self._next_due(entry)
        entry.due = due
        if due is None:
            return
        heapq.heappush(self._heap, (due, next(self._sequence), entry.envelope.queue_id))
        self._arm_timer()

    def _arm_timer(self) -> None:
        """One timer, for the earliest time on the heap: no polling, however long the queue."""
        if not self.running or not self._heap:
            return
        due = self._heap[0][0]
        if self._timer is not None and self._timer.active():
            if self._timer_at <= due:
                return
            self._timer.cancel()
        self._timer_at = due
        self._timer = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        while self._heap and self._heap[0][0] <= now and self.running:
            due, _, queue_id = heapq.heappop(self._heap)
            entry = self._entries.get(queue_id)
            if entry is None or entry.busy or entry.due != due:
                continue  # stale: removed, running, or rescheduled since
            self._start_round(entry)
        self._arm_timer()

    # -- a delivery round ----------------------------------------------------------------------

    def _start_round(self, entry: _Entry) -> None:
        """Hand every due recipient of the entry to its agent; the round ends when all answered."""
        if entry.busy:
            return
        envelope = entry.envelope
        queue_id = envelope.queue_id
        entry.due = None
        if envelope.held:
            log.info("{queue_id}: held, not delivered", queue_id=queue_id)
            return
        if envelope.is_finished:
            # Only a hand-edited envelope gets here; finished messages leave the spool.
            entry.busy = True
            self._active_rounds += 1
            self._finish_round(entry)
            return
        now = self._clock.seconds()
        due: list[Recipient] = []
        for recipient in envelope.recipients:
            if recipient.status.is_final:
                continue
            if recipient.kind not in self._agents:
                if recipient.kind not in entry.waiting_logged:
                    entry.waiting_logged.add(recipient.kind)
                    log.info(
                        "{queue_id}: to=<{to}> waiting for {kind}: no delivery agent yet",
                        queue_id=queue_id,
                        to=recipient.address,
                        kind=recipient.kind,
                    )
                continue
            if recipient.next_attempt is None or recipient.next_attempt <= now:
                due.append(recipient)
        if not due:
            self._schedule(entry)
            return
        entry.busy = True
        entry.pending = len(due)
        entry.attempted = 0
        self._active_rounds += 1
        self._jobs.extend((entry, recipient) for recipient in due)
        self._pump()

    def _pump(self) -> None:
        """Start queued deliveries up to the limit.

        Agents may answer synchronously, re-entering here through their callbacks; the flag keeps
        that to one loop instead of a recursion as deep as the queue.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._jobs and self._in_flight < self._max_concurrent and self.running:
                entry, recipient = self._jobs.popleft()
                self._in_flight += 1
                self._dispatch(entry, recipient)
        finally:
            self._pumping = False

    def _dispatch(self, entry: _Entry, recipient: Recipient) -> None:
        envelope = entry.envelope
        deliver = self._agents[recipient.kind]
        path = self._spool.message_path(envelope.queue_id)
        if entry.recovered and self._recovery_aware[recipient.kind]:
            d = maybeDeferred(deliver, envelope, recipient, path, recovered=True)
        else:
            d = maybeDeferred(deliver, envelope, recipient, path)
        attempt = d.addCallback(_require_attempt).addErrback(
            self._agent_failed, envelope, recipient
        )
        attempt.addCallback(self._attempted, entry, recipient).addErrback(
            self._internal_error, entry, recipient
        )

    def _agent_failed(self, failure: Failure, envelope: Envelope, recipient: Recipient) -> Attempt:
        """An agent that raises has not delivered: a temporary failure, never a lost message."""
        log.failure(
            "{queue_id}: to=<{to}> delivery agent for {kind} failed",
            failure,
            queue_id=envelope.queue_id,
            to=recipient.address,
            kind=recipient.kind,
        )
        return Attempt(
            at=self._clock.seconds(),
            status=RecipientStatus.DEFERRED,
            host="",
            reply=REPLY_AGENT_ERROR,
        )

    def _attempted(self, attempt: Attempt, entry: _Entry, recipient: Recipient) -> None:
        try:
            next_attempt = None
            if not attempt.status.is_final:
                if attempt.status is not RecipientStatus.DEFERRED:
                    # An agent answering "scheduled" has not tried: for us that is a deferral.
                    attempt.status = RecipientStatus.DEFERRED
                next_attempt = self._clock.seconds() + self._retry_delay(recipient)
            recipient.record(attempt, next_attempt)
            entry.attempted += 1
            self._log_attempt(entry.envelope, recipient, attempt)
        finally:
            # Whatever went wrong above, the counts must stay right or stopService never fires.
            self._in_flight -= 1
            self._delivery_done(entry)
            self._pump()

    def _internal_error(self, failure: Failure, entry: _Entry, recipient: Recipient) -> None:
        log.failure(
            "{queue_id}: to=<{to}> internal error after delivery attempt",
            failure,
            queue_id=entry.envelope.queue_id,
            to=recipient.address,
        )

    def _retry_delay(self, recipient: Recipient) -> float:
        deferrals = sum(1 for a in recipient.attempts if a.status is RecipientStatus.DEFERRED)
        return self._retry_schedule[min(deferrals, len(self._retry_schedule) - 1)]

    def _delivery_done(self, entry: _Entry) -> None:
        entry.pending -= 1
        if entry.pending == 0:
            self._finish_round(entry)

    def _finish_round(self, entry: _Entry) -> None:
        """Every delivery of the round answered: drop the message if it is finished, else
        rewrite its envelope and schedule its next due recipient."""
        envelope = entry.envelope
        queue_id = envelope.queue_id
        if envelope.is_finished:
            d = maybeDeferred(self._spool.remove, queue_id)
            # No line for the removal: the delivery lines already say the message is done, and
            # even a filtered-out debug event costs a measurable share of the reactor's time.
            d.addErrback(
                lambda f: log.failure(
                    "{queue_id}: could not remove the finished message", f, queue_id=queue_id
                )
            )
            d.addBoth(lambda _: self._forget(entry))
            return
        if entry.attempted == 0:
            # Nothing happened (the service stopped before any delivery): nothing to write.
            self._round_done(entry)
            return
        d = maybeDeferred(self._spool.update, envelope)
        d.addCallbacks(lambda _: self._round_done(entry), lambda f: self._update_failed(f, entry))

    def _update_failed(self, failure: Failure, entry: _Entry) -> None:
        queue_id = entry.envelope.queue_id
        if isinstance(failure.value, FileNotFoundError):
            # The envelope left the spool under us (a queue tool deleted it): so does the entry.
            log.warn("{queue_id}: no longer in the spool, forgetting it", queue_id=queue_id)
            self._forget(entry)
            return
        # The attempts are still recorded in memory; the next round's update writes them.
        log.failure("{queue_id}: could not rewrite the envelope", failure, queue_id=queue_id)
        self._round_done(entry)

    def _forget(self, entry: _Entry) -> None:
        self._entries.pop(entry.envelope.queue_id, None)
        entry.busy = False
        self._round_ended()

    def _round_done(self, entry: _Entry) -> None:
        entry.busy = False
        self._schedule(entry)
        self._round_ended()

    def _round_ended(self) -> None:
        self._active_rounds -= 1
        if self._active_rounds == 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def _log_attempt(self, envelope: Envelope, recipient: Recipient, attempt: Attempt) -> None:
        fields: dict[str, Any] = {
            "queue_id": envelope.queue_id,
            "to": recipient.address,
            "status": attempt.status,
            "host": attempt.host,
            "reply": attempt.reply,
            "delay": round(attempt.at - envelope.received_at, 3),
            "kind": recipient.kind,
            "mailbox": recipient.mailbox,
        }
        where = "mailbox={mailbox}" if recipient.kind is TargetKind.LOCAL else "host={host}"
        text = "{queue_id}: to=<{to}> status={status} " + where + " delay={delay}s reply={reply}"
        if attempt.status is RecipientStatus.DEFERRED:
            fields["retry_at"] = recipient.next_attempt
            fields["retry_in"] = round((recipient.next_attempt or 0.0) - self._clock.seconds())
            log.warn(text + " retry_in={retry_in}s", **fields)
        elif attempt.status is RecipientStatus.FAILED:
            log.warn(text, **fields)
        else:
            log.info(text, **fields)


def _require_attempt(result: object) -> Attempt:
    if not isinstance(result, Attempt):
        raise TypeError(f"delivery agent returned {result!r}, not an Attempt")
    return result


def _accepts_recovered(deliver: Callable[..., object]) -> bool:
    """Whether an agent's deliver() takes ``recovered=``; IDeliveryAgent does not require it."""
    try:
        parameters = inspect.signature(deliver).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.name == "recovered" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )
