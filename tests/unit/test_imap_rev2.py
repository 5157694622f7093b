"""IMAP4rev2 (RFC 9051) where a client enables it, and the extensions it folds in: ESEARCH
(RFC 4731), SEARCHRES (RFC 5182), BINARY (RFC 3516), UTF-8 mailbox names (RFC 6855)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from tests.unit.imap_support import Client, Server, filled
from tests.unit.mailbox_support import deliver, message


@pytest.fixture
def server(tmp_path: Path) -> Server:
    return Server(tmp_path / "maildirs", allow_plaintext_auth=True)


REV2 = ("IMAP4rev2",)


def lines(out: str, prefix: str) -> list[str]:
    return [line for line in out.split("\r\n") if line.startswith(prefix)]


# --- capabilities and ENABLE ---------------------------------------------------------------------


def test_capability_lists_rev2_and_its_extensions(server: Server) -> None:
    """CAPABILITY has IMAP4rev1 and IMAP4rev2; after login ESEARCH, SEARCHRES, BINARY too."""
    client = server.connect()
    assert "IMAP4rev1 IMAP4rev2" in client.greeting.decode()
    out = client.login()
    for cap in ("ESEARCH", "SEARCHRES", "BINARY", "UTF8=ACCEPT", "STATUS=SIZE"):
        assert f" {cap}" in out


def test_enable_lists_only_what_it_newly_enabled(server: Server) -> None:
    """ENABLED names IMAP4rev2 once; unknown or repeated names are left out."""
    client = server.connect()
    client.login()
    assert "* ENABLED IMAP4rev2\r\n" in client.ok("ENABLE imap4rev2 XUNKNOWN")
    assert "* ENABLED\r\n" in client.ok("ENABLE IMAP4rev2")
    assert "* ENABLED UTF8=ACCEPT\r\n" in client.ok("ENABLE UTF8=ACCEPT")


def test_enable_is_refused_while_selected(server: Server) -> None:
    """ENABLE in the selected state is BAD (RFC 9051 §6.3.1: authenticated state only)."""
    client = filled(server, 1)
    assert client.status("ENABLE IMAP4rev2").startswith("BAD")
    assert not client.session.rev2


# --- SELECT, flags and updates in rev2 -----------------------------------------------------------


def test_rev2_select_has_list_and_no_recent_or_unseen(server: Server) -> None:
    """A rev2 SELECT sends a LIST response and neither RECENT nor [UNSEEN]; flags lack \\Recent."""
    client = filled(server, 2, enable=REV2)
    out = client.select()
    assert '* LIST () "." "INBOX"' in out
    assert "RECENT" not in out and "UNSEEN" not in out
    assert "\\Recent" not in client.ok("FETCH 1:* FLAGS")


def test_rev2_select_while_selected_sends_closed(server: Server) -> None:
    """SELECT with a mailbox selected says OK [CLOSED] first in rev2 (RFC 9051 §7.1)."""
    client = filled(server, 1, enable=REV2)
    out = client.ok("EXAMINE Sent")
    assert out.startswith("* OK [CLOSED]")


def test_rev1_select_keeps_recent_and_unseen(server: Server) -> None:
    """Without ENABLE the rev1 SELECT responses are unchanged."""
    client = filled(server, 2)
    out = client.select()
    assert "RECENT" in out and "[UNSEEN 1]" in out and "* LIST" not in out


def test_rev2_new_mail_reports_exists_without_recent(server: Server) -> None:
    """A delivery reaches a rev2 session as EXISTS with no RECENT."""
    client = filled(server, 1, enable=REV2)
    deliver(server.inbox, message(2))
    server.store.notify_delivered(client.session.user or "")
    out = client.ok("NOOP")
    assert "* 2 EXISTS" in out and "RECENT" not in out


# --- ESEARCH and SEARCHRES -----------------------------------------------------------------------


def test_search_return_min_max_count_all(server: Server) -> None:
    """SEARCH RETURN (MIN MAX COUNT ALL) answers one ESEARCH line tagged with the command's tag."""
    client = filled(server, 5)
    client.ok("STORE 2,4:5 +FLAGS.SILENT (\\Seen)")
    out = client.ok("SEARCH RETURN (MIN MAX COUNT ALL) SEEN")
    assert f'* ESEARCH (TAG "{client.tag}") MIN 2 MAX 5 ALL 2,4:5 COUNT 3\r\n' in out
    assert "* SEARCH" not in out
    out = client.ok("UID SEARCH RETURN (COUNT) UNSEEN")
    assert f'* ESEARCH (TAG "{client.tag}") UID COUNT 2\r\n' in out


