"""The message journey against the real `twistd -n mailsys`: a message submitted with smtplib,
delivered to a local mailbox, then shown step by step by `mailsys trace`."""

from __future__ import annotations

import imaplib
import json
import poplib
import smtplib
import ssl
import subprocess
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from tests.integration.conftest import MAILSYS, MailServer, free_port, wait_for

USER = "demo@example.test"
PASSWORD = "demo"


def journey_config(directory: Path, enabled: bool = True, pop3_port: int = 0,
                   imap_port: int = 0) -> str:
    readers = f"""
[pop3]
listen = []
listen_tls = ["tcp:{pop3_port}:interface=127.0.0.1"]

[imap]
listen = []
listen_tls = ["tcp:{imap_port}:interface=127.0.0.1"]
""" if pop3_port else ""
    return readers + f"""
[journey]
enabled = {str(enabled).lower()}
path = "{directory}/var/journey.sqlite"
"""


def trace(server: MailServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MAILSYS, "--config", str(server.config_path), "trace", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def submit(server: MailServer, msg: EmailMessage, recipients: list[str]) -> dict[str, Any]:
    """Send over 587 with STARTTLS and AUTH, as a mail client does; the refused recipients."""
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30) as client:
        client.starttls(context=tls_context(server))
        client.login(USER, PASSWORD)
        refused: dict[str, Any] = client.send_message(msg, USER, recipients)
    return refused


def tls_context(server: MailServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.directory / "var/tls/cert.pem"))


def steps_of(server: MailServer, query: str, until: Callable[[list[dict[str, Any]]], bool]
             ) -> list[dict[str, Any]]:
    """The steps of the first journey ``query`` names, once ``until`` holds (the writer
    batches, so the last steps reach the store a moment after they happen)."""
    def ready() -> list[dict[str, Any]] | None:
        done = trace(server, query, "--json")
        if done.returncode != 0:
            return None
        steps: list[dict[str, Any]] = json.loads(done.stdout)["journeys"][0]["steps"]
        return steps if until(steps) else None

    found = wait_for(ready, deadline=20.0, message=f"the journey of {query}")
    assert isinstance(found, list)
    return found


