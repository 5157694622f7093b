"""DMARC (RFC 9989): the tree walk, alignment modes, p/sp/np, t=y, and DNS failures."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from mailsys.authn.dkim import DKIMResult
from mailsys.authn.dmarc import DMARCChecker, DMARCResult, author_domain, parse_record
from mailsys.authn.spf import SPFResult
from mailsys.labdns import Zone


def _spf(domain: str, result: str = "pass") -> SPFResult:
    return SPFResult(result, "mailfrom", domain, f"x@{domain}", "192.0.2.1")  # type: ignore[arg-type]


def _dkim(domain: str, result: str = "pass") -> DKIMResult:
    return DKIMResult(result, domain=domain, selector="s")  # type: ignore[arg-type]


class DMARCTests(SynchronousTestCase):
    def check(self, zone: dict[str, Any], from_domain: str | None, spf: SPFResult | None = None,
              dkim: list[DKIMResult] | None = None) -> DMARCResult:
        from mailsys.dns import CachingResolver

        self.zone = Zone(zone)
        checker = DMARCChecker(CachingResolver(self.zone, Clock()))
        return self.successResultOf(checker.check(from_domain, spf, dkim or []))

    def test_aligned_spf_passes(self) -> None:
        """An SPF pass for the author domain itself passes, keeping the record as evidence."""
        result = self.check({"_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]}},
                            "example.test", _spf("example.test"))
        self.assertEqual((result.result, result.spf_aligned), ("pass", True))
        self.assertEqual(result.record, "v=DMARC1; p=reject")
        self.assertIn("TXT _dmarc.example.test: 'v=DMARC1; p=reject'", result.evidence)

    def test_relaxed_dkim_alignment(self) -> None:
        """A DKIM pass for a subdomain aligns under relaxed alignment (same Organizational
        Domain, found by the tree walk)."""
        result = self.check({"_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]}},
                            "example.test", None, [_dkim("mail.example.test")])
        self.assertEqual((result.result, result.aligned_dkim_domain),
                         ("pass", "mail.example.test"))
        self.assertEqual(result.organizational_domain, "example.test")

    def test_strict_alignment(self) -> None:
        """adkim=s and aspf=s need the exact author domain."""
        zone = {"_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject; adkim=s; aspf=s"]}}
        result = self.check(zone, "example.test", _spf("mail.example.test"),
                            [_dkim("mail.example.test")])
        self.assertEqual((result.result, result.policy), ("fail", "reject"))
        self.assertEqual(self.check(zone, "example.test", None,
                                    [_dkim("example.test")]).result, "pass")

    def test_unaligned_and_failed_do_not_count(self) -> None:
        """A pass for another organization, or a DKIM fail for the author, is no pass."""
        zone = {"_dmarc.example.test": {"TXT": ["v=DMARC1; p=quarantine"]}}
        result = self.check(zone, "example.test", _spf("evil.test"),
                            [_dkim("evil.test"), _dkim("example.test", "fail")])
        self.assertEqual((result.result, result.policy), ("fail", "quarantine"))

    def test_subdomain_policy(self) -> None:
        """A subdomain without its own record gets sp= from the record found walking up."""
        zone = {"_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject; sp=quarantine"]},
                "news.example.test": {"A": ["192.0.2.1"]}}
        result = self.check(zone, "news.example.test", _spf("evil.test"))
        self.assertEqual((result.result, result.policy, result.record_domain),
                         ("fail", "quarantine", "example.test"))

    def test_nonexistent_subdomain_policy(self) -> None:
        """A subdomain that does not exist gets np= (RFC 9989)."""
        zone = {"_dmarc.example.test": {"TXT": ["v=DMARC1; p=none; sp=quarantine; np=reject"]}}
        result = self.check(zone, "ghost.example.test", _spf("evil.test"))
        self.assertEqual((result.result, result.policy), ("fail", "reject"))

    def test_testing_mode_lowers_policy(self) -> None:
        """t=y asks one step less: reject becomes quarantine."""
        zone = {"_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject; t=y"]}}
        self.assertEqual(self.check(zone, "example.test").policy, "quarantine")

    def test_psd_record(self) -> None:
        """Under a public suffix's psd=y record, each registered domain is its own
        Organizational Domain, so siblings do not align; the PSD's policy applies."""
        zone = {"_dmarc.test": {"TXT": ["v=DMARC1; p=reject; psd=y"]},
                "example.test": {"A": ["192.0.2.1"]}}
        result = self.check(zone, "example.test", _spf("other.test"))
        self.assertEqual((result.result, result.organizational_domain, result.policy),
                         ("fail", "example.test", "reject"))

    def test_psd_n_stops_the_walk(self) -> None:
        """A psd=n record names its domain as the Organizational Domain."""
        zone = {"_dmarc.dept.example.test": {"TXT": ["v=DMARC1; p=reject; psd=n"]},
                "_dmarc.example.test": {"TXT": ["v=DMARC1; p=none"]}}
        result = self.check(zone, "dept.example.test", None, [_dkim("example.test")])
        self.assertEqual((result.result, result.organizational_domain),
                         ("fail", "dept.example.test"))

    def test_long_name_walk(self) -> None:
        """A name of 8 or more labels is walked from its last 7 labels, then label by label."""
        self.check({}, "a.b.c.d.e.f.g.h.example.test")
        asked = [name for name, kind in self.zone.queries if kind == dns.TXT]
        self.assertEqual(asked[:3], ["_dmarc.a.b.c.d.e.f.g.h.example.test",
                                     "_dmarc.d.e.f.g.h.example.test",
                                     "_dmarc.e.f.g.h.example.test"])
        self.assertEqual(asked[-1], "_dmarc.test")
        self.assertEqual(len(asked), 8)

    def test_no_record(self) -> None:
        """Without any record the result is none."""
        self.assertEqual(self.check({}, "example.test", _spf("evil.test")).result, "none")

    def test_multiple_records_ignored(self) -> None:
        """Two records at one name are both discarded (RFC 9989 §4.10.1)."""
        zone = {"_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]}}
        self.assertEqual(self.check(zone, "example.test").result, "none")

    def test_dns_failure_is_temperror(self) -> None:
        """A DNS failure looking for the record is a temperror, never a fail."""
        zone = {"_dmarc.example.test": {"error": "servfail"}}
        result = self.check(zone, "example.test", _spf("evil.test"))
        self.assertEqual((result.result, result.policy), ("temperror", "none"))

    def test_no_single_author(self) -> None:
        """A message without exactly one author domain is a permerror."""
        self.assertEqual(self.check({}, None).result, "permerror")

    def test_author_domain(self) -> None:
        """The author domain comes from the one From field; two Froms or two domains give
        none."""
        self.assertEqual(author_domain(b"From: A <a@Example.TEST>\r\nTo: b@x.test\r\n"),
                         "example.test")
        self.assertEqual(author_domain(b"From:\r\n a@example.test\r\n"), "example.test")
        self.assertIsNone(author_domain(b"From: a@example.test\r\nFrom: b@evil.test\r\n"))
        self.assertIsNone(author_domain(b"From: a@example.test, b@evil.test\r\n"))
        self.assertIsNone(author_domain(b"Subject: none\r\n"))
        self.assertIsNone(author_domain(b"From: nobody\r\n"))

    def test_parse_record(self) -> None:
        """v=DMARC1 must come first; unknown tags and invalid values are ignored."""
        self.assertIsNone(parse_record("x.test", "p=reject; v=DMARC1"))
        record = parse_record("x.test", "v=DMARC1; p=bogus; sp=reject; zz=1; adkim=s")
        assert record is not None
        self.assertEqual((record.p, record.sp, record.adkim, record.aspf),
                         (None, "reject", "s", "r"))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["", "Alice ", "Alice Smith ", '"Smith, Alice" ', "(c) ", "=?utf-8?q?A?= "]),
       st.sampled_from(["a@example.test", "a.b+c@Mail.Example.TEST", "a@example.test.",
                        "@x.test", "a@b@c.test", "a@[192.0.2.1]", "a"]),
       st.booleans())
def test_author_domain_fast_path_agrees(name: str, address: str, angle: bool) -> None:
    """The fast path for plain From fields finds what email.utils' parser finds."""
    from email.utils import getaddresses

    value = f"{name}<{address}>" if angle else f"{name}{address}" if not name else address
    found = author_domain(f"From: {value}\r\n".encode())
    parsed = [a for _, a in getaddresses([value]) if a]
    domains = {a.rpartition("@")[2].strip().lower().removesuffix(".") for a in parsed}
    expected = next(iter(domains)) if len(domains) == 1 else None
    if expected is not None and (not expected or "." not in expected or "[" in expected
                                 or "@" in expected):
        expected = None
    assert found == expected, (value, found, expected)
