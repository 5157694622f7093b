"""Submission on 587 (STARTTLS) and 465 (implicit TLS) against the real `twistd -n mailsys`:
smtplib, swaks and raw sockets for TLS, AUTH, throttling, sender rules and certificate reload."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import json
import select
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailsys import tls
from tests.integration.conftest import MAILSYS, TWISTD, MailServer, make_server, wait_for
from tests.integration.relay_support import block_for, files_in, find_message, parse

USER = "demo@example.test"
PASSWORD = "demo"
# The shared server forgives failed logins quickly, so tests that fail on purpose do not slow
# each other down; the throttling test has a server of its own.
LENIENT_THROTTLE = """
[auth]
throttle_base_delay = 0.05
throttle_max_delay = 0.1
throttle_max_failures = 1000
throttle_max_address_failures = 1000
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailServer]:
    """One started server for the tests that only talk to it."""
    server = make_server(tmp_path_factory.mktemp("submission"), extra_config=LENIENT_THROTTLE)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def trusting(server: MailServer) -> ssl.SSLContext:
    """A client context that trusts only the server's self-signed certificate (and checks the
    name: 127.0.0.1 and localhost are in its SAN)."""
    return ssl.create_default_context(cafile=str(server.directory / "var" / "tls" / "cert.pem"))


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def message(subject: str, to: str, sender: str = USER) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(f"Body of {subject}.\n")
    return msg


def delivered(server: MailServer, subject: str, mailbox: str = USER) -> bytes:
    """The bytes of the message with ``subject`` in ``mailbox``'s new/, waiting for it."""

    def find() -> bytes | None:
        for path in server.inbox_files(mailbox):
            data = path.read_bytes()
            if f"Subject: {subject}\n".encode() in data.replace(b"\r\n", b"\n"):
                return data
        return None

    found = wait_for(find, deadline=10, message=f"delivery of {subject!r}")
    assert isinstance(found, bytes)
    return found


