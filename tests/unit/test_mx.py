"""MX resolution: preference order, implicit MX, null MX, NXDOMAIN, SERVFAIL, CNAME, ip_version.

The same behaviour tests run twice: against mailsys.labdns.Zone used directly as the resolver
(the fake), and against twisted.names' real client asking a real twisted.names server (the same
zone, served by mailsys.labdns on a loopback UDP port). The fake is thereby held to the real thing.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolver
from twisted.names import client, dns, error
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailsys.delivery.mx import MailHost, MXLookupError, MXResolver
from mailsys.labdns import Zone, serve
from mailsys.values import IPVersion, NextHop, RouteKind

ZONE: dict[str, Any] = {
    "remote.test": {"MX": [[20, "mx2.remote.test"], [10, "mx1.remote.test"]]},
    "mx1.remote.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "mx2.remote.test": {"A": ["127.0.0.3"]},
    "six.test": {"AAAA": ["::1"]},
    "tie.test": {"MX": [[10, f"mx{i}.tie.test"] for i in range(8)] + [[5, "first.tie.test"]]},
    "plain.test": {"A": ["127.0.0.4"]},
    "empty.test": {"A": []},
    "nullmx.test": {"MX": [[0, "."]]},
    "broken.test": {"ERROR": "servfail"},
    "mxbroken.test": {"MX": [[10, "broken.test"]]},
    "alias.test": {"CNAME": "remote.test"},
    "chain.test": {"CNAME": "alias.test"},
    "cname-mx.test": {"MX": [[10, "www.cname-mx.test"]]},
    "www.cname-mx.test": {"CNAME": "mx2.remote.test"},
    "dangling.test": {"CNAME": "nowhere.test"},
    "loop1.test": {"CNAME": "loop2.test"},
    "loop2.test": {"CNAME": "loop1.test"},
    "gone-mx.test": {"MX": [[10, "nowhere.test"]]},
}


def mx(name: str) -> NextHop:
    return NextHop(RouteKind.MX, name)


class MXBehaviour:
    """The behaviour of MXResolver; subclasses provide the resolver (fake or real)."""

    def resolver(self, ip_version: str = "any") -> MXResolver:
        raise NotImplementedError

    def hosts(self, name: str, **kwargs: Any) -> Deferred[list[MailHost]]:
        return self.resolver(**kwargs).hosts(mx(name))

    def fails(self, d: Deferred[Any], code: int, enhanced: str, text: str = "") -> Deferred[None]:
        def check(result: object) -> None:
            assert isinstance(result, Failure), f"expected a failure, got {result!r}"
            value = result.value
            assert isinstance(value, MXLookupError), repr(value)
            assert (value.reply.code, value.reply.enhanced) == (code, enhanced), str(value)
            assert text in value.reply.text

        return d.addBoth(check)

    def test_mx_by_preference(self) -> Deferred[None]:
        """MX hosts come lowest preference first."""
        d = self.hosts("remote.test")
        return d.addCallback(lambda hosts: self.assertEqual(  # type: ignore[attr-defined]
            [(h.name, h.preference) for h in hosts], [("mx1.remote.test", 10),
                                                      ("mx2.remote.test", 20)]))

    def test_equal_preferences_shuffled(self) -> Deferred[None]:
        """Hosts of equal preference are shuffled; the lower preference stays first."""
        orders: list[tuple[str, ...]] = []

        def seen(hosts: list[MailHost]) -> None:
            assert hosts[0].name == "first.tie.test"
            assert sorted(h.name for h in hosts[1:]) == [f"mx{i}.tie.test" for i in range(8)]
            orders.append(tuple(h.name for h in hosts))

        d = self.hosts("tie.test").addCallback(seen)
        for _ in range(5):
            d.addCallback(lambda _: self.hosts("tie.test").addCallback(seen))
        return d.addCallback(lambda _: self.assertGreater(  # type: ignore[attr-defined]
            len(set(orders)), 1))

    def test_addresses_aaaa_then_a(self) -> Deferred[None]:
        """With ip_version "any" a host's AAAA addresses come before its A addresses."""
        d = self.resolver().addresses(MailHost("mx1.remote.test"))
        return d.addCallback(self.assertEqual, ["::1", "127.0.0.2"])  # type: ignore[attr-defined]

    def test_ipv4_only(self) -> Deferred[None]:
        """ip_version "ipv4" uses A records only; a host with only AAAA has no address."""
        r = self.resolver("ipv4")
        d = r.addresses(MailHost("mx1.remote.test"))
        d.addCallback(self.assertEqual, ["127.0.0.2"])  # type: ignore[attr-defined]
        return d.addCallback(lambda _: self.fails(r.addresses(MailHost("six.test", 0)),
                                                  550, "5.4.4", "ipv4"))

    def test_ipv6_only(self) -> Deferred[None]:
        """ip_version "ipv6" uses AAAA records only."""
        r = self.resolver("ipv6")
        d = r.addresses(MailHost("mx1.remote.test"))
        d.addCallback(self.assertEqual, ["::1"])  # type: ignore[attr-defined]
        return d.addCallback(lambda _: self.fails(r.addresses(MailHost("mx2.remote.test")),
                                                  550, "5.4.4"))

    def test_no_mx_uses_the_domain_itself(self) -> Deferred[None]:
        """RFC 5321 §5.1: without MX records the domain's own address records are used."""
        r = self.resolver()
        d = r.hosts(mx("plain.test"))

        def check(hosts: list[MailHost]) -> Deferred[list[str]]:
            assert hosts == [MailHost("plain.test", 0, implicit=True)]
            return r.addresses(hosts[0])

        d.addCallback(check)
        return d.addCallback(self.assertEqual, ["127.0.0.4"])  # type: ignore[attr-defined]

    def test_no_mx_and_no_address_is_permanent(self) -> Deferred[None]:
        """A domain with neither MX nor address records is undeliverable (5.1.2)."""
        r = self.resolver()
        d = r.addresses(MailHost("empty.test", 0, implicit=True))
        return self.fails(d, 550, "5.1.2", "no MX and no address")

    def test_null_mx(self) -> Deferred[None]:
        """RFC 7505: a null MX is a permanent failure with 5.1.10."""
        return self.fails(self.hosts("nullmx.test"), 556, "5.1.10", "accepts no mail")

    def test_nxdomain_is_permanent(self) -> Deferred[None]:
        """A domain that does not exist fails permanently (5.1.2)."""
        return self.fails(self.hosts("nowhere.test"), 550, "5.1.2", "NXDOMAIN")

    def test_servfail_is_temporary(self) -> Deferred[None]:
        """A server failure is temporary (4.4.3)."""
        return self.fails(self.hosts("broken.test"), 451, "4.4.3", "SERVFAIL")

    def test_address_servfail_is_temporary(self) -> Deferred[None]:
        """A server failure looking up an MX host's addresses is temporary too."""
        return self.fails(self.resolver().addresses(MailHost("broken.test", 10)), 451, "4.4.3")

    def test_mx_host_that_does_not_exist(self) -> Deferred[None]:
        """An MX host name that does not exist has no address (permanent for that host)."""
        return self.fails(self.resolver().addresses(MailHost("nowhere.test", 10)), 550, "5.4.4")

    def test_cname_chain_to_mx(self) -> Deferred[None]:
        """A CNAME chain is followed to the MX records of its end."""
        d = self.hosts("chain.test")
        return d.addCallback(lambda hosts: self.assertEqual(  # type: ignore[attr-defined]
            [h.name for h in hosts], ["mx1.remote.test", "mx2.remote.test"]))

    def test_cname_mx_host(self) -> Deferred[None]:
        """An MX host that is a CNAME resolves to its target's addresses."""
        d = self.resolver().addresses(MailHost("www.cname-mx.test", 10))
        return d.addCallback(self.assertEqual, ["127.0.0.3"])  # type: ignore[attr-defined]

    def test_dangling_cname_is_nxdomain(self) -> Deferred[None]:
        """A CNAME to a name that does not exist fails like NXDOMAIN."""
        return self.fails(self.hosts("dangling.test"), 550, "5.1.2")

    def test_cname_loop_is_temporary(self) -> Deferred[None]:
        """A CNAME loop ends (temporarily failed) instead of spinning."""
        return self.fails(self.hosts("loop1.test"), 451, "4.4.3", "CNAME chain")


