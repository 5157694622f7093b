"""The real server, driven by smtplib and swaks: mail in on the MTA port, out into a Maildir."""

from __future__ import annotations

import email
import email.policy
import smtplib
import ssl
import subprocess
from collections.abc import Callable
from email.message import EmailMessage

import pytest

from tests.integration.conftest import MailServer, wait_for


def _message(subject: str, to: str = "demo@example.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "alice@sender.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(f"Body of {subject}.\n.\nA line with only a dot above.\n")
    return msg


def test_smtplib_message_lands_in_maildir(server: MailServer) -> None:
    """A message accepted on the MTA port is in the recipient's Maildir new/ with trace headers."""
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.ehlo("client.test")
        code, _ = client.noop()
        assert code == 250
        refused = client.send_message(_message("hello"))
        assert refused == {}
    files = wait_for(lambda: server.inbox_files(), deadline=5, message="delivery")
    assert isinstance(files, list) and len(files) == 1
    raw = files[0].read_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Return-Path"] == "<alice@sender.test>"
    assert parsed["Delivered-To"] == "demo@example.test"
    assert "by mail.example.test" in str(parsed["Received"])
    assert parsed["Subject"] == "hello"
    assert "\n.\nA line with only a dot above." in parsed.get_content()


def test_queue_id_in_reply_and_received_header(server: MailServer) -> None:
    """The 250 reply names the queue id, and the delivered copy's Received header names it too."""
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.test")
        client.rcpt("demo@example.test")
        code, reply = client.data(_message("queue id").as_bytes(policy=email.policy.SMTP))
    assert code == 250
    queue_id = reply.decode().rsplit(" ", 1)[-1]
    assert queue_id
    files = wait_for(lambda: server.inbox_files(), deadline=5, message="delivery")
    assert isinstance(files, list)
    assert f"id {queue_id}".encode() in files[0].read_bytes()


def test_unknown_local_user_and_relay_are_refused_at_rcpt(server: MailServer) -> None:
    """Port 25 refuses an unknown local user with 550 5.1.1 and another domain with 554 5.7.1."""
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.test")
        code, text = client.rcpt("nobody@example.test")
        assert code == 550 and text.startswith(b"5.1.1")
        code, text = client.rcpt("someone@elsewhere.test")
        assert code == 554 and text.startswith(b"5.7.1")
        code, _ = client.rcpt("Demo+Tag@EXAMPLE.TEST")
        assert code == 250


def test_null_sender_alias_and_postmaster(server_factory: Callable[..., MailServer]) -> None:
    """A bounce (null sender) to an alias and to postmaster is accepted and delivered."""
    server = server_factory()
    server.add_user("second@example.test", "pw")
    server.start()
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("<>")
        assert client.rcpt("team@example.test")[0] == 250
        assert client.rcpt("postmaster@lab.test")[0] == 250
        code, _ = client.data(_message("bounce").as_bytes(policy=email.policy.SMTP))
        assert code == 250
    # team@ -> demo and second; postmaster@lab.test -> some local mailbox; demo gets >= 1 copy
    wait_for(lambda: server.inbox_files("demo@example.test"), deadline=5, message="demo copy")
    wait_for(lambda: server.inbox_files("second@example.test"), deadline=5, message="second copy")


def test_swaks_delivers(server: MailServer) -> None:
    """swaks, an outside SMTP client, gets its message delivered to the Maildir."""
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.smtp_port}", "--to", "demo@example.test",
         "--from", "swaks@sender.test", "--header", "Subject: from swaks", "--timeout", "10"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    files = wait_for(lambda: server.inbox_files(), deadline=5, message="delivery")
    assert isinstance(files, list)
    assert b"Subject: from swaks" in files[0].read_bytes()


def test_swaks_pipelining_and_chunking(server: MailServer) -> None:
    """swaks with PIPELINING and with BDAT (CHUNKING) both get their messages delivered."""
    for extra in (["--pipeline"], ["--pipeline", "--protocol", "ESMTP"]):
        result = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{server.smtp_port}", "--to", "demo@example.test",
             "--from", "swaks@sender.test", "--timeout", "10", *extra],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: len(server.inbox_files()) == 2, deadline=5, message="two deliveries")


def test_message_too_big_is_refused(server_factory: Callable[..., MailServer]) -> None:
    """A message over the configured size gets 552 5.3.4 and is not delivered."""
    srv = server_factory("small", smtp_extra="max_message_size = 10000")
    srv.start()
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("size") and client.esmtp_features["size"] == "10000"
        client.mail("alice@sender.test")
        client.rcpt("demo@example.test")
        code, reply = client.data(b"Subject: big\r\n\r\n" + b"0123456789\r\n" * 1500)
    assert code == 552 and reply.startswith(b"5.3.4")
    assert srv.inbox_files() == []


def test_starttls_on_submission_then_auth_required(server: MailServer) -> None:
    """587 offers STARTTLS; after TLS a MAIL without AUTH is refused with 530 5.7.0."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        code, _ = client.mail("demo@example.test")
        assert code == 530
        client.rset()
        client.starttls(context=context)
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        code, text = client.mail("demo@example.test")
        assert code == 530 and text.startswith(b"5.7.0")


def test_implicit_tls_on_submissions_port(server: MailServer) -> None:
    """465 speaks TLS from the first byte (RFC 8314) with TLS 1.2 or newer."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", server.submissions_port, timeout=10, context=context) as c:
        code, _ = c.ehlo("client.test")
        assert code == 250
        assert not c.has_extn("starttls")
        sock = c.sock
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("protocol", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_refused(server: MailServer, protocol: ssl.TLSVersion) -> None:
    """TLS 1.0 and 1.1 handshakes fail on the implicit-TLS port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context.minimum_version = protocol
        context.maximum_version = protocol
        context.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.fail("this Python cannot even offer the old protocol; adjust the test")
    with pytest.raises((ssl.SSLError, ConnectionError, smtplib.SMTPServerDisconnected)):
        smtplib.SMTP_SSL("127.0.0.1", server.submissions_port, timeout=10, context=context).quit()


def test_user_added_while_running_is_accepted_at_once(server: MailServer) -> None:
    """`mailsys user add` on a running server: RCPT TO for the new user goes from 550 to 250
    as soon as the command returns, without a restart."""
    def rcpt_code() -> int:
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("alice@sender.test")
            return client.rcpt("newcomer@example.test")[0]

    assert rcpt_code() == 550
    server.add_user("newcomer@example.test", "pw")
    assert rcpt_code() == 250
