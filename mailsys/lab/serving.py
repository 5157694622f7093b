"""The lab's pieces inside a lab server, built from ``[lab]`` by mailsys.service: the hurried
queue clock (mailsys.lab.clock) and the fault policy in front of the SMTP listeners
(mailsys.lab.faults). Outside a lab ``[lab]`` names no file and nothing here is built: the queue
keeps the reactor's clock and the listeners their own policies.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import IServiceCollection
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mailsys.config import Config
from mailsys.diskio import DiskRunner
from mailsys.envelope import Envelope
from mailsys.interfaces import IMessageSink
from mailsys.lab.clock import CLOCK_POLL_INTERVAL, ClockFollower, HurriedClock
from mailsys.lab.faults import FAULT_POLL_INTERVAL, FaultFollower, FaultPolicy
from mailsys.smtp.policy import Policy


class LabServing:
    """What ``[lab]`` asks of one server; inert when it asks nothing."""

    def __init__(self, config: Config, reactor: Any, disk: DiskRunner) -> None:
        self._reactor = reactor
        lab = config.lab
        self._clock = (ClockFollower(HurriedClock(reactor), lab.clock, disk)
                       if lab.clock is not None else None)
        self._faults = FaultFollower(lab.faults, disk) if lab.faults is not None else None

    @property
    def queue_clock(self) -> IReactorTime:
        """The queue's clock: hurried in a lab, else the reactor."""
        if self._clock is None:
            clock: IReactorTime = self._reactor
            return clock
        return self._clock.clock

    def sink(self, sink: IMessageSink) -> IMessageSink:
        """``sink`` with arrival times put on the queue's clock, when it is hurried."""
        if self._clock is None:
            return sink
        return QueueTimeSink(sink, self._clock.clock)

    def policy(self, policy: Policy, *, inbound: bool) -> Policy:
        """``policy`` with the lab's faults in front, when the server has a fault file."""
        if self._faults is None:
            return policy
        return FaultPolicy(policy, self._faults, self._reactor, inbound=inbound)

    def add_services(self, parent: IServiceCollection) -> None:
        """The timers that read the lab's files each second, in disk threads."""
        if self._clock is not None:
            TimerService(CLOCK_POLL_INTERVAL, self._clock.refresh).setServiceParent(parent)
        if self._faults is not None:
            TimerService(FAULT_POLL_INTERVAL, self._faults.refresh).setServiceParent(parent)


@implementer(IMessageSink)
class QueueTimeSink:
    """Puts a message's arrival time on the hurried clock before it is queued.

    Intake stamps ``received_at`` with the real clock; the queue measures age (the delay notice,
    max_lifetime) on its own. Without this, a message arriving after `lab clock advance 1d`
    would look a day old and expire at once. Notices the queue makes itself are stamped with
    its clock already: a time nearer the queue's now than the real now is left alone.
    """

    def __init__(self, inner: IMessageSink, clock: HurriedClock) -> None:
        self._inner = inner
        self._clock = clock

    def new_queue_id(self) -> str:
        queue_id: str = self._inner.new_queue_id()
        return queue_id

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
        real, queue = self._clock.real.seconds(), self._clock.seconds()
        if abs(envelope.received_at - real) < abs(envelope.received_at - queue):
            envelope.received_at += queue - real
        return self._inner.submit(envelope, message)
