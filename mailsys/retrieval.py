"""What the POP3 and IMAP servers share as front ends of the mailbox store.

The factory that holds a listener's collaborators (config, store, portal, throttle, clock, TLS,
connection counter), and the one wiring of a retrieval protocol's listeners: STARTTLS/STLS
listeners get the plain factory, implicit-TLS listeners (RFC 8314) the same kind of factory
wrapped in TLS from the first byte, and both count against one connection counter, since the
limits are the protocol's, not a port's.
"""

from __future__ import annotations

from typing import ClassVar, Generic, TypeVar

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsys.auth.throttle import LoginThrottle
from mailsys.config import Config, IMAPSection, POP3Section
from mailsys.connlimit import ConnectionCounter
from mailsys.mailbox.store import MailboxStore
from mailsys.tls import CurrentCertificateCreator, ServerTLS, TLSContextSource

SectionT = TypeVar("SectionT", POP3Section, IMAPSection)


class MailboxServerFactory(ServerFactory, Generic[SectionT]):
    """Holds what every session of one POP3 or IMAP listener needs; sessions read the
    protocol's config section (``section``) directly."""

    noisy = False  # no 'Starting factory' lines: the service logs its listeners
    protocol_name: ClassVar[str]  # the config section and the log's word: "pop3", "imap"

    def __init__(
        self,
        config: Config,
        store: MailboxStore,
        portal: Portal,
        throttle: LoginThrottle,
        clock: IReactorTime,
        tls: TLSContextSource | None = None,
        connections: ConnectionCounter | None = None,
        *,
        implicit_tls: bool = False,
    ) -> None:
        self.config = config
        self.section: SectionT = self.section_of(config)
        self.hostname = config.server.hostname
        self.implicit_tls = implicit_tls  # RFC 8314: TLS from the first byte (995, 993)
        self.store = store
        self.portal = portal
        self.throttle = throttle
        self.clock = clock
        self.tls = tls
        if connections is None:
            connections = ConnectionCounter(
                self.section.max_connections, self.section.max_connections_per_client
            )
        self.connections = connections

    @classmethod
    def section_of(cls, config: Config) -> SectionT:
        """The protocol's section of ``config``."""
        raise NotImplementedError


def mailbox_listeners(
    kind: type[MailboxServerFactory[SectionT]],
    config: Config,
    store: MailboxStore,
    portal: Portal,
    throttle: LoginThrottle,
    tls: ServerTLS | None,
    clock: IReactorTime,
) -> list[tuple[str, IProtocolFactory]]:
    """One (endpoint description, factory of ``kind``) per listener of its section, in config
    order: ``listen`` plain (STARTTLS/STLS offered), then ``listen_tls`` wrapped in TLS."""
    section = kind.section_of(config)
    listeners: list[tuple[str, IProtocolFactory]] = []
    connections = ConnectionCounter(section.max_connections, section.max_connections_per_client)
    if section.listen:
        plain = kind(config, store, portal, throttle, clock, tls, connections)
        listeners.extend((description, plain) for description in section.listen)
    if section.listen_tls:
        if tls is None:  # config.py refuses listen_tls without a certificate
            raise ValueError(f"[{kind.protocol_name}] listen_tls needs [tls] certificate and key")
        implicit = kind(config, store, portal, throttle, clock, tls, connections,
                        implicit_tls=True)
        wrapped: IProtocolFactory = TLSMemoryBIOFactory(
            CurrentCertificateCreator(tls), False, implicit)
        listeners.extend((description, wrapped) for description in section.listen_tls)
    return listeners
