"""Relay against real servers: `twistd -n mailsys` sending through MX records of a lab DNS
(a twisted.names server on loopback) to other mailsys instances on 127.0.0.2, with bounces into
the sender's Maildir, TLS policies, a smarthost with AUTH, the transport map, retries across a
receiver outage and a SIGKILL, and expiry with delay notices.

Mail enters the sender on its MTA port through aliases whose targets are external: those become
RELAY recipients. Every server runs with short retry schedules, so tests wait seconds.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration import relay_support
from tests.integration.conftest import MAILSYS, MailServer, make_server, wait_for
from tests.integration.relay_support import (
    LabDNS,
    block_for,
    delivery_status,
    find_message,
    message,
    parse,
    recipient_state,
    relay_section,
    reply_text,
    send,
    start_lab_dns,
)

lab_dns = relay_support.lab_dns  # the fixture

SENDER = "demo@example.test"
RECEIVER_DOMAINS = ("example.test", "remote.test", "failover.test", "verify.test",
                    "trusted.test", "smart.test", "lab2.test")
RECEIVER_ALIASES = "\n".join(
    f'"someone@{domain}" = ["demo@example.test"]' for domain in RECEIVER_DOMAINS[1:]
)
SENDER_ALIASES = """
"out@example.test" = ["someone@remote.test"]
"bad@example.test" = ["nobody@remote.test"]
"failover@example.test" = ["someone@failover.test"]
"nullmx@example.test" = ["x@nullmx.test"]
"nx@example.test" = ["x@nx.test"]
"sf@example.test" = ["x@broken.test"]
"verify@example.test" = ["someone@verify.test"]
"trusted@example.test" = ["someone@trusted.test"]
"smart@example.test" = ["someone@smart.test"]
"lab@example.test" = ["someone@lab2.test"]
"""


def zone() -> dict[str, object]:
    return {
        "remote.test": {"MX": [[10, "mx1.remote.test"]]},
        "mx1.remote.test": {"A": ["127.0.0.2"]},
        # The first MX has nothing listening: the second one takes the mail.
        "failover.test": {"MX": [[10, "dead.failover.test"], [20, "mx1.remote.test"]]},
        "dead.failover.test": {"A": ["127.0.0.4"]},
        "nullmx.test": {"MX": [[0, "."]]},
        "broken.test": {"ERROR": "servfail"},
        # The receiver's self-signed certificate names mail.example.test, not this host.
        "verify.test": {"MX": [[10, "mx.verify.test"]]},
        "mx.verify.test": {"A": ["127.0.0.2"]},
        "trusted.test": {"MX": [[10, "mail.example.test"]]},
        "mail.example.test": {"A": ["127.0.0.2"]},
    }


@dataclass
class Pair:
    """A sender (127.0.0.1) and a receiver (127.0.0.2), with the lab DNS both rely on."""

    dns: LabDNS
    sender: MailServer
    receiver: MailServer

    def inbox(self) -> Path:
        return self.receiver.inbox()

    def bounces(self) -> Path:
        return self.sender.inbox(SENDER)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("relay")
    dns = start_lab_dns(root / "dns", zone())
    servers: list[MailServer] = []
    try:
        receiver = make_server(root / "receiver", smtp_extra="offer_auth = true",
                               interface="127.0.0.2", local_domains=RECEIVER_DOMAINS,
                               aliases=RECEIVER_ALIASES)
        servers.append(receiver)
        receiver.start()  # first: the sender trusts its certificate for trusted.test
        port = receiver.smtp_port
        certificate = receiver.directory / "var" / "tls" / "cert.pem"
        extra = f"""
smarthost = "smtp:[127.0.0.2]:{port}"
smarthost_username = "demo@example.test"
smarthost_password = "demo"
tls_ca_file = "{certificate}"
transport = {{ "*" = "mx", "smart.test" = "smarthost", "lab2.test" = "smtp:[127.0.0.2]:{port}" }}
tls_policy_per_domain = {{ "verify.test" = "verify", "trusted.test" = "verify" }}
"""
        sender = make_server(root / "sender", aliases=SENDER_ALIASES,
                             relay_config=relay_section(dns, port, extra))
        servers.append(sender)
        sender.start()
        yield Pair(dns, sender, receiver)
    finally:
        for server in servers:
            server.kill()
        dns.stop()


def received_fields(path: Path) -> list[str]:
    return [" ".join(str(value).split()) for value in parse(path).get_all("Received") or []]


def test_delivered_over_starttls_to_the_first_mx(pair: Pair) -> None:
    """Mail for an external domain goes to its MX over STARTTLS; the receiver's Received field
    and the sender's log both say TLS was used."""
    send(pair.sender, ["out@example.test"], message("over starttls"))
    path = find_message(pair.inbox(), b"Subject: over starttls")
    received = received_fields(path)[0]
    assert "from mail.example.test ([127.0.0.1])" in received
    assert "(using TLSv1.3 with cipher" in received and "with ESMTPS" in received
    wait_for(lambda: "host=mx1.remote.test[127.0.0.2]" in pair.sender.log(),
             message="the delivery line in the sender's log")
    assert "tls=using TLSv1.3" in pair.sender.log()


