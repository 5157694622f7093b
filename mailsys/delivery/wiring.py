"""The relay built from the [relay] section: resolver, next hops, TLS policy and the agent.

service.py calls ``build_relay``; everything the relay is made of is constructed here, so the
relay's own modules take their collaborators as arguments and are tested alone.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IResolver

from mailsys.config import Config
from mailsys.delivery.mtasts import CACHE_DIR, PolicyCache, PolicyFetcher
from mailsys.delivery.mx import MXResolver, make_resolver
from mailsys.delivery.nexthop import NextHops
from mailsys.delivery.relay import RelayAgent, RelaySettings, TCPDialer
from mailsys.delivery.tlspolicy import ClientTLS, TLSPolicies
from mailsys.diskio import DiskPool
from mailsys.dns.cache import CachingResolver
from mailsys.journey.events import NULL_RECORDER
from mailsys.journey.interfaces import IJourneyRecorder


def smarthost_password(config: Config) -> str | None:
    """The smarthost password from the config or its file (first line, without the newline)."""
    relay = config.relay
    if relay.smarthost_password is not None:
        return relay.smarthost_password
    if relay.smarthost_password_file is not None:
        text = relay.smarthost_password_file.read_text(encoding="utf-8")
        return text.splitlines()[0] if text else ""
    return None


def build_relay(config: Config, pool: DiskPool, reactor: Any,
                journey: IJourneyRecorder = NULL_RECORDER,
                resolver: IResolver | None = None) -> RelayAgent | None:
    """The relay agent for ``config``, or None when ``relay.enabled`` is false. ``resolver``
    is the shared caching one (mailsys.dns), so MX answers are asked once for all deliveries
    and shared with mail authentication; without it, a client of its own."""
    relay = config.relay
    if not relay.enabled:
        return None
    servers = [(server.host, server.port) for server in relay.dns_servers]
    settings = RelaySettings(
        helo_name=relay.helo_name or config.server.hostname,
        per_destination_concurrency=relay.per_destination_concurrency,
        connect_timeout=relay.connect_timeout,
        smarthost_username=relay.smarthost_username,
        smarthost_password=smarthost_password(config),
    )
    client_tls = ClientTLS(relay.tls_ca_file)
    mta_sts = None
    # RFC 8461 needs the TXT answers and the policy host's address from the shared resolver.
    if relay.mta_sts and isinstance(resolver, CachingResolver):
        fetcher = PolicyFetcher(reactor, resolver, client_tls.verifying,
                                timeout=relay.mta_sts_timeout, port=relay.mta_sts_lab_https_port)
        mta_sts = PolicyCache(resolver, fetcher.fetch, pool, config.storage.spool / CACHE_DIR,
                              reactor)
    return RelayAgent(
        settings,
        NextHops(relay.transport, relay.smarthost, relay.port),
        TLSPolicies(relay.tls_policy, relay.tls_policy_per_domain),
        client_tls,
        MXResolver(resolver if resolver is not None else make_resolver(servers, reactor),
                   relay.ip_version),
        TCPDialer(reactor, settings.timeouts, relay.connect_timeout,
                  relay.bind_address, relay.bind_address6),
        pool,
        reactor,
        journey,
        mta_sts=mta_sts,
    )
