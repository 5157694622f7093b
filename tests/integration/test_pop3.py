"""POP3 against the real `twistd -n mailsys`: poplib (plain, STLS, POP3_SSL) and fetchmail."""

from __future__ import annotations

import hashlib
import os
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.integration.conftest import MailServer, free_port, read_greeting, wait_for

USER = "demo@example.test"
PASSWORD = "demo"


@dataclass
class POP3Server:
    """A running mailsys with [pop3] listeners: STLS on ``port``, implicit TLS on ``tls_port``."""

    mail: MailServer
    port: int
    tls_port: int

    @property
    def inbox(self) -> Path:
        return self.mail.maildirs / "example.test" / "demo"

    def start(self) -> None:
        self.mail.start()
        wait_for(lambda: read_greeting(self.port).startswith(b"+OK"), deadline=30,
                 message="the POP3 greeting")
        wait_for(lambda: _listening(self.tls_port), deadline=30, message="POP3 over TLS")

    def restart(self) -> None:
        self.mail.stop()
        self.start()

    def deliver(self, data: bytes, name: str) -> None:
        """Put a message into the INBOX's new/ as a delivery agent would."""
        for sub in ("cur", "new", "tmp"):
            (self.inbox / sub).mkdir(parents=True, exist_ok=True)
        (self.inbox / "tmp" / name).write_bytes(data)
        os.rename(self.inbox / "tmp" / name, self.inbox / "new" / name)

    def context(self) -> ssl.SSLContext:
        """A client context trusting nothing but this server's self-signed certificate."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(self.mail.directory / "var/tls/cert.pem"))
        return context

    def stls(self) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.port, timeout=30)
        client.stls(self.context())
        client.user(USER)
        client.pass_(PASSWORD)
        return client

    def implicit(self) -> poplib.POP3_SSL:
        client = poplib.POP3_SSL("127.0.0.1", self.tls_port, timeout=30, context=self.context())
        client.user(USER)
        client.pass_(PASSWORD)
        return client


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def make_pop3(factory: Callable[..., MailServer], name: str = "server",
              plaintext: bool = False) -> POP3Server:
    port, tls_port = free_port(), free_port()
    extra = f"""
