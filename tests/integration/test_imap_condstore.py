"""CONDSTORE (RFC 7162 §3.1) against the real `twistd -n mailsys`, driven by imaplib: two
sessions racing with STORE UNCHANGEDSINCE, FETCH CHANGEDSINCE, and mod-sequences kept across a
restart."""

from __future__ import annotations

import imaplib
import re
from collections.abc import Callable

from tests.integration.conftest import MailServer, read_greeting, wait_for
from tests.integration.test_imap import IMAPServer, make_imap


def _ok(result: tuple[str, list[object]]) -> list[object]:
    status, data = result
    assert status == "OK", result
    return data


def _session(imap: IMAPServer) -> tuple[imaplib.IMAP4_SSL, int]:
    """A logged-in session with CONDSTORE enabled and INBOX selected; its HIGHESTMODSEQ."""
    client = imap.implicit()
    assert b" CONDSTORE" in _ok(client.capability())[0]  # type: ignore[operator]
    _ok(client.enable("CONDSTORE"))
    _ok(client.select("INBOX"))
    _, values = client.response("HIGHESTMODSEQ")
    assert values and values[-1] is not None
    return client, int(values[-1])


def _changed(data: list[object]) -> dict[int, bytes]:
    """Sequence number -> the FETCH response's data, for every response in ``data``."""
    out = {}
    for item in data:
        assert isinstance(item, bytes), item
        seq, _, rest = item.partition(b" ")
        out[int(seq)] = rest
    return out


def test_conditional_store_from_two_sessions_and_changedsince(
        server_factory: Callable[..., MailServer]) -> None:
    """Two sessions STORE with UNCHANGEDSINCE: the later one gets MODIFIED for the message the
    first changed; FETCH CHANGEDSINCE then answers only the changed messages, also after a
    restart."""
    imap = make_imap(server_factory)
    setup = imap.implicit()
    for i in range(4):
        _ok(setup.append("INBOX", None, None, f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode()))
    setup.logout()
    first, known = _session(imap)
    second, known_too = _session(imap)
    assert known == known_too

    data = _ok(first.store("1", f"(UNCHANGEDSINCE {known}) +FLAGS", "(\\Flagged)"))
    # The first session to select the INBOX sees the appended messages \Recent (RFC 3501 §2.3.2).
    assert re.search(rb"FLAGS \(\\Flagged( \\Recent)?\) MODSEQ \(\d+\)",
                     data[0])  # type: ignore[arg-type]
    assert first.response("MODIFIED") == ("MODIFIED", [None])

    _ok(second.store("1,2", f"(UNCHANGEDSINCE {known}) +FLAGS", "(\\Seen)"))
    assert second.response("MODIFIED") == ("MODIFIED", [b"1"])

    for client in (first, second):
        _ok(client.noop())  # the other session's changes reach this one
        client.response("FETCH")  # (and imaplib keeps them apart from the FETCH below)
        data = _ok(client.fetch("1:*", f"(FLAGS) (CHANGEDSINCE {known})"))
        changed = _changed(data)
        assert sorted(changed) == [1, 2]
        assert b"\\Flagged" in changed[1] and b"\\Seen" not in changed[1]
        assert b"\\Seen" in changed[2] and b"MODSEQ (" in changed[2]
    first.logout()
    second.logout()

    imap.mail.stop()
    imap.mail.start()
    wait_for(lambda: read_greeting(imap.port).startswith(b"* OK"), deadline=30,
             message="the IMAP greeting after a restart")
    client, after = _session(imap)
    assert after > known
    data = _ok(client.uid("FETCH", "1:*", f"(FLAGS) (CHANGEDSINCE {known})"))
    assert sorted(_changed(data)) == [1, 2]
    assert _ok(client.status("INBOX", "(HIGHESTMODSEQ)"))[0] == (
        b'"INBOX" (HIGHESTMODSEQ %d)' % after)
    client.logout()
