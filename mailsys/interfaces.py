"""The seams between parts of mailsys, as zope interfaces.

Only real seams are here: where the SMTP session hands a message over, where routing answers
"who receives this", and where the queue runner hands a recipient to a delivery agent. Fakes used
in tests are held to these with verifyObject.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRouter(Interface):
    """Resolves a recipient address to where it is delivered."""

    def is_local_domain(domain: str) -> bool:
        """True if mail for ``domain`` is ours (local or alias domain), case-insensitively."""

    def resolve(address: str) -> list[object]:
        """Expand ``address`` to a list of ``mailsys.routing.Destination``.

        Raises ``mailsys.routing.UnknownRecipient`` for an unknown user of a local domain.
        Addresses in other domains resolve to one RELAY destination.
        """


class IMessageSink(Interface):
    """Where an SMTP session hands an accepted message: the durable queue."""

    def new_queue_id() -> str:
        """A fresh, unique queue id (named in the Received header and in the 250 reply)."""

    def submit(envelope: object, message: bytes) -> object:
        """Make ``message`` and its ``mailsys.envelope.Envelope`` durable, then schedule it.

        Returns a Deferred that fires only after everything is fsync'd and committed; it fails if
        the message could not be stored, and then nothing of it remains.
        """


class ISpool(Interface):
    """The durable store of queued messages and their envelopes."""

    directory = Attribute("The spool directory (pathlib.Path).")

    def new_queue_id() -> str:
        """A fresh, unique, file-name-safe queue id."""

    def commit(envelope: object, message: bytes) -> object:
        """Deferred: write, fsync and atomically commit message + envelope."""

    def update(envelope: object) -> object:
        """Deferred: atomically rewrite the envelope of a committed message (after an attempt)."""

    def remove(queue_id: str) -> object:
        """Deferred: remove a finished message from the spool."""

    def message_path(queue_id: str) -> object:
        """The path of a committed message's bytes (pathlib.Path)."""

    def recover() -> object:
        """Blocking, at start-up: delete uncommitted leftovers, return committed Envelopes."""


class IDeliveryAgent(Interface):
    """Delivers one recipient of a queued message somewhere (a Maildir, a remote server)."""

    def deliver(envelope: object, recipient: object, message_path: object) -> object:
        """Deferred firing with a ``mailsys.envelope.Attempt`` describing the outcome."""
