"""Mail authentication as a link in the chain from SMTP intake to the queue: message sinks in
front of the durable one. SigningSink signs (submission listeners, and the server's own notices:
bounces, delay warnings), so the signature covers exactly the bytes stored and relayed;
CheckingSink checks what arrives on the inbound listeners and refuses, marks for Junk or
passes on, with the Authentication-Results field on top. Both record what they did, with its
evidence, as journey steps of the message (``authn.*``, mailsys.journey.steps)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailsys.authn.intake import IntakeFacts, IntakeVerdict, MessageAuthentication, Signing
from mailsys.envelope import Envelope
from mailsys.interfaces import IMessageSink, MessageRefusedError
from mailsys.journey.events import NULL_RECORDER, NullRecorder
from mailsys.journey.interfaces import IJourneyRecorder

log = Logger(namespace="mailsys.authn")


@implementer(IMessageSink)
class SigningSink:
    """Signs (DKIM, with the keys of the From domain) and passes on to ``inner``."""

    def __init__(self, inner: IMessageSink, authentication: MessageAuthentication,
                 journey: IJourneyRecorder = NULL_RECORDER) -> None:
        self._inner = inner
        self._authentication = authentication
        self._journey = journey

    def new_queue_id(self) -> str:
        queue_id: str = self._inner.new_queue_id()
        return queue_id

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
        """Fires when ``inner`` has stored the signed message; signing trouble never stops it
        (the message then goes unsigned, and the log says why)."""
        if self._authentication.signer is None:
            # Signing off: nothing to sign or to record, and no step on the way to the spool.
            envelope.size = len(message)
            return self._inner.submit(envelope, message)

        def store(signing: Signing) -> Deferred[None]:
            if self._authentication.signer is not None:  # with signing off, nothing to say
                self._journey.emit("authn.sign", envelope.queue_id, **signing.step())
            envelope.size = len(signing.message)
            return self._inner.submit(envelope, signing.message)

        return self._authentication.signing(message, envelope.queue_id).addCallback(store)


@implementer(IMessageSink)
class CheckingSink:
    """For the inbound listeners: the checks, the Authentication-Results field, the verdict.

    Refused or deferred mail fails with MessageRefusedError (nothing is stored); junk marks the
    copies of the recipients concerned for their Junk folder; every stored message keeps the
    evidence on its envelope and in its journey.
    """

    def __init__(self, inner: IMessageSink, authentication: MessageAuthentication,
                 journey: IJourneyRecorder = NULL_RECORDER) -> None:
        self._inner = inner
        self._authentication = authentication
        self._journey = journey

    def new_queue_id(self) -> str:
        queue_id: str = self._inner.new_queue_id()
        return queue_id

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
        unchecked = self._authentication.unchecked(message)
        if unchecked is not None:
            # Checks off: only forged fields of ours were removed; nothing to record, and no
            # step of its own on the way to the spool (every message from a client takes it).
            envelope.size = len(unchecked)
            return self._inner.submit(envelope, unchecked)
        facts = IntakeFacts(
            client_address=envelope.client_address,
            helo=envelope.client_helo,
            sender=envelope.sender,
            # Policy follows the domain the client addressed, before alias expansion.
            recipients=list(dict.fromkeys(r.original for r in envelope.recipients)),
            queue_id=envelope.queue_id,
        )

        def decided(verdict: IntakeVerdict) -> Deferred[None]:
            if verdict.report is None and verdict.action == "accept":
                # Checks off: only forged fields of ours were removed; nothing to record.
                envelope.size = len(verdict.message)
                return self._inner.submit(envelope, verdict.message)
            log.info("{queue_id}: authentication {summary}: {action}{reason}",
                     queue_id=envelope.queue_id,
                     summary=verdict.report.summary() if verdict.report else "none",
                     action=verdict.action,
                     reason=f" ({verdict.reason})" if verdict.reason else "")
            self._record(envelope.queue_id, verdict)
            if verdict.action in ("reject", "defer"):
                assert verdict.reply is not None
                raise MessageRefusedError(verdict.reply, verdict.reason)
            junk = set(verdict.junk)
            for recipient in envelope.recipients:
                if recipient.original in junk:
                    recipient.folder = "Junk"
            envelope.authentication = verdict.evidence()
            envelope.size = len(verdict.message)
            return self._inner.submit(envelope, verdict.message)

        return self._authentication.inbound(facts, message).addCallback(decided)

    def _record(self, queue_id: str, verdict: IntakeVerdict) -> None:
        """The journey: each check with its evidence, then the verdict (also for a refused
        message, whose queue id then names only these steps and the refusal)."""
        journey = self._journey
        if isinstance(journey, NullRecorder):  # recording off: build no fields for nothing
            return
        report = verdict.report
        if report is not None:
            for kind, fields in report.steps():
                journey.emit(kind, queue_id, **fields)
        journey.emit("authn.verdict", queue_id, action=verdict.action, reason=verdict.reason,
                     junk=list(verdict.junk),
                     reply=str(verdict.reply) if verdict.reply is not None else None,
                     removed_forged_results=report.removed if report is not None else 0)


@implementer(IMessageSink)
class AuthenticatingSink:
    """One sink in front of the queue for every listener: mail that an authenticated user
    submitted, or that the server made itself (notices), is signed; mail from a client that
    did not authenticate - whatever its address, loopback included - is checked (with the
    checks off, only forged Authentication-Results fields of ours are removed)."""

    def __init__(self, inner: IMessageSink, authentication: MessageAuthentication,
                 journey: IJourneyRecorder = NULL_RECORDER) -> None:
        self._inner = inner
        self._signing = SigningSink(inner, authentication, journey)
        self._checking = CheckingSink(inner, authentication, journey)

    def new_queue_id(self) -> str:
        queue_id: str = self._inner.new_queue_id()
        return queue_id

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
        submitted = envelope.auth_user is not None or envelope.protocol == "local"
        target = self._signing if submitted else self._checking
        return target.submit(envelope, message)
