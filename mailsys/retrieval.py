"""What the POP3 and IMAP servers share as front ends of the mailbox store.

The factory that holds a listener's collaborators (settings, store, portal, throttle, clock,
TLS, connection counter), and the wiring of a protocol's listeners: STARTTLS/STLS listeners get
the plain factory, implicit-TLS listeners (RFC 8314) the same kind of factory wrapped in TLS
from the first byte, and both count against one connection counter, since the limits are the
protocol's, not a port's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from twisted.cred.portal import Portal
from twisted.internet.interfaces import (
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import ServerFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsys.auth.throttle import LoginThrottle
from mailsys.connlimit import ConnectionCounter
from mailsys.mailbox.store import MailboxStore
from mailsys.tls import CurrentCertificateCreator, ServerTLS, TLSContextSource


class ConnectionLimits(Protocol):
    """The part of a listener's settings the connection counter is made from."""

    @property
    def max_connections(self) -> int: ...

    @property
    def max_connections_per_client(self) -> int: ...


class ListenerSection(ConnectionLimits, Protocol):
    """The part of a [pop3] or [imap] config section that says where to listen, and how much."""

    @property
    def listen(self) -> Sequence[str]: ...

    @property
    def listen_tls(self) -> Sequence[str]: ...



SettingsT = TypeVar("SettingsT", bound=ConnectionLimits)


class MailboxServerFactory(ServerFactory, Generic[SettingsT]):
    """Holds what every session of one POP3 or IMAP listener needs."""

    noisy = False  # no 'Starting factory' lines: the service logs its listeners

    def __init__(
        self,
        settings: SettingsT,
        store: MailboxStore,
        portal: Portal,
        throttle: LoginThrottle,
        clock: IReactorTime,
        tls: TLSContextSource | None = None,
        connections: ConnectionCounter | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.portal = portal
        self.throttle = throttle
        self.clock = clock
        self.tls = tls
        if connections is None:
            connections = ConnectionCounter(
                settings.max_connections, settings.max_connections_per_client
            )
        self.connections = connections


def listener_factories(
    section_name: str,
    section: ListenerSection,
    build: Callable[[bool, ConnectionCounter], IProtocolFactory],
    tls: ServerTLS | None,
) -> list[tuple[str, IProtocolFactory]]:
    """One (endpoint description, factory) per listener of ``section``, in config order.

    ``build(implicit_tls, connections)`` makes the protocol's factory for one kind of listener.
    """
    listeners: list[tuple[str, IProtocolFactory]] = []
    connections = ConnectionCounter(section.max_connections, section.max_connections_per_client)
    if section.listen:
        plain = build(False, connections)
        listeners.extend((description, plain) for description in section.listen)
    if section.listen_tls:
        if tls is None:  # config.py refuses listen_tls without a certificate
            raise ValueError(f"[{section_name}] listen_tls needs [tls] certificate and key")
        wrapped: IProtocolFactory = TLSMemoryBIOFactory(
            CurrentCertificateCreator(tls), False, build(True, connections))
        listeners.extend((description, wrapped) for description in section.listen_tls)
    return listeners
