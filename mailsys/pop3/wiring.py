"""The POP3 listeners of a Config: (endpoint description, factory) pairs for the service to bind.

STLS listeners (``[pop3] listen``) get the plain factory; implicit-TLS listeners
(``[pop3] listen_tls``, RFC 8314) get it wrapped in TLS from the first byte.
"""

from __future__ import annotations

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IProtocolFactory, IReactorTime

from mailsys.auth.throttle import LoginThrottle
from mailsys.config import Config
from mailsys.connlimit import ConnectionCounter
from mailsys.mailbox.store import MailboxStore
from mailsys.pop3.server import POP3ServerFactory, POP3Settings
from mailsys.retrieval import listener_factories
from mailsys.tls import ServerTLS


def pop3_factories(
    config: Config,
    store: MailboxStore,
    portal: Portal,
    throttle: LoginThrottle,
    tls: ServerTLS | None,
    clock: IReactorTime,
) -> list[tuple[str, IProtocolFactory]]:
    """One (description, factory) per [pop3] listener, in config order."""

    def build(implicit_tls: bool, connections: ConnectionCounter) -> IProtocolFactory:
        settings = POP3Settings.from_config(config, implicit_tls=implicit_tls)
        return POP3ServerFactory(settings, store, portal, throttle, clock, tls, connections)

    return listener_factories("pop3", config.pop3, build, tls)