def test_first_mx_refusing_connections_falls_over_to_the_second(pair: Pair) -> None:
    """Nothing listens at the first MX: the second MX gets the message at once."""
    send(pair.sender, ["failover@example.test"], message("failover"))
    find_message(pair.inbox(), b"Subject: failover")
    assert "connect to dead.failover.test[127.0.0.4]" in pair.sender.log()


def test_dot_lines_arrive_byte_identical(pair: Pair) -> None:
    """A body with "." lines at its start and at bytes 16384 and 32768 of the spooled message
    arrives byte for byte (twisted.mail's client would end the message early)."""
    header = b"From: demo@example.test\r\nTo: out@example.test\r\nSubject: dots\r\n\r\n"
    body = bytearray(b".\r\n..\r\n")
    # The spool file is the sender's Received field plus this message: place the dot lines at
    # 16384 and 32768 of the message and of the spool file alike, near enough either way.
    for mark in (16384, 32768):
        while len(header) + len(body) < mark - 80:
            body += b"a" * 76 + b"\r\n"
        body += b".\r\n.leading\r\n"
    body += b"end\r\n"
    original = header + bytes(body)
    send(pair.sender, ["out@example.test"], original)
    path = find_message(pair.inbox(), b"Subject: dots")
    stored = path.read_bytes()
    assert stored.endswith(bytes(body).replace(b"\r\n", b"\n"))


def test_long_lines_accepted_and_relayed_within_the_limit(pair: Pair) -> None:
    """A body line of 5,000 octets (over RFC 5321's 1000) is accepted, not bounced, and the
    relay sends it re-encoded as quoted-printable within 998-octet lines, content unchanged."""
    line = b"0123456789" * 500
    original = (b"From: demo@example.test\r\nTo: out@example.test\r\nSubject: long line\r\n"
                b"\r\nbefore\r\n" + line + b"\r\nafter\r\n")
    send(pair.sender, ["out@example.test"], original)
    path = find_message(pair.inbox(), b"Subject: long line")
    stored = path.read_bytes()
    assert max(len(text) for text in stored.split(b"\n")) <= 999  # stored with LF: 998 + CR
    assert b"Content-Transfer-Encoding: quoted-printable" in stored
    payload = parse(path).get_payload(decode=True)
    assert payload.replace(b"\r\n", b"\n") == b"before\n" + line + b"\nafter\n"


def test_5xx_bounces_to_the_local_sender(pair: Pair) -> None:
    """A 550 from the receiver fails the recipient; the bounce lands in the sender's Maildir
    with the remote reply as Diagnostic-Code and the message returned."""
    send(pair.sender, ["bad@example.test"], message("to nobody"))
    path = find_message(pair.bounces(), b"Final-Recipient: rfc822; nobody@remote.test")
    parsed = parse(path)
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsed["Return-Path"] == "<>"
    _, block = delivery_status(path)
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx1.remote.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user here"
    assert block["Original-Recipient"] == "rfc822; bad@example.test"
    assert b"Subject: to nobody" in path.read_bytes()


def test_null_mx_and_nxdomain_bounce_servfail_defers(pair: Pair) -> None:
    """RFC 7505 null MX fails with 5.1.10 and NXDOMAIN with 5.1.2, both bounced; a DNS server
    failure defers the recipient and keeps it queued."""
    send(pair.sender, ["nullmx@example.test", "nx@example.test", "sf@example.test"],
         message("dns outcomes"))
    null = find_message(pair.bounces(), b"Final-Recipient: rfc822; x@nullmx.test")
    assert block_for(null, "x@nullmx.test")["Status"] == "5.1.10"
    assert block_for(null, "x@nullmx.test")["Diagnostic-Code"] is None  # no server said it
    nx = find_message(pair.bounces(), b"Final-Recipient: rfc822; x@nx.test")
    assert block_for(nx, "x@nx.test")["Status"] == "5.1.2"
    state = wait_for(lambda: recipient_state(pair.sender, "x@broken.test"),
                     message="the SERVFAIL recipient on disk")
    assert isinstance(state, dict)
    assert state["status"] == "deferred"
    reply = reply_text(state["attempts"][0])
    assert state["attempts"][0]["reply"]["enhanced"] == "4.4.3" and "SERVFAIL" in reply