def test_trace_shows_a_submitted_message_in_order(
        server_factory: Callable[..., MailServer], tmp_path: Path) -> None:
    """Submission, a refused and an accepted RCPT, queueing, routing, Maildir delivery, the
    first read over IMAP and the retrieval by POP3 are the steps of `mailsys trace`, in order,
    found by Message-ID, queue id and address."""
    pop3_port, imap_port = free_port(), free_port()
    server = server_factory(extra_config=journey_config(tmp_path / "server",
                                                        pop3_port=pop3_port,
                                                        imap_port=imap_port))
    server.start()
    msg = EmailMessage()
    msg["From"] = USER
    msg["To"] = USER
    msg["Subject"] = "Where is my mail?"
    msg["Message-ID"] = "<journey-1@client.example.test>"
    msg.set_content("Hello.\n")
    refused = submit(server, msg, [USER, "nobody@example.test"])
    assert list(refused) == ["nobody@example.test"]
    wait_for(lambda: server.inbox_files(), message="delivery to demo's inbox")
    maildir_file = server.inbox_files()[0].name
    imap = imaplib.IMAP4_SSL("127.0.0.1", imap_port, ssl_context=tls_context(server), timeout=30)
    imap.login(USER, PASSWORD)
    imap.select("INBOX")
    for _ in range(2):  # only the first read of the body is a step
        assert imap.fetch("1", "(BODY[])")[0] == "OK"
    imap.logout()
    reader = poplib.POP3_SSL("127.0.0.1", pop3_port, timeout=30, context=tls_context(server))
    reader.user(USER)
    reader.pass_(PASSWORD)
    reader.retr(1)
    reader.dele(1)
    reader.quit()

    steps = steps_of(server, "<journey-1@client.example.test>",
                     lambda steps: any(s["kind"] == "pop3.dele" for s in steps))
    kinds = [step["kind"] for step in steps]
    expected = ["smtp.connect", "smtp.ehlo", "smtp.tls", "smtp.ehlo", "smtp.auth", "smtp.mail",
                "smtp.rcpt", "smtp.rcpt", "spool.commit", "route", "smtp.data",
                "delivery.maildir", "imap.fetch", "pop3.retr", "pop3.dele"]
    assert [k for k in kinds if k in expected] == expected, kinds
    by_kind = {step["kind"]: step for step in steps}
    assert by_kind["smtp.connect"]["fields"]["listener"] == "submission"
    assert by_kind["smtp.tls"]["text"].startswith("STARTTLS: TLSv1.3")
    assert by_kind["smtp.auth"]["fields"] == {"user": USER, "mechanism": "PLAIN",
                                              "reply": "235 2.7.0 Authentication successful"}
    rcpts = {s["fields"]["recipient"]: s for s in steps if s["kind"] == "smtp.rcpt"}
    refused_step, accepted_step = rcpts["nobody@example.test"], rcpts[USER]
    assert refused_step["fields"]["reply"].startswith("550 5.1.1")
    assert refused_step["rule"].startswith("RFC 5321 §4.1.1.3; 5.1.1: address status")
    assert accepted_step["fields"]["reply"].startswith("250")
    queue_id = by_kind["spool.commit"]["queue_id"]
    assert by_kind["smtp.data"]["fields"]["reply"] == f"250 2.0.0 Ok: queued as {queue_id}"
    maildir = by_kind["delivery.maildir"]["fields"]
    assert maildir["mailbox"] == USER and maildir["folder"] == "INBOX"
    assert maildir["file"] == maildir_file
    assert kinds.count("imap.fetch") == 1
    assert by_kind["imap.fetch"]["text"] == f"{USER} read it over IMAP (BODY[] in INBOX)"
    assert by_kind["pop3.retr"]["fields"]["user"] == USER
    assert by_kind["pop3.retr"]["text"] == f"{USER} retrieved it by POP3"
    offsets = [step["offset"] for step in steps]
    assert offsets == sorted(offsets) and offsets[0] == 0

    # The same journey by queue id, as text: one step per line, each with its rule.
    text = trace(server, queue_id)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"message {queue_id} <journey-1@client.example.test>")
    assert any("RCPT TO:<nobody@example.test> refused (550 5.1.1" in line for line in lines)
    assert any(f"written to {USER} folder INBOX" in line for line in lines)
    # And by the refused address: the transaction that queued the message for the others.
    by_address = trace(server, "nobody@example.test")
    assert by_address.returncode == 0 and f"message {queue_id}" in by_address.stdout
    # No password and no body in the store.
    stored = b"".join(p.read_bytes() for p in (server.directory / "var").glob("journey.sqlite*"))
    assert b"Hello." not in stored and PASSWORD.encode() + b"\x00" not in stored
    assert b"AGRlbW9AZXhhbXBsZS50ZXN0AGRlbW8" not in stored  # the AUTH PLAIN response


def test_recording_off_keeps_no_store(server_factory: Callable[..., MailServer],
                                      tmp_path: Path) -> None:
    """With [journey] enabled = false nothing is recorded and trace says there is no store."""
    server = server_factory(extra_config=journey_config(tmp_path / "server", enabled=False))
    server.start()
    msg = EmailMessage()
    msg["From"] = USER
    msg["To"] = USER
    msg["Subject"] = "unrecorded"
    msg.set_content("x\n")
    submit(server, msg, [USER])
    wait_for(lambda: server.inbox_files(), message="delivery")
    done = trace(server, USER)
    assert done.returncode == 1 and "no journey store here" in done.stderr
    assert not (server.directory / "var" / "journey.sqlite").exists()