[pop3]
listen = ["tcp:{port}:interface=127.0.0.1"]
listen_tls = ["tcp:{tls_port}:interface=127.0.0.1"]
allow_plaintext_auth = {"true" if plaintext else "false"}
"""
    server = POP3Server(factory(name, extra_config=extra), port, tls_port)
    server.start()
    return server


@pytest.fixture
def pop3(server_factory: Callable[..., MailServer]) -> Iterator[POP3Server]:
    """A started server with POP3; plaintext login refused before TLS (the default)."""
    yield make_pop3(server_factory)


def received(client: poplib.POP3, number: int) -> bytes:
    """RETR ``number`` through poplib, as the bytes of the message with CRLF line ends."""
    _, lines, _ = client.retr(number)
    return b"".join(line + b"\r\n" for line in lines)


def listing(client: poplib.POP3) -> dict[int, int]:
    _, lines, _ = client.list()
    return {int(n): int(size) for n, size in (line.split() for line in lines)}


def uidls(client: poplib.POP3) -> list[bytes]:
    _, lines, _ = client.uidl()
    return [line.split()[1] for line in lines]


def _dotted() -> bytes:
    """A message with a "." line first in the body and another starting at byte 16384."""
    data = b"Subject: dots\r\nFrom: a@example.test\r\n\r\n.first line starts with a dot\r\n"
    while 16384 - len(data) > 100:
        data += b"x" * 78 + b"\r\n"
    data += b"y" * (16384 - len(data) - 2) + b"\r\n"
    assert len(data) == 16384
    return data + b".\r\n..\r\n.after the boundary\r\nend\r\n"


DOTTED = _dotted()


def test_plaintext_login_refused_then_stls(pop3: POP3Server) -> None:
    """Before STLS, USER is refused with [AUTH]; after STLS the same login works."""
    client = poplib.POP3("127.0.0.1", pop3.port, timeout=30)
    assert "STLS" in client.capa() and "USER" not in client.capa()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.user(USER)
    client.stls(pop3.context())
    assert "USER" in client.capa() and "STLS" not in client.capa()
    client.user(USER)
    assert client.pass_(PASSWORD).startswith(b"+OK")
    assert client.stat() == (0, 0)
    client.quit()


def test_plain_login_when_allowed(server_factory: Callable[..., MailServer]) -> None:
    """With allow_plaintext_auth, USER/PASS works over a plain connection."""
    server = make_pop3(server_factory, "plain", plaintext=True)
    client = poplib.POP3("127.0.0.1", server.port, timeout=30)
    client.user(USER)
    assert client.pass_(PASSWORD).startswith(b"+OK")
    client.quit()


def test_pop3_ssl_and_wrong_password(pop3: POP3Server) -> None:
    """POP3 over implicit TLS logs in; a wrong password is -ERR [AUTH]."""
    client = poplib.POP3_SSL("127.0.0.1", pop3.tls_port, timeout=30, context=pop3.context())
    client.user(USER)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("wrong")
    client.user(USER)
    assert client.pass_(PASSWORD).startswith(b"+OK")
    client.quit()


def test_line_too_long_ends_auth_plain(pop3: POP3Server) -> None:
    """poplib on 995: AUTH PLAIN, then a 5,000-byte line gets -ERR and ends the exchange; the
    next line is a command again and the right password logs in."""
    client = poplib.POP3_SSL("127.0.0.1", pop3.tls_port, timeout=30, context=pop3.context())
    client._putcmd("AUTH PLAIN")
    assert client._getline()[0].startswith(b"+")
    with pytest.raises(poplib.error_proto, match="too long"):
        client._shortcmd("A" * 5000)
    assert client.capa()  # a command, not a SASL response
    client.user(USER)
    assert client.pass_(PASSWORD).startswith(b"+OK")
    client.quit()


def test_retr_dot_lines_byte_identical(pop3: POP3Server) -> None:
    """A message with "." lines at the start and at byte 16384 comes back byte-identical."""
    pop3.deliver(DOTTED, "1800000000.dots.host")
    big = b"Subject: big\r\n\r\n" + b"".join(
        (b"." if i % 50 == 0 else b"") + b"line %d\r\n" % i for i in range(60_000))
    pop3.deliver(big, "1800000001.big.host")
    client = pop3.implicit()
    assert received(client, 1) == DOTTED
    assert received(client, 2) == big
    client.quit()


def test_list_sizes_equal_retr_bytes(pop3: POP3Server) -> None:
    """LIST sizes equal the bytes RETR returns, also for a message stored with bare LF."""
    pop3.deliver(DOTTED, "1800000000.a.host")
    pop3.deliver(b"Subject: lf\n\nline one\n.line two\nno final newline", "1800000001.b.host")
    client = pop3.stls()
    sizes = listing(client)
    for number, size in sizes.items():
        assert len(received(client, number)) == size
    assert client.stat() == (2, sum(sizes.values()))
    client.quit()


def test_dele_quit_deletes_and_drop_deletes_nothing(pop3: POP3Server) -> None:
    """DELE then a dropped connection deletes nothing; DELE then QUIT deletes."""
    for i in range(3):
        pop3.deliver(b"Subject: %d\r\n\r\nbody\r\n" % i, f"180000000{i}.m{i}.host")
    client = pop3.stls()
    client.dele(1)
    client.close()  # the socket, without QUIT: RFC 1939 §6, no UPDATE state

    def relogin() -> poplib.POP3 | None:
        try:
            return pop3.stls()
        except poplib.error_proto as exc:
            assert b"[IN-USE]" in exc.args[0]  # until the server sees the connection gone
            return None

    again = wait_for(relogin, message="the lock of the dropped session to go")
    assert isinstance(again, poplib.POP3)
    client = again
    assert client.stat()[0] == 3
    first = uidls(client)[0]
    client.dele(1)
    client.quit()
    client = pop3.stls()
    assert client.stat()[0] == 2
    assert first not in uidls(client)
    client.quit()


def test_second_session_gets_in_use(pop3: POP3Server) -> None:
    """While one POP3 session holds the mailbox, a second login gets -ERR [IN-USE]."""
    first = pop3.stls()
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        pop3.implicit()
    first.quit()
    pop3.implicit().quit()


def test_mail_sent_by_smtp_is_fetched(pop3: POP3Server) -> None:
    """A message accepted over SMTP is delivered and then retrieved over POP3."""
    with smtplib.SMTP("127.0.0.1", pop3.mail.smtp_port, timeout=30) as smtp:
        smtp.sendmail("sender@example.net", [USER],
                      b"Subject: via smtp\r\n\r\n.dot line\r\nhello\r\n")
    wait_for(lambda: pop3.mail.inbox_files(), message="delivery")
    client = pop3.stls()
    message = received(client, 1)
    assert message.endswith(b"Subject: via smtp\r\n\r\n.dot line\r\nhello\r\n")
    assert message.startswith(b"Return-Path: <sender@example.net>\r\n")
    client.quit()


def test_uidl_and_uids_stable_across_restart_and_rebuild(pop3: POP3Server) -> None:
    """UIDL and the store's UIDs survive a restart, flag changes and a lost UID file."""
    for i in range(5):
        pop3.deliver(b"Subject: %d\r\n\r\nbody\r\n" % i, f"180000000{i}.s{i}.host")
    client = pop3.stls()
    before = uidls(client)
    received(client, 2)  # marked seen at QUIT: a flag change renames the file
    client.quit()
    uidlist = pop3.inbox / "mailsys-uidlist"

    def uid_lines() -> list[tuple[str, ...]]:
        # UID, size, wire size and key; a rebuild gives new (higher) mod-sequences.
        lines = uidlist.read_text().splitlines()
        return [(*line.split(" ")[:3], line.split(" ", 5)[-1]) for line in lines[1:]]

    uids_before = uid_lines()
    pop3.restart()
    client = pop3.implicit()
    assert uidls(client) == before
    client.quit()
    uidlist.unlink()
    client = pop3.stls()
    assert uidls(client) == before
    client.quit()
    assert uid_lines() == uids_before