def test_verify_policy_against_a_name_mismatch_defers(pair: Pair) -> None:
    """Under "verify", a trusted certificate that does not name the MX host defers the mail
    with a clear TLS reason; nothing is delivered."""
    send(pair.sender, ["verify@example.test"], message("verify me"))

    def deferred() -> dict[str, object] | None:
        state = recipient_state(pair.sender, "someone@verify.test")
        return state if state and state["attempts"] else None

    state = wait_for(deferred, message="the verify attempt on disk")
    assert isinstance(state, dict)
    reply = reply_text(state["attempts"][0])  # type: ignore[index]
    assert state["status"] == "deferred"
    assert reply == ("451 4.7.5 TLS failed with mx.verify.test[127.0.0.2]: TLS handshake "
                     "failed: the certificate does not match the host name mx.verify.test")


def test_verify_policy_with_a_trusted_certificate_delivers(pair: Pair) -> None:
    """Under "verify", a certificate that chains to tls_ca_file and names the MX host passes."""
    send(pair.sender, ["trusted@example.test"], message("trusted tls"))
    path = find_message(pair.inbox(), b"Subject: trusted tls")
    assert "using TLSv1.3" in received_fields(path)[0]


def test_smarthost_with_auth(pair: Pair) -> None:
    """A domain routed to the smarthost goes there after STARTTLS and AUTH."""
    send(pair.sender, ["smart@example.test"], message("via smarthost"))
    path = find_message(pair.inbox(), b"Subject: via smarthost")
    received = received_fields(path)[0]
    assert "(Authenticated sender: demo@example.test)" in received
    assert "with ESMTPSA" in received


def test_transport_map_bypasses_mx(pair: Pair) -> None:
    """A transport entry sends its domain to a fixed host; the DNS knows nothing of it."""
    send(pair.sender, ["lab@example.test"], message("by transport"))
    find_message(pair.inbox(), b"Subject: by transport")


# --- servers of their own -----------------------------------------------------------------------


def test_deferred_mail_survives_sigkill_and_is_delivered_after_restart(
    server_factory: Callable[..., MailServer], lab_dns: LabDNS
) -> None:
    """The receiver is down: the message is deferred, with its attempts on disk. The sender is
    killed with SIGKILL; the receiver comes up; after a restart the sender delivers it. Then,
    under "verify" with no trust anchor for it, the receiver's self-signed certificate defers
    a message with the TLS reason."""
    receiver = server_factory("receiver", interface="127.0.0.2",
                              local_domains=RECEIVER_DOMAINS, aliases=RECEIVER_ALIASES)
    lab_dns.set(zone())
    sender = server_factory("sender", aliases=SENDER_ALIASES,
                            relay_config=relay_section(lab_dns, receiver.smtp_port,
                                                       'tls_policy_per_domain = '
                                                       '{ "trusted.test" = "verify" }'))
    sender.start()
    send(sender, ["out@example.test"], message("after the outage"))

    def attempts() -> list[dict[str, object]] | None:
        state = recipient_state(sender, "someone@remote.test")
        found = state["attempts"] if state else []
        return found if len(found) >= 2 else None  # type: ignore[return-value]

    tried = wait_for(attempts, message="two failed attempts on disk")
    assert isinstance(tried, list)
    assert all("connection refused" in reply_text(a) for a in tried)
    sender.kill(signal.SIGKILL)
    receiver.start()
    sender.start()
    path = find_message(receiver.inbox(), b"Subject: after the outage")
    assert parse(path)["Subject"] == "after the outage"
    wait_for(lambda: recipient_state(sender, "someone@remote.test") is None,
             message="the message to leave the sender's queue")
    # Under "verify", without a trust anchor for it, the self-signed receiver is refused even
    # though its certificate names the MX host.
    send(sender, ["trusted@example.test"], message("self-signed"))

    def verify_attempt() -> str | None:
        state = recipient_state(sender, "someone@trusted.test")
        return reply_text(state["attempts"][0]) if state and state["attempts"] else None

    reply = str(wait_for(verify_attempt, message="the verify attempt on disk"))
    assert reply == ("451 4.7.5 TLS failed with mail.example.test[127.0.0.2]: TLS handshake "
                     "failed: certificate verify failed")


