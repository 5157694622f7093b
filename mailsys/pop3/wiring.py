"""The POP3 listeners of a Config: (endpoint description, factory) pairs for the service to bind.

STLS listeners (``[pop3] listen``) get the plain factory; implicit-TLS listeners
(``[pop3] listen_tls``, RFC 8314) get it wrapped in TLS from the first byte.
"""

from __future__ import annotations

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsys.auth.throttle import LoginThrottle
from mailsys.config import Config
from mailsys.connlimit import ConnectionCounter
from mailsys.mailbox.store import MailboxStore
from mailsys.pop3.server import POP3ServerFactory, POP3Settings
from mailsys.tls import CurrentCertificateCreator, ServerTLS


def pop3_factories(
    config: Config,
    store: MailboxStore,
    portal: Portal,
    throttle: LoginThrottle,
    tls: ServerTLS | None,
    clock: IReactorTime,
) -> list[tuple[str, IProtocolFactory]]:
    """One (description, factory) per [pop3] listener, in config order."""
    listeners: list[tuple[str, IProtocolFactory]] = []
    connections = ConnectionCounter(config.pop3.max_connections,
                                    config.pop3.max_connections_per_client)
    if config.pop3.listen:
        settings = POP3Settings.from_config(config, implicit_tls=False)
        plain = POP3ServerFactory(settings, store, portal, throttle, clock, tls, connections)
        listeners.extend((description, plain) for description in config.pop3.listen)
    if config.pop3.listen_tls:
        if tls is None:  # config.py refuses listen_tls without a certificate
            raise ValueError("[pop3] listen_tls needs [tls] certificate and key")
        settings = POP3Settings.from_config(config, implicit_tls=True)
        inner = POP3ServerFactory(settings, store, portal, throttle, clock, tls, connections)
        creator = CurrentCertificateCreator(tls)
        wrapped: IProtocolFactory = TLSMemoryBIOFactory(creator, False, inner)
        listeners.extend((description, wrapped) for description in config.pop3.listen_tls)
    return listeners