def plain(user: str = USER, password: str = PASSWORD) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class RawSMTP:
    """SMTP at the line level over a socket, for what real clients will not send."""

    def __init__(self, port: int, *, source: str = "127.0.0.1", implicit_tls: bool = False,
                 timeout: float = 10.0) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                        source_address=(source, 0))
        if implicit_tls:
            sock = unverified().wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.buffer = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[str]:
        """The lines of the next reply (up to a 'ddd ' line); [] if the server closed."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return lines
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] == b" ":
                return lines

    def command(self, line: str) -> list[str]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def start_tls(self) -> None:
        assert self.buffer == b"", f"plaintext after 220: {self.buffer!r}"
        self.sock = unverified().wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        self.sock.close()


# --- real clients ------------------------------------------------------------------------------


def test_smtplib_starttls_login_send_on_587(shared: MailServer) -> None:
    """smtplib starttls()+login()+send_message() on 587: the local copy is delivered with a
    Received field naming TLS and the user; the external recipient is accepted and stays queued."""
    with smtplib.SMTP("127.0.0.1", shared.submission_port, timeout=10) as client:
        client.ehlo("laptop.test")
        assert "auth" not in client.esmtp_features
        client.starttls(context=trusting(shared))
        client.ehlo("laptop.test")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        client.login(USER, PASSWORD)
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        version, (cipher, _, bits) = sock.version(), sock.cipher()  # type: ignore[misc]
        msg = message("via 587", f"{USER}, friend@far-away.test")
        assert client.send_message(msg) == {}
    raw = delivered(shared, "via 587")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    received = " ".join(str(parsed["Received"]).split())
    assert f"(using {version} with cipher {cipher} ({bits}/{bits} bits))" in received
    assert f"(Authenticated sender: {USER})" in received
    assert "with ESMTPSA id" in received
    assert parsed["Message-ID"] and parsed["Date"]
    queue_id = received.split(" id ", 1)[1].split()[0].rstrip(";")

    def relay_waiting() -> dict[str, str] | None:
        path = shared.spool / "queue" / f"{queue_id}.env"
        if not path.exists():
            return None
        recipients = json.loads(path.read_text())["recipients"]
        statuses = {r["address"]: r["status"] for r in recipients}
        return statuses if statuses.get(USER) == "delivered" else None

    statuses = wait_for(relay_waiting, deadline=10, message="the local copy done, relay queued")
    # Relay is disabled here: the external recipient waits, deferred with the reason.
    assert statuses == {USER: "delivered", "friend@far-away.test": "deferred"}


# Relay disabled, with a lifetime of seconds: waiting mail must still age and bounce.
RELAY_DISABLED_SHORT = """
[relay]
enabled = false
retry_schedule = [0.5]
delay_warning = 1.5
max_lifetime = 4.0
"""


def test_relay_disabled_mail_gets_a_delay_notice_then_bounces(
    server_factory: Callable[..., MailServer],
) -> None:
    """Relay disabled: mail submitted for another domain is listed with its next check and the
    reason, then the sender gets one delay notice (4.3.2) and one bounce (5.4.7, saying that
    relaying is disabled) in their Maildir."""
    server = server_factory("norelay", relay_config=RELAY_DISABLED_SHORT)
    server.start()
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=10) as client:
        client.starttls(context=trusting(server))
        client.login(USER, PASSWORD)
        assert client.send_message(message("to far away", "x@far.test")) == {}

    def listed() -> str | None:
        out = subprocess.run([MAILSYS, "--config", str(server.config_path), "queue", "list"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out if "<x@far.test>" in out else None

    listing = str(wait_for(listed, message="the waiting message in queue list"))
    assert "next=" in listing and "Relay disabled" in listing
    inbox = server.inbox(USER)
    delay = find_message(inbox, b"Action: delayed", what="the delay notice")
    assert block_for(delay, "x@far.test")["Status"] == "4.3.2"
    bounce = find_message(inbox, b"Action: failed", what="the bounce")
    assert parse(bounce)["Subject"] == "Undelivered Mail Returned to Sender"
    assert block_for(bounce, "x@far.test")["Status"] == "5.4.7"
    assert b"relaying is disabled on this server" in bounce.read_bytes()
    wait_for(lambda: not list((server.spool / "queue").glob("*.env")),
             message="the bounced message to leave the queue")
    notices = [p for p in files_in(inbox) if b"Action: delayed" in p.read_bytes()]
    assert len(notices) == 1


def test_smtp_ssl_login_on_465(shared: MailServer) -> None:
    """SMTP_SSL + login() on 465: TLS from the first byte, AUTH offered at once, mail delivered
    with the TLS details of the implicit-TLS connection."""
    with smtplib.SMTP_SSL("127.0.0.1", shared.submissions_port, timeout=10,
                          context=trusting(shared)) as client:
        client.ehlo("phone.test")
        assert "starttls" not in client.esmtp_features
        assert client.login(USER, PASSWORD)[0] == 235
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        version, cipher = sock.version(), sock.cipher()[0]  # type: ignore[index]
        assert client.send_message(message("via 465", USER)) == {}
    raw = delivered(shared, "via 465").decode()
    assert f"(using {version} with cipher {cipher} (" in raw
    assert f"(Authenticated sender: {USER})" in raw


def test_plaintext_auth_on_587_is_refused(shared: MailServer) -> None:
    """Before STARTTLS, 587 does not offer AUTH, and AUTH sent anyway gets 530 5.7.0."""
    with smtplib.SMTP("127.0.0.1", shared.submission_port, timeout=10) as client:
        client.ehlo("laptop.test")
        assert "auth" not in client.esmtp_features
        code, text = client.docmd("AUTH", f"PLAIN {plain()}")
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
        with pytest.raises(smtplib.SMTPNotSupportedError):
            client.login(USER, PASSWORD)


def test_port_25_offers_no_auth(shared: MailServer) -> None:
    """Port 25 offers STARTTLS with the same certificate but never AUTH (the default)."""
    with smtplib.SMTP("127.0.0.1", shared.smtp_port, timeout=10) as client:
        client.ehlo("mx.far.test")
        client.starttls(context=trusting(shared))
        client.ehlo("mx.far.test")
        assert "auth" not in client.esmtp_features
        assert client.docmd("AUTH", f"PLAIN {plain()}")[0] == 502


def test_relay_without_auth_is_refused_everywhere(shared: MailServer) -> None:
    """Without AUTH no port relays to an external domain."""
    with smtplib.SMTP("127.0.0.1", shared.smtp_port, timeout=10) as client:
        client.ehlo("mx.far.test")
        client.mail("someone@far.test")
        code, text = client.rcpt("victim@elsewhere.test")
        assert (code, text[:5]) == (554, b"5.7.1")
    with smtplib.SMTP("127.0.0.1", shared.submission_port, timeout=10) as client:
        client.ehlo("laptop.test")
        assert client.mail(USER)[0] == 530
        assert client.rcpt("victim@elsewhere.test")[0] == 503
        client.starttls(context=trusting(shared))
        client.ehlo("laptop.test")
        code, text = client.mail(USER)
        assert (code, text) == (530, b"5.7.0 Authentication required")
        assert client.rcpt("victim@elsewhere.test")[0] == 503
    with smtplib.SMTP_SSL("127.0.0.1", shared.submissions_port, timeout=10,
                          context=trusting(shared)) as client:
        client.ehlo("laptop.test")
        assert client.mail(USER)[0] == 530
        assert client.rcpt("victim@elsewhere.test")[0] == 503


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--timeout", "10", *args], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_starttls_auth(shared: MailServer, mechanism: str) -> None:
    """swaks --tls --auth PLAIN/LOGIN on 587 logs in and gets its message delivered."""
    subject = f"swaks {mechanism}"
    result = swaks("--server", f"127.0.0.1:{shared.submission_port}", "--tls",
                   "--auth", mechanism, "--auth-user", USER, "--auth-password", PASSWORD,
                   "--from", USER, "--to", USER, "--header", f"Subject: {subject}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0 Authentication successful" in result.stdout
    assert b"with ESMTPSA" in delivered(shared, subject)


def test_swaks_implicit_tls(shared: MailServer) -> None:
    """swaks --tlsc (TLS on connect) on 465 logs in and sends."""
    result = swaks("--server", f"127.0.0.1:{shared.submissions_port}", "--tlsc",
                   "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
                   "--from", USER, "--to", USER, "--header", "Subject: swaks tlsc")
    assert result.returncode == 0, result.stdout + result.stderr
    delivered(shared, "swaks tlsc")


def test_swaks_wrong_password(shared: MailServer) -> None:
    """swaks with a wrong password is told 535 5.7.8 and sends nothing."""
    result = swaks("--server", f"127.0.0.1:{shared.submission_port}", "--tls",
                   "--auth", "LOGIN", "--auth-user", USER, "--auth-password", "wrong",
                   "--from", USER, "--to", USER, "--header", "Subject: never")
    assert result.returncode != 0
    assert "535 5.7.8 Authentication credentials invalid" in result.stdout
    assert "MAIL FROM" not in result.stdout


def test_alpn_smtp_accepted_http_refused(shared: MailServer) -> None:
    """A client offering ALPN "smtp" gets it; one offering only HTTP protocols (a browser lured
    to the mail port, the ALPACA attack) is refused during the handshake."""
    context = trusting(shared)
    context.set_alpn_protocols(["smtp"])
    with smtplib.SMTP_SSL("127.0.0.1", shared.submissions_port, timeout=10,
                          context=context) as client:
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.selected_alpn_protocol() == "smtp"
        assert client.noop()[0] == 250
    browser = trusting(shared)
    browser.set_alpn_protocols(["h2", "http/1.1"])
    with pytest.raises(ssl.SSLError, match="no application protocol"):
        smtplib.SMTP_SSL("127.0.0.1", shared.submissions_port, timeout=10, context=browser)


# --- protocol details ---------------------------------------------------------------------------


INJECTED = b"MAIL FROM:<x@evil.test>\r\n"


def test_starttls_injection_is_discarded(shared: MailServer) -> None:
    """A MAIL pipelined in plaintext behind STARTTLS is never executed and never answered;
    inside TLS the session starts afresh (MAIL needs EHLO again)."""
    raw = RawSMTP(shared.submission_port)
    try:
        assert raw.greeting[0].startswith("220 ")
        raw.command("EHLO attacker.test")
        raw.send(b"STARTTLS\r\n" + INJECTED)  # one segment
        assert raw.reply() == ["220 2.0.0 Ready to start TLS"]
        raw.start_tls()
        # The first reply inside TLS answers our NOOP: nothing was queued for the injected MAIL.
        assert raw.command("NOOP") == ["250 2.0.0 Ok"]
        assert raw.command("MAIL FROM:<x@evil.test>") == ["503 5.5.1 Send EHLO or HELO first"]
    finally:
        raw.close()
    assert f"discarded {len(INJECTED)} plaintext bytes after STARTTLS" in shared.log()


def test_sender_must_belong_to_the_user(shared: MailServer) -> None:
    """A sender that is not the user's own address or alias gets 553 5.7.1; an alias works, and
    so does the null sender of a read receipt (RFC 8098 §3)."""
    with smtplib.SMTP_SSL("127.0.0.1", shared.submissions_port, timeout=10,
                          context=trusting(shared)) as client:
        client.ehlo("laptop.test")
        client.login(USER, PASSWORD)
        code, text = client.mail("second@example.test")
        assert (code, text) == (553, b"5.7.1 Sender address not owned by authenticated user")
        assert client.mail("<>")[0] == 250
        client.rset()
        assert client.mail("boss@far.test")[0] == 553
        assert client.mail("team@example.test")[0] == 250  # an alias reaching demo
        client.rset()
        assert client.mail("demo+lists@lab.test")[0] == 553  # another domain's demo
        assert client.mail("Demo+Lists@Example.Test")[0] == 250


def test_auth_sequence_errors(shared: MailServer) -> None:
    """AUTH before EHLO and after MAIL get 503; the session stays usable."""
    with smtplib.SMTP_SSL("127.0.0.1", shared.submissions_port, timeout=10,
                          context=trusting(shared)) as client:
        code, text = client.docmd("AUTH", f"PLAIN {plain()}")
        assert (code, text) == (503, b"5.5.1 Send EHLO first")
        client.ehlo("laptop.test")
        client.login(USER, PASSWORD)
        assert client.mail(USER)[0] == 250
        code, _ = client.docmd("AUTH", f"PLAIN {plain()}")
        assert code == 503
        assert client.noop()[0] == 250


def test_auth_on_port_25_with_offer_auth(server_factory: Callable[..., MailServer]) -> None:
    """With smtp.offer_auth = true, port 25 offers AUTH after STARTTLS (never before) and an
    authenticated client may relay."""
    srv = server_factory("offer", smtp_extra="offer_auth = true")
    srv.start()
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as client:
        client.ehlo("laptop.test")
        assert "auth" not in client.esmtp_features
        client.starttls(context=trusting(srv))
        client.ehlo("laptop.test")
        assert "PLAIN" in client.esmtp_features["auth"]
        client.login(USER, PASSWORD)
        assert client.mail("second@example.test")[0] == 553
        assert client.mail(USER)[0] == 250
        assert client.rcpt("friend@far.test")[0] == 250


def test_cancelled_and_garbage_auth(shared: MailServer) -> None:
    """'*' cancels AUTH with 501 5.0.0; a response that is not base64 gets 501 5.5.2."""
    with smtplib.SMTP_SSL("127.0.0.1", shared.submissions_port, timeout=10,
                          context=trusting(shared)) as client:
        client.ehlo("laptop.test")
        assert client.docmd("AUTH", "PLAIN") == (334, b"")
        assert client.docmd("*") == (501, b"5.0.0 Authentication cancelled")
        assert client.docmd("AUTH", "PLAIN !!garbage!!") == (
            501, b"5.5.2 Cannot decode the response: not base64")
        assert client.docmd("AUTH", "LOGIN")[0] == 334
        assert client.docmd("%%%") == (501, b"5.5.2 Cannot decode the response: not base64")
        assert client.docmd("AUTH", "CRAM-MD5")[0] == 504
        assert client.docmd("AUTH")[0] == 501
        assert client.login(USER, PASSWORD)[0] == 235


def test_line_errors_end_the_auth_exchange(shared: MailServer) -> None:
    """On 465, AUTH PLAIN then a 5,000-byte line gets 500 and ends the exchange: the NOOP after
    it is a command (250), not credentials taken as a failed login."""
    with smtplib.SMTP_SSL("127.0.0.1", shared.submissions_port, timeout=10,
                          context=trusting(shared)) as client:
        client.ehlo("laptop.test")
        assert client.docmd("AUTH", "PLAIN") == (334, b"")
        client.send(b"A" * 5000 + b"\r\n")
        assert client.getreply()[0] == 500
        assert client.noop()[0] == 250
        assert client.docmd("AUTH", "PLAIN")[0] == 334
        client.send(b"dGVzdA==\n")  # a bare LF
        assert client.getreply()[0] == 500
        assert client.noop()[0] == 250
        assert client.login(USER, PASSWORD)[0] == 235


# --- throttling ---------------------------------------------------------------------------------

THROTTLE = """
[auth]
throttle_base_delay = 0.4
throttle_max_delay = 1.6
throttle_max_failures = 4
throttle_window = 600
"""


def test_failed_logins_are_throttled_per_user_and_address(
    server_factory: Callable[..., MailServer],
) -> None:
    """Bad passwords for a user from one address get slower answers (0.4, 0.8, 1.6 s), then 421
    and a disconnect; that user stays refused at that address while another user there and the
    same user from 127.0.0.2 log in; meanwhile the server keeps answering other connections at
    once."""
    srv = server_factory("throttle", extra_config=THROTTLE)
    srv.start()
    srv.add_user("classmate@example.test", "classmate-pw")
    bad = RawSMTP(srv.submissions_port, implicit_tls=True)
    bad.command("EHLO guesser.test")
    observer = RawSMTP(srv.submissions_port, source="127.0.0.2", implicit_tls=True)
    try:
        for delay in (0.4, 0.8, 1.6):
            started = time.monotonic()
            bad.send(f"AUTH PLAIN {plain(password='guess')}\r\n".encode())
            if delay == 1.6:
                # While the guesser waits, another connection is answered at once.
                noop_started = time.monotonic()
                assert observer.command("NOOP") == ["250 2.0.0 Ok"]
                assert time.monotonic() - noop_started < 1.0
                assert select.select([bad.sock], [], [], 0)[0] == [], "guesser answered early"
            assert bad.reply() == ["535 5.7.8 Authentication credentials invalid"]
            elapsed = time.monotonic() - started
            assert delay - 0.05 <= elapsed < delay + 1.0, (delay, elapsed)
        bad.send(f"AUTH PLAIN {plain(password='guess')}\r\n".encode())
        assert bad.reply() == ["421 4.7.0 Too many authentication failures, closing connection"]
        assert bad.reply() == []  # closed
    finally:
        bad.close()
    # The user is refused at once at this address now, even with the right password and on
    # another port.
    with smtplib.SMTP("127.0.0.1", srv.submission_port, timeout=10) as client:
        client.ehlo("guesser.test")
        client.starttls(context=unverified())
        client.ehlo("guesser.test")
        started = time.monotonic()
        with pytest.raises((smtplib.SMTPResponseException, smtplib.SMTPServerDisconnected)):
            client.login(USER, PASSWORD)
        assert time.monotonic() - started < 1.0  # no delay: refused before any check
    # Another user at the same address is unaffected (one NAT address for a whole class).
    with smtplib.SMTP("127.0.0.1", srv.submission_port, timeout=10) as client:
        client.ehlo("classmate.test")
        client.starttls(context=unverified())
        client.ehlo("classmate.test")
        assert client.login("classmate@example.test", "classmate-pw")[0] == 235
    # Another address is unaffected.
    try:
        observer.command("EHLO other.test")
        started = time.monotonic()
        assert observer.command(f"AUTH PLAIN {plain()}") == ["235 2.7.0 Authentication successful"]
        assert time.monotonic() - started < 2.0
    finally:
        observer.close()


# --- certificates ------------------------------------------------------------------------------


def peer_fingerprint(port: int, starttls: bool) -> str:
    """SHA-256 of the certificate a new connection to ``port`` is shown."""
    if starttls:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("check.test")
            client.starttls(context=unverified())
            sock = client.sock
            assert isinstance(sock, ssl.SSLSocket)
            der = sock.getpeercert(binary_form=True)
    else:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain_sock, \
                unverified().wrap_socket(plain_sock, server_hostname="localhost") as sock:
            der = sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def test_renewed_certificate_is_used_after_sighup(server: MailServer, tmp_path: Path) -> None:
    """After the certificate files are replaced and SIGHUP is sent, new connections on 465 and
    (STARTTLS) 587 and 25 are shown the new certificate, without a restart."""
    old = peer_fingerprint(server.submissions_port, starttls=False)
    renewed_cert, renewed_key = tmp_path / "new-cert.pem", tmp_path / "new-key.pem"
    tls.ensure_self_signed(renewed_cert, renewed_key, "mail.example.test")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    new = hashlib.sha256(x509.load_pem_x509_certificate(renewed_cert.read_bytes())
                         .public_bytes(Encoding.DER)).hexdigest()
    assert new != old
    live = server.directory / "var" / "tls"
    # As certbot's deploy hook would: new files moved into place, then a signal.
    shutil.copy(renewed_key, live / "key.pem.new")
    shutil.copy(renewed_cert, live / "cert.pem.new")
    (live / "key.pem.new").replace(live / "key.pem")
    (live / "cert.pem.new").replace(live / "cert.pem")
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: peer_fingerprint(server.submissions_port, starttls=False) == new,
             deadline=10, interval=0.1, message="the new certificate on 465")
    assert peer_fingerprint(server.submission_port, starttls=True) == new
    assert peer_fingerprint(server.smtp_port, starttls=True) == new
    assert server.process.poll() is None
    assert "TLS certificate reloaded" in server.log()


@pytest.mark.parametrize(("key_text", "reason"), [
    ("this is not a key\n", "not a valid PEM private key"),
    (None, "does not match the certificate"),
])
def test_bad_key_file_stops_startup(
    server_factory: Callable[..., MailServer], tmp_path: Path, key_text: str | None, reason: str
) -> None:
    """A key file that is not a key, or not the certificate's, stops start-up: one line, exit 2."""
    srv = server_factory("badkey")
    live = srv.directory / "var" / "tls"
    live.mkdir(parents=True)
    tls.ensure_self_signed(live / "cert.pem", live / "key.pem", "mail.example.test")
    if key_text is not None:
        (live / "key.pem").write_text(key_text)
    else:
        tls.ensure_self_signed(tmp_path / "other.pem", tmp_path / "other.key", "other.test")
        shutil.copy(tmp_path / "other.key", live / "key.pem")
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mailsys", "--config", str(srv.config_path)],
        capture_output=True, text=True, timeout=60, cwd=srv.directory,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mailsys: {live / 'key.pem'}: ") and reason in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
