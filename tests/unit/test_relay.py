"""The relay agent: MX order and failover, per-recipient outcomes, TLS policy, smarthost with
AUTH, transport map, connection reuse and limits; and, with the queue runner, retries on
schedule and expiry. Remote servers are scripted (tests/unit/relay_support.py); time is a Clock.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mailsys.delivery.mx import MXResolver
from mailsys.delivery.nexthop import NextHops
from mailsys.delivery.relay import RelayAgent, RelaySettings
from mailsys.delivery.tlspolicy import ClientTLS, TLSPolicies
from mailsys.envelope import Attempt, Envelope, Recipient, RecipientStatus, TargetKind
from mailsys.interfaces import IDeliveryAgent
from mailsys.labdns import Zone
from mailsys.queue.runner import QueueRunner
from mailsys.queue.spool import Spool
from mailsys.replies import Reply
from mailsys.values import TLSPolicy, parse_next_hop, parse_transport
from tests.unit.relay_support import FakeDialer, FakeMTA, FakeSession
from tests.unit.test_spool import ImmediateDiskPool

START = 1_700_000_000.0
MESSAGE = b"Subject: test\r\n\r\n.leading dot\r\nbody\r\n"
DELIVERED = RecipientStatus.DELIVERED
DEFERRED = RecipientStatus.DEFERRED
FAILED = RecipientStatus.FAILED

ZONE: dict[str, Any] = {
    "remote.test": {"MX": [[10, "mx1.remote.test"], [20, "mx2.remote.test"]]},
    "mx1.remote.test": {"A": ["127.0.0.2"]},
    "mx2.remote.test": {"A": ["127.0.0.3"]},
    "other.test": {"MX": [[10, "mx.other.test"]]},
    "mx.other.test": {"A": ["127.0.0.4"]},
    "nullmx.test": {"MX": [[0, "."]]},
    "broken.test": {"ERROR": "servfail"},
    "smarthost.test": {"A": ["127.0.0.9"]},
}


class Lab:
    """A relay agent wired to a lab zone, a fake dialer and a Clock."""

    def __init__(self, tmp_path: Path, *, transport: dict[str, str] | None = None,
                 smarthost: str | None = None, tls: str = "opportunistic",
                 tls_per_domain: dict[str, str] | None = None, **settings: Any) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.zone = Zone(ZONE)
        self.dialer = FakeDialer(self.clock)
        self.pool = ImmediateDiskPool()
        settings.setdefault("helo_name", "mail.example.test")
        self.agent = RelayAgent(
            RelaySettings(**settings),
            # The lab writes values as the config file does; config.py parses them once.
            NextHops({k: parse_transport(v) for k, v in (transport or {}).items()},
                     parse_next_hop(smarthost) if smarthost else None),
            TLSPolicies(TLSPolicy(tls),
                        {k: TLSPolicy(v) for k, v in (tls_per_domain or {}).items()}),
            ClientTLS(),
            MXResolver(self.zone, rng=random.Random(1)),
            self.dialer,
            self.pool,  # type: ignore[arg-type]
            self.clock,
        )
        self.agent.startService()
        self.path = tmp_path / "message.msg"
        self.path.write_bytes(MESSAGE)
        self.mx1 = self.dialer.add("127.0.0.2", FakeMTA("mx1.remote.test"))
        self.mx2 = self.dialer.add("127.0.0.3", FakeMTA("mx2.remote.test"))

    def deliver(self, envelope: Envelope, *recipients: Recipient) -> list[Deferred[Attempt]]:
        ds = [self.agent.deliver(envelope, r, self.path)
              for r in (recipients or envelope.recipients)]
        self.clock.advance(0)
        return ds


def relay(address: str, **kwargs: Any) -> Recipient:
    return Recipient(address=address, original=address, kind=TargetKind.RELAY, **kwargs)


def envelope(queue_id: str, *addresses: str, **kwargs: Any) -> Envelope:
    return Envelope(queue_id=queue_id, sender="alice@example.test",
                    recipients=[relay(a) for a in addresses], received_at=START,
                    size=len(MESSAGE), **kwargs)


def done(d: Deferred[Attempt]) -> Attempt:
    box: list[Any] = []

    def keep(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(keep)
    assert box and isinstance(box[0], Attempt), f"no attempt yet: {box!r}"
    return box[0]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    yield lab
    lab.agent.stopService()


def test_provides_idelivery_agent(lab: Lab) -> None:
    """The relay is an IDeliveryAgent."""
    verifyObject(IDeliveryAgent, lab.agent)


def test_recipients_of_one_message_share_a_transaction(lab: Lab) -> None:
    """Two recipients in one domain: one connection to the first MX, one transaction, each
    recipient delivered with the host, the remote MTA and TLS recorded."""
    a, b = lab.deliver(envelope("Q1", "one@remote.test", "two@remote.test"))
    (received,) = lab.mx1.received
    assert received.recipients == ["one@remote.test", "two@remote.test"]
    assert received.data == MESSAGE and received.tls
    for attempt in (done(a), done(b)):
        assert attempt.status is DELIVERED
        assert attempt.host == "mx1.remote.test[127.0.0.2]:25"
        assert attempt.mta == "mx1.remote.test"
        assert str(attempt.reply) == "250 2.0.0 Ok: queued"
        assert attempt.tls is not None and "TLSv1.3" in attempt.tls
    assert lab.mx2.connections == 0


def test_first_mx_refusing_connections_falls_over_to_the_second(lab: Lab) -> None:
    """A refused connection to the first MX moves on to the next one."""
    lab.dialer.refuse("127.0.0.2")
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    attempt = done(d)
    assert attempt.status is DELIVERED and attempt.host.startswith("mx2.remote.test")
    assert [c[0] for c in lab.dialer.connects] == ["127.0.0.2", "127.0.0.3"]


def test_greeting_refusal_tries_the_next_host(lab: Lab) -> None:
    """A 554 greeting (no service for us) is that host's answer only."""
    lab.mx1.greeting = "554 5.7.1 go away"
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    assert done(d).status is DELIVERED and lab.mx2.received