def test_search_return_empty_list_means_all_and_no_match_has_no_data(server: Server) -> None:
    """RETURN () is ALL; with no match MIN/MAX/ALL are left out and COUNT is 0."""
    client = filled(server, 2)
    out = client.ok("SEARCH RETURN () ALL")
    assert f'* ESEARCH (TAG "{client.tag}") ALL 1:2\r\n' in out
    out = client.ok("SEARCH RETURN (MIN ALL COUNT) DELETED")
    assert f'* ESEARCH (TAG "{client.tag}") COUNT 0\r\n' in out


def test_rev2_plain_search_answers_esearch(server: Server) -> None:
    """In rev2 a SEARCH without RETURN answers ESEARCH ALL (RFC 9051 §6.4.4), never SEARCH."""
    client = filled(server, 3, enable=REV2)
    out = client.ok("SEARCH 2:3")
    assert f'* ESEARCH (TAG "{client.tag}") ALL 2:3\r\n' in out and "* SEARCH" not in out


def test_search_save_then_dollar_in_fetch_store_and_search(server: Server) -> None:
    """RETURN (SAVE) sends no ESEARCH and keeps the matches; "$" then names them everywhere."""
    client = filled(server, 4)
    client.ok("STORE 1,3 +FLAGS.SILENT (\\Flagged)")
    out = client.ok("SEARCH RETURN (SAVE) FLAGGED")
    assert "ESEARCH" not in out and "* SEARCH" not in out
    out = client.ok("FETCH $ (UID)")
    assert re.findall(r"\* (\d+) FETCH", out) == ["1", "3"]
    client.ok("STORE $ +FLAGS.SILENT (\\Deleted)")
    assert "ALL 1,3" in client.ok("SEARCH RETURN (ALL) DELETED")
    assert "* SEARCH 3" in client.ok("SEARCH $ 2:4")
    out = client.ok("UID EXPUNGE $")
    assert "* 3 EXPUNGE" in out and "* 1 EXPUNGE" in out


def test_search_save_with_min_keeps_only_the_minimum(server: Server) -> None:
    """SAVE with MIN (and no ALL or COUNT) saves only the lowest match (RFC 5182 §2.4)."""
    client = filled(server, 3)
    out = client.ok("SEARCH RETURN (SAVE MIN) 2:3")
    assert "MIN 2" in out
    assert re.findall(r"\* (\d+) FETCH", client.ok("FETCH $ FLAGS")) == ["2"]


def test_failed_search_save_empties_the_saved_result(server: Server) -> None:
    """A SEARCH with SAVE that fails leaves "$" empty (RFC 5182 §2.1)."""
    client = filled(server, 2)
    client.ok("SEARCH RETURN (SAVE) ALL")
    assert client.status("SEARCH RETURN (SAVE) FROB").startswith("BAD")
    assert "FETCH (" not in client.ok("FETCH $ FLAGS")


def test_bad_return_option_is_bad(server: Server) -> None:
    """An unknown RETURN option is BAD with a clear text; the session goes on."""
    client = filled(server, 1)
    assert client.status("SEARCH RETURN (FIRST) ALL") == "BAD Unknown SEARCH RETURN option FIRST"
    client.ok("NOOP")


