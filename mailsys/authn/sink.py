"""Mail authentication as a link in the chain from SMTP intake to the queue: a message sink that
signs each message before handing it to the durable one. Used for the submission listeners and
for the server's own notices (bounces, delay warnings), so the signature covers exactly the
bytes that are stored and relayed."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailsys.authn.intake import MessageAuthentication
from mailsys.envelope import Envelope
from mailsys.interfaces import IMessageSink


@implementer(IMessageSink)
class SigningSink:
    """Signs (DKIM, with the keys of the From domain) and passes on to ``inner``."""

    def __init__(self, inner: IMessageSink, authentication: MessageAuthentication) -> None:
        self._inner = inner
        self._authentication = authentication

    def new_queue_id(self) -> str:
        queue_id: str = self._inner.new_queue_id()
        return queue_id

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[object]:  # type: ignore[override]
        """Fires when ``inner`` has stored the signed message; signing trouble never stops it
        (the message then goes unsigned, and the log says why)."""

        def store(signed: bytes) -> object:
            envelope.size = len(signed)
            return self._inner.submit(envelope, signed)

        return self._authentication.sign(message, envelope.queue_id).addCallback(store)
