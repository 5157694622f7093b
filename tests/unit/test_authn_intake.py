"""Intake: signing submitted mail by its From domain, and the verdict for inbound mail per
recipient domain."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailsys.authn.checks import InboundChecks
from mailsys.authn.dkim import DKIMSigner, generate_key, load_key
from mailsys.authn.intake import IntakeFacts, MessageAuthentication, PolicyTable
from mailsys.authn.policy import AuthnPolicy
from mailsys.dns import CachingResolver
from mailsys.labdns import Zone

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: bob@here.test\r\nSubject: Hi\r\n"
           b"Date: Mon, 07 Dec 2026 04:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n"
           b"Hello.\r\n")
SPOOF_ZONE = {"example.test": {"TXT": ["v=spf1 -all"]},
              "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]}}


def _now(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(function, *args)


def _checks(zone: dict[str, Any]) -> InboundChecks:
    return InboundChecks(CachingResolver(Zone(zone), Clock()), "mx.here.test",
                         run_in_thread=_now)


class SigningTests(SynchronousTestCase):
    def test_signs_by_from_domain(self) -> None:
        """A submitted message is signed with the keys of its From domain, others not."""
        pem, _ = generate_key("ed25519")
        with tempfile.NamedTemporaryFile(suffix=".pem") as file:
            file.write(pem)
            file.flush()
            key = load_key(Path(file.name), "example.test", "s1")
        intake = MessageAuthentication(None, DKIMSigner({"example.test": [key]},
                                                        run_in_thread=_now))
        signed = self.successResultOf(intake.sign(MESSAGE))
        self.assertTrue(signed.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256"))
        other = MESSAGE.replace(b"alice@example.test", b"alice@other.test")
        self.assertEqual(self.successResultOf(intake.sign(other)), other)

    def test_signing_failure_sends_unsigned(self) -> None:
        """A signer that breaks leaves the message unsigned rather than losing it."""

        class Broken(DKIMSigner):
            def sign(self, message: bytes, domain: str) -> Deferred[bytes]:
                return fail(RuntimeError("no entropy"))

        intake = MessageAuthentication(None, Broken({"example.test": [object()]}))  # type: ignore[list-item]
        self.assertEqual(self.successResultOf(intake.sign(MESSAGE)), MESSAGE)
        self.flushLoggedErrors(RuntimeError)


class InboundTests(SynchronousTestCase):
    def facts(self, *recipients: str) -> IntakeFacts:
        return IntakeFacts("192.0.2.66", "evil.test", "alice@example.test", recipients)

    def test_spoof_rejected_by_default(self) -> None:
        """A spoof of a p=reject domain gets 550 5.7.1 under the default policy."""
        verdict = self.successResultOf(
            MessageAuthentication(_checks(SPOOF_ZONE), None).inbound(self.facts("bob@here.test"),
                                                                     MESSAGE))
        self.assertEqual(verdict.action, "reject")
        assert verdict.reply is not None
        self.assertEqual((verdict.reply.code, verdict.reply.enhanced), (550, "5.7.1"))
        self.assertTrue(verdict.message.startswith(b"Authentication-Results: mx.here.test;"))
        self.assertEqual(verdict.evidence()["dmarc"]["result"], "fail")

    def test_lenient_domain_keeps_its_mail(self) -> None:
        """With a second recipient whose domain only marks, the message is accepted, and the
        strict domain's recipient gets it in Junk."""
        table = PolicyTable(domains={"lenient.test": AuthnPolicy(dmarc="none")})
        intake = MessageAuthentication(_checks(SPOOF_ZONE), None, table)
        verdict = self.successResultOf(
            intake.inbound(self.facts("bob@here.test", "carol@lenient.test"), MESSAGE))
        self.assertEqual((verdict.action, verdict.junk), ("junk", ("bob@here.test",)))

    def test_quarantine_to_junk(self) -> None:
        """p=quarantine sends every recipient's copy to Junk."""
        zone = {**SPOOF_ZONE, "_dmarc.example.test": {"TXT": ["v=DMARC1; p=quarantine"]}}
        verdict = self.successResultOf(MessageAuthentication(_checks(zone), None).inbound(
            self.facts("bob@here.test"), MESSAGE))
        self.assertEqual((verdict.action, verdict.junk), ("junk", ("bob@here.test",)))

    def test_broken_checks_accept(self) -> None:
        """Checks that break accept the message as it came (never lost)."""

        class Broken(InboundChecks):
            def check(self, *args: Any) -> Any:
                return fail(RuntimeError("bug"))

        broken = Broken(CachingResolver(Zone({}), Clock()), "mx.here.test")
        verdict = self.successResultOf(MessageAuthentication(broken, None).inbound(
            self.facts("bob@here.test"), MESSAGE))
        self.assertEqual((verdict.action, verdict.message), ("accept", MESSAGE))
        self.flushLoggedErrors(RuntimeError)


