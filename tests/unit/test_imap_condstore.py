"""CONDSTORE (RFC 7162 §3.1): HIGHESTMODSEQ, FETCH MODSEQ and CHANGEDSINCE, STORE UNCHANGEDSINCE
with MODIFIED, MODSEQ in unsolicited FETCH responses, and the MODSEQ search key."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mailsys.mailbox.names import parse_name
from tests.unit import imap_support as support
from tests.unit.imap_support import Client, Server


@pytest.fixture
def server(tmp_path: Path) -> Server:
    return Server(tmp_path / "maildirs", allow_plaintext_auth=True)


CONDSTORE = ("CONDSTORE",)


def filled(server: Server, count: int = 3, *, enable: bool = True) -> Client:
    """``count`` messages, INBOX selected, CONDSTORE enabled unless told not to."""
    return support.filled(server, count, enable=CONDSTORE if enable else ())


def session(server: Server) -> Client:
    """Another client of the same INBOX, CONDSTORE enabled."""
    return support.selected(server, enable=CONDSTORE)


def highest(out: str) -> int:
    match = re.search(r"\[HIGHESTMODSEQ (\d+)\]", out)
    assert match, out
    return int(match.group(1))


def modseqs(out: str) -> dict[int, int]:
    """Sequence number -> MODSEQ of every FETCH response in ``out``."""
    return {int(seq): int(value) for seq, value in
            re.findall(r"\* (\d+) FETCH \(.*?MODSEQ \((\d+)\)", out)}


def test_capability_and_enable(server: Server) -> None:
    """CONDSTORE is advertised after login, and ENABLE CONDSTORE says it enabled it once."""
    client = server.connect()
    assert " CONDSTORE" in client.login()
    assert "* ENABLED CONDSTORE\r\n" in client.ok("ENABLE CONDSTORE")
    assert "* ENABLED\r\n" in client.ok("ENABLE condstore")


def test_select_reports_highestmodseq_only_once_enabled(server: Server) -> None:
    """SELECT has no HIGHESTMODSEQ before CONDSTORE is enabled, and has it afterwards."""
    client = filled(server, 2, enable=False)
    assert "HIGHESTMODSEQ" not in client.select()
    client.ok("UNSELECT")
    client.ok("ENABLE CONDSTORE")
    assert highest(client.select()) >= 1


def test_select_condstore_parameter_enables_it(server: Server) -> None:
    """SELECT INBOX (CONDSTORE) reports HIGHESTMODSEQ; an unknown parameter is BAD."""
    client = filled(server, 1, enable=False)
    assert highest(client.ok("EXAMINE INBOX (CONDSTORE)")) >= 1
    assert client.session.condstore
    assert client.status("SELECT INBOX (XFOO)").startswith("BAD")


def test_status_highestmodseq_matches_select(server: Server) -> None:
    """STATUS HIGHESTMODSEQ gives the same value SELECT reports."""
    client = filled(server, 2)
    value = highest(client.select())
    client.ok("UNSELECT")
    assert f'* STATUS "INBOX" (HIGHESTMODSEQ {value} MESSAGES 2)' in client.ok(
        "STATUS INBOX (HIGHESTMODSEQ MESSAGES)")


def test_status_highestmodseq_grows_on_expunge(server: Server) -> None:
    """An EXPUNGE raises HIGHESTMODSEQ (RFC 7162 §3.1.2.1)."""
    client = filled(server, 2)
    before = highest(client.select())
    client.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    client.ok("EXPUNGE")
    other = session(server)
    assert highest(other.select()) > before


def test_own_expunge_raises_highestmodseq_of_the_selected_mailbox(server: Server) -> None:
    """STATUS of the selected mailbox reports a higher HIGHESTMODSEQ after its own EXPUNGE."""
    client = filled(server, 2)
    client.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    before = int(re.findall(r"HIGHESTMODSEQ (\d+)", client.ok("STATUS INBOX (HIGHESTMODSEQ)"))[0])
    client.ok("EXPUNGE")
    after = int(re.findall(r"HIGHESTMODSEQ (\d+)", client.ok("STATUS INBOX (HIGHESTMODSEQ)"))[0])
    assert after > before
    assert after <= highest(session(server).select())


def test_fetch_modseq_item(server: Server) -> None:
    """FETCH MODSEQ gives each message's mod-sequence, none above HIGHESTMODSEQ."""
    client = filled(server, 3)
    top = highest(client.select())
    values = modseqs(client.ok("FETCH 1:* (MODSEQ)"))
    assert sorted(values) == [1, 2, 3] and max(values.values()) <= top


