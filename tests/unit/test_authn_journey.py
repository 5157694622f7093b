"""Mail authentication in the message journey: each check and the signing step recorded with
its evidence, and the words `mailsys trace` shows for them."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailsys.authn.checks import InboundChecks
from mailsys.authn.dkim import DKIMSigner, generate_key, load_key, sign_message
from mailsys.authn.intake import MessageAuthentication
from mailsys.authn.sink import CheckingSink, SigningSink
from mailsys.dns import CachingResolver
from mailsys.envelope import Envelope, Recipient, TargetKind
from mailsys.interfaces import MessageRefusedError
from mailsys.journey.events import JourneyEvent, MemoryRecorder
from mailsys.journey.steps import describe
from mailsys.labdns import Zone

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: bob@here.test\r\nSubject: Hi\r\n"
           b"Date: Mon, 07 Dec 2026 04:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n"
           b"Hello.\r\n")


def _now(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(function, *args)


class _Inner:
    def __init__(self) -> None:
        self.stored: list[tuple[Envelope, bytes]] = []

    def new_queue_id(self) -> str:
        return "Q1"

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
        self.stored.append((envelope, message))
        return maybeDeferred(lambda: None)


def _key(algorithm: str, selector: str) -> tuple[Any, str]:
    pem, record = generate_key(algorithm)  # type: ignore[arg-type]
    with tempfile.NamedTemporaryFile(suffix=".pem") as file:
        file.write(pem)
        file.flush()
        return load_key(Path(file.name), "example.test", selector), record


def _envelope(ip: str = "192.0.2.10") -> Envelope:
    return Envelope("Q1", "alice@example.test",
                    [Recipient("bob@here.test", "bob@here.test", TargetKind.LOCAL,
                               "bob@here.test")], 0.0, client_address=ip,
                    client_helo="mail.example.test")


class CheckStepsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key, record = _key("rsa", "mail")
        self.zone: dict[str, Any] = {
            "example.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
            "mail.example.test": {"A": ["192.0.2.10"],
                                  "TXT": ["v=spf1 ip4:192.0.2.10 -all"]},
            "10.2.0.192.in-addr.arpa": {"PTR": ["mail.example.test"]},
            "mail._domainkey.example.test": {"TXT": [record]},
            "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]},
        }
        self.journey = MemoryRecorder()

    def submit(self, message: bytes, ip: str = "192.0.2.10") -> Deferred[object]:
        checks = InboundChecks(CachingResolver(Zone(self.zone), Clock()), "mx.here.test",
                               run_in_thread=_now)
        sink = CheckingSink(_Inner(), MessageAuthentication(checks, None),  # type: ignore[arg-type]
                            self.journey)
        return sink.submit(_envelope(ip), message)

    def events(self) -> dict[str, list[JourneyEvent]]:
        found: dict[str, list[JourneyEvent]] = {}
        for event in self.journey.events:
            found.setdefault(event.kind, []).append(event)
        return found

    def test_each_check_recorded_with_its_evidence(self) -> None:
        """A checked message records iprev, SPF for MAIL FROM and HELO, each DKIM signature
        (d=, s=), DMARC (the record) and the verdict, each with the DNS answers it used."""
        signed = sign_message(MESSAGE, [self.key]) + MESSAGE
        self.successResultOf(self.submit(signed))
        self.assertEqual(self.journey.kinds(), ["authn.iprev", "authn.spf", "authn.spf",
                                                "authn.dkim", "authn.dmarc", "authn.verdict"])
        events = self.events()
        self.assertTrue(all(e.queue_id == "Q1" for e in self.journey.events))
        iprev = events["authn.iprev"][0].fields
        self.assertEqual((iprev["result"], iprev["name"]), ("pass", "mail.example.test"))
        self.assertIn("PTR 10.2.0.192.in-addr.arpa: mail.example.test", iprev["evidence"])
        mailfrom, helo = (e.fields for e in events["authn.spf"])
        self.assertEqual((mailfrom["identity"], mailfrom["result"], mailfrom["mechanism"]),
                         ("mailfrom", "pass", "ip4:192.0.2.0/24"))
        self.assertIn("TXT example.test: 'v=spf1 ip4:192.0.2.0/24 -all'", mailfrom["evidence"])
        self.assertEqual((helo["identity"], helo["result"]), ("helo", "pass"))
        dkim = events["authn.dkim"][0].fields
        self.assertEqual((dkim["result"], dkim["domain"], dkim["selector"], dkim["key_bits"]),
                         ("pass", "example.test", "mail", 2048))
        self.assertTrue(dkim["evidence"][0].startswith("TXT mail._domainkey.example.test:"))
        dmarc = events["authn.dmarc"][0].fields
        self.assertEqual((dmarc["result"], dmarc["record"], dmarc["record_domain"]),
                         ("pass", "v=DMARC1; p=reject", "example.test"))
        self.assertTrue(dmarc["spf_aligned"] and dmarc["dkim_aligned"])
        self.assertEqual(events["authn.verdict"][0].fields["action"], "accept")

    def test_refused_message_records_why(self) -> None:
        """A spoof refused under p=reject still records its checks and the 550 verdict."""
        self.failureResultOf(self.submit(MESSAGE, ip="198.51.100.7"), MessageRefusedError)
        events = self.events()
        self.assertEqual(events["authn.dkim"][0].fields, {"result": "none"})
        self.assertEqual(events["authn.spf"][0].fields["result"], "fail")
        self.assertEqual(events["authn.spf"][0].fields["mechanism"], "-all")
        verdict = events["authn.verdict"][0].fields
        self.assertEqual(verdict["action"], "reject")
        self.assertTrue(verdict["reply"].startswith("550 5.7.1"))

    def test_trace_words(self) -> None:
        """Each step reads as a sentence naming the result, the evidence and its RFC."""
        signed = sign_message(MESSAGE, [self.key]) + MESSAGE
        self.successResultOf(self.submit(signed))
        lines = {e.kind + ":" + e.fields.get("identity", ""): describe(e)
                 for e in self.journey.events}
        spf = lines["authn.spf:mailfrom"]
        self.assertIn("SPF pass for MAIL FROM example.test from 192.0.2.10, decided by "
                      "ip4:192.0.2.0/24", spf.text)
        self.assertIn("DNS: TXT example.test: 'v=spf1 ip4:192.0.2.0/24 -all'", spf.text)
        self.assertIn("RFC 7208 §2.6.3", spf.rule)
        self.assertIn("SPF pass for HELO mail.example.test", lines["authn.spf:helo"].text)
        dkim = lines["authn.dkim:"]
        self.assertIn("DKIM pass: signature d=example.test s=mail (rsa-sha256, 2048-bit key)",
                      dkim.text)
        self.assertIn("…", dkim.text)  # the key record is shortened in the text
        self.assertIn("RFC 6376 §6.1.3", dkim.rule)
        dmarc = lines["authn.dmarc:"]
        self.assertIn("DMARC pass for From example.test, aligned by SPF and DKIM "
                      "(d=example.test), record at _dmarc.example.test: v=DMARC1; p=reject",
                      dmarc.text)
        self.assertIn("RFC 9989", dmarc.rule)
        self.assertIn("iprev pass: 192.0.2.10 is mail.example.test", lines["authn.iprev:"].text)
        self.assertIn("RFC 8601 §3", lines["authn.iprev:"].rule)
        self.assertEqual(lines["authn.verdict:"].text, "authentication verdict: accepted")


class SignStepTests(SynchronousTestCase):
    def test_signing_recorded(self) -> None:
        """Submitted mail records the signing step: d=, s= and algorithm of each signature."""
        rsa, _ = _key("rsa", "mail")
        ed, _ = _key("ed25519", "ed")
        journey = MemoryRecorder()
        signer = DKIMSigner({"example.test": [rsa, ed]}, run_in_thread=_now)
        sink = SigningSink(_Inner(), MessageAuthentication(None, signer),  # type: ignore[arg-type]
                           journey)
        self.successResultOf(sink.submit(_envelope(), MESSAGE))
        (event,) = journey.events
        self.assertEqual((event.kind, event.queue_id), ("authn.sign", "Q1"))
        self.assertEqual(event.fields["selectors"], ["mail", "ed"])
        self.assertEqual(event.fields["algorithms"], ["rsa-sha256", "ed25519-sha256"])
        step = describe(event)
        self.assertEqual(step.text, "DKIM-signed for From example.test: d=example.test s=mail "
                                    "(rsa-sha256), d=example.test s=ed (ed25519-sha256)")
        self.assertIn("RFC 6376 §5", step.rule)

    def test_unsigned_says_why(self) -> None:
        """Mail from a domain without a key records that it went unsigned, and why."""
        rsa, _ = _key("rsa", "mail")
        journey = MemoryRecorder()
        signer = DKIMSigner({"example.test": [rsa]}, run_in_thread=_now)
        sink = SigningSink(_Inner(), MessageAuthentication(None, signer),  # type: ignore[arg-type]
                           journey)
        other = MESSAGE.replace(b"alice@example.test", b"alice@other.test")
        self.successResultOf(sink.submit(_envelope(), other))
        self.assertEqual(describe(journey.events[0]).text,
                         "not DKIM-signed (no DKIM key for other.test)")

    def test_signing_off_records_nothing(self) -> None:
        """With signing off there is no signing step."""
        journey = MemoryRecorder()
        sink = SigningSink(_Inner(), MessageAuthentication(None, None),  # type: ignore[arg-type]
                           journey)
        self.successResultOf(sink.submit(_envelope(), MESSAGE))
        self.assertEqual(journey.events, [])
