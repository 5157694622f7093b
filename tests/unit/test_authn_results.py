"""iprev, the Authentication-Results field (RFC 8601), the policy decision, and the checks of
one message together."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailsys.authn.checks import InboundChecks
from mailsys.authn.dkim import DKIMResult, generate_key, load_key, sign_message
from mailsys.authn.dmarc import DMARCResult
from mailsys.authn.iprev import IprevChecker, IprevResult
from mailsys.authn.policy import AuthnPolicy, Decision, combine, decide
from mailsys.authn.results import authentication_results, strip_authentication_results
from mailsys.authn.spf import SPFResult
from mailsys.dns import CachingResolver
from mailsys.labdns import Zone

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: bob@here.test\r\nSubject: Hi\r\n"
           b"Date: Mon, 07 Dec 2026 04:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n"
           b"Hello.\r\n")


def _now(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(function, *args)


class IprevTests(SynchronousTestCase):
    def check(self, zone: dict[str, Any], ip: str) -> IprevResult:
        checker = IprevChecker(CachingResolver(Zone(zone), Clock()))
        return self.successResultOf(checker.check(ip))

    def test_forward_confirmed(self) -> None:
        """A PTR name whose A record is the address passes, naming it."""
        result = self.check({"1.2.0.192.in-addr.arpa": {"PTR": ["mx.example.test"]},
                             "mx.example.test": {"A": ["192.0.2.1"]}}, "192.0.2.1")
        self.assertEqual((result.result, result.name), ("pass", "mx.example.test"))

    def test_not_confirmed(self) -> None:
        """A PTR name that does not lead back fails; no PTR at all is a permerror."""
        zone = {"1.2.0.192.in-addr.arpa": {"PTR": ["mx.example.test"]},
                "mx.example.test": {"A": ["192.0.2.9"]}}
        self.assertEqual(self.check(zone, "192.0.2.1").result, "fail")
        self.assertEqual(self.check({}, "192.0.2.1").result, "permerror")

    def test_dns_failure(self) -> None:
        """A DNS failure is a temperror."""
        zone = {"1.2.0.192.in-addr.arpa": {"error": "servfail"}}
        self.assertEqual(self.check(zone, "192.0.2.1").result, "temperror")

    def test_ipv6(self) -> None:
        """IPv6 addresses are looked up under ip6.arpa and confirmed by AAAA."""
        name = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        result = self.check({name: {"PTR": ["mx.example.test"]},
                             "mx.example.test": {"AAAA": ["2001:db8::1"]}}, "2001:db8::1")
        self.assertEqual(result.result, "pass")


class ResultsFieldTests(SynchronousTestCase):
    def test_field(self) -> None:
        """The field names our authserv-id and one method per line, with its properties."""
        field = authentication_results(
            "mx.here.test",
            spf=[SPFResult("pass", "mailfrom", "example.test", "alice@example.test", "192.0.2.1")],
            dkim=[DKIMResult("pass", "example.test", "s1", "rsa-sha256", "", "abcdefgh", 2048)],
            dmarc=DMARCResult("pass", "example.test"),
            iprev=IprevResult("pass", "192.0.2.1", "mx.example.test"))
        self.assertEqual(field.decode(), (
            "Authentication-Results: mx.here.test;\r\n"
            "\tiprev=pass policy.iprev=192.0.2.1 (mx.example.test);\r\n"
            "\tspf=pass smtp.mailfrom=alice@example.test;\r\n"
            "\tdkim=pass (2048-bit key) header.d=example.test header.s=s1 header.a=rsa-sha256"
            " header.b=abcdefgh;\r\n"
            "\tdmarc=pass header.from=example.test\r\n"))

    def test_reasons_quoted(self) -> None:
        """A reason or an odd address becomes a quoted-string, escaped."""
        field = authentication_results(
            "mx.here.test",
            spf=[SPFResult("permerror", "mailfrom", "x.test", 'a "b"@x.test', "192.0.2.1",
                           problem='bad "term"')], dkim=[])
        self.assertIn(b'spf=permerror reason="bad \\"term\\"" smtp.mailfrom="a \\"b\\"@x.test"',
                      field)
        self.assertIn(b"dkim=none", field)

    def test_strip_ours_only(self) -> None:
        """Fields claiming our authserv-id are removed (RFC 8601 §5), in any case and after a
        comment; others' fields stay."""
        message = (b"Authentication-Results: MX.Here.Test; spf=pass\r\n"
                   b"Received: from x\r\n"
                   b"Authentication-Results: (forged) mx.here.test;\r\n dkim=pass\r\n"
                   b"Authentication-Results: other.test; spf=fail\r\n" + MESSAGE)
        stripped, removed = strip_authentication_results(message, "mx.here.test")
        self.assertEqual(removed, 2)
        self.assertEqual(stripped, b"Received: from x\r\n"
                         b"Authentication-Results: other.test; spf=fail\r\n" + MESSAGE)
        self.assertEqual(strip_authentication_results(MESSAGE, "mx.here.test"), (MESSAGE, 0))


