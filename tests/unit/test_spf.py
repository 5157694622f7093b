"""SPF beyond the suite: evidence, the HELO identity, and bad input that must give a result."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from mailsys.authn.spf import SPFChecker, SPFResult
from mailsys.dns import CachingResolver
from mailsys.labdns import Zone


class _Silent:
    """A DNS server that never answers."""

    def query(self, query: dns.Query, timeout: object = None) -> Deferred[Any]:
        return Deferred()


class SPFTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def check(self, zone: dict[str, Any], ip: str, mailfrom: str,
              helo: str = "client.test") -> SPFResult:
        checker = SPFChecker(CachingResolver(Zone(zone), self.clock))
        return self.successResultOf(checker.check_mailfrom(ip, mailfrom, helo))

    def test_pass_keeps_evidence(self) -> None:
        """A pass names the term that matched and the DNS answers it used."""
        result = self.check({"example.test": {"TXT": ["v=spf1 a -all"], "A": ["192.0.2.1"]}},
                            "192.0.2.1", "a@example.test")
        self.assertEqual((result.result, result.mechanism), ("pass", "a"))
        self.assertEqual(result.evidence, ["TXT example.test: 'v=spf1 a -all'",
                                           "A example.test: 192.0.2.1"])
        self.assertEqual(result.lookups, 1)

    def test_helo_identity(self) -> None:
        """The HELO identity is checked on its own (RFC 7208 §2.3)."""
        checker = SPFChecker(CachingResolver(
            Zone({"mx.example.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}}), self.clock))
        result = self.successResultOf(checker.check_helo("192.0.2.7", "mx.example.test"))
        self.assertEqual((result.identity, result.result), ("helo", "pass"))

    def test_huge_record(self) -> None:
        """A record of thousands of terms is evaluated up to the lookup limit: permerror."""
        terms = " ".join(f"a:h{i}.example.test" for i in range(2000))
        result = self.check({"example.test": {"TXT": [f"v=spf1 {terms} -all"]},
                             **{f"h{i}.example.test": {"A": ["192.0.2.9"]} for i in range(20)}},
                            "192.0.2.1", "a@example.test")
        self.assertEqual(result.result, "permerror")
        self.assertIn("more than 10", result.problem)

    def test_over_long_txt(self) -> None:
        """A TXT record of many 255-octet strings is joined and refused as syntax, not a crash."""
        result = self.check({"example.test": {"TXT": ["v=spf1 " + "x" * 5000]}},
                            "192.0.2.1", "a@example.test")
        self.assertEqual(result.result, "permerror")

    def test_redirect_loop(self) -> None:
        """Two records redirecting to each other end in permerror at the lookup limit."""
        result = self.check({"a.test": {"TXT": ["v=spf1 redirect=b.test"]},
                             "b.test": {"TXT": ["v=spf1 redirect=a.test"]}},
                            "192.0.2.1", "x@a.test")
        self.assertEqual(result.result, "permerror")

    def test_include_loop(self) -> None:
        """Records including each other (and themselves) end in permerror at the lookup
        limit, never in endless recursion."""
        result = self.check({"a.test": {"TXT": ["v=spf1 include:b.test -all"]},
                             "b.test": {"TXT": ["v=spf1 include:a.test include:b.test -all"]}},
                            "192.0.2.1", "x@a.test")
        self.assertEqual(result.result, "permerror")
        self.assertLessEqual(result.lookups, 11)

    def test_include_fan_out(self) -> None:
        """A record whose includes each include ten more is cut at 10 lookups in all, not
        10 per level (RFC 7208 §4.6.4)."""
        zone: dict[str, Any] = {"a.test": {"TXT": ["v=spf1 " + " ".join(
            f"include:i{n}.test" for n in range(10)) + " -all"]}}
        for n in range(10):
            zone[f"i{n}.test"] = {"TXT": ["v=spf1 " + " ".join(
                f"a:h{n}-{m}.test" for m in range(10)) + " -all"]}
            zone.update({f"h{n}-{m}.test": {"A": ["192.0.2.99"]} for m in range(10)})
        result = self.check(zone, "192.0.2.1", "x@a.test")
        self.assertEqual(result.result, "permerror")
        self.assertIn("more than 10", result.problem)

    def test_server_never_answers(self) -> None:
        """A DNS server that never answers gives temperror at the resolver's deadline."""
        checker = SPFChecker(CachingResolver(_Silent(), self.clock, timeout=3))
        deferred = checker.check_mailfrom("192.0.2.1", "a@example.test", "client.test")
        self.assertNoResult(deferred)
        self.clock.advance(3)
        self.assertEqual(self.successResultOf(deferred).result, "temperror")

    def test_bad_ip(self) -> None:
        """A client address that is not one gives permerror, not an exception."""
        result = self.check({}, "not-an-ip", "a@example.test")
        self.assertEqual(result.result, "permerror")

    def test_null_sender_uses_helo(self) -> None:
        """A null reverse-path is checked as postmaster@HELO (RFC 7208 §2.4)."""
        result = self.check({"client.test": {"TXT": ["v=spf1 -all"]}}, "192.0.2.1", "",
                            "client.test")
        self.assertEqual((result.result, result.sender), ("fail", "postmaster@client.test"))
