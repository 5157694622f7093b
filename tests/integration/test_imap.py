"""IMAP against the real `twistd -n mailsys`: imaplib over STARTTLS and 993, IDLE with SMTP."""

from __future__ import annotations

import base64
import imaplib
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.integration.conftest import MailServer, free_port, read_greeting, wait_for

USER = "demo@example.test"
PASSWORD = "demo"


@dataclass
class IMAPServer:
    """A running mailsys with [imap] listeners: STARTTLS on ``port``, implicit TLS on
    ``tls_port``."""

    mail: MailServer
    port: int
    tls_port: int

    def context(self) -> ssl.SSLContext:
        """A client context trusting nothing but this server's self-signed certificate."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.load_verify_locations(cafile=str(self.mail.directory / "var/tls/cert.pem"))
        return context

    def starttls(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=30)
        client.starttls(self.context())
        client.login(USER, PASSWORD)
        return client

    def implicit(self) -> imaplib.IMAP4_SSL:
        client = imaplib.IMAP4_SSL("127.0.0.1", self.tls_port, ssl_context=self.context(),
                                   timeout=30)
        client.login(USER, PASSWORD)
        return client


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def make_imap(factory: Callable[..., MailServer], name: str = "server") -> IMAPServer:
    port, tls_port = free_port(), free_port()
    extra = f"""
