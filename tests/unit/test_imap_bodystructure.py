"""MIME structure: ENVELOPE, BODYSTRUCTURE and sections, for good and malformed messages."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsys.imap.bodystructure import (
    Section,
    body_structure,
    envelope,
    parse_addresses,
    parse_message,
    section_bytes,
)
from mailsys.imap.fetch import FetchItem, Need, parse_fetch_items, render
from mailsys.imap.parser import Reader
from mailsys.mailbox.folder import MessageInfo

NESTED = (
    b"From: \"Ann Example\" <ann@example.test>\r\nTo: group: bob@example.test, "
    b"carl@example.test;, dave@example.test (Dave)\r\nSubject: nested\r\n"
    b"Message-ID: <m1@example.test>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\npreamble\r\n"
    b"--outer\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
    b"--outer\r\nContent-Type: message/rfc822\r\n\r\n"
    b"Subject: inner\r\nContent-Type: multipart/alternative; boundary=in\r\n\r\n"
    b"--in\r\nContent-Type: text/plain\r\n\r\nplain\r\n--in\r\n"
    b"Content-Type: text/html\r\n\r\n<b>html</b>\r\n--in--\r\n"
    b"\r\n--outer\r\nContent-Type: application/pdf; name=a.pdf\r\n"
    b"Content-Disposition: attachment; filename=\"a.pdf\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--outer--\r\nepilogue\r\n"
)


def test_sections_of_a_nested_message() -> None:
    """Part numbers reach into multiparts and encapsulated messages (RFC 3501 §6.4.5)."""
    root = parse_message(NESTED)
    assert section_bytes(root, Section((1,))) == b"hello"
    assert section_bytes(root, Section((2,), "HEADER")).startswith(b"Subject: inner\r\n")
    assert section_bytes(root, Section((2, 1))) == b"plain"
    assert section_bytes(root, Section((2, 2))) == b"<b>html</b>"
    assert section_bytes(root, Section((2, 2), "MIME")) == b"Content-Type: text/html\r\n\r\n"
    assert section_bytes(root, Section((3,))) == b"AAAA"
    assert section_bytes(root, Section((4,))) is None
    assert section_bytes(root, Section((), "HEADER.FIELDS", (b"subject", b"TO"))) == (
        b"To: group: bob@example.test, carl@example.test;, dave@example.test (Dave)\r\n"
        b"Subject: nested\r\n\r\n")
    assert b"Subject" not in section_bytes(  # type: ignore[operator]
        root, Section((), "HEADER.FIELDS.NOT", (b"Subject",)))
    assert section_bytes(root, Section()) == NESTED


def test_bodystructure_of_a_nested_message() -> None:
    """BODYSTRUCTURE lists every part with sizes, lines, dispositions and the inner envelope."""
    structure = body_structure(parse_message(NESTED))
    assert structure.startswith(b'(("text" "plain" ("CHARSET" "utf-8") NIL NIL "7BIT" 5 0 ')
    assert b'("message" "rfc822" NIL NIL NIL "7BIT" ' in structure
    assert b'"alternative" ("boundary" "in")' in structure
    assert b'("attachment" ("filename" "a.pdf"))' in structure
    assert structure.endswith(b' "mixed" ("boundary" "outer") NIL NIL NIL)')
    assert body_structure(parse_message(NESTED), extended=False).count(b"attachment") == 0


def test_envelope_addresses_and_groups() -> None:
    """ENVELOPE has names, groups as start/end markers, and Sender/Reply-To from From."""
    env = envelope(parse_message(NESTED))
    assert b'(("Ann Example" NIL "ann" "example.test"))' in env
    assert (b'((NIL NIL "group" NIL)(NIL NIL "bob" "example.test")(NIL NIL "carl" '
            b'"example.test")(NIL NIL NIL NIL)("Dave" NIL "dave" "example.test"))') in env
    assert env.endswith(b'NIL "<m1@example.test>")')
    assert parse_addresses(b"undisclosed-recipients:;")[0].mailbox == b"undisclosed-recipients"


def test_malformed_messages_have_a_structure() -> None:
    """No blank line, no boundary, an unclosed multipart and deep nesting all parse."""
    for data in (b"Subject: only a header", b"", b"\r\n", b"Content-Type: multipart/mixed\r\n\r\nx",
                 b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\n\r\nunclosed",
                 b"Content-Type: ///;;;=\r\n\r\nbody",
                 b"Content-Type: message/rfc822\r\n\r\n" * 100,
                 b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n" * 50):
        root = parse_message(data)
        assert body_structure(root).startswith(b"(")
        assert envelope(root).startswith(b"(")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600), st.sampled_from([b"mixed", b"digest", b"alternative"]))
def test_random_bytes_never_crash(body: bytes, subtype: bytes) -> None:
    """Any bytes as a multipart body give a structure, an envelope and every section."""
    data = (b"Content-Type: multipart/" + subtype + b"; boundary=b\r\nFrom: " + body[:40]
            + b"\r\n\r\n--b\r\n" + body + b"\r\n--b\r\n" + body[::-1])
    root = parse_message(data)
    body_structure(root)
    envelope(root)
    for section in (Section((1,)), Section((2, 1), "MIME"), Section((1, 1), "TEXT")):
        section_bytes(root, section)


def test_fetch_items_parse_and_render() -> None:
    """Macros, sections with partials and PEEK parse; render gives exact literals."""
    items = parse_fetch_items(Reader(b"FAST"))
    assert [i.name for i in items] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    items = parse_fetch_items(Reader(b"(BODY.PEEK[1.2.MIME] BODY[HEADER.FIELDS (A B)]<5.10>)"))
    assert items[0] == FetchItem("BODY", Section((1, 2), "MIME"), True)
    assert items[1].partial == (5, 10) and not items[1].peek and items[1].sets_seen
    assert items[1].label() == b"BODY[HEADER.FIELDS (A B)]<5>"
    assert items[1].need is Need.HEADER
    info = MessageInfo(7, "k", "k", 9, 11, frozenset(), 0.0)
    line = render(3, info, [FetchItem("RFC822.SIZE"), FetchItem("BODY", Section(), True)],
                  lambda: b"", b"a\xff\r\n\x00b\r\n", with_uid=True)
    assert line == b"* 3 FETCH (UID 7 RFC822.SIZE 11 BODY[] {8}\r\na\xff\r\n\x00b\r\n)\r\n"
