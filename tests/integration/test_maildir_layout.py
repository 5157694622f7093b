"""One Maildir format against the real `twistd -n mailsys`: SMTP delivery and IMAP APPEND write
files the same way, and folder names too long for a directory entry are refused."""

from __future__ import annotations

import email
import email.policy
import os
import re
import smtplib
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailsys.mailbox.layout import parse_name
from tests.integration.conftest import MailServer, wait_for
from tests.integration.test_imap import USER, IMAPServer, make_imap


@pytest.fixture
def imap(server_factory: Callable[..., MailServer]) -> Iterator[IMAPServer]:
    """A started server with SMTP and IMAP."""
    yield make_imap(server_factory)


def _message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "alice@sender.test"
    msg["To"] = USER
    msg["Subject"] = subject
    msg.set_content(f"Body of {subject}.\n")
    return msg


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def test_delivered_and_appended_copies_share_one_format(imap: IMAPServer) -> None:
    """A delivered and an appended message are both stored with LF and named with sizes that
    match what IMAP sends (,S= the file, ,W= RFC822.SIZE and the fetched bytes)."""
    mail = imap.mail
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("alice@sender.test")
        smtp.rcpt(USER)
        code, reply = smtp.data(_message("delivered").as_bytes(policy=email.policy.SMTP))
    assert code == 250
    queue_id = reply.decode().rsplit(" ", 1)[-1]
    wait_for(lambda: mail.inbox_files(), deadline=10, message="delivery")
    (delivered,) = mail.inbox_files()
    assert re.match(rf"\d+\.Q{re.escape(queue_id)}R[0-9A-F]{{10}}\.", delivered.name)

    client = imap.implicit()
    appended = b"From: me@example.test\r\nSubject: appended\r\n\r\nline\r\n"
    status, _ = client.append("Sent", None, None, appended)
    assert status == "OK"
    for folder in ("INBOX", "Sent"):
        status, _ = client.select(folder)
        assert status == "OK"
        status, data = client.fetch("1", "(RFC822.SIZE BODY.PEEK[])")
        assert status == "OK"
        item = data[0]
        assert isinstance(item, tuple)
        head, body = item
        match = re.search(rb"RFC822.SIZE (\d+)", head)
        assert match is not None
        size = int(match.group(1))
        assert size == len(body)
        cur = mail.maildirs / "example.test" / "demo" / ("cur" if folder == "INBOX"
                                                         else ".Sent/cur")
        (path,) = _files(cur)
        parsed = parse_name(path.name)
        stored = path.read_bytes()
        assert parsed.size == len(stored) and parsed.wire_size == size
        assert b"\r" not in stored and stored.replace(b"\n", b"\r\n") == body
    client.logout()


def test_folder_names_too_long_for_the_disk_are_refused(imap: IMAPServer) -> None:
    """CREATE of a 100-level or over-long name and a RENAME that would make a child's name too
    long get NO; nothing reaches ENAMETOOLONG and the session goes on."""
    client = imap.implicit()
    for name in (".".join(["level"] * 100), "n" * 300):
        status, _ = client.create(name)
        assert status == "NO"
    child = "A." + "c" * 240
    assert client.create(child)[0] == "OK"
    status, _ = client.rename("A", "B" * 20)
    assert status == "NO"
    status, listed = client.list('""', "A*")
    assert status == "OK" and len(listed) == 2
    assert client.noop()[0] == "OK"
    client.logout()
    inbox = imap.mail.maildirs / "example.test" / "demo"
    assert sorted(n for n in os.listdir(inbox) if n.startswith(".A")) == [".A", "." + child]
    assert "File name too long" not in imap.mail.log()
