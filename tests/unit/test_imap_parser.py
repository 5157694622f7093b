"""IMAP command framing (lines, literals, limits), the argument reader and mailbox names."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsys.imap.names import (
    MailboxNameError,
    canonical,
    decode_mutf7,
    encode_mutf7,
    pattern_regex,
)
from mailsys.imap.parser import (
    STAR,
    Command,
    ContinueLiteral,
    Framer,
    ParseError,
    Reader,
    Rejected,
    Rejection,
    parse_sequence_set,
)
from mailsys.imap.responses import astring, literal, number_set, string


def events(framer: Framer) -> list[object]:
    out = []
    while (event := framer.next_event()) is not None:
        out.append(event)
    return out


def test_lines_become_commands_with_crlf_or_lf() -> None:
    """Each line is a command; CRLF and bare LF both end it."""
    framer = Framer(1000, 1000)
    framer.feed(b"a NOOP\r\nb NOOP\nc NO")
    assert events(framer) == [Command(b"a NOOP"), Command(b"b NOOP")]
    framer.feed(b"OP\r\n")
    assert events(framer) == [Command(b"c NOOP")]


def test_synchronizing_literal_asks_for_continuation() -> None:
    """A {n} literal produces a continuation request, then the whole command."""
    framer = Framer(1000, 1000)
    framer.feed(b"a LOGIN {4}\r\n")
    assert events(framer) == [ContinueLiteral(4)]
    framer.feed(b"us\r\n {2}\r\npw\r\n")
    assert events(framer) == [ContinueLiteral(2), Command(b"a LOGIN {4}\r\nus\r\n {2}\r\npw")]


def test_non_synchronizing_literal_needs_no_continuation() -> None:
    """A {n+} literal (LITERAL+) is read straight away."""
    framer = Framer(1000, 1000)
    framer.feed(b"a APPEND INBOX {3+}\r\nabc\r\n")
    assert events(framer) == [Command(b"a APPEND INBOX {3+}\r\nabc")]


def test_limits_reject_and_recover() -> None:
    """Too long lines and too large literals are rejected; later commands still parse."""
    framer = Framer(20, 10)
    framer.feed(b"a NOOP " + b"x" * 50)
    assert events(framer) == []
    framer.feed(b"yy\r\nb NOOP\r\n")
    assert events(framer) == [Rejected(b"a", Rejection.LINE_TOO_LONG), Command(b"b NOOP")]
    framer.feed(b"c APPEND X {11}\r\nd APPEND X {11+}\r\n" + b"z" * 11 + b"\r\ne NOOP\r\n")
    assert events(framer) == [Rejected(b"c", Rejection.LITERAL_TOO_BIG),
                              Rejected(b"d", Rejection.LITERAL_TOO_BIG, False),
                              Command(b"e NOOP")]


def test_clear_drops_pending_input() -> None:
    """clear() (STARTTLS) forgets buffered bytes and a half-read command."""
    framer = Framer(100, 100)
    framer.feed(b"a X {5}\r\nab")
    assert events(framer) == [ContinueLiteral(5)]
    assert framer.in_command
    framer.feed(b"c")
    assert framer.clear() == 1
    assert not framer.in_command
    framer.feed(b"b NOOP\r\n")
    assert events(framer) == [Command(b"b NOOP")]


def test_reader_strings() -> None:
    """Atoms, quoted strings with escapes, literals and NIL are read; bad ones raise."""
    reader = Reader(b'atom "q\\"uo\\\\te" {3}\r\nlit NIL')
    assert reader.astring() == b"atom"
    reader.space()
    assert reader.astring() == b'q"uo\\te'
    reader.space()
    assert reader.astring() == b"lit"
    reader.space()
    assert reader.nstring() is None
    reader.end()
    for bad in (b'"open', b'"bad \\x"', b"{9}\r\nab", b"(", b""):
        with pytest.raises(ParseError):
            Reader(bad).astring()


def test_sequence_sets() -> None:
    """Sequence sets with ranges and * resolve against the largest number; 0 is invalid."""
    numbers = parse_sequence_set(b"1,3:5,7:*")
    assert numbers.ranges == ((1, 1), (3, 5), (7, STAR))
    assert numbers.resolve(6) == [(1, 1), (3, 5), (6, 7)]
    assert numbers.contains(4, 10) and not numbers.contains(2, 10)
    for bad in (b"0", b"1:", b"a", b"1,,2", b"99999999999"):
        with pytest.raises(ParseError):
            parse_sequence_set(bad)


def test_flag_lists() -> None:
    """Flag lists hold system flags, keywords and \\*."""
    assert Reader(b"(\\Seen $Work \\*)").flag_list() == [b"\\Seen", b"$Work", b"\\*"]
    assert Reader(b"()").flag_list() == []


def test_modified_utf7_round_trips() -> None:
    """Modified UTF-7 encodes non-ASCII and "&" (RFC 3501 §5.1.3) and decodes back."""
    assert encode_mutf7("Entwürfe") == "Entw&APw-rfe"
    assert encode_mutf7("A&B") == "A&-B"
    assert encode_mutf7("日本語") == "&ZeVnLIqe-"
    for name in ("Entwürfe", "A&B", "日本語", "plain", "Ünï.cødé/x", "😀"):
        assert decode_mutf7(encode_mutf7(name)) == name
    for bad in ("&Jjo", "&", "caf\u00e9", "&!!-"):
        with pytest.raises(MailboxNameError):
            decode_mutf7(bad)


def test_list_patterns_and_names() -> None:
    """"*" crosses levels, "%" does not; INBOX matches in any case; "." is dropped at the end."""
    assert pattern_regex("", "*").match("a.b")
    assert not pattern_regex("", "%").match("a.b")
    assert pattern_regex("", "a.%").match("a.b")
    assert pattern_regex("a.", "%").match("a.b")
    assert pattern_regex("", "inbox").match("INBOX")
    assert canonical("inbox") == "INBOX" and canonical("Work.") == "Work"


def test_response_strings() -> None:
    """Quotable bytes are quoted, others sent as literals with their exact size."""
    assert string(b'a "b"') == b'"a \\"b\\""'
    assert string(b"8bit \xe9") == b"{6}\r\n8bit \xe9"
    assert string(b"line\r\nbreak") == literal(b"line\r\nbreak")
    assert astring(b"INBOX") == b"INBOX" and astring(b"NIL") == b'"NIL"'
    assert number_set([1, 2, 3, 5, 7, 8]) == b"1:3,5,7:8"
    assert number_set([5, 3, 4]) == b"5,3:4"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=20))
def test_framing_does_not_depend_on_chunking(data: bytes, cuts: list[int]) -> None:
    """Any bytes, fed whole or in arbitrary pieces, give the same events and never raise."""
    whole = Framer(64, 32)
    whole.feed(data)
    expected = events(whole)
    pieces = Framer(64, 32)
    got: list[object] = []
    position = 0
    for cut in [*cuts, len(data)]:
        pieces.feed(data[position:position + cut])
        position += cut
        got += events(pieces)
    pieces.feed(data[position:])
    got += events(pieces)
    assert got == expected
    for event in expected:
        if isinstance(event, Command):
            reader = Reader(event.data)
            try:
                reader.tag()
                reader.space()
                reader.astring()
            except ParseError:
                pass


@pytest.mark.parametrize("items_text, with_uid", [
    (b"BODY.PEEK[]", False),
    (b"BODY.PEEK[]", True),
    (b"(UID BODY.PEEK[] FLAGS)", False),
    (b"(RFC822.SIZE BODY[] INTERNALDATE MODSEQ BODY.PEEK[])", True),
])
def test_whole_body_renderer_matches_render(items_text: bytes, with_uid: bool) -> None:
    """The whole-message FETCH renderer writes the same bytes as the general one."""
    from mailsys.imap.fetch import parse_fetch_items, render, whole_body_renderer
    from mailsys.mailbox.folder import MessageInfo

    items = parse_fetch_items(Reader(items_text))
    info = MessageInfo(uid=7, key="k", name="k:2,S", size=30, wire_size=32,
                       flags=frozenset("S"), internal_date=1_700_000_000.0, modseq=5)
    data = b"Subject: x\r\n\r\nbody\r\n"
    renderer = whole_body_renderer(items, with_uid=with_uid)
    assert renderer is not None
    out: list[bytes] = []
    renderer(out, 3, info, lambda _: b"\\Seen", data)
    assert b"".join(out) == render(3, info, items, lambda: b"\\Seen", data, with_uid=with_uid)


def test_whole_body_renderer_declines_parts_and_ranges() -> None:
    """Sections, partial ranges and parsed items go to the general renderer."""
    from mailsys.imap.fetch import parse_fetch_items, whole_body_renderer

    for text in (b"BODY.PEEK[1]", b"BODY.PEEK[]<0.10>", b"(BODY.PEEK[] ENVELOPE)",
                 b"BODY.PEEK[HEADER]", b"(UID FLAGS)", b"BINARY.PEEK[]"):
        assert whole_body_renderer(parse_fetch_items(Reader(text)), with_uid=False) is None


def test_header_field_values_follow_folding_and_lone_cr() -> None:
    """A header search sees each occurrence of the field, folded lines and lone CRs included."""
    from mailsys.imap.search import HeaderContains

    key = HeaderContains(b"subject", "x")
    lower = (b"subject: a\r\n b\rc\r\nto: subject: no\r\nx-subject: no\r\n"
             b"subject:\t2\r\n\r\n")
    assert [lower[a:b] for a, b in (m.span(1) for m in key.fields.finditer(lower))] == [
        b" a\r\n b\rc", b"\t2"]