def test_pipelined_stls_plaintext_discarded(pop3: POP3Server) -> None:
    """Commands pipelined after STLS in the same segment are discarded, not run inside TLS."""
    with socket.create_connection(("127.0.0.1", pop3.port), timeout=30) as sock:
        sock.recv(1024)
        sock.sendall(b"STLS\r\nCAPA\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += sock.recv(1024)
        assert reply == b"+OK Begin TLS negotiation\r\n"
        tls = pop3.context().wrap_socket(sock)
        tls.sendall(b"NOOP\r\n")
        assert tls.recv(1024) == b"-ERR Command not valid in this state\r\n"


def _fingerprint(cert: Path) -> str:
    """The certificate fingerprint as fetchmail 6.4 pins it (MD5, colon-separated hex)."""
    digest = x509.load_pem_x509_certificate(cert.read_bytes()).fingerprint(hashes.MD5())
    return ":".join(f"{b:02X}" for b in digest)


@pytest.mark.parametrize("implicit", [True, False], ids=["pop3s", "stls"])
def test_fetchmail_fetches_everything(pop3: POP3Server, tmp_path: Path, implicit: bool) -> None:
    """fetchmail fetches every message over TLS; counts and contents match the Maildir."""
    fetchmail = shutil.which("fetchmail")
    assert fetchmail is not None, "fetchmail is needed (Debian package fetchmail)"
    messages = {}
    for i in range(20):
        body = b"Subject: fm %d\r\nMessage-ID: <fm%d@example.test>\r\n\r\n" % (i, i)
        body += b"".join(b".dot %d\r\nline %d\r\n" % (j, j) for j in range(i * 50))
        name = f"18000000{i:02d}.fm{i}.host"
        pop3.deliver(body, name)
        messages[f"<fm{i}@example.test>"] = body
    out = tmp_path / "out"
    out.mkdir()
    mda = tmp_path / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "{out}/msg.$$"\n')
    mda.chmod(0o700)
    rc = tmp_path / "fetchmailrc"
    port = pop3.tls_port if implicit else pop3.port
    tls = "ssl" if implicit else "sslproto 'tls1.2+'"
    rc.write_text(
        f'poll 127.0.0.1 with proto POP3 port {port} no envelope\n'
        f'  user "{USER}" there with password "{PASSWORD}" is "local" here\n'
        # The development certificate is self-signed: pinned by its fingerprint instead.
        f'  options {tls} no sslcertck sslcommonname "mail.example.test"\n'
        f'  sslfingerprint "{_fingerprint(pop3.mail.directory / "var/tls/cert.pem")}"\n'
        f'  fetchall nokeep mda "{mda}"\n'
    )
    rc.chmod(0o600)
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "FETCHMAILHOME": str(tmp_path)}
    # As root, fetchmail keeps one system-wide pid file whatever FETCHMAILHOME says, so two
    # test runs side by side would refuse each other ("another foreground fetchmail is running").
    done = subprocess.run([fetchmail, "-f", str(rc), "--nodetach", "--nosyslog", "-v",
                           "--pidfile", str(tmp_path / "fetchmail.pid")],
                          env=env, capture_output=True, timeout=120, check=False)
    log = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert done.returncode == 0, log
    got: dict[str, bytes] = {}
    for path in out.iterdir():
        data = path.read_bytes()
        header = data.split(b"\n\n", 1)[0]
        field = next(line for line in header.split(b"\n")
                     if line.lower().startswith(b"message-id:"))
        got[field.split(b" ", 1)[1].decode()] = data
    assert sorted(got) == sorted(messages)
    for message_id, original in messages.items():
        fetched = got[message_id]
        # fetchmail writes LF line ends and adds its own Received field at the top.
        expected = original.replace(b"\r\n", b"\n")
        assert fetched.endswith(expected), message_id
        assert hashlib.sha256(fetched[-len(expected):]).digest() == hashlib.sha256(
            expected).digest()
    # nokeep: everything was deleted at QUIT.
    assert os.listdir(pop3.inbox / "cur") == [] and os.listdir(pop3.inbox / "new") == []