def test_fetch_modseq_enables_and_reports_highest_when_selected(server: Server) -> None:
    """The first FETCH MODSEQ in a selected mailbox turns CONDSTORE on with an OK HIGHESTMODSEQ."""
    client = filled(server, 1, enable=False)
    out = client.ok("FETCH 1 (UID MODSEQ)")
    assert "* OK [HIGHESTMODSEQ " in out and "MODSEQ (" in out
    assert client.session.condstore
    assert "* OK [HIGHESTMODSEQ " not in client.ok("FETCH 1 (MODSEQ)")


def test_store_gives_a_new_modseq_with_uid(server: Server) -> None:
    """After ENABLE CONDSTORE a STORE's FETCH has UID, FLAGS and a MODSEQ above the old highest."""
    client = filled(server, 2)
    top = highest(client.select())
    out = client.ok("STORE 2 +FLAGS (\\Flagged)")
    match = re.search(r"\* 2 FETCH \(UID 2 FLAGS \(\\Flagged\) MODSEQ \((\d+)\)\)", out)
    assert match and int(match.group(1)) > top


def test_store_silent_still_reports_the_modseq(server: Server) -> None:
    """STORE .SILENT with CONDSTORE sends the new MODSEQ without FLAGS (RFC 7162 §3.1.3)."""
    client = filled(server, 2)
    out = client.ok("STORE 1 +FLAGS.SILENT (\\Seen)")
    assert re.search(r"\* 1 FETCH \(UID 1 MODSEQ \(\d+\)\)", out) and "FLAGS" not in out
    assert "* " not in client.ok("STORE 1 +FLAGS.SILENT (\\Seen)")  # nothing changed


def test_fetch_changedsince_returns_only_changed_messages(server: Server) -> None:
    """FETCH (FLAGS) (CHANGEDSINCE n) answers only messages changed after n, with MODSEQ."""
    client = filled(server, 4)
    top = highest(client.select())
    client.ok("STORE 2,4 +FLAGS.SILENT (\\Answered)")
    out = client.ok(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {top})")
    assert sorted(modseqs(out)) == [2, 4]
    assert "* 2 FETCH (FLAGS (\\Answered) MODSEQ (" in out
    out = client.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {top})")
    assert "* 4 FETCH (UID 4 FLAGS (\\Answered) MODSEQ (" in out
    assert "* " not in client.ok(f"FETCH 1:* (FLAGS) (changedsince {top + 100})")


def test_unchangedsince_reports_modified_messages(server: Server) -> None:
    """STORE (UNCHANGEDSINCE n) skips a message another session changed: OK [MODIFIED seq]."""
    first = filled(server, 3)
    second = session(server)
    top = highest(second.select())
    first.ok("STORE 2 +FLAGS (\\Flagged)")
    out = second.ok(f"STORE 1:3 (UNCHANGEDSINCE {top}) +FLAGS (\\Seen)")
    assert f"{second.tag} OK [MODIFIED 2]" in out
    assert "* 1 FETCH (UID 1 FLAGS (\\Seen) MODSEQ (" in out
    # The modified message's current state comes along, and the view has it too.
    assert "* 2 FETCH (UID 2 FLAGS (\\Flagged) MODSEQ (" in out
    assert "* 2 FETCH (FLAGS (\\Flagged))" in second.ok("FETCH 2 (FLAGS)")
    assert "FETCH" not in second.ok("NOOP")


def test_uid_store_unchangedsince_lists_uids(server: Server) -> None:
    """UID STORE names the modified messages by UID; UNCHANGEDSINCE 0 always fails."""
    client = filled(server, 3)
    client.ok("STORE 1 +FLAGS.SILENT (\\Seen)")
    client.ok("EXPUNGE")  # nothing deleted: UIDs still 1..3 at seq 1..3
    client.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    client.ok("EXPUNGE")  # now UIDs 2, 3 at seq 1, 2
    out = client.ok("UID STORE 2:3 (UNCHANGEDSINCE 0) +FLAGS (\\Seen)")
    assert f"{client.tag} OK [MODIFIED 2:3]" in out and "* " not in out


def test_bad_modifiers_are_bad(server: Server) -> None:
    """Unknown FETCH and STORE modifiers, and VANISHED (QRESYNC), are BAD."""
    client = filled(server, 1)
    assert client.status("FETCH 1 (FLAGS) (VANISHED)").startswith("BAD")
    assert client.status("FETCH 1 (FLAGS) (CHANGEDSINCE x)").startswith("BAD")
    assert client.status("STORE 1 (XFOO 1) +FLAGS (\\Seen)").startswith("BAD")


