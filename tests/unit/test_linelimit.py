"""Long lines: taken at intake up to smtp.max_line_length and stored as received; made to fit
RFC 5321 §4.5.3.1.6 (998 octets before CRLF) without losing content when relayed, and before
signing when submitted (mailsys.smtp.linelimit)."""

from __future__ import annotations

import email
import email.policy
import io
from pathlib import Path

import pytest

from mailsys.smtp.linelimit import MAX_LINE, file_has_long_line, fit_lines, has_long_line
from mailsys.smtp.server import ListenerRole
from tests.unit.test_relay import Lab, done, envelope
from tests.unit.test_smtp_auth import plain, secure

LONG = b"A" * 5000
PLAIN_TEXT = b"From: a@b.test\r\nSubject: x\r\n\r\nhello\r\n" + LONG + b" end\r\nbye\r\n"
MULTIPART = (
    b"From: a@b.test\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\npreamble\r\n--XX\r\n'
    b"Content-Type: text/plain\r\n\r\nshort\r\n--XX\r\n"
    b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"<p>" + "\u00e9".encode() * 3000 + b"</p>\r\n--XX--\r\n"
)


def longest(data: bytes) -> int:
    return max(len(line) for line in data.split(b"\r\n"))


def leaves(data: bytes) -> list[bytes]:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    return [part.get_payload(decode=True) for part in parsed.walk()
            if not part.is_multipart()]


@pytest.mark.parametrize("data", [PLAIN_TEXT, MULTIPART])
def test_fit_lines_keeps_the_content(data: bytes) -> None:
    """Every line fits; every part decodes to the same octets as before."""
    fitted = fit_lines(data)
    assert longest(fitted) <= MAX_LINE
    assert leaves(fitted) == leaves(data)
    assert b"Content-Transfer-Encoding: quoted-printable" in fitted


def test_fit_lines_leaves_fitting_messages_alone() -> None:
    """A message whose lines fit is returned as it is."""
    data = b"Subject: x\r\n\r\n" + b"x" * MAX_LINE + b"\r\n"
    assert fit_lines(data) is data


def test_long_header_folded_at_whitespace() -> None:
    """A long header field is folded at whitespace (RFC 5322 §2.2.3); unfolded it is the same."""
    data = b"Subject: " + b"word " * 400 + b"\r\nTo: x@y.test\r\n\r\nbody\r\n"
    fitted = fit_lines(data)
    assert longest(fitted) <= MAX_LINE
    subject = email.message_from_bytes(fitted)["Subject"]
    assert subject.replace("\r\n", "") == email.message_from_bytes(data)["Subject"]


@pytest.mark.parametrize("data", [PLAIN_TEXT, MULTIPART, b"x" * 999 + b"\r\n",
                                  b"x" * 998 + b"\r\n", b"x" * 999, b"", b"\r\n" * 5])
def test_file_scan_agrees(data: bytes) -> None:
    """The chunked scan of a spool file finds the same long lines as the scan of bytes."""
    assert file_has_long_line(io.BytesIO(data)) == has_long_line(data)


def test_relay_sends_long_lines_re_encoded(tmp_path: Path) -> None:
    """A queued message with a 5,000-octet line leaves the relay within 998-octet lines, its
    content unchanged."""
    lab = Lab(tmp_path)
    try:
        lab.path.write_bytes(PLAIN_TEXT)
        (attempt,) = lab.deliver(envelope("Q1", "one@remote.test"))
        assert done(attempt).status.value == "delivered"
        (received,) = lab.mx1.received
        assert longest(received.data) <= MAX_LINE
        assert leaves(received.data) == leaves(PLAIN_TEXT)
        assert lab.path.read_bytes() == PLAIN_TEXT  # the spool keeps it as received
    finally:
        lab.agent.stopService()


def test_submitted_message_re_encoded_before_signing() -> None:
    """On submission a message with long lines is re-encoded before it reaches the (signing)
    sink, so what is signed is what will be sent."""
    driver = secure(ListenerRole.SUBMISSIONS)
    driver.send(f"AUTH PLAIN {plain()}\r\n".encode())
    lines = driver.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                        + PLAIN_TEXT.replace(b"a@b.test", b"alice@example.test") + b".\r\n")
    assert lines[-1].startswith("250 ")
    stored = driver.factory.sink.accepted[0][1]  # type: ignore[attr-defined]
    assert longest(stored) <= MAX_LINE
    assert b"Content-Transfer-Encoding: quoted-printable" in stored


def test_inbound_message_stored_as_received() -> None:
    """On port 25 a message with long lines is stored exactly as received."""
    driver = secure(ListenerRole.MTA)
    lines = driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                        + PLAIN_TEXT + b".\r\n")
    assert lines[-1].startswith("250 ")
    stored = driver.factory.sink.accepted[0][1]  # type: ignore[attr-defined]
    assert stored.endswith(PLAIN_TEXT)