class PolicyTests(SynchronousTestCase):
    def dmarc(self, result: str, policy: str = "reject", record: str = "v=DMARC1; p=reject"
              ) -> DMARCResult:
        return DMARCResult(result, "example.test", policy, record)  # type: ignore[arg-type]

    def test_honours_sender_policy(self) -> None:
        """By default p=reject refuses with 550 5.7.1 and p=quarantine goes to Junk."""
        rejected = decide(AuthnPolicy(), dmarc=self.dmarc("fail"))
        self.assertEqual(rejected.action, "reject")
        assert rejected.reply is not None
        self.assertEqual((rejected.reply.code, rejected.reply.enhanced), (550, "5.7.1"))
        self.assertEqual(decide(AuthnPolicy(), dmarc=self.dmarc("fail", "quarantine")).action,
                         "junk")
        self.assertEqual(decide(AuthnPolicy(), dmarc=self.dmarc("pass")).action, "accept")

    def test_dns_failure_never_permanent(self) -> None:
        """A DMARC temperror defers only where a refusal was possible; a DMARC fail beside an
        SPF or DKIM temperror defers instead of refusing."""
        self.assertEqual(decide(AuthnPolicy(), dmarc=self.dmarc("temperror")).action, "defer")
        self.assertEqual(decide(AuthnPolicy(), dmarc=self.dmarc("temperror", "none", "")
                                ).action, "accept")
        spf = SPFResult("temperror", "mailfrom", "example.test", "a@example.test", "192.0.2.1")
        decision = decide(AuthnPolicy(), dmarc=self.dmarc("fail"), spf=spf)
        assert decision.reply is not None
        self.assertEqual((decision.action, decision.reply.code), ("defer", 451))

    def test_per_check_settings(self) -> None:
        """spf, dkim and iprev can each be none, junk or reject; the strictest wins."""
        spf = SPFResult("fail", "mailfrom", "example.test", "a@example.test", "192.0.2.1")
        self.assertEqual(decide(AuthnPolicy(), spf=spf).action, "accept")
        self.assertEqual(decide(AuthnPolicy(spf="junk"), spf=spf).action, "junk")
        self.assertEqual(decide(AuthnPolicy(spf="reject"), spf=spf).action, "reject")
        iprev = IprevResult("fail", "192.0.2.1")
        self.assertEqual(decide(AuthnPolicy(iprev="reject", spf="junk"), spf=spf,
                                iprev=iprev).action, "reject")
        dkim = [DKIMResult("fail", "example.test")]
        self.assertEqual(decide(AuthnPolicy(dkim="junk"), dkim=dkim).action, "junk")
        self.assertEqual(decide(AuthnPolicy(dmarc="none"), dmarc=self.dmarc("fail")).action,
                         "accept")

    def test_combine_most_lenient(self) -> None:
        """With recipients under different policies, one domain's refusal does not cost the
        other its mail."""
        self.assertEqual(combine([Decision("reject"), Decision("accept")]).action, "accept")
        self.assertEqual(combine([Decision("reject"), Decision("defer")]).action, "defer")