def test_unsolicited_fetch_carries_modseq(server: Server) -> None:
    """Another session's flag change reaches a CONDSTORE session with UID and MODSEQ."""
    first = filled(server, 2)
    second = session(server)
    first.ok("STORE 1 +FLAGS (\\Seen)")
    out = second.ok("NOOP")
    assert re.search(r"\* 1 FETCH \(UID 1 FLAGS \(\\Seen\) MODSEQ \(\d+\)\)", out), out


def test_rename_by_another_program_is_reported_with_a_new_modseq(server: Server) -> None:
    """A flag change made by renaming the file outside mailsys comes with a higher MODSEQ."""
    client = filled(server, 1)
    top = highest(client.select())
    cur = server.inbox / "cur"
    (name,) = os.listdir(cur)
    os.rename(cur / name, cur / parse_name(name).with_flags(frozenset("F")))
    out = client.ok("NOOP")
    assert "FLAGS (\\Flagged)" in out and modseqs(out)[1] > top


def test_fetch_setting_seen_reports_flags_and_modseq(server: Server) -> None:
    """A FETCH that sets \\Seen reports UID, FLAGS and the new MODSEQ with CONDSTORE on."""
    client = filled(server, 1)
    top = highest(client.select())
    out = client.ok("FETCH 1 (BODY[HEADER.FIELDS (SUBJECT)])")
    match = re.search(r"MODSEQ \((\d+)\)", out)
    assert "UID 1" in out and "FLAGS (\\Seen)" in out and match and int(match.group(1)) > top


def test_search_modseq(server: Server) -> None:
    """SEARCH MODSEQ n finds messages changed since, and reports their highest MODSEQ."""
    client = filled(server, 3)
    top = highest(client.select())
    out = client.ok("STORE 3 +FLAGS (\\Flagged)")
    changed = modseqs(out)[3]
    assert f"* SEARCH 3 (MODSEQ {changed})\r\n" in client.ok(f"SEARCH MODSEQ {top + 1}")
    out = client.ok(f'UID SEARCH MODSEQ "/flags/\\\\flagged" all {top + 1}')
    assert f"* SEARCH 3 (MODSEQ {changed})\r\n" in out
    assert "* SEARCH\r\n" in client.ok(f"SEARCH MODSEQ {changed + 1}")
    assert "* SEARCH 1 2 3\r\n" in client.ok("SEARCH ALL")  # no MODSEQ key, no MODSEQ


def test_esearch_modseq(server: Server) -> None:
    """ESEARCH reports MODSEQ: the highest of all matches, or of the MIN/MAX ones only."""
    client = filled(server, 3)
    out = client.ok("FETCH 1:* (MODSEQ)")
    values = modseqs(out)
    client.ok("STORE 1 +FLAGS.SILENT (\\Seen)")
    values[1] = modseqs(client.ok("FETCH 1 (MODSEQ)"))[1]
    out = client.ok("SEARCH RETURN (ALL) MODSEQ 1")
    assert f"ALL 1:3 MODSEQ {max(values.values())}\r\n" in out
    out = client.ok("SEARCH RETURN (MAX) MODSEQ 1")
    assert f"MAX 3 MODSEQ {values[3]}\r\n" in out
    out = client.ok(f"SEARCH RETURN (COUNT) MODSEQ {max(values.values()) + 1}")
    assert "COUNT 0\r\n" in out and "MODSEQ" not in out.split("\r\n")[0]


def test_own_store_never_claims_a_highestmodseq_over_unreported_changes(server: Server) -> None:
    """After another session's change this one has not reported, its own STORE does not raise
    the HIGHESTMODSEQ it tells until that change is reported (RFC 7162 §3.1.2.1)."""
    first = filled(server, 2)
    told = highest(first.ok("SELECT INBOX (CONDSTORE)"))
    other = session(server)
    other.ok("STORE 1 +FLAGS.SILENT (\\Flagged)")  # first has not heard of this yet
    out = first.ok("STORE 2 +FLAGS.SILENT (\\Seen)")
    own = modseqs(out)[2]
    status = first.ok("STATUS INBOX (HIGHESTMODSEQ)")
    reported = int(re.findall(r"HIGHESTMODSEQ (\d+)", status)[0])
    assert reported < own
    assert reported == told
    assert "* 1 FETCH" in status  # the other session's change, reported with STATUS
    after = first.ok("STATUS INBOX (HIGHESTMODSEQ)")
    assert int(re.findall(r"HIGHESTMODSEQ (\d+)", after)[0]) >= own
