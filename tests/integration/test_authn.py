"""Mail authentication end to end: real `twistd -n mailsys` servers, a lab DNS server
(twisted.names on loopback), swaks and smtplib.

- A spoofed From of a p=reject domain, sent with swaks to port 25 from 127.0.0.1, gets 550 5.7.1
  at the end of DATA: loopback is checked like any other address.
- The same under p=quarantine is delivered to the recipient's Junk folder.
- A message submitted (587, AUTH) to a first mailsys is DKIM-signed there, relayed over the lab
  DNS's MX to a second mailsys, and arrives with dkim=pass and dmarc=pass.
- `mailsys trace` shows the signing step at the first and each check with its evidence at the
  second.
"""

from __future__ import annotations

import json
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailsys.authn.dkim import generate_key
from tests.integration.conftest import MAILSYS, MailServer, make_server, wait_for
from tests.integration.relay_support import (
    LabDNS,
    files_in,
    find_message,
    relay_section,
    start_lab_dns,
    wait_for_files,
)

SWAKS = shutil.which("swaks")


def _authn(dns: LabDNS) -> str:
    return f"""
[authn]
checks = true
dns_servers = ["{dns.server}"]
dns_timeout = 3.0
"""


def _journey(directory: Path) -> str:
    """The journey of each message, for `mailsys trace` (off unless enabled)."""
    return f"""
[journey]
enabled = true
path = "{directory}/var/journey.sqlite"
"""


@dataclass
class World:
    dns: LabDNS
    sender: MailServer  # example.test, signs what demo@example.test submits
    receiver: MailServer  # remote.test on 127.0.0.2, checks what arrives


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("authn")
    pem, record = generate_key("rsa")
    zone: dict[str, Any] = {
        # The spoofed banks: no host of theirs is 127.0.0.1.
        "bank.test": {"TXT": ["v=spf1 -all"], "A": ["192.0.2.80"]},
        "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject"]},
        "shop.test": {"TXT": ["v=spf1 -all"], "A": ["192.0.2.81"]},
        "_dmarc.shop.test": {"TXT": ["v=DMARC1; p=quarantine"]},
        # The first mailsys's domain: its key, its DMARC policy, and SPF naming loopback.
        "example.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
        "mail._domainkey.example.test": {"TXT": [record]},
        "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]},
        "mail.example.test": {"A": ["127.0.0.1"]},
        "1.0.0.127.in-addr.arpa": {"PTR": ["mail.example.test"]},
        # The second mailsys receives remote.test.
        "remote.test": {"MX": [[10, "mx1.remote.test"]]},
        "mx1.remote.test": {"A": ["127.0.0.2"]},
    }
    dns = start_lab_dns(root / "dns", zone)
    servers: list[MailServer] = []
    try:
        receiver = make_server(root / "receiver", interface="127.0.0.2",
                               local_domains=("remote.test", "example.test"),
                               authn_config=_authn(dns), extra_config=_journey(root / "receiver"),
                               aliases='"someone@remote.test" = ["demo@example.test"]')
        servers.append(receiver)
        receiver.start()
        sender = make_server(root / "sender", extra_config=_journey(root / "sender"),
                             relay_config=relay_section(dns, receiver.smtp_port))
        keys = sender.directory / "dkim"
        keys.mkdir(mode=0o700)
        (keys / "example.test.mail.pem").write_bytes(pem)
        (keys / "example.test.mail.pem").chmod(0o600)
        servers.append(sender)
        sender.start()
        yield World(dns, sender, receiver)
    finally:
        for server in servers:
            server.kill()
        dns.stop()


def _swaks(server: MailServer, author: str, subject: str) -> str:
    assert SWAKS is not None
    done = subprocess.run(
        [SWAKS, "--server", server.interface, "--port", str(server.smtp_port),
         "--helo", "client.test", "--from", author, "--to", "someone@remote.test",
         "--header", f"From: <{author}>", "--header", f"Subject: {subject}",
         "--body", "Please wire the money today.", "--timeout", "30"],
        capture_output=True, timeout=90,
    )
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (Debian: swaks; .ci/run "
                                          "installs it)")
def test_spoof_of_p_reject_domain_refused(world: World) -> None:
    """swaks from 127.0.0.1 claiming a p=reject domain gets 550 5.7.1 after DATA; nothing is
    stored."""
    before = files_in(world.receiver.inbox())
    output = _swaks(world.receiver, "ceo@bank.test", "urgent transfer")
    assert "<** 550 5.7.1" in output, output
    assert files_in(world.receiver.inbox()) == before
    assert "dmarc=fail" in world.receiver.log()


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (Debian: swaks; .ci/run "
                                          "installs it)")
def test_spoof_of_p_quarantine_domain_goes_to_junk(world: World) -> None:
    """The same spoof under p=quarantine is accepted into the recipient's Junk folder, with the
    verdict in its Authentication-Results field."""
    output = _swaks(world.receiver, "billing@shop.test", "your invoice")
    assert "<-  250 2.0.0" in output, output
    junk = world.receiver.maildirs / "example.test" / "demo" / ".Junk" / "new"
    path = find_message(junk, b"Subject: your invoice")
    data = path.read_bytes()
    assert b"Authentication-Results: mail.example.test;" in data
    assert b"dmarc=fail (p=quarantine)" in data
    assert b"spf=fail" in data


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_signed_by_one_mailsys_passes_at_the_other(world: World) -> None:
    """Mail submitted to the first mailsys is signed there, relayed by MX over the lab DNS, and
    the second mailsys finds dkim=pass and dmarc=pass."""
    message = EmailMessage()
    message["From"] = "Demo <demo@example.test>"
    message["To"] = "someone@remote.test"
    message["Subject"] = "signed across"
    message.set_content("Signed at submission, checked on arrival.\n")
    with smtplib.SMTP(world.sender.interface, world.sender.submission_port, timeout=30) as client:
        client.starttls(context=_unverified())
        client.login("demo@example.test", "demo")
        client.send_message(message)
    inbox = world.receiver.inbox()
    path = find_message(inbox, b"Subject: signed across", deadline=60)
    data = path.read_bytes()
    header = data.split(b"\r\n\r\n")[0].decode()
    assert "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;" in header
    assert "dkim=pass" in header and "header.d=example.test header.s=mail" in header
    assert "dmarc=pass header.from=example.test" in header
    assert "spf=pass smtp.mailfrom=demo@example.test" in header
    wait_for_files(inbox, 1)