def test_all_hosts_down_defers_with_the_last_reason(lab: Lab) -> None:
    """No host takes the connection: deferred, naming the last host and why."""
    lab.dialer.refuse("127.0.0.2")
    lab.dialer.refuse("127.0.0.3")
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    attempt = done(d)
    assert attempt.status is DEFERRED
    assert str(attempt.reply) == ("451 4.4.1 No connection to the mail server: connect to "
                             "mx2.remote.test[127.0.0.3]:25: connection refused")
    assert attempt.mta is None


def test_per_recipient_outcomes(lab: Lab) -> None:
    """2xx delivers, 4xx defers and 5xx fails, each recipient on its own reply."""
    lab.mx1.rcpt = {"busy@remote.test": "450 4.2.1 mailbox busy",
                    "gone@remote.test": "550 5.1.1 no such user"}
    ok, busy, gone = lab.deliver(
        envelope("Q1", "ok@remote.test", "busy@remote.test", "gone@remote.test"))
    assert done(ok).status is DELIVERED
    assert (done(busy).status, str(done(busy).reply)) == (DEFERRED, "450 4.2.1 mailbox busy")
    assert (done(gone).status, str(done(gone).reply)) == (FAILED, "550 5.1.1 no such user")
    assert done(gone).reply == Reply(550, "5.1.1", "no such user")  # structured, not re-parsed
    assert done(gone).mta == "mx1.remote.test"


def test_data_refusal_applies_to_accepted_recipients(lab: Lab) -> None:
    """The reply to the data decides every recipient whose RCPT was accepted."""
    lab.mx1.data_reply = "554 5.6.0 content refused"
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    assert (done(d).status, str(done(d).reply)) == (FAILED, "554 5.6.0 content refused")


def test_null_mx_fails_without_a_connection(lab: Lab) -> None:
    """RFC 7505: a null MX fails permanently with 5.1.10 and no connection is made."""
    (d,) = lab.deliver(envelope("Q1", "x@nullmx.test"))
    attempt = done(d)
    assert attempt.status is FAILED and str(attempt.reply).startswith("556 5.1.10 ")
    assert lab.dialer.connects == []


