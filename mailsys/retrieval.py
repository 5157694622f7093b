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
from mailsys.journey.events import NULL_RECORDER
from mailsys.journey.interfaces import IJourneyRecorder
from mailsys.mailbox.store import MailboxStore
from mailsys.session import SessionMetrics
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
        journey: IJourneyRecorder = NULL_RECORDER,
    ) -> None:
        self.config = config
        self.journey = journey  # what readers do with delivered messages (mailsys.journey)
        self.section: SectionT = self.section_of(config)
        self.hostname = config.server.hostname
        self.implicit_tls = implicit_tls  # RFC 8314: TLS from the first byte (995, 993)
        self.store = store
        self.portal = portal
        self.throttle = throttle
        self.metrics: SessionMetrics | None = None  # set by the service (mailsys.web.metrics)
        self.clock = clock
        self.tls = tls
        if connections is None:
            connections = ConnectionCounter(
                self.section.max_connections, self.section.max_connections_per_client
            )
        self.connections = connections

    def reconfigure(self, config: Config) -> None:
        """Serve the next sessions with ``config`` (a reload, mailsys.reload); a session already
        open keeps the section it started with. The connection counter, shared by the plain
        and the TLS listener, keeps its counts."""
        self.config = config
        self.section = self.section_of(config)
        self.hostname = config.server.hostname
        self.connections.max_total = self.section.max_connections
        self.connections.max_per_client = self.section.max_connections_per_client

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
    journey: IJourneyRecorder = NULL_RECORDER,
) -> list[tuple[str, IProtocolFactory]]:
    """One (endpoint description, factory of ``kind``) per listener of its section, in config
    order: ``listen`` plain (STARTTLS/STLS offered), then ``listen_tls`` wrapped in TLS."""
    section = kind.section_of(config)
    listeners: list[tuple[str, IProtocolFactory]] = []
    connections = ConnectionCounter(section.max_connections, section.max_connections_per_client)
    if section.listen:
        plain = kind(config, store, portal, throttle, clock, tls, connections, journey=journey)
        listeners.extend((description, plain) for description in section.listen)
    if section.listen_tls:
        if tls is None:  # config.py refuses listen_tls without a certificate
            raise ValueError(f"[{kind.protocol_name}] listen_tls needs [tls] certificate and key")
        implicit = kind(config, store, portal, throttle, clock, tls, connections,
                        implicit_tls=True, journey=journey)
        wrapped: IProtocolFactory = TLSMemoryBIOFactory(
            CurrentCertificateCreator(tls), False, implicit)
        listeners.extend((description, wrapped) for description in section.listen_tls)
    return listeners
