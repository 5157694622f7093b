"""Property tests: random and mutated command lines never break an IMAP session."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.imap_support import Client, Server
from tests.unit.mailbox_support import deliver, message

TEMPLATES = [
    b"NOOP", b"CAPABILITY", b"LOGIN demo@example.test secret", b"LOGIN x y", b"SELECT INBOX",
    b"EXAMINE Sent", b"FETCH 1:* (FLAGS UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])",
    b"FETCH 1 (BODY[1.MIME] BODYSTRUCTURE ENVELOPE RFC822.SIZE)", b"UID FETCH 1:* FULL",
    b"STORE 1 +FLAGS (\\Seen $Kw)", b"UID STORE 2 -FLAGS.SILENT (\\Deleted)",
    b"SEARCH OR UNSEEN FROM a NOT BODY x", b"UID SEARCH CHARSET UTF-8 TEXT y 1:*",
    b"COPY 1 Trash", b"UID MOVE 2 Junk", b"EXPUNGE", b"UID EXPUNGE 1:3", b"CLOSE",
    b"UNSELECT", b'LIST "" "*"', b'LIST (SPECIAL-USE) "" "%" RETURN (STATUS (MESSAGES))',
    b'LSUB "" "*"', b"STATUS INBOX (MESSAGES UNSEEN UIDNEXT)", b"CREATE A.B", b"DELETE A.B",
    b"RENAME A Z", b"SUBSCRIBE Z", b"UNSUBSCRIBE Z", b"NAMESPACE", b"ID NIL",
    b"ENABLE CONDSTORE", b"CHECK", b"IDLE", b"AUTHENTICATE PLAIN", b"STARTTLS",
    b'APPEND INBOX (\\Seen) " 1-Jan-2024 00:00:00 +0000" {3+}\r\nabc',
    b"ENABLE IMAP4rev2", b"ENABLE UTF8=ACCEPT IMAP4rev2", b"SEARCH RETURN (MIN MAX COUNT) ALL",
    b"UID SEARCH RETURN (SAVE ALL) UNSEEN", b"SEARCH RETURN () $", b"FETCH $ (UID FLAGS)",
    b"UID STORE $ +FLAGS (\\Flagged)", b"UID EXPUNGE $", b"MOVE $ Trash",
    b"FETCH 1:* (BINARY.PEEK[1] BINARY.SIZE[1] BINARY[]<0.5>)", b"UID FETCH 1 BINARY[2.1]",
    b"APPEND INBOX ~{3+}\r\na\x00c", b"APPEND INBOX UTF8 (~{3+}\r\nabc)",
    b'LIST "" "*" RETURN (SUBSCRIBED CHILDREN)', b"STATUS INBOX (SIZE DELETED RECENT)",
    b'CREATE "Entw\xc3\xbcrfe"', b"SEARCH CHARSET UTF-8 RETURN (ALL) ALL",
    b"APPEND INBOX {1+}\r\na (\\Seen) {1+}\r\nb",
    b"SELECT INBOX (CONDSTORE)", b"STATUS INBOX (HIGHESTMODSEQ MESSAGES)",
    b"FETCH 1:* (FLAGS MODSEQ) (CHANGEDSINCE 1)", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE 0)",
    b"STORE 1:2 (UNCHANGEDSINCE 5) +FLAGS (\\Seen)",
    b"UID STORE 1:* (UNCHANGEDSINCE 0) FLAGS.SILENT (\\Flagged)",
    b'SEARCH MODSEQ "/flags/\\\\draft" all 3', b"SEARCH RETURN (MIN MAX) MODSEQ 1",
]
PRINTABLE = st.binary(min_size=0, max_size=8).map(
    lambda b: bytes(c for c in b if c not in (10, 13, 123)))


@st.composite
def command_lines(draw: st.DrawFn) -> bytes:
    """A template, maybe mutated by cutting, inserting or replacing bytes."""
    line = draw(st.sampled_from(TEMPLATES))
    for _ in range(draw(st.integers(0, 3))):
        position = draw(st.integers(0, len(line)))
        kind = draw(st.sampled_from(["cut", "insert", "replace"]))
        junk = draw(PRINTABLE)
        if kind == "cut":
            line = line[:position] + line[position + len(junk):]
        elif kind == "insert":
            line = line[:position] + junk + line[position:]
        else:
            line = line[:position] + junk + line[position + len(junk):]
    return line


def _server(root: Path) -> tuple[Server, Client]:
    server = Server(root, allow_plaintext_auth=True, max_bad_commands=1000,
                    max_literal_size=1000)
    for i in range(3):
        deliver(server.inbox, message(i))
    return server, server.connect()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(command_lines(), min_size=1, max_size=12))
def test_every_tagged_command_gets_a_tagged_reply(lines: list[bytes]) -> None:
    """Each tagged command gets OK, NO or BAD, or the session ends with BYE; no internal error."""
    with tempfile.TemporaryDirectory() as tmp:
        server, client = _server(Path(tmp))
        for number, line in enumerate(lines):
            tag = b"F%d" % number
            out = client.send(tag + b" " + line + b"\r\n")
            for _ in range(3):
                if re.search(rb"(^|\n)" + tag + rb" (OK|NO|BAD) ", out) or client.closed:
                    break
                if out.endswith(b"+ idling\r\n"):
                    out += client.send(b"DONE\r\n")
                elif out.endswith(b"+ \r\n"):
                    out += client.send(b"*\r\n")
                else:
                    server.clock.advance(20)  # a failed login answers after a delay
                    out += client.output()
                    if not re.search(rb"(^|\n)" + tag + rb" ", out) and not client.closed:
                        # A mutated literal size: the server rightly waits for its bytes.
                        out += client.send(b"x" * 1100 + b"\r\n")
            assert b"SERVERBUG" not in out and b"Internal" not in out, out
            if client.closed:
                assert b"* BYE" in out, out
                return
            assert re.search(rb"(^|\n)" + tag + rb" (OK|NO|BAD) ", out), (line, out)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=8))
def test_random_bytes_never_raise(chunks: list[bytes]) -> None:
    """Arbitrary bytes, logged in and selected, never raise; a closed session said BYE."""
    with tempfile.TemporaryDirectory() as tmp:
        server, client = _server(Path(tmp))
        client.login()
        client.select()
        out = b""
        for chunk in chunks:
            out += client.send(chunk)
            server.clock.advance(20)
            out += client.output()
        assert b"SERVERBUG" not in out and b"Internal" not in out, out
        if client.closed:
            assert b"* BYE" in out
