"""Random input for whole SMTP sessions: nothing escapes, replies are well formed, and the
outcome does not depend on how the bytes were split into reads."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsys.smtp.testing import MemorySink, SessionDriver, make_factory

REPLY_LINE = re.compile(r"^[2-5]\d\d[ -]")

TOKENS = st.one_of(
    st.sampled_from([
        b"EHLO x\r\n", b"HELO y\r\n", b"MAIL FROM:<a@b.test>\r\n", b"MAIL FROM:<>\r\n",
        b"MAIL FROM:<a@b.test> SIZE=99999999\r\n",
        b"MAIL FROM:<a@b.test> BODY=8BITMIME SMTPUTF8\r\n",
        b"RCPT TO:<alice@example.test>\r\n", b"RCPT TO:<nobody@example.test>\r\n",
        b"RCPT TO:<x@remote.test>\r\n", b"RCPT TO:<bob@example.test> NOTIFY=NEVER,SUCCESS\r\n",
        b"RCPT TO:<Postmaster>\r\n", b"DATA\r\n", b"BDAT 5\r\n", b"BDAT 3 LAST\r\n",
        b"BDAT 0 LAST\r\n", b"RSET\r\n", b"NOOP\r\n", b"VRFY a\r\n", b"STARTTLS\r\n", b"HELP\r\n",
        b"AUTH PLAIN\r\n", b"QUIT\r\n", b".\r\n", b"\r\n", b"\r", b"\n", b".", b"..",
        b"Received: x\r\n", b"hello", b"x" * 50, b"\xff\xfe", "MAIL FROM:<jö@b.test>\r\n".encode(),
    ]),
    st.binary(max_size=12),
)


def run(pieces: list[bytes]) -> tuple[bytes, list[bytes]]:
    sink = MemorySink()
    factory = make_factory(
        sink=sink, max_command_length=64, max_line_length=40, max_message_size=200,
        max_recipients=3, max_received_headers=2, max_bad_commands=25,
    )
    driver = SessionDriver(factory)
    for piece in pieces:
        driver.session.dataReceived(piece)  # must not raise
    return driver.output(), [message for _, message in sink.accepted]


@settings(max_examples=300, deadline=None)
@given(st.lists(TOKENS, max_size=40), st.lists(st.integers(min_value=0), max_size=10))
def test_random_sessions(tokens: list[bytes], cuts: list[int]) -> None:
    """Random command and data streams, split at random points, never raise, always get
    well-formed replies without internal errors, and give the same result unsplit."""
    stream = b"".join(tokens)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(stream)]:
        pieces.append(stream[last:point])
        last = point
    output, messages = run(pieces)
    text = output.decode("utf-8")
    assert text.endswith("\r\n")
    lines = text.split("\r\n")[:-1]
    assert all(REPLY_LINE.match(line) for line in lines), lines
    assert not any(line.startswith(("451 4.3.0 Internal", "421 4.3.0")) for line in lines)
    assert (output, messages) == run([stream])