class FakeResolverTests(MXBehaviour, unittest.SynchronousTestCase):
    """MXResolver over mailsys.labdns.Zone used directly."""

    def resolver(self, ip_version: str = "any") -> MXResolver:
        return MXResolver(Zone(ZONE), ip_version, random.Random())

    def test_zone_is_a_resolver(self) -> None:
        """The fake provides IResolver, like twisted.names' client."""
        verifyObject(IResolver, Zone(ZONE))

    def test_fake_raises_what_the_client_raises(self) -> None:
        """For NXDOMAIN and SERVFAIL the fake raises the exceptions the client makes of the
        response codes."""
        real = client.Resolver(servers=[("127.0.0.1", 53)])
        assert real.exceptionForCode(dns.ENAME) is error.DNSNameError
        assert real.exceptionForCode(dns.ESERVER) is error.DNSServerError
        zone = Zone(ZONE)
        self.failureResultOf(zone.lookupMailExchange("nowhere.test"), error.DNSNameError)
        self.failureResultOf(zone.lookupMailExchange("broken.test"), error.DNSServerError)

    def test_timeout_is_temporary(self) -> None:
        """A DNS timeout is temporary."""
        r = MXResolver(Zone({"slow.test": {"ERROR": "timeout"}}))
        failure = self.failureResultOf(r.hosts(mx("slow.test")), MXLookupError)
        assert failure.value.reply.enhanced == "4.4.3"
        assert "timed out" in failure.value.reply.text

    def test_host_route_needs_no_mx(self) -> None:
        """A fixed next hop [host] is used as it is, without an MX query."""
        zone = Zone(ZONE)
        r = MXResolver(zone)
        hosts = self.successResultOf(r.hosts(NextHop(RouteKind.HOST, "mx2.remote.test")))
        assert hosts == [MailHost("mx2.remote.test")]
        assert zone.queries == []
        assert self.successResultOf(r.addresses(MailHost("127.0.0.9"))) == ["127.0.0.9"]
        assert zone.queries == []

    def test_ip_version_literal(self) -> None:
        """An address literal of the wrong family is refused under ipv4/ipv6 only."""
        r = MXResolver(Zone(ZONE), IPVersion.IPV4)
        self.failureResultOf(r.addresses(MailHost("::1")), MXLookupError)


class RealResolverTests(MXBehaviour, unittest.TestCase):
    """MXResolver over twisted.names' client asking the lab DNS server on 127.0.0.1."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self._reactor = reactor
        udp, tcp = serve(Zone(ZONE), 0, "127.0.0.1", reactor)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.port = udp.getHost().port
        # twisted.names' server logs every SERVFAIL it answers as an error.
        self.addCleanup(self.flushLoggedErrors, error.ResolverError)

    def resolver(self, ip_version: str = "any") -> MXResolver:
        real = client.Resolver(servers=[("127.0.0.1", self.port)], reactor=self._reactor)
        return MXResolver(real, ip_version, random.Random(), timeout=(2,))