def test_nxdomain_fails_and_servfail_defers(lab: Lab) -> None:
    """A domain that does not exist fails; a DNS server failure defers."""
    nx, sf = lab.deliver(envelope("Q1", "x@nowhere.test", "y@broken.test"))
    assert done(nx).status is FAILED and str(done(nx).reply).startswith("550 5.1.2 ")
    assert done(sf).status is DEFERRED and str(done(sf).reply).startswith("451 4.4.3 ")


def test_too_big_for_the_peer_fails_before_mail(lab: Lab) -> None:
    """A message over the peer's SIZE fails with 5.3.4 and no MAIL is sent."""
    lab.mx1.ehlo = ("PIPELINING", "SIZE 10")
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    assert done(d).status is FAILED and str(done(d).reply).startswith("552 5.3.4 ")
    assert not any(c.startswith("MAIL") for c in lab.mx1.commands)


def test_8bit_message_to_a_7bit_server_fails_clearly(lab: Lab) -> None:
    """An 8BITMIME message to a server without 8BITMIME fails with the reason."""
    lab.mx1.ehlo = ("PIPELINING",)
    (d,) = lab.deliver(envelope("Q1", "one@remote.test", body="8BITMIME"))
    assert done(d).status is FAILED
    assert str(done(d).reply) == ("554 5.6.3 The message is 8-bit, but the server does not offer "
                             "8BITMIME")


def test_dsn_parameters_and_orcpt(lab: Lab) -> None:
    """DSN parameters go on to a DSN server; ORCPT is added from the original address."""
    env = envelope("Q1", "one@remote.test", ret="HDRS", envid="E1")
    env.recipients[0].notify = ("FAILURE",)
    env.recipients[0].original = "alias@example.test"
    lab.deliver(env)
    (received,) = lab.mx1.received
    assert received.mail_line.endswith("RET=HDRS ENVID=E1")
    assert received.rcpt_lines == [
        "RCPT TO:<one@remote.test> NOTIFY=FAILURE ORCPT=rfc822;alias@example.test"]


# --- TLS policy ---------------------------------------------------------------------------------


def test_opportunistic_without_starttls_is_plaintext(lab: Lab) -> None:
    """Opportunistic: a server without STARTTLS gets the mail in plaintext."""
    lab.mx1.ehlo = ("PIPELINING",)
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    assert done(d).status is DELIVERED and done(d).tls is None
    assert not lab.mx1.received[0].tls


def test_opportunistic_tls_failure_retries_in_plaintext(lab: Lab) -> None:
    """Opportunistic: when the handshake fails, the same host is tried again without TLS."""
    lab.mx1.tls_error = "sslv3 alert handshake failure"
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    assert done(d).status is DELIVERED and done(d).tls is None
    assert [c[0] for c in lab.dialer.connects] == ["127.0.0.2", "127.0.0.2"]


def test_verify_without_starttls_defers(tmp_path: Path) -> None:
    """verify: a server that does not offer STARTTLS is skipped and the mail deferred."""
    lab = Lab(tmp_path, tls="verify")
    lab.mx1.ehlo = lab.mx2.ehlo = ("PIPELINING",)
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    attempt = done(d)
    assert attempt.status is DEFERRED and str(attempt.reply).startswith("451 4.7.4 TLS is required")
    assert lab.mx1.received == [] and lab.mx2.received == []


def test_verify_certificate_failure_defers_with_the_reason(tmp_path: Path) -> None:
    """verify: a certificate that does not verify defers with a clear TLS reason."""
    lab = Lab(tmp_path, tls="verify")
    lab.mx1.tls_error = lab.mx2.tls_error = "certificate verify failed"
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    attempt = done(d)
    assert attempt.status is DEFERRED
    assert str(attempt.reply) == ("451 4.7.5 TLS failed with mx2.remote.test[127.0.0.3]: "
                             "TLS handshake failed: certificate verify failed")
    assert len(lab.dialer.connects) == 2  # no plaintext retry under verify


def test_policy_none_never_starts_tls(tmp_path: Path) -> None:
    """none: STARTTLS is not used even when offered."""
    lab = Lab(tmp_path, tls="none")
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    assert done(d).status is DELIVERED and done(d).tls is None
    assert "STARTTLS" not in lab.mx1.commands


