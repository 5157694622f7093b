"""The queue runner: decides when each open recipient of a spooled message is tried, and by whom.

It owns the in-memory view of the queue (every envelope in the spool), one timer for the earliest
due retry, and the limit on deliveries in flight. Delivery itself belongs to the agents (Maildir,
relay); durability belongs to the Spool, which the runner asks to rewrite or drop envelopes.
A recipient whose kind has no agent (relay disabled) is deferred by the runner itself at each of
its retry times, so that it ages like any deferred one: delay notice, then a bounce at expiry.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from mailsys.envelope import Attempt, Envelope, Recipient, RecipientStatus, TargetKind
from mailsys.interfaces import IDeliveryAgent
from mailsys.journey.events import NULL_RECORDER
from mailsys.journey.interfaces import IJourneyRecorder
from mailsys.queue.spool import Spool
from mailsys.replies import MAILBOX_FULL, MAILBOX_FULL_EXPIRED, Reply

log = Logger(namespace="mailsys.queue.runner")

# Seconds to wait after the 1st, 2nd, ... temporary failure; the last value repeats.
DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)

REPLY_AGENT_ERROR = Reply(451, "4.3.0", "Temporary local problem, will retry")
# RFC 5321 §4.5.4.1: give up after the maximum lifetime; RFC 3463 X.4.7 delivery time expired.
EXPIRED = Reply(554, "5.4.7", "Delivery time expired")
# After a notice (a bounce) could not be queued, the finished message waits this long to retry.
NOTICE_RETRY = 60.0
# A recipient whose kind has no delivery agent (relay disabled) waits as a temporary failure,
# RFC 3463 X.3.2 (system not accepting network messages), as Postfix defers a transport it does
# not run; at the end of its lifetime it fails with X.4.7, the reason kept in the text.
WITHOUT_AGENT: dict[TargetKind, tuple[Reply, Reply]] = {
    TargetKind.RELAY: (
        Reply(451, "4.3.2", "Relay disabled: this server does not send mail to other domains"),
        Reply(554, "5.4.7", "Delivery time expired: relaying is disabled on this server"),
    ),
    TargetKind.LOCAL: (
        Reply(451, "4.3.2", "Local delivery disabled on this server"),
        Reply(554, "5.4.7", "Delivery time expired: local delivery is disabled on this server"),
    ),
}


class Notifier(TypingProtocol):
    """Sends delivery status notifications at the end of each round (mailsys.queue.dsn)."""

    def notify(self, envelope: Envelope, message_path: Path) -> Deferred[bool]:
        """Queue the notices now due (bounces, delay and success notices), marking each
        recipient's ``notices``; fire True if the envelope changed. Never fails."""

    def owes(self, envelope: Envelope) -> bool:
        """True if a notice is due that could not be queued yet (retry before removal)."""


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
    dirty: bool = False  # changed by a queue tool during the round: write it at the end
    delete_requested: bool = False  # a queue tool deleted it during the round
    notice_retry_at: float | None = None  # finished, but a notice could not be queued yet


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
        max_lifetime: float | None = None,
        journey: IJourneyRecorder = NULL_RECORDER,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if not retry_schedule or min(retry_schedule) <= 0:
            raise ValueError("retry_schedule needs at least one positive delay")
        self._spool = spool
        self._clock = clock
        self._journey = journey
        self._max_concurrent = max_concurrent
        self._retry_schedule = tuple(float(s) for s in retry_schedule)
        self._max_lifetime = max_lifetime
        # Set after construction (the notifier submits through the sink, which needs us).
        self.notifier: Notifier | None = None
        # Told of every recorded attempt (metrics); must not raise or change anything.
        self.observer: Callable[[Envelope, Recipient, Attempt], None] | None = None
        self._agents: dict[TargetKind, IDeliveryAgent] = dict(agents)
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

    def reschedule(self, retry_schedule: Sequence[float], max_lifetime: float | None) -> None:
        """Use a new retry schedule and lifetime from the next attempt on (a reload); an attempt
        already scheduled keeps its time."""
        if not retry_schedule or min(retry_schedule) <= 0:
            raise ValueError("retry_schedule needs at least one positive delay")
        self._retry_schedule = tuple(float(s) for s in retry_schedule)
        self._max_lifetime = max_lifetime

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
        for recipient in envelope.open_recipients():
            if recipient.kind in self._agents and _waited_for_agent(recipient):
                # Written while that kind had no agent (relay was disabled): it has one now.
                recipient.next_attempt = None
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
            # Due for removal, or for another try at a notice that could not be queued.
            return entry.notice_retry_at or self._clock.seconds()
        due: float | None = None
        for recipient in envelope.recipients:
            if recipient.status.is_final:
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
        agent = self._agents.get(recipient.kind)
        path = self._spool.message_path(envelope.queue_id)
        if agent is None:
            # No agent for this kind (relay disabled): the check is the attempt. It goes through
            # the same path as a delivery, so the retry schedule, the lifetime and the notices
            # are those of any deferred recipient.
            waiting = WITHOUT_AGENT[recipient.kind][0]
            d: Deferred[Any] = succeed(Attempt(at=self._clock.seconds(),
                                               status=RecipientStatus.DEFERRED,
                                               host="", reply=waiting))
        else:
            d = maybeDeferred(agent.deliver, envelope, recipient, path,
                              recovered=entry.recovered)
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
                now = self._clock.seconds()
                next_attempt = now + self._retry_delay(recipient)
                if self._max_lifetime is not None:
                    expires = entry.envelope.received_at + self._max_lifetime
                    if now >= expires:
                        # RFC 5321 §4.5.4.1: the message has been tried long enough.
                        recipient.record(attempt)
                        expired = (EXPIRED if recipient.kind in self._agents
                                   else WITHOUT_AGENT[recipient.kind][1])
                        if attempt.reply.enhanced == MAILBOX_FULL.enhanced:
                            # RFC 3463 X.2.2: still over quota, now for good.
                            expired = MAILBOX_FULL_EXPIRED
                        attempt = Attempt(at=now, status=RecipientStatus.FAILED,
                                          host=attempt.host, reply=expired)
                        next_attempt = None
                    else:
                        # The last try is at the expiry time, not a whole delay after it.
                        next_attempt = min(next_attempt, expires)
            recipient.record(attempt, next_attempt)
            entry.attempted += 1
            self._log_attempt(entry.envelope, recipient, attempt)
            if self.observer is not None:
                self.observer(entry.envelope, recipient, attempt)
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
        """Every delivery of the round answered: send the notices due, then drop the message if
        it is finished, else rewrite its envelope and schedule its next due recipient.

        Notices come first: a bounce quotes the message, whose files are recycled on removal,
        and it must be queued (fsync'd) before the envelope says it was sent.
        """
        envelope = entry.envelope
        queue_id = envelope.queue_id
        if entry.delete_requested:
            self._remove(entry)
            return
        notifier = self.notifier
        if notifier is None:
            d: Deferred[Any] = maybeDeferred(self._after_notices, False, entry)
        else:
            d = maybeDeferred(notifier.notify, envelope, self._spool.message_path(queue_id))
            d.addErrback(self._notices_failed, queue_id)
            d.addCallback(self._after_notices, entry)
        d.addErrback(self._round_failed, entry)

    def _notices_failed(self, failure: Failure, queue_id: str) -> bool:
        log.failure("{queue_id}: notices failed", failure, queue_id=queue_id)
        return False

    def _after_notices(self, changed: object, entry: _Entry) -> None:
        envelope = entry.envelope
        queue_id = envelope.queue_id
        if changed:
            entry.dirty = True
        owed = self.notifier is not None and self.notifier.owes(envelope)
        entry.notice_retry_at = self._clock.seconds() + NOTICE_RETRY if owed else None
        if envelope.is_finished and not owed:
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
        if entry.attempted == 0 and not entry.dirty:
            # Nothing happened (the service stopped before any delivery): nothing to write.
            self._round_done(entry)
            return
        entry.dirty = False
        d = maybeDeferred(self._spool.update, envelope)
        d.addCallbacks(lambda _: self._round_done(entry), lambda f: self._update_failed(f, entry))
        d.addErrback(self._round_failed, entry)

    def _remove(self, entry: _Entry) -> None:
        """A queue tool's delete, done at the end of the round it waited for."""
        queue_id = entry.envelope.queue_id
        log.info("{queue_id}: deleted by a queue tool", queue_id=queue_id)
        d = maybeDeferred(self._spool.remove, queue_id)
        d.addErrback(lambda f: log.failure("{queue_id}: could not delete", f, queue_id=queue_id))
        d.addBoth(lambda _: self._forget(entry))

    # -- queue tools (mailsys.queue.control) ---------------------------------------------------

    def hold(self, queue_id: str) -> Deferred[bool]:
        """Deliver nothing of the message until released; False if it is not queued."""
        return self._set_held(queue_id, True)

    def release(self, queue_id: str) -> Deferred[bool]:
        """Undo hold: the message is tried again on its schedule; False if it is not queued."""
        return self._set_held(queue_id, False)

    def _set_held(self, queue_id: str, held: bool) -> Deferred[bool]:
        entry = self._entries.get(queue_id)
        if entry is None or entry.delete_requested:
            return succeed(False)
        entry.envelope.held = held
        if entry.busy:
            entry.dirty = True  # the end of the round writes it, and schedules
            return succeed(True)
        d = maybeDeferred(self._spool.update, entry.envelope)

        def written(_: object) -> bool:
            self._schedule(entry)
            return True

        return d.addCallback(written)

    def flush(self, queue_id: str | None = None) -> int:
        """Make the open recipients of one message (or all) due now; how many messages."""
        if queue_id is not None:
            entry = self._entries.get(queue_id)
            entries = [entry] if entry is not None else []
        else:
            entries = list(self._entries.values())
        count = 0
        for entry in entries:
            if entry.envelope.held or entry.delete_requested:
                continue
            for recipient in entry.envelope.open_recipients():
                recipient.next_attempt = None
            entry.notice_retry_at = None
            count += 1
            if not entry.busy:
                self._schedule(entry)
        return count

    def delete(self, queue_id: str) -> Deferred[bool]:
        """Remove a message without delivering or bouncing it; False if it is not queued."""
        entry = self._entries.get(queue_id)
        if entry is None or entry.delete_requested:
            return succeed(False)
        entry.delete_requested = True
        entry.due = None
        if entry.busy:
            return succeed(True)  # removed when the deliveries in flight have answered
        self._entries.pop(queue_id, None)
        d = maybeDeferred(self._spool.remove, queue_id)
        log.info("{queue_id}: deleted by a queue tool", queue_id=queue_id)
        return d.addCallback(lambda _: True)

    def envelopes(self) -> list[Envelope]:
        """Every queued envelope (a snapshot list of the live objects), oldest first."""
        return sorted((e.envelope for e in self._entries.values()),
                      key=lambda e: (e.received_at, e.queue_id))

    def _update_failed(self, failure: Failure, entry: _Entry) -> None:
        queue_id = entry.envelope.queue_id
        if isinstance(failure.value, FileNotFoundError):
            # The envelope left the spool under us (a queue tool deleted it): so does the entry.
            log.warn("{queue_id}: no longer in the spool, forgetting it", queue_id=queue_id)
            self._forget(entry)
            return
        # The attempts are still recorded in memory; the next round's update writes them.
        error = failure.value
        if isinstance(error, OSError):
            # A storage error (a full spool, most likely): one line, no traceback.
            log.error("{queue_id}: could not rewrite the envelope: {path}: [Errno {errno}] "
                      "{error}", queue_id=queue_id, path=str(error.filename or ""),
                      errno=error.errno, error=error.strerror)
        else:
            log.failure("{queue_id}: could not rewrite the envelope", failure,
                        queue_id=queue_id)
        self._round_done(entry)

    def _forget(self, entry: _Entry) -> None:
        self._entries.pop(entry.envelope.queue_id, None)
        entry.busy = False
        self._round_ended()

    def _round_done(self, entry: _Entry) -> None:
        if entry.delete_requested:
            # A queue tool's delete arrived while the round's notices or envelope rewrite were
            # under way, after _finish_round looked: it is done now, not lost.
            self._remove(entry)
            return
        entry.busy = False
        try:
            self._schedule(entry)
        finally:
            self._round_ended()

    def _round_failed(self, failure: Failure, entry: _Entry) -> None:
        """A bug between the deliveries and the end of a round: end the round all the same, so
        that the message is tried again and stopService still fires, instead of staying busy
        until a restart."""
        log.failure("{queue_id}: internal error at the end of a delivery round",
                    failure, queue_id=entry.envelope.queue_id)
        if not entry.busy:
            return  # _round_done or _forget ended the round before the error
        entry.busy = False
        entry.dirty = True  # the attempts may be in memory only: the next round writes them
        try:
            self._schedule(entry)
        except Exception:
            log.failure("{queue_id}: could not schedule the next round",
                        queue_id=entry.envelope.queue_id)
        finally:
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
            "reply": str(attempt.reply),
            "delay": round(attempt.at - envelope.received_at, 3),
            "kind": recipient.kind,
            "mailbox": recipient.mailbox,
            "tls": attempt.tls or "none",
        }
        # A local delivery is its Maildir writer's step (with folder and file): only local
        # attempts that did not deliver are the runner's to record.
        if (recipient.kind is not TargetKind.LOCAL
                or attempt.status is not RecipientStatus.DELIVERED):
            self._record_attempt(envelope, recipient, attempt)
        where = ("mailbox={mailbox}" if recipient.kind is TargetKind.LOCAL
                 else "host={host} tls={tls}")
        text = "{queue_id}: to=<{to}> status={status} " + where + " delay={delay}s reply={reply}"
        if attempt.status is RecipientStatus.DEFERRED:
            fields["retry_at"] = recipient.next_attempt
            fields["retry_in"] = round((recipient.next_attempt or 0.0) - self._clock.seconds())
            log.warn(text + " retry_in={retry_in}s", **fields)
        elif attempt.status is RecipientStatus.FAILED:
            log.warn(text, **fields)
        else:
            log.info(text, **fields)

    def _record_attempt(self, envelope: Envelope, recipient: Recipient, attempt: Attempt) -> None:
        self._journey.emit(
            "delivery.attempt", envelope.queue_id, recipient=recipient.address,
            agent=recipient.kind.value, status=attempt.status.value, host=attempt.host,
            reply=str(attempt.reply), tls=attempt.tls,
            next_attempt=recipient.next_attempt if attempt.status is RecipientStatus.DEFERRED
            else None)


def _waited_for_agent(recipient: Recipient) -> bool:
    """Whether the recipient's last attempt was a wait for a missing delivery agent."""
    if not recipient.attempts:
        return False
    waiting = WITHOUT_AGENT.get(recipient.kind)
    return waiting is not None and recipient.attempts[-1].reply == waiting[0]


def _require_attempt(result: object) -> Attempt:
    if not isinstance(result, Attempt):
        raise TypeError(f"delivery agent returned {result!r}, not an Attempt")
    return result