# --- BINARY ---------------------------------------------------------------------------------------

MIME = (b"From: a@example.test\r\nSubject: bin\r\nContent-Type: multipart/mixed; boundary=b\r\n"
        b"\r\n--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        b"\r\ncaf=C3=A9\r\n--b\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(b"\x00\x01binary\xff") + b"\r\n--b\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: x-unknown\r\n\r\nzzz\r\n--b--\r\n")


def binary_client(server: Server) -> Client:
    deliver(server.inbox, MIME)
    client = server.connect()
    client.login()
    client.ok("ENABLE IMAP4rev2")
    client.select()
    return client


def test_binary_decodes_parts_and_uses_literal8_only_for_nul(server: Server) -> None:
    """BINARY[1] undoes quoted-printable in a literal; BINARY[2] with NULs comes as literal8."""
    client = binary_client(server)
    out = client.send(b"a FETCH 1 (BINARY.PEEK[1] BINARY.PEEK[2] BINARY.SIZE[2])\r\n")
    assert "BINARY[1] {5}\r\ncafé".encode() in out
    assert b"BINARY[2] ~{9}\r\n\x00\x01binary\xff" in out
    assert b"BINARY.SIZE[2] 9" in out and b"a OK" in out
    assert b"\\Seen" not in client.send(b"b FETCH 1 FLAGS\r\n")


def test_binary_partial_and_seen(server: Server) -> None:
    """BINARY[2]<2.6> gives that slice labelled <2>; BINARY (not PEEK) sets \\Seen."""
    client = binary_client(server)
    out = client.send(b"a FETCH 1 BINARY[2]<2.6>\r\n")
    assert b"BINARY[2]<2> {6}\r\nbinary" in out and b"FLAGS (\\Seen)" in out


def test_binary_of_unknown_encoding_is_unknown_cte(server: Server) -> None:
    """A part in an encoding we cannot undo is NO [UNKNOWN-CTE], and the session goes on."""
    client = binary_client(server)
    assert client.status("FETCH 1 BINARY.PEEK[3]").startswith("NO [UNKNOWN-CTE]")
    assert client.status("FETCH 1 BINARY.PEEK[1.TEXT]").startswith("BAD")
    client.ok("NOOP")


def test_append_literal8_and_utf8_form(server: Server) -> None:
    """APPEND takes a literal8 (RFC 3516 §4.4) and UTF8 (literal8) (RFC 6855 §4)."""
    client = server.connect()
    client.login()
    data = b"Subject: nul\r\n\r\na\x00b\r\n"
    out = client.send(b"a APPEND INBOX ~{%d+}\r\n" % len(data) + data + b"\r\n")
    assert re.search(rb"a OK \[APPENDUID \d+ 1\]", out)
    utf8 = "Subject: grüße\r\n\r\nhi\r\n".encode()
    out = client.send(b"b APPEND INBOX UTF8 (~{%d+}\r\n" % len(utf8) + utf8 + b")\r\n")
    assert re.search(rb"b OK \[APPENDUID \d+ 2\]", out)
    assert b"b BAD" in client.send(b"b APPEND INBOX UTF8 ({2+}\r\nab)\r\n")
    client.select()
    assert utf8 in client.send(b"c FETCH 2 BINARY.PEEK[]\r\n")


def test_append_refuses_nul_in_an_ordinary_literal(server: Server) -> None:
    """A NUL in a {n} literal is BAD (RFC 3501 §9: CHAR8), and nothing is stored."""
    client = server.connect()
    client.login()
    data = b"Subject: nul\r\n\r\nab\x00cd\r\n"
    out = client.send(b"a APPEND INBOX {%d+}\r\n" % len(data) + data + b"\r\n")
    assert out.startswith(b"a BAD") and b"literal8" in out
    assert "* 0 EXISTS" in client.select()


# --- mailbox names and LIST ----------------------------------------------------------------------


