"""``mailsys-sendmail -bs``: an SMTP session on standard input and output, for programs that
speak SMTP to a local sendmail (as Postfix's ``sendmail -bs`` does).

The session is mailsys's own SMTP engine; what it accepts is written into the pickup directory
like any other local submission, so the server routes it (and refuses nothing here that it
would accept): the local user is the file's owner, and no password is asked.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, cast

from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocol, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.stdio import StandardIO
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from mailsys.address import Mailbox
from mailsys.config import Config
from mailsys.envelope import Destination, Envelope, TargetKind
from mailsys.interfaces import IMessageSink
from mailsys.pickup.maildrop import DropRequest, DropWriter
from mailsys.replies import Reply
from mailsys.smtp.policy import SessionInfo
from mailsys.smtp.server import ListenerRole, SMTPServerFactory


class LocalPolicy:
    """Accept every well-formed sender and recipient: the server routes them at pickup, and an
    unknown local recipient bounces to the sender there."""

    requires_tls_before_mail = False  # a pipe to this process: nothing to protect
    requires_auth = False  # the local user is the one who runs the command

    def check_sender(self, session: SessionInfo, sender: Mailbox | None) -> Deferred[Reply | None]:
        return succeed(None)

    def check_recipient(
        self, session: SessionInfo, recipient: Mailbox
    ) -> Deferred[list[Destination]]:
        return succeed([Destination(str(recipient), TargetKind.RELAY)])


@implementer(IMessageSink)
class DropSink:
    """Writes each accepted message as a drop file (in a thread: the session keeps answering)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def new_queue_id(self) -> str:
        return secrets.token_hex(8)

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
        request = DropRequest(sender=envelope.sender,
                              recipients=tuple(r.original for r in envelope.recipients))
        return deferToThread(self._write, request, message)

    def _write(self, request: DropRequest, message: bytes) -> None:
        writer = DropWriter(self._directory, request)
        try:
            writer.write(message)
            writer.commit()
        except BaseException:
            writer.abort()
            raise


class _PipeSession(Protocol):
    """The SMTP session on the pipe; stops the reactor once it is over."""

    def __init__(self, session: IProtocol, reactor: Any) -> None:
        self._session = session
        self._reactor = reactor

    @override
    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        self._session.makeConnection(transport)

    @override
    def dataReceived(self, data: bytes) -> None:
        self._session.dataReceived(data)

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._session.connectionLost(reason)
        if self._reactor.running:
            self._reactor.stop()


def serve_stdio(config: Config, reactor: Any = None) -> int:
    """Run one SMTP session on stdin/stdout until it ends; return the exit status (0)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    factory = SMTPServerFactory(config, ListenerRole.MTA, LocalPolicy(),
                                DropSink(config.pickup.directory), reactor)
    session = factory.buildProtocol(UNIXAddress(None))
    assert session is not None
    # StandardIO is not annotated.
    cast(Any, StandardIO)(_PipeSession(session, reactor), reactor=reactor)
    reactor.run()
    return 0
