"""In-memory stand-ins for what an SMTP listener talks to, and a driver for sessions, for tests.

``MemorySink`` is an IMessageSink that keeps messages in a list and can succeed, fail or hold
its answer; ``StaticRouter`` is an IRouter over fixed domains and users (both are held to their
interfaces with ``verifyObject`` in the tests). ``SessionDriver`` runs one SMTPSession over a
StringTransport that records STARTTLS and then reports a fixed TLS 1.3 connection, so protocol
tests need no reactor. ``memory_portal`` logs in against fixed passwords, answering at once or
when the test says.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import classImplements, implementer

from mailsys.auth.login import LoginLimiter
from mailsys.auth.portal import MailRealm
from mailsys.defence.intake import IntakeDefence
from mailsys.envelope import Envelope, TargetKind
from mailsys.interfaces import IMessageSink, IRouter
from mailsys.journey.events import NULL_RECORDER
from mailsys.journey.interfaces import IJourneyRecorder
from mailsys.routing import Destination, UnknownRecipient
from mailsys.smtp.policy import InboundPolicy, Policy
from mailsys.smtp.server import (
    ListenerRole,
    SMTPServerFactory,
    SMTPSession,
)
from mailsys.testing import make_config
from mailsys.tls import TLSContextSource

HOSTNAME = "mx.example.test"
LOCAL_DOMAIN = "example.test"
USERS = frozenset({"alice@example.test", "bob@example.test", "postmaster@example.test"})


class SinkMode(enum.Enum):
    """How MemorySink answers ``submit``."""

    ACCEPT = "accept"  # fire at once
    FAIL = "fail"  # fail at once, as a spool with a full disk would
    HOLD = "hold"  # return a Deferred the test fires later (see ``held``)


@implementer(IMessageSink)
class MemorySink:
    """Keeps submitted messages in memory; ``accepted`` holds those whose Deferred succeeded."""

    def __init__(self, mode: SinkMode = SinkMode.ACCEPT) -> None:
        self.mode = mode
        self.accepted: list[tuple[Envelope, bytes]] = []
        self.submitted: list[tuple[Envelope, bytes]] = []
        self.held: list[Deferred[None]] = []
        self._next = 0

    def new_queue_id(self) -> str:
        self._next += 1
        return f"TEST{self._next:04d}"

    def submit(self, envelope: object, message: bytes) -> Deferred[None]:
        assert isinstance(envelope, Envelope)
        self.submitted.append((envelope, message))
        if self.mode is SinkMode.FAIL:
            return fail(OSError("disk full"))
        if self.mode is SinkMode.HOLD:
            d: Deferred[None] = Deferred()
            d.addCallback(lambda _: self.accepted.append((envelope, message)))
            self.held.append(d)
            return d
        self.accepted.append((envelope, message))
        return succeed(None)


@implementer(IRouter)
class StaticRouter:
    """Routes to fixed users of fixed local domains; everything else is relayed."""

    def __init__(self, local_domains: set[str], users: set[str]) -> None:
        self.local_domains = {d.lower() for d in local_domains}
        self.users = {u.lower() for u in users}

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.local_domains

    def resolve(self, address: str) -> list[Destination]:
        local, _, domain = address.rpartition("@")
        if not domain or not local:
            if address.lower() == "postmaster" and self.local_domains:
                local, domain = "postmaster", sorted(self.local_domains)[0]
            else:
                raise UnknownRecipient(address)
        if not self.is_local_domain(domain):
            return [Destination(f"{local}@{domain.lower()}", TargetKind.RELAY)]
        mailbox = f"{local}@{domain}".lower()
        if mailbox not in self.users:
            raise UnknownRecipient(address)
        return [Destination(mailbox, TargetKind.LOCAL, mailbox)]


class FakeTLSConnection:
    """Answers what mailsys.tls.describe_tls asks of a pyOpenSSL Connection."""

    version = "TLSv1.3"
    cipher = "TLS_AES_256_GCM_SHA384"
    bits = 256

    def get_protocol_version_name(self) -> str:
        return self.version

    def get_cipher_name(self) -> str:
        return self.cipher

    def get_cipher_bits(self) -> int:
        return self.bits


class TLSRecordingTransport(StringTransport):
    """A StringTransport whose startTLS only records the context it was given; from then on
    ``getHandle()`` is a FakeTLSConnection, as a real transport's is a pyOpenSSL Connection."""

    def __init__(self, peer: IPv4Address | IPv6Address) -> None:
        super().__init__(peerAddress=peer)  # type: ignore[no-untyped-call]
        self.tls_contexts: list[object] = []
        self.tls_handle: FakeTLSConnection | None = None

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:  # noqa: N802, N803
        """ITLSTransport.startTLS: record the context, negotiate nothing."""
        self.tls_contexts.append(contextFactory)
        self.tls_handle = FakeTLSConnection()

    def getHandle(self) -> object:  # noqa: N802 - ITCPTransport's name
        """The fake TLS connection once TLS is on, else a stand-in for the socket."""
        return self.tls_handle if self.tls_handle is not None else object()


