"""The relay's MX behaviour holds through the shared caching resolver, over the fake zone and
over twisted.names' client asking the lab DNS server: the cache changes nothing but the number
of questions."""

from __future__ import annotations

import random

from twisted.internet.interfaces import IResolver
from twisted.internet.task import Clock
from twisted.names import client, error
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailsys.delivery.mx import MXResolver
from mailsys.dns import CachingResolver
from mailsys.labdns import Zone, serve
from tests.unit.test_mx import ZONE, MXBehaviour, mx


class CachedFakeResolverTests(MXBehaviour, unittest.SynchronousTestCase):
    """MXResolver over CachingResolver over the lab zone."""

    def resolver(self, ip_version: str = "any") -> MXResolver:
        return MXResolver(CachingResolver(Zone(ZONE), Clock()), ip_version, random.Random())

    def test_cache_is_a_resolver(self) -> None:
        """The caching resolver provides IResolver."""
        verifyObject(IResolver, CachingResolver(Zone(ZONE), Clock()))

    def test_second_delivery_asks_nothing(self) -> None:
        """A second lookup of the same domain within the TTL asks DNS nothing."""
        zone = Zone(ZONE)
        resolver = MXResolver(CachingResolver(zone, Clock()), "any", random.Random())
        self.successResultOf(resolver.hosts(mx("remote.test")))
        asked = len(zone.queries)
        self.successResultOf(resolver.hosts(mx("remote.test")))
        assert len(zone.queries) == asked


class CachedRealResolverTests(MXBehaviour, unittest.TestCase):
    """MXResolver over CachingResolver over twisted.names' client and the lab DNS server."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self._reactor = reactor
        udp, tcp = serve(Zone(ZONE), 0, "127.0.0.1", reactor)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.port = udp.getHost().port
        self.addCleanup(self.flushLoggedErrors, error.ResolverError)

    def resolver(self, ip_version: str = "any") -> MXResolver:
        real = client.Resolver(servers=[("127.0.0.1", self.port)], reactor=self._reactor)
        cached = CachingResolver(real, self._reactor, timeout=5)
        return MXResolver(cached, ip_version, random.Random(), timeout=(2,))