def test_expiry_bounces_after_a_delay_notice(
    server_factory: Callable[..., MailServer], lab_dns: LabDNS
) -> None:
    """Nothing answers at the MX: after delay_warning the sender gets one delay notice, and
    after max_lifetime a bounce saying the delivery time expired."""
    lab_dns.set(zone())
    sender = server_factory(
        "sender", aliases=SENDER_ALIASES,
        relay_config=relay_section(lab_dns, 9, "delay_warning = 1.0\nmax_lifetime = 3.0"),
    )
    sender.start()
    send(sender, ["out@example.test"], message("never arrives"))
    bounces = sender.inbox(SENDER)
    delay = find_message(bounces, b"Action: delayed", what="the delay notice")
    assert parse(delay)["Subject"] == "Delayed Mail (still being retried)"
    assert delivery_status(delay)[1]["Will-Retry-Until"]
    failure = find_message(bounces, b"Action: failed", what="the bounce")
    _, block = delivery_status(failure)
    assert block["Status"] == "5.4.7"
    assert b"last error: 451 4.4.1 No connection" in failure.read_bytes()
    assert b"connection refused" in failure.read_bytes()
    assert len([p for p in bounces.iterdir() if b"Action: delayed" in p.read_bytes()]) == 1


def test_queue_tools_on_a_live_server(
    server_factory: Callable[..., MailServer], lab_dns: LabDNS
) -> None:
    """mailsys queue list/show/hold/flush/release/delete against a running server: the server
    applies each change, and flush delivers a deferred message at once."""
    receiver = server_factory("receiver", interface="127.0.0.2",
                              local_domains=RECEIVER_DOMAINS, aliases=RECEIVER_ALIASES)
    lab_dns.set(zone())
    sender = server_factory("sender", aliases=SENDER_ALIASES,
                            relay_config=relay_section(lab_dns, receiver.smtp_port).replace(
                                "retry_schedule = [0.5, 1.0]", "retry_schedule = [600]"))
    sender.start()
    send(sender, ["out@example.test"], message("queued for the tools"))
    send(sender, ["out@example.test"], message("to be deleted"))

    def deferred_ids() -> list[str] | None:
        ids = [e["queue_id"] for e in relay_support.envelopes(sender)
               if e["recipients"][0]["attempts"]]
        return ids if len(ids) == 2 else None

    first, second = wait_for(deferred_ids, message="two deferred messages")  # type: ignore[misc]
    listing = queue_tool(sender, "list")
    assert f"{first}  " in listing and "2 messages in the queue" in listing
    assert "<someone@remote.test>  deferred  attempts=1  next=in 9m" in listing
    assert "last=451 4.4.1 No connection to the mail server" in listing
    shown = queue_tool(sender, "show", first)
    assert "Subject: queued for the tools" in shown and "connection refused" in shown

    assert queue_tool(sender, "hold", first) == f"{first}: held\n"
    assert relay_support.envelopes(sender)[0]["held"] is True
    receiver.start()
    assert queue_tool(sender, "delete", second) == f"{second}: deleted\n"
    assert queue_tool(sender, "flush") == "0 message(s): due now\n"  # the other one is held
    assert queue_tool(sender, "release", first) == f"{first}: released\n"
    assert queue_tool(sender, "flush", first) == f"{first}: due now\n"
    find_message(receiver.inbox(), b"Subject: queued for the tools")
    wait_for(lambda: relay_support.envelopes(sender) == [], message="an empty queue")
    assert "0 messages in the queue" in queue_tool(sender, "list")
    assert not any(b"to be deleted" in p.read_bytes() for p in receiver.inbox().iterdir())
    failed = subprocess.run([MAILSYS, "--config", str(sender.config_path), "queue", "hold",
                             first], capture_output=True, text=True, timeout=60)
    assert (failed.returncode, failed.stderr) == (1, f"mailsys: no message {first} in the "
                                                     "queue\n")


def queue_tool(server: MailServer, *args: str) -> str:
    done = subprocess.run([MAILSYS, "--config", str(server.config_path), "queue", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_relay_leaves_from_the_configured_bind_address(pair: Pair, tmp_path: Path) -> None:
    """With relay.bind_address set, the receiver sees the connection come from that address
    (its Received field names it), not from the address the system would pick."""
    bound = make_server(tmp_path / "bound", interface="127.0.0.6", aliases=SENDER_ALIASES,
                        relay_config=relay_section(pair.dns, pair.receiver.smtp_port,
                                                   'bind_address = "127.0.0.5"'))
    try:
        bound.start()
        send(bound, ["out@example.test"], message("from the bind address"))
        path = find_message(pair.inbox(), b"Subject: from the bind address")
        assert "from mail.example.test ([127.0.0.5])" in received_fields(path)[0]
    finally:
        bound.kill()
