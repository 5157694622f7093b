"""Helpers for IMAP session tests: a factory over a tmp Maildir root and a scripted client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import classImplements

from mailsys.auth.portal import MailRealm
from mailsys.auth.throttle import LoginThrottle
from mailsys.imap.session import IMAPServerFactory, IMAPSession
from mailsys.mailbox.store import MailboxStore
from mailsys.testing import make_config
from tests.unit.mailbox_support import ImmediatePool, deliver, message

USER = "demo@example.test"
PASSWORD = "secret"


class TLSRecordingTransport(StringTransport):
    """A StringTransport whose startTLS records the context and negotiates nothing."""

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)  # type: ignore[no-untyped-call]
        self.tls_contexts: list[object] = []

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:  # noqa: N802, N803
        self.tls_contexts.append(contextFactory)


classImplements(TLSRecordingTransport, ITLSTransport)  # type: ignore[misc]


class FakeTLS:
    """A TLS context source handing out a marker object."""

    context = object()

    def server_context(self) -> Any:
        return self.context


class Server:
    """An IMAP factory over a tmp Maildir root, a Clock and an in-memory password database."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.clock = Clock()
        self.pool = ImmediatePool()
        self.store = MailboxStore(root, self.pool)
        checker = InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode()})
        self.portal = Portal(MailRealm(), [checker])
        self.throttle = LoginThrottle(self.clock, max_failures=3)
        implicit_tls = bool(settings.pop("implicit_tls", False))
        config = make_config("mail.example.test", imap=settings)
        self.factory = IMAPServerFactory(config, self.store, self.portal, self.throttle,
                                         self.clock, FakeTLS(), implicit_tls=implicit_tls)

    @property
    def inbox(self) -> Path:
        return self.store.mailbox_path(USER)

    def connect(self, client: str = "192.0.2.10") -> Client:
        return Client(self, client)


class Client:
    """One session over a recording transport; ``cmd`` returns everything the server wrote."""

    def __init__(self, server: Server, host: str) -> None:
        peer = IPv4Address("TCP", host, 40000)
        self.server = server
        self.transport = TLSRecordingTransport(peer)
        self.session: IMAPSession = server.factory.buildProtocol(peer)
        self.session.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        self._seen = 0
        self._tag = 0
        self.greeting = self.output()

    def output(self) -> bytes:
        value: bytes = self.transport.value()  # type: ignore[no-untyped-call]
        new, self._seen = value[self._seen:], len(value)
        return new

    def send(self, data: bytes) -> bytes:
        self.session.dataReceived(data)
        return self.output()

    def cmd(self, line: str | bytes) -> str:
        """Send ``T<n> line`` and return the server's output as text."""
        self._tag += 1
        raw = line.encode() if isinstance(line, str) else line
        return self.send(b"T%d " % self._tag + raw + b"\r\n").decode("utf-8", "replace")

    @property
    def tag(self) -> str:
        return f"T{self._tag}"

    def status(self, line: str | bytes) -> str:
        """Send a command; its tagged answer without the tag ("OK ...", "NO [...] ...")."""
        out = self.cmd(line)
        prefix = f"{self.tag} "
        tagged = [x for x in out.split("\r\n") if x.startswith(prefix)]
        assert tagged, out
        return tagged[-1][len(prefix):]

    def ok(self, line: str | bytes) -> str:
        """Like cmd, asserting the tagged answer is OK."""
        out = self.cmd(line)
        assert f"{self.tag} OK" in out, out
        return out

    def login(self) -> str:
        return self.ok(f'LOGIN {USER} "{PASSWORD}"')

    def select(self, name: str = "INBOX") -> str:
        return self.ok(f"SELECT {name}")

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        self.session.connectionLost(connectionDone)


def selected(server: Server, *, enable: tuple[str, ...] = ()) -> Client:
    """A logged-in client with INBOX selected, after ENABLE of each extension in ``enable``."""
    client = server.connect()
    client.login()
    for extension in enable:
        client.ok(f"ENABLE {extension}")
    client.select()
    return client


def filled(server: Server, count: int = 3, *, enable: tuple[str, ...] = ()) -> Client:
    """``count`` messages delivered to the INBOX, then a client as ``selected`` gives it."""
    for i in range(1, count + 1):
        deliver(server.inbox, message(i), mtime=1_700_000_000 + i)
    return selected(server, enable=enable)
