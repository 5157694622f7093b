"""The HTTP listener built from the config: its settings, readiness checks and certificate
watch. service.py calls ``build_web``; the public pages are mailsys.web.site's, the journey pages
behind the login mailsys.web.console's."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.internet.defer import Deferred

from mailsys.config import Config
from mailsys.diskio import DiskRunner
from mailsys.web.autoconfig import served_domains, services
from mailsys.web.console import Console, ConsolePages
from mailsys.web.health import (
    Check,
    Readiness,
    dns_answering,
    files_usable,
    listeners_bound,
    spool_writable,
)
from mailsys.web.metrics import Metrics
from mailsys.web.mtasts import MTASTSPolicy
from mailsys.web.site import WebSettings, WebSite, build_site


def web_settings(config: Config) -> WebSettings:
    web = config.web
    policy = None
    if web.mta_sts_mode != "none":
        policy = MTASTSPolicy(web.mta_sts_mode, web.mta_sts_mx or (config.server.hostname,),
                              web.mta_sts_max_age)
    return WebSettings(
        domains=served_domains(config),
        client_hostname=web.client_hostname or config.server.hostname,
        services=tuple(services(config)),
        mta_sts=policy,
    )


def build_web(config: Config, bound: Callable[[], bool], disk: DiskRunner, metrics: Metrics,
              reactor: Any, console: Console | None = None) -> WebSite:
    """The Site of the HTTP listener; readiness asks DNS only when relay is on; the journey
    pages when ``console`` is given."""
    wanted = [(config.storage.maildirs, os.W_OK | os.X_OK), (config.storage.users, os.R_OK)]
    wanted += [(path, os.R_OK) for path in (config.tls.certificate, config.tls.key)
               if path is not None]
    checks: list[Check] = [spool_writable(config.storage.spool, disk), files_usable(wanted, disk),
                           listeners_bound(bound)]
    if config.relay.enabled:
        from mailsys.delivery.mx import make_resolver

        servers = [(server.host, server.port) for server in config.relay.dns_servers]
        resolver = make_resolver(servers, reactor)
        hostname = config.server.hostname

        def lookup() -> Deferred[object]:
            # Short timeouts: a probe, not a delivery (twisted.names retries with these).
            return resolver.lookupAddress(hostname, (1, 3)).addCallback(lambda _: None)

        checks.append(dns_answering(lookup))
    pages = None if console is None else ConsolePages(console)
    return build_site(web_settings(config), Readiness(checks, reactor), metrics.registry,
                      reactor, pages)


def certificate_expiry(path: Path) -> float | None:
    """When the PEM certificate at ``path`` expires (Unix time), or None (blocking)."""
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return certificate.not_valid_after_utc.timestamp()
