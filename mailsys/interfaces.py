"""The seams between parts of mailsys, as zope interfaces.

Only real seams are here: where the SMTP session hands a message over, where routing answers
"who receives this", where the queue keeps messages, and where the queue runner hands a recipient
to a delivery agent. They are typed with the plain values of mailsys.envelope, so implementations
are checked against them as they are; fakes used in tests are held to them with verifyObject.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from mailsys.envelope import Attempt, Destination, Envelope, Recipient
from mailsys.replies import Reply


class IRouter(Interface):
    """Resolves a recipient address to where it is delivered."""

    def is_local_domain(domain: str) -> bool:
        """True if mail for ``domain`` is ours (local or alias domain), case-insensitively."""

    def resolve(address: str) -> list[Destination]:
        """Expand ``address`` to its destinations.

        Raises ``mailsys.routing.UnknownRecipient`` for an unknown user of a local domain.
        Addresses in other domains resolve to one RELAY destination.
        """


class IMessageSink(Interface):
    """Where an SMTP session hands an accepted message: the durable queue."""

    def new_queue_id() -> str:
        """A fresh, unique queue id (named in the Received header and in the 250 reply)."""

    def submit(envelope: Envelope, message: bytes) -> Deferred[None]:
        """Make ``message`` and its envelope durable, then schedule it.

        Returns a Deferred that fires only after everything is fsync'd and committed; it fails if
        the message could not be stored, and then nothing of it remains. It fails with
        MessageRefusedError when a check on the way (mail authentication) refuses the message.
        """


class MessageRefusedError(Exception):
    """A sink's verdict on a message, not a storage failure: the session answers ``reply``
    (5xx refused, 4xx try again later), and nothing of the message is kept."""

    def __init__(self, reply: Reply, reason: str = "") -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.reason = reason


class ISpool(Interface):
    """The durable store of queued messages and their envelopes."""

    directory = Attribute("The spool directory (pathlib.Path).")

    def new_queue_id() -> str:
        """A fresh, unique, file-name-safe queue id."""

    def commit(envelope: Envelope, message: bytes) -> Deferred[None]:
        """Write, fsync and atomically commit message + envelope."""

    def update(envelope: Envelope) -> Deferred[None]:
        """Atomically rewrite the envelope of a committed message (after an attempt)."""

    def remove(queue_id: str) -> Deferred[None]:
        """Remove a finished message from the spool."""

    def message_path(queue_id: str) -> Path:
        """The path of a committed message's bytes."""

    def recover() -> list[Envelope]:
        """Blocking, at start-up: delete uncommitted leftovers, return committed Envelopes."""


class IDeliveryAgent(Interface):
    """Delivers one recipient of a queued message somewhere (a Maildir, a remote server)."""

    def deliver(
        envelope: Envelope, recipient: Recipient, message_path: Path, *, recovered: bool = False
    ) -> Deferred[Attempt]:
        """Fire with the Attempt describing the outcome; never fail (problems are DEFERRED).

        ``recovered`` says the message was in the spool when the service started: an earlier
        process may have delivered this copy already (the Maildir writer then looks for it
        before writing; an agent that cannot know ignores it).
        """