def test_per_domain_policy(tmp_path: Path) -> None:
    """A per-domain policy overrides the default for that domain only."""
    lab = Lab(tmp_path, tls="opportunistic", tls_per_domain={"remote.test": "verify"})
    lab.mx1.ehlo = lab.mx2.ehlo = ("PIPELINING",)
    lab.dialer.add("127.0.0.4", FakeMTA("mx.other.test", ehlo=("PIPELINING",)))
    strict, relaxed = lab.deliver(envelope("Q1", "a@remote.test", "b@other.test"))
    assert done(strict).status is DEFERRED and done(relaxed).status is DELIVERED


# --- smarthost and transport map ----------------------------------------------------------------


def test_smarthost_with_auth(tmp_path: Path) -> None:
    """All mail goes through the smarthost, after STARTTLS and AUTH; no MX lookup."""
    lab = Lab(tmp_path, smarthost="smtp:[smarthost.test]:587", smarthost_username="u@example.test",
              smarthost_password="pw")
    smart = lab.dialer.add("127.0.0.9", FakeMTA("smarthost.test",
                                                credentials=("u@example.test", "pw")), 587)
    a, b = lab.deliver(envelope("Q1", "one@remote.test", "two@other.test"))
    assert done(a).status is DELIVERED and done(b).status is DELIVERED
    (received,) = smart.received
    assert received.auth == "u@example.test" and received.tls
    assert received.recipients == ["one@remote.test", "two@other.test"]
    assert ("remote.test", 15) not in lab.zone.queries  # no MX lookup for remote.test
    assert done(a).host == "smarthost.test[127.0.0.9]:587"


def test_smarthost_auth_refused_defers(tmp_path: Path) -> None:
    """Refused credentials defer the mail (a configuration problem, not the recipient's)."""
    lab = Lab(tmp_path, smarthost="smtp:[smarthost.test]:587", smarthost_username="u",
              smarthost_password="wrong")
    lab.dialer.add("127.0.0.9", FakeMTA("smarthost.test", credentials=("u", "pw")), 587)
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    attempt = done(d)
    assert attempt.status is DEFERRED
    assert str(attempt.reply).startswith("451 4.7.0 Authentication at the smarthost failed")
    assert "535 5.7.8" in str(attempt.reply)


def test_smarthost_password_never_in_plaintext(tmp_path: Path) -> None:
    """Without TLS the smarthost password is not sent."""
    lab = Lab(tmp_path, smarthost="smtp:[smarthost.test]:587", smarthost_username="u",
              smarthost_password="pw")
    smart = lab.dialer.add("127.0.0.9", FakeMTA("smarthost.test", ehlo=("PIPELINING",),
                                                credentials=("u", "pw")), 587)
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    assert done(d).status is DEFERRED and "without TLS" in str(done(d).reply)
    assert not any(c.startswith("AUTH") for c in smart.commands)


def test_smarthost_implicit_tls(tmp_path: Path) -> None:
    """smtps: the connection is TLS from the first byte (RFC 8314), no STARTTLS."""
    lab = Lab(tmp_path, smarthost="smtps:[smarthost.test]:465", smarthost_username="u",
              smarthost_password="pw")
    smart = lab.dialer.add("127.0.0.9", FakeMTA("smarthost.test", credentials=("u", "pw")), 465)
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    assert done(d).status is DELIVERED and done(d).tls is not None
    (_, port, creator) = lab.dialer.connects[0]
    assert port == 465 and creator is not None
    assert "STARTTLS" not in smart.commands


def test_transport_map_bypasses_mx(tmp_path: Path) -> None:
    """A transport entry sends a domain to a fixed next hop without an MX lookup."""
    lab = Lab(tmp_path, transport={"lab.test": "smtp:[127.0.0.3]:2525"})
    hop = lab.dialer.add("127.0.0.3", FakeMTA("127.0.0.3"), 2525)
    (d,) = lab.deliver(envelope("Q1", "x@lab.test"))
    assert done(d).status is DELIVERED and hop.received
    assert lab.zone.queries == []


