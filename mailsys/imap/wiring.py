"""The IMAP listeners of a Config: (endpoint description, factory) pairs for the service to bind.

STARTTLS listeners (``[imap] listen``, port 143's role) get the plain factory; implicit-TLS
listeners (``[imap] listen_tls``, 993's, RFC 8314) get it wrapped in TLS from the first byte.
"""

from __future__ import annotations

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsys.auth.throttle import LoginThrottle
from mailsys.config import Config
from mailsys.connlimit import ConnectionCounter
from mailsys.imap.session import IMAPServerFactory, IMAPSettings
from mailsys.mailbox.store import MailboxStore
from mailsys.tls import CurrentCertificateCreator, ServerTLS


def imap_factories(
    config: Config,
    store: MailboxStore,
    portal: Portal,
    throttle: LoginThrottle,
    tls: ServerTLS | None,
    clock: IReactorTime,
) -> list[tuple[str, IProtocolFactory]]:
    """One (description, factory) per [imap] listener, in config order."""
    listeners: list[tuple[str, IProtocolFactory]] = []
    connections = ConnectionCounter(config.imap.max_connections,
                                    config.imap.max_connections_per_client)
    if config.imap.listen:
        settings = IMAPSettings.from_config(config, implicit_tls=False)
        plain = IMAPServerFactory(settings, store, portal, throttle, clock, tls, connections)
        listeners.extend((description, plain) for description in config.imap.listen)
    if config.imap.listen_tls:
        if tls is None:  # config.py refuses listen_tls without a certificate
            raise ValueError("[imap] listen_tls needs [tls] certificate and key")
        settings = IMAPSettings.from_config(config, implicit_tls=True)
        inner = IMAPServerFactory(settings, store, portal, throttle, clock, tls, connections)
        wrapped: IProtocolFactory = TLSMemoryBIOFactory(CurrentCertificateCreator(tls), False,
                                                        inner)
        listeners.extend((description, wrapped) for description in config.imap.listen_tls)
    return listeners
