"""The IMAP listeners of a Config: (endpoint description, factory) pairs for the service to bind.

STARTTLS listeners (``[imap] listen``, port 143's role) get the plain factory; implicit-TLS
listeners (``[imap] listen_tls``, 993's, RFC 8314) get it wrapped in TLS from the first byte.
"""

from __future__ import annotations

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IProtocolFactory, IReactorTime

from mailsys.auth.throttle import LoginThrottle
from mailsys.config import Config
from mailsys.connlimit import ConnectionCounter
from mailsys.imap.session import IMAPServerFactory, IMAPSettings
from mailsys.mailbox.store import MailboxStore
from mailsys.retrieval import listener_factories
from mailsys.tls import ServerTLS


def imap_factories(
    config: Config,
    store: MailboxStore,
    portal: Portal,
    throttle: LoginThrottle,
    tls: ServerTLS | None,
    clock: IReactorTime,
) -> list[tuple[str, IProtocolFactory]]:
    """One (description, factory) per [imap] listener, in config order."""

    def build(implicit_tls: bool, connections: ConnectionCounter) -> IProtocolFactory:
        settings = IMAPSettings.from_config(config, implicit_tls=implicit_tls)
        return IMAPServerFactory(settings, store, portal, throttle, clock, tls, connections)

    return listener_factories("imap", config.imap, build, tls)