def test_transport_mx_exempts_a_domain_from_the_smarthost(tmp_path: Path) -> None:
    """With a smarthost, "mx" in the transport map keeps a domain on MX routing."""
    lab = Lab(tmp_path, smarthost="smtp:[smarthost.test]:587",
              transport={"remote.test": "mx"})
    smart = lab.dialer.add("127.0.0.9", FakeMTA("smarthost.test"), 587)
    a, b = lab.deliver(envelope("Q1", "one@remote.test", "two@other.test"))
    assert done(a).host.startswith("mx1.remote.test") and done(b).status is DELIVERED
    assert smart.received[0].recipients == ["two@other.test"]


# --- connections --------------------------------------------------------------------------------


def test_connection_reused_for_the_next_message(lab: Lab) -> None:
    """A second message to the same destination uses the open connection; after the idle time
    the connection is closed with QUIT."""
    (a,) = lab.deliver(envelope("Q1", "one@remote.test"))
    (b,) = lab.deliver(envelope("Q2", "two@remote.test"))
    assert done(a).status is DELIVERED and done(b).status is DELIVERED
    assert lab.mx1.connections == 1 and len(lab.mx1.received) == 2
    assert "QUIT" not in lab.mx1.commands
    lab.clock.advance(lab.agent.settings.idle_time)
    assert lab.mx1.commands[-1] == "QUIT"


def test_reset_before_reusing_after_a_failed_transaction(lab: Lab) -> None:
    """After a transaction that ended without data, RSET comes before the next MAIL."""
    lab.mx1.rcpt = {"gone@remote.test": "550 5.1.1 no"}
    lab.deliver(envelope("Q1", "gone@remote.test"))
    (b,) = lab.deliver(envelope("Q2", "two@remote.test"))
    assert done(b).status is DELIVERED
    mails = [i for i, c in enumerate(lab.mx1.commands) if c.startswith("MAIL")]
    assert lab.mx1.commands[mails[1] - 1] == "RSET"


def test_stale_cached_connection_is_replaced(lab: Lab) -> None:
    """If the server dropped an idle connection, the message goes over a new one."""
    lab.deliver(envelope("Q1", "one@remote.test"))
    lab.mx1.sessions[0].close()  # the server's idle timeout, unnoticed by the cache
    (b,) = lab.deliver(envelope("Q2", "two@remote.test"))
    assert done(b).status is DELIVERED and lab.mx1.connections == 2