class InboundChecksTests(SynchronousTestCase):
    def test_signed_message_passes_everything(self) -> None:
        """A signed message from an SPF-authorised, forward-confirmed host passes all four
        checks, with the field on top and any forged field of ours removed."""
        import tempfile

        pem, record = generate_key("ed25519")
        with tempfile.NamedTemporaryFile(suffix=".pem") as file:
            file.write(pem)
            file.flush()
            key = load_key(Path(file.name), "example.test", "s1")
        zone = {"example.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
                "s1._domainkey.example.test": {"TXT": [record]},
                "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]},
                "1.2.0.192.in-addr.arpa": {"PTR": ["mx.example.test"]},
                "mx.example.test": {"A": ["192.0.2.1"], "TXT": ["v=spf1 a -all"]}}
        checks = InboundChecks(CachingResolver(Zone(zone), Clock()), "mx.here.test",
                               run_in_thread=_now)
        forged = b"Authentication-Results: mx.here.test; dmarc=pass\r\n"
        message = forged + sign_message(MESSAGE, [key]) + MESSAGE
        stored, report = self.successResultOf(
            checks.check("192.0.2.1", "mx.example.test", "alice@example.test", message))
        self.assertEqual(report.summary(),
                         "iprev=pass spf=pass spf.helo=pass dkim=pass:example.test dmarc=pass")
        self.assertTrue(stored.startswith(report.header))
        self.assertEqual(stored.count(b"Authentication-Results:"), 1)
        self.assertEqual(report.removed, 1)
        self.assertEqual(report.evidence()["dmarc"]["record"], "v=DMARC1; p=reject")

    def test_spoof_fails_dmarc(self) -> None:
        """An unsigned message claiming a p=reject domain from an unlisted host fails DMARC."""
        zone = {"example.test": {"TXT": ["v=spf1 -all"]},
                "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]}}
        checks = InboundChecks(CachingResolver(Zone(zone), Clock()), "mx.here.test",
                               run_in_thread=_now)
        _, report = self.successResultOf(
            checks.check("192.0.2.66", "evil.test", "alice@example.test", MESSAGE))
        assert report.dmarc is not None
        self.assertEqual((report.dmarc.result, report.dmarc.policy), ("fail", "reject"))
        self.assertEqual(decide(AuthnPolicy(), spf=report.spf, dkim=report.dkim,
                                dmarc=report.dmarc).action, "reject")


class _Silent:
    """A DNS server that never answers."""

    def query(self, query: Any, timeout: object = None) -> Deferred[Any]:
        return Deferred()


class SilentDNSTests(SynchronousTestCase):
    def test_every_check_ends_in_temperror(self) -> None:
        """With a DNS server that never answers, every check is a temperror at the resolver's
        deadline, the field says so, and the default policy accepts the message."""
        clock = Clock()
        checks = InboundChecks(CachingResolver(_Silent(), clock, timeout=5), "mx.here.test",
                               run_in_thread=_now)
        message = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=s; h=from; bh=AAAA;"
                   b" b=AAAA\r\n" + MESSAGE)
        done = checks.check("192.0.2.1", "mx.example.test", "alice@example.test", message)
        self.assertNoResult(done)
        for _ in range(10):  # each stage waits for its own deadline
            clock.advance(5)
        stored, report = self.successResultOf(done)
        self.assertEqual(report.summary(), "iprev=temperror spf=temperror spf.helo=temperror "
                                           "dkim=temperror:example.test dmarc=temperror")
        self.assertIn(b"dmarc=temperror", stored)
        self.assertEqual(decide(AuthnPolicy(), spf=report.spf, dkim=report.dkim,
                                dmarc=report.dmarc, iprev=report.iprev).action, "accept")

    def test_overall_deadline(self) -> None:
        """However many lookups a check still has to make, at the deadline it is a temperror
        and the message goes on."""
        clock = Clock()
        checks = InboundChecks(CachingResolver(_Silent(), clock, timeout=1000), "mx.here.test",
                               run_in_thread=_now, clock=clock, deadline=5)
        done = checks.check("192.0.2.1", "mx.example.test", "alice@example.test", MESSAGE)
        clock.advance(5)
        self.assertNoResult(done)  # DMARC has its own deadline, after the others
        clock.advance(5)
        _, report = self.successResultOf(done)
        self.assertEqual(report.summary(), "iprev=temperror spf=temperror spf.helo=temperror "
                                           "dmarc=temperror")
        assert report.spf is not None
        self.assertEqual(report.spf.problem, "no answer within 5 s")
