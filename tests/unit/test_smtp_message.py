"""Tests for mailsys.smtp.message.MessageBuffer, checked against a plain line-by-line model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsys import replies
from mailsys.replies import Reply
from mailsys.smtp.message import MessageBuffer, has_field, header_section

MAX_SIZE = 120
MAX_LINE = 20
MAX_RECEIVED = 2
GRAVITY = [replies.MESSAGE_TOO_BIG, replies.LOOP_DETECTED, replies.DATA_LINE_TOO_LONG,
           replies.BARE_LINE_ENDING]


def new() -> MessageBuffer:
    return MessageBuffer(max_size=MAX_SIZE, max_line_length=MAX_LINE, max_received=MAX_RECEIVED)


def model(lines: list[bytes], unstuff: bool) -> tuple[Reply | None, bytes]:
    """What the rules say about a message made of ``lines`` (each without its CRLF)."""
    errors = set()
    if any(b"\r" in line or b"\n" in line for line in lines):
        errors.add(replies.BARE_LINE_ENDING)
    if any(len(line) + 2 > MAX_LINE for line in lines):
        errors.add(replies.DATA_LINE_TOO_LONG)
    if unstuff:
        lines = [line[1:] if line.startswith(b".") else line for line in lines]
    header = lines[: lines.index(b"")] if b"" in lines else lines
    if sum(line.lower().startswith(b"received:") for line in header) > MAX_RECEIVED:
        errors.add(replies.LOOP_DETECTED)
    message = b"".join(line + b"\r\n" for line in lines)
    if len(message) > MAX_SIZE:
        errors.add(replies.MESSAGE_TOO_BIG)
    if errors:
        return max(errors, key=GRAVITY.index), b""
    return None, message


def model_data(stream: bytes) -> tuple[Reply | None, bytes, bytes] | None:
    """The DATA outcome for ``stream`` (text after the 354): error, message, bytes after."""
    virtual = b"\r\n" + stream
    end = virtual.find(b"\r\n.\r\n")
    if end < 0:
        return None
    body = virtual[2 : end + 2]
    error, message = model(body.split(b"\r\n")[:-1], unstuff=True)
    return error, message, virtual[end + 5 :]


def feed_data(pieces: list[bytes]) -> tuple[Reply | None, bytes, bytes] | None:
    buffer = new()
    for index, piece in enumerate(pieces):
        rest = buffer.feed_data(piece)
        if rest is not None:
            after = rest + b"".join(pieces[index + 1 :])
            return buffer.error, b"" if buffer.error else buffer.message(), after
    return None


TOKENS = st.sampled_from([
    b"a", b"bc", b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n.\r\n", b"\r\n.", b".\r\n",
    b"Received: x\r\n", b"received:y\r\n", b"\r\n\r\n", b"x" * 25, b"\xff", b"\n.\n", b"\r.\r",
])


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(stream)]:
        pieces.append(stream[last:point])
        last = point
    return pieces


@settings(max_examples=400)
@given(st.lists(TOKENS, max_size=30), st.lists(st.integers(min_value=0), max_size=8))
def test_data_matches_the_model_however_split(tokens: list[bytes], cuts: list[int]) -> None:
    """However the stream is split into reads, DATA intake gives the model's outcome."""
    stream = b"".join(tokens)
    assert feed_data(split(stream, cuts)) == model_data(stream)


@settings(max_examples=400)
@given(st.lists(TOKENS, max_size=30), st.lists(st.integers(min_value=0), max_size=8))
def test_chunks_match_the_model_however_split(tokens: list[bytes], cuts: list[int]) -> None:
    """However the octets are fed, BDAT intake gives the model's outcome (no unstuffing)."""
    stream = b"".join(tokens)
    buffer = new()
    for piece in split(stream, cuts):
        buffer.feed_chunk(piece)
    buffer.finish_chunks()
    lines = stream.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    error, message = model(lines, unstuff=False)
    assert buffer.error == error
    if error is None:
        assert buffer.message() == message


def test_end_marker_at_the_start() -> None:
    """'.' CRLF straight after the 354 is an empty message."""
    buffer = new()
    assert buffer.feed_data(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert buffer.error is None and buffer.message() == b""


def test_long_line_memory_is_bounded() -> None:
    """An endless line is not kept in memory."""
    buffer = MessageBuffer(max_size=10**9, max_line_length=1000, max_received=50)
    for _ in range(1000):
        assert buffer.feed_data(b"y" * 10_000) is None
    assert buffer.error == replies.DATA_LINE_TOO_LONG
    assert len(buffer._pending) < 10
    assert buffer.feed_data(b"\r\n.\r\n") == b""


def test_graver_problem_wins() -> None:
    """A bare LF after a too-big message still makes the reply 'bare line ending'."""
    buffer = MessageBuffer(max_size=10, max_line_length=1000, max_received=50)
    buffer.feed_data(b"0123456789abc\r\n")
    assert buffer.error == replies.MESSAGE_TOO_BIG
    buffer.feed_data(b"bare\nlf\r\n")
    assert buffer.error == replies.BARE_LINE_ENDING


def test_header_section() -> None:
    """The header section ends at the first empty line; none if the message starts with one."""
    assert header_section(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == b"A: 1\r\nB: 2\r\n"
    assert header_section(b"A: 1\r\n") == b"A: 1\r\n"
    assert header_section(b"\r\nbody\r\n") == b""


def test_has_field() -> None:
    """Field names match case-insensitively at a line start, with white space before the colon
    allowed; folded lines and other fields' values do not count."""
    header = b"Subject: the Date: is not here\r\n\tDate: folded\r\nmessage-ID : <a@b>\r\n"
    assert has_field(header, b"Message-ID")
    assert not has_field(header, b"Date")
    assert has_field(b"DATE:x\r\n", b"Date")
    assert not has_field(b"Dated: x\r\n", b"Date")
