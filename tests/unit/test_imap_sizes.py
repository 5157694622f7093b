"""Wire sizes read when asked: a cold SELECT reads no message file; RFC822.SIZE, LARGER/SMALLER
and STATUS SIZE read the sizes they need, once, and answer as if they had always been known."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsys.mailbox.uidlist import UIDLIST_NAME, parse_uidlist
from tests.unit.imap_support import Server, selected
from tests.unit.mailbox_support import deliver, forget_folder_caches


@pytest.fixture
def server(tmp_path: Path) -> Server:
    forget_folder_caches()
    return Server(tmp_path / "maildirs", allow_plaintext_auth=True)


def cold(server: Server) -> list[bytes]:
    """Three messages of different wire sizes, LF line ends, names without ,W=."""
    bodies = [b"Subject: a\n\n" + b"x\n" * n for n in (1, 50, 500)]
    for i, body in enumerate(bodies, 1):
        deliver(server.inbox, body, mtime=1_700_000_000 + i)
    return [body.replace(b"\n", b"\r\n") for body in bodies]


def recorded_sizes(server: Server) -> list[int | None]:
    uids = parse_uidlist((server.inbox / UIDLIST_NAME).read_text())
    return [entry.wire_size for entry in sorted(uids.entries.values(), key=lambda e: e.uid)]


def test_select_leaves_sizes_unread_and_fetch_reads_only_its_targets(server: Server) -> None:
    """After a cold SELECT no size is known; UID FETCH RFC822.SIZE of one message reads and
    records that one's only, and answers its CRLF size."""
    wire = cold(server)
    client = selected(server)
    assert recorded_sizes(server) == [None, None, None]
    out = client.ok("UID FETCH 2 (RFC822.SIZE)")
    assert f"* 2 FETCH (UID 2 RFC822.SIZE {len(wire[1])})" in out
    assert recorded_sizes(server) == [None, len(wire[1]), None]
    out = client.ok("FETCH 1:* FAST")
    for n, data in enumerate(wire, 1):
        assert f"* {n} FETCH (FLAGS (\\Recent) INTERNALDATE " in out
        assert f"RFC822.SIZE {len(data)})" in out
    assert recorded_sizes(server) == [len(data) for data in wire]


def test_search_larger_and_smaller_on_a_cold_folder(server: Server) -> None:
    """LARGER and SMALLER compare the wire sizes, read first for a folder opened cold."""
    wire = cold(server)
    client = selected(server)
    middle = len(wire[1])
    assert "* SEARCH 3\r\n" in client.ok(f"SEARCH LARGER {middle}")
    assert "* SEARCH 1\r\n" in client.ok(f"SEARCH SMALLER {middle}")
    assert "* SEARCH 1 3\r\n" in client.ok(f"SEARCH OR LARGER {middle} SMALLER {middle}")


def test_status_size_of_the_selected_cold_folder_and_of_another(server: Server) -> None:
    """STATUS SIZE (RFC 8438) sums the wire sizes, for the selected folder opened cold and for
    a folder STATUS opens itself."""
    wire = cold(server)
    client = selected(server)
    total = sum(len(data) for data in wire)
    assert f"* STATUS \"INBOX\" (SIZE {total} MESSAGES 3)" in client.ok(
        "STATUS INBOX (SIZE MESSAGES)")
    client.ok("CREATE Other")
    deliver(server.inbox / ".Other", b"a\nb\n")
    assert "* STATUS \"Other\" (SIZE 6)" in client.ok("STATUS Other (SIZE)")