def _trace(server: MailServer, query: str, kinds: set[str]) -> list[dict[str, Any]]:
    """The steps of the first journey ``query`` names in ``server``'s store, once every kind
    in ``kinds`` is among them (the writer stores its batches a moment later)."""
    def ready() -> list[dict[str, Any]] | None:
        done = subprocess.run([MAILSYS, "--config", str(server.config_path), "trace", query,
                               "--json"], capture_output=True, text=True, timeout=60,
                              check=False)
        if done.returncode != 0:
            return None
        steps: list[dict[str, Any]] = json.loads(done.stdout)["journeys"][0]["steps"]
        return steps if kinds <= {step["kind"] for step in steps} else None

    found = wait_for(ready, deadline=30.0, message=f"the journey of {query}")
    assert isinstance(found, list)
    return found


def test_trace_shows_signing_and_checks_with_evidence(world: World) -> None:
    """`mailsys trace` at the sender shows the DKIM signing step (d=, s=); at the receiver it
    shows iprev, SPF, DKIM and DMARC with their DNS answers, then the verdict, before the
    message was queued."""
    message = EmailMessage()
    message["From"] = "Demo <demo@example.test>"
    message["To"] = "someone@remote.test"
    message["Subject"] = "traced across"
    message["Message-ID"] = "<traced-across@example.test>"
    message.set_content("Follow me.\n")
    with smtplib.SMTP(world.sender.interface, world.sender.submission_port, timeout=30) as client:
        client.starttls(context=_unverified())
        client.login("demo@example.test", "demo")
        client.send_message(message)
    signing = _trace(world.sender, "traced-across@example.test", {"authn.sign"})
    sign = next(s for s in signing if s["kind"] == "authn.sign")
    assert sign["text"] == "DKIM-signed for From example.test: d=example.test s=mail (rsa-sha256)"
    assert "RFC 6376" in sign["rule"]
    kinds = {"authn.iprev", "authn.spf", "authn.dkim", "authn.dmarc", "authn.verdict",
             "spool.commit"}
    steps = _trace(world.receiver, "traced-across@example.test", kinds)
    by_kind = {s["kind"]: s for s in steps}
    order = [s["kind"] for s in steps]
    assert order.index("authn.verdict") < order.index("spool.commit")
    iprev = by_kind["authn.iprev"]
    assert iprev["fields"]["result"] == "pass"
    assert "PTR 1.0.0.127.in-addr.arpa: mail.example.test" in iprev["text"]
    spf = next(s for s in steps if s["kind"] == "authn.spf"
               and s["fields"]["identity"] == "mailfrom")
    assert spf["fields"]["mechanism"] == "ip4:127.0.0.0/8"
    assert "TXT example.test: 'v=spf1 ip4:127.0.0.0/8 -all'" in spf["fields"]["evidence"]
    dkim = by_kind["authn.dkim"]
    assert (dkim["fields"]["result"], dkim["fields"]["domain"],
            dkim["fields"]["selector"]) == ("pass", "example.test", "mail")
    assert dkim["fields"]["evidence"][0].startswith("TXT mail._domainkey.example.test: 'v=DKIM1")
    dmarc = by_kind["authn.dmarc"]
    assert dmarc["fields"]["record"] == "v=DMARC1; p=reject"
    assert "DMARC pass for From example.test" in dmarc["text"]
    assert by_kind["authn.verdict"]["text"] == "authentication verdict: accepted"
    # The text form too, as an administrator reads it.
    text = subprocess.run([MAILSYS, "--config", str(world.receiver.config_path), "trace",
                           "traced-across@example.test"], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    for line in ("iprev pass: 127.0.0.1 is mail.example.test", "SPF pass for MAIL FROM",
                 "DKIM pass: signature d=example.test s=mail (rsa-sha256, 2048-bit key)",
                 "DMARC pass for From example.test"):
        assert line in text, text


def test_bounces_are_signed_too(world: World) -> None:
    """The server's own bounce (from MAILER-DAEMON@mail.example.test) is DKIM-signed with
    example.test's key before it is spooled."""
    message = EmailMessage()
    message["From"] = "demo@example.test"
    message["To"] = "nobody@remote.test"
    message["Subject"] = "to a stranger"
    message.set_content("This one comes back.\n")
    with smtplib.SMTP(world.sender.interface, world.sender.submission_port, timeout=30) as client:
        client.starttls(context=_unverified())
        client.login("demo@example.test", "demo")
        client.send_message(message)
    bounce = find_message(world.sender.inbox(), b"to a stranger", deadline=60)
    data = bounce.read_bytes()
    assert b"multipart/report" in data
    assert data.startswith(b"Return-Path: <>")
    header = data.split(b"\r\n\r\n")[0]
    assert b"DKIM-Signature: v=1; a=rsa-sha256" in header and b"d=example.test" in header