# Declared here rather than with @implementer (and the checker told to look away): StringTransport
# lacks some ITCPTransport methods that ITLSTransport inherits; none of them is used.
classImplements(TLSRecordingTransport, ITLSTransport)  # type: ignore[misc]


class SessionDriver:
    """One SMTPSession of ``factory`` over a TLSRecordingTransport, driven by ``send``."""

    def __init__(self, factory: SMTPServerFactory, client: str = "192.0.2.10") -> None:
        peer: IPv4Address | IPv6Address
        if ":" in client:
            peer = IPv6Address("TCP", client, 40000)
        else:
            peer = IPv4Address("TCP", client, 40000)
        self.factory = factory
        self.transport = TLSRecordingTransport(peer)
        if factory.role is ListenerRole.SUBMISSIONS:
            self.transport.tls_handle = FakeTLSConnection()  # TLS from the first byte
        session = factory.buildProtocol(peer)
        self.session: SMTPSession = session
        session.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        self._seen = 0

    def output(self) -> bytes:
        """Everything written since the last call to ``output`` or ``send``."""
        value: bytes = self.transport.value()  # type: ignore[no-untyped-call]
        new, self._seen = value[self._seen:], len(value)
        return new

    def send(self, data: bytes) -> list[str]:
        """Feed ``data`` to the session; the reply lines it caused, without CRLF."""
        self.session.dataReceived(data)
        return self.lines()

    def lines(self) -> list[str]:
        """The reply lines written since the last look."""
        text = self.output().decode("utf-8", "replace")
        return text.split("\r\n")[:-1] if text else []

    def codes(self, data: bytes) -> list[int]:
        """Feed ``data``; the codes of the last line of each reply it caused."""
        return [int(line[:3]) for line in self.send(data) if line[3:4] == " "]

    @property
    def closed(self) -> bool:
        """True once the session asked its transport to close."""
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        """The client goes away."""
        self.session.connectionLost(connectionDone)


def make_factory(
    *,
    role: ListenerRole = ListenerRole.MTA,
    policy: Policy | None = None,
    sink: IMessageSink | None = None,
    clock: Clock | None = None,
    tls: TLSContextSource | None = None,
    portal: Portal | None = None,
    throttle: LoginLimiter | None = None,
    hide_client_address: bool = False,
    journey: IJourneyRecorder = NULL_RECORDER,
    defence: IntakeDefence | None = None,
    **smtp: int | float | bool,
) -> SMTPServerFactory:
    """A factory for ``mx.example.test`` with a StaticRouter (alice, bob and postmaster of
    example.test), a MemorySink and a Clock unless given; ``smtp`` are [smtp] values and
    ``hide_client_address`` the [submission] one."""
    config = make_config(HOSTNAME, smtp=smtp,
                         submission={"hide_client_address": hide_client_address})
    return SMTPServerFactory(
        config,
        role,
        policy if policy is not None else InboundPolicy(StaticRouter({LOCAL_DOMAIN}, set(USERS))),
        sink if sink is not None else MemorySink(),
        clock if clock is not None else Clock(),
        tls,
        portal=portal,
        throttle=throttle,
        journey=journey,
        defence=defence,
    )


class HeldChecks:
    """Makes a portal's password checks wait until the test releases them (``release``)."""

    def __init__(self) -> None:
        self.pending: list[Deferred[Any]] = []

    def __call__(self, func: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        d.addCallback(lambda _: func(*args))
        self.pending.append(d)
        return d

    def release(self) -> None:
        """Run every check held so far."""
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(None)


def memory_portal(passwords: dict[str, str]) -> Portal:
    """A portal with mailsys's realm over fixed ``mailbox: password`` pairs, answering at once.

    The avatar id is the user name as given (UTF-8), like UserStoreChecker's for a canonical name.
    """
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    for user, password in passwords.items():
        checker.addUser(user.encode(), password.encode())
    return Portal(MailRealm(), [checker])
