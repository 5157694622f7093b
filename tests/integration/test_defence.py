"""Intake defences of the real server (mailsys.defence) against bots on loopback: idle
connections holding the cap, a connection flood, a directory harvest, an early talker, DNS
lists served by the lab DNS (one of them timing out). Clients bind 127.0.0.x source
addresses so that each plays a different network."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.integration.conftest import MailServer, wait_for
from tests.integration.relay_support import LabDNS, start_lab_dns

FLOOD = 2_000
# Loopback clients are exempt by default (like Postfix's mynetworks); the tests play strangers.
STRANGERS = """
[defence]
exempt_networks = []
"""


def connect_from(source: str, port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_reply(sock: socket.socket) -> bytes:
    """One whole reply (its last line has a space after the code), or what came before EOF."""
    data = b""
    while True:
        lines = data.split(b"\r\n")
        if len(lines) > 1 and any(len(line) > 3 and line[3:4] == b" " for line in lines[:-1]):
            return data
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@remote.test"
    msg["To"] = "demo@example.test"
    msg["Subject"] = subject
    msg.set_content("hello\n")
    return msg


def send_from(source: str, server: MailServer, subject: str) -> None:
    # smtplib's default HELO here is "[127.0.0.1]", the server's own address: refused.
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30, local_hostname="client.test",
                      source_address=(source, 0)) as client:
        client.send_message(message(subject))


def test_idle_connections_at_the_cap_do_not_lock_out_a_sender(
        server_factory: Callable[..., MailServer]) -> None:
    """Two addresses holding every place of a (scaled-down) cap with idle connections: a real
    sender from a third address still gets in, and the idle connections are the ones shed."""
    server = server_factory(smtp_extra="max_connections = 10\nmax_connections_per_client = 5")
    server.start()
    held = []
    try:
        for source in ("127.0.0.2", "127.0.0.3"):
            for _ in range(5):
                sock = connect_from(source, server.smtp_port)
                assert read_reply(sock).startswith(b"220 ")
                held.append(sock)
        send_from("127.0.0.4", server, "through the crowd")
        wait_for(lambda: server.inbox_files(), deadline=20, message="the delivery")
        shed = []
        for sock in held:
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):  # still held: nobody needed its place
                shed.append(read_reply(sock))
        assert shed and all(r.startswith(b"421 4.7.0 Server busy") for r in shed)
        assert "shed idle connection" in server.log()
    finally:
        for sock in held:
            sock.close()


def test_connection_flood_from_one_address_leaves_another_unaffected(
        server_factory: Callable[..., MailServer]) -> None:
    """2,000 connections from 127.0.0.2 while 127.0.0.3 delivers: the flood is refused with
    421 4.7.0 past connections_per_minute, every message of the second address is accepted."""
    server = server_factory(extra_config=STRANGERS + "connections_per_minute = 50\n")
    server.start()
    counts = {"220": 0, "421": 0, "other": 0}
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            for n in range(20):
                send_from("127.0.0.3", server, f"normal {n}")
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    sender = threading.Thread(target=deliver)
    sender.start()
    started = time.monotonic()
    deadline = started + 120
    for _ in range(FLOOD):
        assert time.monotonic() < deadline, "the flood took too long"
        with connect_from("127.0.0.2", server.smtp_port) as sock:
            reply = read_reply(sock)
        counts[reply[:3].decode() if reply[:3] in (b"220", b"421") else "other"] += 1
    # The bucket holds 50 and drains 50 a minute: at most that many got in while it lasted.
    admitted = 50 + (time.monotonic() - started) * 50 / 60 + 1
    sender.join(timeout=120)
    assert not sender.is_alive() and not errors, errors
    assert counts["220"] <= admitted and counts["other"] == 0
    assert counts["421"] == FLOOD - counts["220"]
    wait_for(lambda: len(server.inbox_files()) == 20, deadline=30, message="20 deliveries")


def test_directory_harvest_stopped(server_factory: Callable[..., MailServer]) -> None:
    """10,000 RCPTs to random local parts: after failed_recipients_per_hour unknown ones the
    client is told 421 4.7.0 and disconnected, and its next connection is refused."""
    server = server_factory(extra_config=STRANGERS + "failed_recipients_per_hour = 25\n")
    server.start()
    refused = 0
    closing: smtplib.SMTPResponseException | None = None
    client = smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30,
                          source_address=("127.0.0.5", 0))
    client.ehlo("harvester.test")
    client.mail("probe@remote.test")
    rng = random.Random(17)
    try:
        for _ in range(10_000):
            local = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(10))
            code, _ = client.rcpt(f"{local}@example.test")
            if code == 550:
                refused += 1
            elif code == 421:
                closing = smtplib.SMTPResponseException(code, b"")
                break
    except smtplib.SMTPServerDisconnected:
        pass
    finally:
        client.close()
    assert refused == 25
    assert closing is not None
    with connect_from("127.0.0.5", server.smtp_port) as sock:
        assert read_reply(sock).startswith(b"421 4.7.0 Too many unknown recipients")


def test_early_talker_refused_patient_client_served(
        server_factory: Callable[..., MailServer]) -> None:
    """With a greeting pause, a client that sends EHLO before the greeting ends gets 554 and
    the connection closes; swaks, which waits, delivers."""
    server = server_factory(extra_config=STRANGERS + "greeting_pause = 1.0\n")
    server.start()
    with connect_from("127.0.0.6", server.smtp_port) as sock:
        first = sock.recv(4096)
        assert first.startswith(b"220-")
        sock.sendall(b"EHLO bot.test\r\n")
        rest = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
    assert rest == b"554 5.5.1 Protocol error: talked before the greeting\r\n"
    assert "pregreet from [127.0.0.6]" in server.log()
    swaks = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.smtp_port}", "--local-interface",
         "127.0.0.7", "--from", "sender@remote.test", "--to", "demo@example.test",
         "--helo", "patient.test", "--timeout", "20"],
        capture_output=True, text=True, timeout=60)
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    wait_for(lambda: server.inbox_files(), deadline=20, message="the patient client's mail")


@pytest.fixture
def blocklist_dns(tmp_path: Path) -> Iterator[LabDNS]:
    """The lab DNS serving a test blocklist: 127.0.0.2 listed in bl.test, and a zone slow.test
    that never answers for 127.0.0.3."""
    dns = start_lab_dns(tmp_path / "dns", {
        "2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["listed for testing"]},
        "3.0.0.127.slow.test": {"error": "timeout"},
        "2.0.0.127.slow.test": {"error": "timeout"},
    })
    try:
        yield dns
    finally:
        dns.stop()


def test_dnsbl_listed_client_refused_and_timeout_marks(
        server_factory: Callable[..., MailServer], blocklist_dns: LabDNS) -> None:
    """A client listed by bl.test gets 554 5.7.1 naming it; a client whose other list times
    out still delivers, with the message marked."""
    server = server_factory(
        authn_config=f'[authn]\nchecks = false\ndns_servers = ["{blocklist_dns.server}"]\n',
        extra_config=STRANGERS + 'dnsbl = { "bl.test" = 1.0, "slow.test" = 1.0 }\n'
                                 "dnsbl_timeout = 2.0\n")
    server.start()
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send_from("127.0.0.2", server, "from a listed bot")
    assert refused.value.smtp_code == 554
    assert refused.value.smtp_error.startswith(b"5.7.1 ")
    assert b"blocked using bl.test" in refused.value.smtp_error
    started = time.monotonic()
    send_from("127.0.0.3", server, "through a slow list")
    assert time.monotonic() - started < 15
    files = wait_for(lambda: server.inbox_files(), deadline=20, message="the marked message")
    assert isinstance(files, list)
    content = files[0].read_bytes()
    assert b"X-Mailsys-Defence: dnsbl=slow.test timeout" in content


def test_greylisting_delays_then_remembers_across_a_restart(
        server_factory: Callable[..., MailServer]) -> None:
    """Greylisting on: a new triplet gets 450 4.7.1, the retry after the delay is accepted,
    and after a restart the known sender passes at once while a new one waits."""
    server = server_factory(extra_config=STRANGERS + "greylisting = true\n"
                                                     "greylist_delay = 2.0\n")
    server.start()
    with pytest.raises(smtplib.SMTPRecipientsRefused) as greylisted:
        send_from("127.0.0.9", server, "first try")
    ((code, text),) = greylisted.value.recipients.values()
    assert (code, text[:5]) == (450, b"4.7.1")
    tried = time.monotonic()

    def retry() -> bool:
        """A real MTA's retry: refused until the delay has passed."""
        try:
            send_from("127.0.0.9", server, "second try")
        except smtplib.SMTPRecipientsRefused:
            return False
        return True

    wait_for(retry, deadline=20, interval=0.5, message="the retry to be accepted")
    assert time.monotonic() - tried >= 1.5
    wait_for(lambda: server.inbox_files(), deadline=20, message="the retried message")
    server.stop()
    server.start()
    send_from("127.0.0.9", server, "known sender")
    wait_for(lambda: len(server.inbox_files()) == 2, deadline=20, message="the known sender")
    with (pytest.raises(smtplib.SMTPRecipientsRefused),
          smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30, local_hostname="client.test",
                       source_address=("127.0.0.9", 0)) as client):
        client.sendmail("new@remote.test", ["demo@example.test"], b"Subject: new\r\n\r\nx\r\n")


def test_lists_read_again_on_sighup(server_factory: Callable[..., MailServer]) -> None:
    """A sender added to block_senders in the file is refused after SIGHUP, without a restart;
    a file with a mistake leaves the lists as they were."""
    server = server_factory(extra_config=STRANGERS)
    server.start()
    send_from("127.0.0.10", server, "before")
    server.extra_config = STRANGERS + 'block_senders = ["@remote.test"]\n'
    server.write_config()
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGHUP)
    wait_for(lambda: "configuration reloaded from" in server.log(), deadline=20,
             message="the reload")
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send_from("127.0.0.10", server, "after")
    assert refused.value.smtp_code == 554
    server.extra_config = STRANGERS + "helo = 'sometimes'\n"
    server.write_config()
    os.kill(server.process.pid, signal.SIGHUP)
    wait_for(lambda: "configuration not reloaded" in server.log(), deadline=20,
             message="the refused reload")
    assert "defence.helo: must be one of none, score, reject" in server.log()
    with pytest.raises(smtplib.SMTPSenderRefused):
        send_from("127.0.0.10", server, "still blocked")