class SigningSinkTests(SynchronousTestCase):
    def test_signs_before_storing(self) -> None:
        """The sink stores the signed message and its new size; the server's own notices from
        mail.example.test are signed with example.test's key (relaxed alignment)."""
        from mailsys.authn.sink import SigningSink
        from mailsys.envelope import Envelope

        pem, _ = generate_key("ed25519")
        with tempfile.NamedTemporaryFile(suffix=".pem") as file:
            file.write(pem)
            file.flush()
            key = load_key(Path(file.name), "example.test", "s1")
        stored: list[tuple[Envelope, bytes]] = []

        class Inner:
            def new_queue_id(self) -> str:
                return "Q1"

            def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
                stored.append((envelope, message))
                return maybeDeferred(lambda: None)

        intake = MessageAuthentication(None, DKIMSigner({"example.test": [key]},
                                                        run_in_thread=_now))
        sink = SigningSink(Inner(), intake)  # type: ignore[arg-type]
        notice = MESSAGE.replace(b"alice@example.test", b"MAILER-DAEMON@mail.example.test")
        envelope = Envelope(sink.new_queue_id(), "", [], 0.0, size=len(notice))
        self.successResultOf(sink.submit(envelope, notice))
        (got, message), = stored
        self.assertTrue(message.startswith(b"DKIM-Signature:"))
        self.assertIn(b"d=example.test", message)
        self.assertEqual(got.size, len(message))


class CheckingSinkTests(SynchronousTestCase):
    def sink(self, zone: dict[str, Any]) -> tuple[Any, list[tuple[Any, bytes]]]:
        from mailsys.authn.sink import CheckingSink

        stored: list[tuple[Any, bytes]] = []

        class Inner:
            def new_queue_id(self) -> str:
                return "Q1"

            def submit(self, envelope: Any, message: bytes) -> Deferred[None]:
                stored.append((envelope, message))
                return maybeDeferred(lambda: None)

        return CheckingSink(Inner(), MessageAuthentication(_checks(zone), None)), stored  # type: ignore[arg-type]

    def envelope(self) -> Any:
        from mailsys.envelope import Envelope, Recipient, TargetKind

        return Envelope("Q1", "alice@example.test",
                        [Recipient("bob@here.test", "bob@here.test", TargetKind.LOCAL,
                                   "bob@here.test")], 0.0, client_address="192.0.2.66",
                        client_helo="evil.test")

    def test_refusal(self) -> None:
        """A p=reject spoof fails the submit with MessageRefusedError(550 5.7.1); nothing is
        stored."""
        from mailsys.interfaces import MessageRefusedError

        sink, stored = self.sink(SPOOF_ZONE)
        failure = self.failureResultOf(sink.submit(self.envelope(), MESSAGE),
                                       MessageRefusedError)
        self.assertEqual(failure.value.reply.code, 550)
        self.assertEqual(stored, [])

    def test_junk_and_evidence(self) -> None:
        """p=quarantine stores the message with the field on top, the copy marked for Junk and
        the evidence on the envelope."""
        zone = {**SPOOF_ZONE, "_dmarc.example.test": {"TXT": ["v=DMARC1; p=quarantine"]}}
        sink, stored = self.sink(zone)
        self.successResultOf(sink.submit(self.envelope(), MESSAGE))
        ((envelope, message),) = stored
        self.assertTrue(message.startswith(b"Authentication-Results: mx.here.test;"))
        self.assertEqual(envelope.recipients[0].folder, "Junk")
        self.assertEqual(envelope.authentication["dmarc"]["result"], "fail")
        self.assertEqual(envelope.size, len(message))


