"""The caching resolver: TTLs, negative answers (RFC 2308), failures as temperror, sharing."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.names import dns, error
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailsys.dns import TLSA, Answer, CachingResolver, DNSTemporaryError, reverse_name
from mailsys.labdns import TTL, Zone

ZONE = {
    "example.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"],
                     "MX": [[10, "mx.example.test"]],
                     "TXT": ["v=spf1 -all", ["part one ", "part two"]]},
    "alias.example.test": {"CNAME": "example.test"},
    "1.2.0.192.in-addr.arpa": {"PTR": ["example.test"]},
    "_25._tcp.mx.example.test": {"TLSA": [[3, 1, 1, "abcd"]]},
    "broken.test": {"error": "servfail"},
    "slow.test": {"error": "timeout"},
}


class _Silent:
    """An upstream that never answers (a DNS server that is down)."""

    def __init__(self) -> None:
        self.asked = 0

    def query(self, query: dns.Query, timeout: object = None) -> Deferred[Any]:
        self.asked += 1
        return Deferred()


class CachingResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.zone = Zone(ZONE)
        self.resolver = CachingResolver(self.zone, self.clock)

    def answer(self, name: str, type: int) -> Answer:
        return self.successResultOf(self.resolver.query_answer(name, type))

    def test_records_by_type(self) -> None:
        """A, AAAA, MX, TXT (strings joined), PTR and TLSA answers come back typed."""
        self.assertEqual(self.answer("example.test", dns.A).addresses(), ["192.0.2.1"])
        self.assertEqual(self.answer("example.test", dns.AAAA).addresses(), ["2001:db8::1"])
        self.assertEqual(self.answer("example.test", dns.MX).exchanges(),
                         [(10, "mx.example.test")])
        self.assertEqual(self.answer("example.test", dns.TXT).texts(),
                         [b"v=spf1 -all", b"part one part two"])
        self.assertEqual(self.answer(reverse_name("192.0.2.1"), dns.PTR).names(),
                         ["example.test"])
        tlsa = self.answer("_25._tcp.mx.example.test", TLSA).tlsa()
        self.assertEqual([(t.usage, t.selector, t.matching_type, t.data) for t in tlsa],
                         [(3, 1, 1, b"\xab\xcd")])

    def test_cname_followed(self) -> None:
        """A CNAME is followed and the chain kept."""
        answer = self.answer("alias.example.test", dns.A)
        self.assertEqual(answer.addresses(), ["192.0.2.1"])
        self.assertEqual(answer.chain, ("example.test",))

    def test_positive_cached_for_ttl(self) -> None:
        """A positive answer is served from the cache until its TTL runs out."""
        self.answer("example.test", dns.A)
        self.answer("example.test", dns.A)
        self.assertEqual(self.resolver.upstream_queries, 1)
        self.clock.advance(TTL + 1)
        self.answer("example.test", dns.A)
        self.assertEqual(self.resolver.upstream_queries, 2)

    def test_nxdomain_and_nodata_cached(self) -> None:
        """NXDOMAIN and NODATA are answers, kept for the SOA's negative TTL (RFC 2308 §5)."""
        missing = self.answer("nowhere.test", dns.TXT)
        self.assertFalse(missing.exists)
        self.assertTrue(missing.void)
        nodata = self.answer("example.test", dns.PTR)
        self.assertTrue(nodata.exists)
        self.assertTrue(nodata.void)
        self.answer("nowhere.test", dns.TXT)
        self.answer("mx.example.test", dns.MX)
        self.answer("mx.example.test", dns.MX)
        self.assertEqual(self.resolver.upstream_queries, 3)
        self.clock.advance(TTL + 1)
        self.answer("nowhere.test", dns.TXT)
        self.assertEqual(self.resolver.upstream_queries, 4)

    def test_servfail_is_temporary(self) -> None:
        """SERVFAIL becomes DNSTemporaryError, remembered briefly so a dead zone is not
        hammered."""
        self.failureResultOf(self.resolver.query_answer("broken.test", dns.A), DNSTemporaryError)
        self.failureResultOf(self.resolver.query_answer("broken.test", dns.A), DNSTemporaryError)
        self.assertEqual(self.resolver.upstream_queries, 1)
        self.clock.advance(self.resolver.failure_ttl + 1)
        self.zone.set({"broken.test": {"A": ["192.0.2.9"]}})
        self.assertEqual(self.answer("broken.test", dns.A).addresses(), ["192.0.2.9"])

    def test_timeout_is_temporary(self) -> None:
        """A client timeout becomes DNSTemporaryError."""
        failure = self.failureResultOf(self.resolver.query_answer("slow.test", dns.A))
        self.assertIsInstance(failure.value, DNSTemporaryError)
        self.assertIn("timed out", str(failure.value))

    def test_server_never_answers(self) -> None:
        """An upstream that never answers gives DNSTemporaryError at our own deadline."""
        silent = _Silent()
        resolver = CachingResolver(silent, self.clock, timeout=5)
        first = resolver.query_answer("example.test", dns.A)
        second = resolver.query_answer("example.test", dns.A)
        self.assertNoResult(first)
        self.assertEqual(silent.asked, 1)  # the second question shares the first query
        self.clock.advance(5)
        self.failureResultOf(first, DNSTemporaryError)
        self.failureResultOf(second, DNSTemporaryError)

    def test_answer_for_coroutines(self) -> None:
        """answer() gives a fresh cached answer at once, and otherwise asks as query_answer
        does: upstream once, failures as DNSTemporaryError, expired entries asked again."""
        def run(name: str, type: int) -> Deferred[Any]:
            return Deferred.fromCoroutine(self.resolver.answer(name, type))

        first = self.successResultOf(run("example.test", dns.A))
        self.assertEqual(first.addresses(), ["192.0.2.1"])
        self.assertIs(self.successResultOf(run("Example.Test.", dns.A)), first)
        self.assertEqual(self.resolver.upstream_queries, 1)
        self.failureResultOf(run("broken.test", dns.A), DNSTemporaryError)
        self.clock.advance(3600 * 24 + 1)
        self.successResultOf(run("example.test", dns.A))
        self.assertEqual(self.resolver.upstream_queries, 3)
        self.assertFalse(self.successResultOf(run("a" * 64 + ".test", dns.A)).exists)

    def test_invalid_name_is_nxdomain(self) -> None:
        """A name that cannot be asked (a label over 63 octets) is NXDOMAIN without a query."""
        answer = self.answer("a" * 64 + ".test", dns.TXT)
        self.assertFalse(answer.exists)
        self.assertEqual(self.resolver.upstream_queries, 0)

    def test_entries_bounded(self) -> None:
        """The cache holds at most max_entries answers, forgetting the least recently used."""
        resolver = CachingResolver(self.zone, self.clock, max_entries=1)
        self.successResultOf(resolver.query_answer("example.test", dns.A))
        self.successResultOf(resolver.query_answer("example.test", dns.AAAA))
        self.successResultOf(resolver.query_answer("example.test", dns.A))
        self.assertEqual(resolver.upstream_queries, 3)

    def test_iresolver_compatible(self) -> None:
        """As an IResolver it answers lookupMailExchange and fails NXDOMAIN as twisted.names."""
        answers, _, _ = self.successResultOf(self.resolver.lookupMailExchange("example.test"))
        self.assertEqual([rr.payload.preference for rr in answers], [10])
        self.failureResultOf(self.resolver.lookupMailExchange("nowhere.test"),
                             error.DNSNameError)
        self.failureResultOf(self.resolver.lookupAddress("broken.test"), error.DNSServerError)

    def test_describe(self) -> None:
        """An answer describes itself in one line for a result's evidence."""
        self.assertEqual(self.answer("example.test", dns.TXT).describe(),
                         "TXT example.test: 'v=spf1 -all', 'part one part two'")
        self.assertEqual(self.answer("nowhere.test", dns.A).describe(), "A nowhere.test: NXDOMAIN")


class OverTheWireTests(TestCase):
    """The lab DNS server and twisted.names' client: negative answers carry their SOA."""

    def test_nxdomain_cached_over_udp(self) -> Deferred[None]:
        """NXDOMAIN from the lab DNS server comes with an SOA, so the cache keeps it."""
        from twisted.internet import reactor
        from twisted.names import client

        from mailsys.labdns import serve

        udp, tcp = serve(Zone(ZONE), 0, "127.0.0.1", reactor)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        upstream = client.Resolver(servers=[("127.0.0.1", udp.getHost().port)], reactor=reactor)
        resolver = CachingResolver(upstream, reactor, timeout=5)

        async def twice() -> None:
            first = await resolver.query_answer("nowhere.test", dns.TXT)
            second = await resolver.query_answer("nowhere.test", dns.TXT)
            assert not first.exists and not second.exists
            assert first.ttl == TTL
            assert resolver.upstream_queries == 1

        return Deferred.fromCoroutine(twice())