def test_utf8_names_after_enable(server: Server) -> None:
    """After ENABLE UTF8=ACCEPT names are UTF-8 both ways; "&" is an ordinary character."""
    client = server.connect()
    client.login()
    client.ok("CREATE Entw&APw-rfe")
    client.ok("ENABLE UTF8=ACCEPT")
    assert '"Entwürfe"' in client.ok('LIST "" "Entw*"')
    client.ok('CREATE "R&D"')
    assert (server.inbox / ".R&D").is_dir()
    assert '* STATUS "Entwürfe" (MESSAGES 0)' in client.ok('STATUS "Entwürfe" (MESSAGES)')
    assert client.status("SEARCH CHARSET UTF-8 ALL").startswith("BAD")
    rev1 = server.connect()
    rev1.login()
    assert '"R&-D"' in rev1.ok('LIST "" "R*"')


def test_rev2_list_marks_missing_parents_nonexistent(server: Server) -> None:
    """In rev2 a parent that is no mailbox is \\NonExistent; rev1 clients see \\Noselect."""
    (server.inbox / ".Projects.Alpha").mkdir(parents=True)
    for sub in ("cur", "new", "tmp"):
        (server.inbox / ".Projects.Alpha" / sub).mkdir()
    client = server.connect()
    client.login()
    assert '(\\Noselect \\HasChildren) "." "Projects"' in client.ok('LIST "" "Proj*"')
    client.ok("ENABLE IMAP4rev2")
    assert '(\\NonExistent \\HasChildren) "." "Projects"' in client.ok('LIST "" "Proj*"')


def test_status_size_and_deleted(server: Server) -> None:
    """STATUS SIZE and DELETED count octets and \\Deleted messages (RFC 9051 §6.3.11)."""
    client = filled(server, 2, enable=REV2)
    client.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    out = client.ok("STATUS INBOX (DELETED SIZE)")
    assert "* STATUS \"INBOX\" (DELETED 1 SIZE 160)" in out


# --- MULTIAPPEND ------------------------------------------------------------------------------


def test_multiappend_stores_all_and_answers_a_uid_set(server: Server) -> None:
    """One APPEND with two messages stores both and answers APPENDUID with a UID set."""
    client = server.connect()
    client.login()
    one, two = b"Subject: one\r\n\r\n1\r\n", b"Subject: two\r\n\r\n2\r\n"
    out = client.send(b"a APPEND INBOX (\\Seen Work) {%d+}\r\n%s (\\Flagged) {%d+}\r\n%s\r\n"
                      % (len(one), one, len(two), two))
    assert re.search(rb"a OK \[APPENDUID \d+ 1:2\]", out), out
    client.select()
    out = client.cmd("FETCH 1:* FLAGS").encode()
    # RFC 3501 §2.3.2: appended messages are new, and this is the first session to see them.
    assert (b"* 1 FETCH (FLAGS (\\Seen Work \\Recent))" in out
            and b"* 2 FETCH (FLAGS (\\Flagged \\Recent))" in out)


def test_multiappend_with_an_empty_message_stores_nothing(server: Server) -> None:
    """If one message of a MULTIAPPEND is refused, none is stored."""
    client = server.connect()
    client.login()
    out = client.send(b"a APPEND INBOX {3+}\r\nabc {0+}\r\n\r\n")
    assert out.startswith(b"a NO")
    assert "* 0 EXISTS" in client.select()


def test_multiappend_failure_rolls_back_stored_messages(server: Server,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk failure at the second message deletes the first again (RFC 3502: all or none)."""
    import mailsys.imap.transfers as transfers_module

    real = transfers_module.append_message
    calls: list[int] = []

    def failing(*args: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(transfers_module, "append_message", failing)
    client = server.connect()
    client.login()
    out = client.send(b"a APPEND INBOX {3+}\r\nabc {3+}\r\ndef\r\n")
    assert b"a NO [SERVERBUG]" in out and b"disk full" not in out
    assert "* 0 EXISTS" in client.select()