class ChecksOffTests(SynchronousTestCase):
    def test_forged_results_removed_with_checks_off(self) -> None:
        """With the checks off, a field claiming our authserv-id is still removed."""
        intake = MessageAuthentication(None, None, authserv_id="mx.here.test")
        forged = b"Authentication-Results: mx.here.test; dmarc=pass\r\n" + MESSAGE
        facts = IntakeFacts("192.0.2.66", "evil.test", "alice@example.test", ["bob@here.test"])
        verdict = self.successResultOf(intake.inbound(facts, forged))
        self.assertEqual((verdict.action, verdict.message), ("accept", MESSAGE))

    def test_sink_hands_over_at_once_with_checks_off(self) -> None:
        """With the checks off, the checking sink hands the message, without our forged field
        and with its size corrected, to the next sink in the same call; the next sink's result
        is the caller's."""
        from mailsys.authn.sink import CheckingSink
        from mailsys.envelope import Envelope

        stored: list[tuple[Envelope, bytes]] = []
        committed: Deferred[None] = Deferred()

        class Inner:
            def new_queue_id(self) -> str:
                return "Q"

            def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
                stored.append((envelope, message))
                return committed

        intake = MessageAuthentication(None, None, authserv_id="mx.here.test")
        sink = CheckingSink(Inner(), intake)  # type: ignore[arg-type]
        forged = b"Authentication-Results: mx.here.test; dmarc=pass\r\n" + MESSAGE
        envelope = Envelope("Q", "alice@example.test", [], 0.0, size=len(forged))
        self.assertIs(sink.submit(envelope, forged), committed)
        self.assertEqual(stored, [(envelope, MESSAGE)])
        self.assertEqual(envelope.size, len(MESSAGE))


class _Silent:
    """A DNS server that never answers."""

    def query(self, query: Any, timeout: object = None) -> Deferred[Any]:
        return Deferred()


class BadInputAtIntakeTests(SynchronousTestCase):
    def sink(self, resolver: CachingResolver, clock: Clock) -> tuple[Any, list[bytes]]:
        from mailsys.authn.sink import CheckingSink

        stored: list[bytes] = []

        class Inner:
            def new_queue_id(self) -> str:
                return "Q1"

            def submit(self, envelope: Any, message: bytes) -> Deferred[None]:
                stored.append(message)
                return maybeDeferred(lambda: None)

        checks = InboundChecks(resolver, "mx.here.test", run_in_thread=_now, clock=clock,
                               deadline=10.0)
        return CheckingSink(Inner(), MessageAuthentication(checks, None)), stored  # type: ignore[arg-type]

    def envelope(self) -> Any:
        from mailsys.envelope import Envelope, Recipient, TargetKind

        return Envelope("Q1", "alice@example.test",
                        [Recipient("bob@here.test", "bob@here.test", TargetKind.LOCAL,
                                   "bob@here.test")], 0.0, client_address="192.0.2.66",
                        client_helo="client.test")

    def test_dns_that_never_answers(self) -> None:
        """With a DNS server that never answers, the message waits no longer than the
        resolver's timeout, is accepted (nothing known asks for a refusal) and marked
        temperror for every check; nothing is lost."""
        from mailsys.authn.dkim import sign_message

        pem, _ = generate_key("ed25519")
        with tempfile.NamedTemporaryFile(suffix=".pem") as file:
            file.write(pem)
            file.flush()
            key = load_key(Path(file.name), "example.test", "s1")
        clock = Clock()
        sink, stored = self.sink(CachingResolver(_Silent(), clock, timeout=5.0), clock)
        done = sink.submit(self.envelope(), sign_message(MESSAGE, [key]) + MESSAGE)
        self.assertNoResult(done)
        finished: list[float] = []
        done.addCallback(lambda _: finished.append(clock.seconds()))
        while not finished and clock.seconds() < 60:
            clock.advance(1.0)
        # The checks' own lookups end at the resolver's timeout; DMARC's, asked after them,
        # at the next one: bounded, whatever the server does.
        self.assertEqual(finished, [10.0])
        (message,) = stored
        header = message.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
        for method in (b"iprev=temperror", b"spf=temperror", b"dkim=temperror",
                       b"dmarc=temperror"):
            self.assertIn(method, header)

    def test_fifty_signatures_stored_with_results(self) -> None:
        """A message with 50 DKIM signatures is checked (the first 8 looked at) and stored
        whole, with one dkim result per signature looked at."""
        from mailsys.authn.dkim import sign_message

        pem, record = generate_key("ed25519")
        with tempfile.NamedTemporaryFile(suffix=".pem") as file:
            file.write(pem)
            file.flush()
            key = load_key(Path(file.name), "example.test", "s1")
        zone = {"s1._domainkey.example.test": {"TXT": [record]},
                "example.test": {"TXT": ["v=spf1 -all"]},
                "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]}}
        clock = Clock()
        sink, stored = self.sink(CachingResolver(Zone(zone), clock), clock)
        fields = sign_message(MESSAGE, [key]) * 50
        self.successResultOf(sink.submit(self.envelope(), fields + MESSAGE))
        (message,) = stored
        self.assertTrue(message.endswith(fields + MESSAGE))
        header = message.split(b"DKIM-Signature:")[0]
        self.assertEqual(header.count(b"dkim=pass"), 8)
        self.assertIn(b"dmarc=pass", header)
