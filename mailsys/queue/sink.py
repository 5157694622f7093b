"""Where an SMTP session hands over an accepted message: commit to the spool, then schedule it.

The sink is the only bridge between intake and the queue; the SMTP server sees IMessageSink only.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailsys.envelope import Envelope
from mailsys.interfaces import IMessageSink
from mailsys.queue.runner import QueueRunner
from mailsys.queue.spool import Spool

log = Logger(namespace="mailsys.queue.sink")


@implementer(IMessageSink)
class QueueSink:
    """Commits each message durably, then hands its envelope to the runner for delivery."""

    def __init__(self, spool: Spool, runner: QueueRunner) -> None:
        self._spool = spool
        self._runner = runner

    def new_queue_id(self) -> str:
        return self._spool.new_queue_id()

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
        """Fire once the message is committed (fsync'd); delivery is not awaited.

        Fails only if the commit failed, and then nothing of the message remains.
        """
        committed: Deferred[None] = Deferred()
        d = self._spool.commit(envelope, message)
        d.addCallbacks(self._committed, committed.errback, callbackArgs=(envelope, committed))
        return committed

    def _committed(self, _: None, envelope: Envelope, committed: Deferred[None]) -> None:
        # The caller's callbacks first (the session logs "queued" and answers 250), then the
        # runner, whose first lines about the message must follow the one saying it arrived.
        committed.callback(None)
        try:
            self._runner.enqueue(envelope)
        except Exception:
            # The message is durable and will be delivered after the next start-up; failing here
            # would make the client send it again, a duplicate.
            log.failure("{queue_id}: could not schedule the committed message",
                        queue_id=envelope.queue_id)