[imap]
listen = ["tcp:{port}:interface=127.0.0.1"]
listen_tls = ["tcp:{tls_port}:interface=127.0.0.1"]
"""
    server = IMAPServer(factory(name, extra_config=extra), port, tls_port)
    server.mail.start()
    wait_for(lambda: read_greeting(port).startswith(b"* OK"), deadline=30,
             message="the IMAP greeting")
    wait_for(lambda: _listening(tls_port), deadline=30, message="IMAP over TLS")
    return server


@pytest.fixture
def imap(server_factory: Callable[..., MailServer]) -> Iterator[IMAPServer]:
    """A started server with IMAP; plaintext login refused before TLS (the default)."""
    yield make_imap(server_factory)


def _ok(result: tuple[str, list[object]]) -> list[object]:
    status, data = result
    assert status == "OK", result
    return data


def test_login_disabled_before_starttls(imap: IMAPServer) -> None:
    """Before STARTTLS, LOGINDISABLED is advertised and LOGIN is refused."""
    client = imaplib.IMAP4("127.0.0.1", imap.port, timeout=30)
    assert "LOGINDISABLED" in client.capabilities and "STARTTLS" in client.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        client.login(USER, PASSWORD)
    client.starttls(imap.context())
    client.login(USER, PASSWORD)
    client.logout()


def test_line_too_long_ends_authenticate(imap: IMAPServer) -> None:
    """imaplib on 993: an over-long AUTHENTICATE response gets BAD and ends the exchange; the
    next command runs and the right password logs in."""
    client = imaplib.IMAP4_SSL("127.0.0.1", imap.tls_port, ssl_context=imap.context(),
                               timeout=30)
    with pytest.raises(imaplib.IMAP4.error, match="too long"):
        client.authenticate("PLAIN", lambda challenge: b"A" * 70_000)
    _ok(client.noop())
    client.login(USER, PASSWORD)
    client.logout()


def test_imaplib_mailbox_session(imap: IMAPServer) -> None:
    """Over 993: append, select, fetch, search, store, copy, move and expunge all work."""
    client = imap.implicit()
    for i in range(3):
        message = (f"From: sender@example.net\r\nSubject: note {i}\r\n\r\n"
                   f"body {i}\r\n").encode()
        data = _ok(client.append("INBOX", None, None, message))  # APPEND without flags
        assert re.search(rb"APPENDUID \d+ %d" % (i + 1), data[0])  # type: ignore[arg-type]
    assert _ok(client.select("INBOX")) == [b"3"]
    data = _ok(client.fetch("1:*", "(UID FLAGS RFC822.SIZE)"))
    assert len(data) == 3
    _, fetched = client.fetch("2", "(BODY.PEEK[])")
    assert fetched[0][1] == b"From: sender@example.net\r\nSubject: note 1\r\n\r\nbody 1\r\n"
    assert _ok(client.search(None, "SUBJECT", '"note 2"')) == [b"3"]
    _ok(client.store("1", "+FLAGS", "(\\Seen \\Flagged)"))
    assert _ok(client.search(None, "UNSEEN")) == [b"2 3"]
    copied = _ok(client.copy("1", "Trash"))
    assert b"COPYUID" in copied[0]  # type: ignore[operator]
    _ok(client.uid("MOVE", "3", "Junk"))
    _ok(client.store("1", "+FLAGS", "(\\Deleted)"))
    assert _ok(client.expunge())[-1] == b"1"  # imaplib also keeps the MOVE's EXPUNGE
    assert _ok(client.select("INBOX")) == [b"1"]
    assert _ok(client.select("Junk")) == [b"1"]
    assert _ok(client.select("Trash")) == [b"1"]
    _, flags = client.fetch("1", "(FLAGS)")
    assert b"\\Flagged" in flags[0]  # type: ignore[operator]
    client.logout()


def test_idle_hears_smtp_delivery(imap: IMAPServer) -> None:
    """A session in IDLE gets EXISTS for a message delivered by SMTP meanwhile."""
    client = imap.starttls()
    assert _ok(client.select("INBOX")) == [b"0"]
    tag = client._new_tag().decode()  # type: ignore[attr-defined]
    client.send(f"{tag} IDLE\r\n".encode())
    assert client.readline().startswith(b"+")
    with smtplib.SMTP("127.0.0.1", imap.mail.smtp_port, timeout=30) as smtp:
        smtp.sendmail("sender@example.net", [USER], b"Subject: while idle\r\n\r\nhello\r\n")
    client.sock.settimeout(30)
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = client.readline()
        lines.append(line)
        if line.endswith(b"EXISTS\r\n"):
            break
    assert lines[-1] == b"* 1 EXISTS\r\n", lines
    client.send(b"DONE\r\n")
    while not (line := client.readline()).startswith(tag.encode()):
        pass
    assert line.startswith(f"{tag} OK".encode())
    _, fetched = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert fetched[0][1] == b"Subject: while idle\r\n\r\n"  # type: ignore[index]
    client.logout()


def test_imap4rev2_esearch_searchres_and_binary(imap: IMAPServer) -> None:
    """imaplib enables IMAP4rev2, searches with ESEARCH and "$", fetches BINARY parts."""
    client = imap.implicit()
    assert "IMAP4REV2" in client.capabilities
    _ok(client.enable("IMAP4rev2"))
    assert client.untagged_responses.pop("ENABLED") == [b"IMAP4rev2"]
    payload = b"\x00\x01\x02 binary \xff"
    message = (b"From: sender@example.net\r\nSubject: attachment\r\n"
               b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
               b"Content-Type: text/plain\r\n\r\nsee attached\r\n--b\r\n"
               b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
               b"\r\n" + base64.b64encode(payload) + b"\r\n--b--\r\n")
    _ok(client.append("INBOX", None, None, message))
    _ok(client.append("INBOX", "(\\Seen)", None, b"Subject: second\r\n\r\nhi\r\n"))
    assert _ok(client.select("INBOX")) == [b"2"]
    assert "RECENT" not in client.untagged_responses
    typ, data = client._simple_command("SEARCH", "RETURN", "(MIN MAX COUNT)", "ALL")
    assert typ == "OK"
    _, lines = client._untagged_response(typ, data, "ESEARCH")
    assert re.fullmatch(rb'\(TAG "\w+"\) MIN 1 MAX 2 COUNT 2', lines[-1]), lines
    _ok(client._simple_command("UID", "SEARCH", "RETURN", "(SAVE)", "UNSEEN"))
    _, fetched = client.fetch("$", "(UID BINARY.PEEK[2] BINARY.SIZE[2])")
    assert fetched[0][1] == payload, fetched  # type: ignore[index]
    assert b"UID 1 " in fetched[0][0] and b"BINARY.SIZE[2] 12" in fetched[1], fetched
    client.logout()