def test_per_destination_concurrency_limit(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No more than per_destination_concurrency connections to one destination; waiting
    messages take a connection as soon as one is free."""
    lab = Lab(tmp_path, per_destination_concurrency=2)
    # Hold the data replies: each transaction stays open until the test answers it.
    held: list[tuple[FakeSession, bytes]] = []
    answer = FakeSession.finish_data
    monkeypatch.setattr(FakeSession, "finish_data",
                        lambda session, raw: held.append((session, raw)))
    ds = [lab.deliver(envelope(f"Q{i}", f"r{i}@remote.test"))[0] for i in range(4)]
    assert lab.mx1.connections == 2 and len(held) == 2
    while held:
        session, raw = held.pop(0)
        answer(session, raw)
    assert lab.mx1.connections == 2
    assert [done(d).status for d in ds] == [DELIVERED] * 4


def test_stop_defers_what_is_in_flight(lab: Lab) -> None:
    """Stopping the service ends connections; deliveries in flight come back deferred."""
    lab.mx1.greeting = "220-slow\r\n"  # an unfinished greeting: the session waits
    (d,) = lab.deliver(envelope("Q1", "one@remote.test"))
    lab.agent.stopService()
    attempt = done(d)
    assert attempt.status is DEFERRED


def test_unreachable_destination_defers_waiting_messages_too(tmp_path: Path) -> None:
    """When a destination cannot be reached, the messages waiting for it are deferred with
    the same reason instead of each waiting out the same failures."""
    lab = Lab(tmp_path, per_destination_concurrency=1)
    lab.dialer.refuse("127.0.0.2")
    lab.dialer.refuse("127.0.0.3")
    envelopes = [envelope(f"Q{i}", "x@remote.test") for i in range(3)]
    ds = [lab.agent.deliver(e, e.recipients[0], lab.path) for e in envelopes]
    lab.clock.advance(0)
    assert {done(d).status for d in ds} == {DEFERRED}
    assert len(lab.dialer.connects) == 2


# --- with the queue runner: retries and expiry --------------------------------------------------


def runner_for(lab: Lab, tmp_path: Path, **kwargs: Any) -> tuple[QueueRunner, Spool]:
    spool = Spool(tmp_path / "spool", lab.pool)  # type: ignore[arg-type]
    spool.recover()
    runner = QueueRunner(spool, {TargetKind.RELAY: lab.agent}, lab.clock, **kwargs)
    runner.startService()
    return runner, spool


def queue(runner: QueueRunner, spool: Spool, env: Envelope) -> None:
    spool.commit(env, MESSAGE)
    runner.enqueue(env)
    runner_clock_turns(runner)


def runner_clock_turns(runner: QueueRunner) -> None:
    clock: Clock = runner._clock  # type: ignore[assignment]
    for _ in range(3):
        clock.advance(0)


def test_4xx_for_a_while_then_delivered(lab: Lab, tmp_path: Path) -> None:
    """A greylisting server (451 twice) gets the message on the third attempt, at the times
    of the retry schedule; every attempt is recorded, and the message leaves the queue."""
    runner, spool = runner_for(lab, tmp_path, retry_schedule=(60, 300))
    lab.mx1.rcpt = {"grey@remote.test": "451 4.7.1 greylisted, try later"}
    lab.mx2.rcpt = dict(lab.mx1.rcpt)
    env = envelope("Q1", "grey@remote.test")
    queue(runner, spool, env)
    recipient = env.recipients[0]
    assert recipient.status is DEFERRED and recipient.next_attempt == START + 60
    lab.clock.advance(59)
    assert len(recipient.attempts) == 1
    lab.clock.advance(1)
    runner_clock_turns(runner)
    assert len(recipient.attempts) == 2 and recipient.next_attempt == START + 60 + 300
    lab.mx1.rcpt = {}
    lab.clock.advance(300)
    runner_clock_turns(runner)
    assert [a.status for a in recipient.attempts] == [DEFERRED, DEFERRED, DELIVERED]
    assert [a.at for a in recipient.attempts] == [START, START + 60, START + 360]
    assert len(runner) == 0 and lab.mx1.received


def test_expires_after_max_lifetime(lab: Lab, tmp_path: Path) -> None:
    """A recipient still deferred at max_lifetime fails with 5.4.7; the last try is at the
    expiry time, not a full delay after it."""
    runner, spool = runner_for(lab, tmp_path, retry_schedule=(100,), max_lifetime=250)
    lab.dialer.refuse("127.0.0.2")
    lab.dialer.refuse("127.0.0.3")
    env = envelope("Q1", "one@remote.test")
    queue(runner, spool, env)
    recipient = env.recipients[0]
    for step in (100, 100, 50):
        lab.clock.advance(step)
        runner_clock_turns(runner)
    assert recipient.status is FAILED
    assert [a.at - START for a in recipient.attempts] == [0, 100, 200, 250, 250]
    assert str(recipient.attempts[-1].reply).startswith("554 5.4.7 Delivery time expired")
    assert str(recipient.attempts[-2].reply).startswith("451 4.4.1")


def test_deferred_state_survives_a_restart(lab: Lab, tmp_path: Path) -> None:
    """After every attempt the envelope on disk holds the attempt and the next due time."""
    runner, spool = runner_for(lab, tmp_path, retry_schedule=(60,))
    lab.dialer.refuse("127.0.0.2")
    lab.dialer.refuse("127.0.0.3")
    queue(runner, spool, envelope("Q1", "one@remote.test"))
    on_disk = spool.load("Q1").recipients[0]
    assert on_disk.status is DEFERRED and on_disk.next_attempt == START + 60
    assert str(on_disk.attempts[0].reply).startswith("451 4.4.1")
    assert replace(on_disk.attempts[0]).host == ""
