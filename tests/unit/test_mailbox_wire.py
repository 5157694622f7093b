"""Maildir names and the wire form of messages: CRLF, sizes, POP3 dot-stuffing, TOP."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailsys.mailbox.layout import format_base, parse_name, render_flags
from mailsys.mailbox.wire import WireEncoder, encode_pop3, to_crlf, top_lines, wire_size


def unstuff(body: bytes) -> bytes:
    """What a POP3 client makes of a multi-line body (RFC 1939 §3)."""
    assert body.endswith(b"\r\n.\r\n") or body == b".\r\n"
    lines = body[:-3].split(b"\r\n")[:-1] if body != b".\r\n" else []
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def test_parse_plain_name() -> None:
    """A name without fields or info is all key, with no flags."""
    parsed = parse_name("1700000000.M1P2.host")
    assert parsed.key == "1700000000.M1P2.host"
    assert parsed.flags == frozenset()
    assert (parsed.size, parsed.wire_size, parsed.uid) == (None, None, None)


def test_parse_fields_and_flags() -> None:
    """The S=, W=, U= fields and the ":2," flags are read; the key excludes the fields."""
    parsed = parse_name("1700.M1.host,S=120,W=124,U=7:2,FRS")
    assert parsed.key == "1700.M1.host"
    assert (parsed.size, parsed.wire_size, parsed.uid) == (120, 124, 7)
    assert parsed.flags == frozenset("FRS")
    assert parsed.base == "1700.M1.host,S=120,W=124,U=7"


def test_foreign_commas_stay_in_key() -> None:
    """Comma parts that are not our fields are part of the key."""
    assert parse_name("a,b,S=5:2,S").key == "a,b"


def test_with_flags_keeps_base_and_orders_letters() -> None:
    """A flag change keeps the base byte for byte and writes flags in ASCII order."""
    parsed = parse_name("x,S=1,W=1,U=3:2,S")
    assert parsed.with_flags(frozenset("TSD")) == "x,S=1,W=1,U=3:2,DST"
    assert render_flags({"S", "F"}) == "FS"


def test_format_base_round_trips() -> None:
    """format_base writes fields that parse_name reads back."""
    parsed = parse_name(format_base("k.1", size=10, wire_size=12, uid=99) + ":2,")
    assert (parsed.key, parsed.size, parsed.wire_size, parsed.uid) == ("k.1", 10, 12, 99)


def test_wire_size_of_lf_message() -> None:
    """Bare LF line ends count as CRLF; CRLF ones are unchanged."""
    assert wire_size(b"a\nb\n") == 6
    assert wire_size(b"a\r\nb\r\n") == 6
    assert wire_size(b"") == 0


def test_unterminated_last_line_gets_crlf() -> None:
    """A message whose last line lacks a line end is sent (and sized) with CRLF added."""
    assert to_crlf(b"a\nb") == b"a\r\nb\r\n"
    assert wire_size(b"a\nb") == 6
    assert to_crlf(b"a\r") == b"a\r\n"
    assert wire_size(b"a\r") == 3


def test_dot_lines_stuffed() -> None:
    """Lines starting with "." get one more, at the start and in the middle (RFC 1939 §3)."""
    assert encode_pop3(b".a\r\nb\r\n.\r\n") == b"..a\r\nb\r\n..\r\n.\r\n"


def test_dot_at_16384_stuffed_when_chunked_there() -> None:
    """A "." line starting exactly at byte 16384, at a chunk boundary, is stuffed."""
    data = b"x" * 16382 + b"\r\n" + b".\r\n" + b"end\r\n"
    encoder = WireEncoder()
    out = encoder.feed(data[:16384]) + encoder.feed(data[16384:]) + encoder.finish()
    assert out == b"x" * 16382 + b"\r\n..\r\nend\r\n"


def test_crlf_split_across_chunks() -> None:
    """A CRLF split between two chunks stays one CRLF."""
    encoder = WireEncoder()
    out = encoder.feed(b"a\r") + encoder.feed(b"\n.b\r\n") + encoder.finish()
    assert out == b"a\r\n..b\r\n"


@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=40), max_size=20))
def test_chunking_never_changes_output(data: bytes, cuts: list[int]) -> None:
    """Any chunking gives the same bytes as one piece, and their length is the wire size."""
    data = data.replace(b"\0", b".")
    whole = WireEncoder()
    expected = whole.feed(data) + whole.finish()
    chunked = WireEncoder()
    out, position = b"", 0
    for cut in cuts:
        out += chunked.feed(data[position:position + cut])
        position += cut
    out += chunked.feed(data[position:]) + chunked.finish()
    assert out == expected
    plain = WireEncoder(stuff_dots=False)
    assert len(plain.feed(data) + plain.finish()) == wire_size(data)


@given(st.lists(st.sampled_from([b"", b".", b"..", b"a", b".a", b"a.", b"\r"]), max_size=30))
def test_unstuffing_gives_back_the_crlf_message(lines: list[bytes]) -> None:
    """What a client unstuffs is exactly the CRLF form of the message."""
    data = b"\n".join(lines)
    assert unstuff(encode_pop3(data)) == to_crlf(data)


def test_top_returns_header_and_lines() -> None:
    """TOP n m gives the header, the blank line and m body lines."""
    data = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n"
    assert top_lines(data, 0) == b"A: 1\r\nB: 2\r\n\r\n"
    assert top_lines(data, 2) == b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n"
    assert top_lines(data, 5) is None  # more than there is: the caller sends it all
    assert top_lines(b"A: 1\nB: 2\n\nbody\n", 1) == b"A: 1\nB: 2\n\nbody\n"
    assert top_lines(b"A: 1\r\nno end", 0) is None


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b".", b"\n\r"]), max_size=12))
def test_to_crlf_is_the_encoder_without_dots(pieces: list[bytes]) -> None:
    """to_crlf gives the bytes of a WireEncoder without dot-stuffing fed the whole message."""
    data = b"".join(pieces)
    encoder = WireEncoder(stuff_dots=False)
    assert to_crlf(data) == encoder.feed(data) + encoder.finish()
    assert len(to_crlf(data)) == wire_size(data)
