"""The IMAP session over a StringTransport and a Clock: states, login, mailbox and message
commands, unsolicited updates, IDLE, limits and timeouts."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest

from mailsys.imap.session import State
from mailsys.imap.transfers import parse_date_time
from mailsys.mailbox.keywords import KEYWORDS_NAME
from mailsys.mailbox.names import SEEN, parse_name
from tests.unit.imap_support import PASSWORD, USER, FakeTLS, Server, filled, selected
from tests.unit.mailbox_support import deliver, message


@pytest.fixture
def server(tmp_path: Path) -> Server:
    return Server(tmp_path / "maildirs", allow_plaintext_auth=True)


@pytest.fixture
def strict(tmp_path: Path) -> Server:
    return Server(tmp_path / "maildirs")


# --- greeting, capabilities, login ---------------------------------------------------------------


def test_greeting_offers_starttls_and_disables_login_before_tls(strict: Server) -> None:
    """Before TLS the greeting's CAPABILITY has STARTTLS and LOGINDISABLED, not AUTH=PLAIN."""
    client = strict.connect()
    assert client.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert b"STARTTLS" in client.greeting and b"LOGINDISABLED" in client.greeting
    assert b"AUTH=PLAIN" not in client.greeting


def test_login_before_tls_refused_with_privacyrequired(strict: Server) -> None:
    """LOGIN without TLS is NO [PRIVACYREQUIRED] and the session stays usable."""
    client = strict.connect()
    out = client.cmd(f"LOGIN {USER} {PASSWORD}")
    assert f"{client.tag} NO [PRIVACYREQUIRED]" in out
    assert client.session.state is State.NOT_AUTHENTICATED
    client.ok("NOOP")


def test_starttls_discards_pipelined_plaintext_then_login_works(strict: Server) -> None:
    """Commands pipelined after STARTTLS are dropped; after TLS, LOGIN is accepted."""
    client = strict.connect()
    out = client.send(b"a STARTTLS\r\nb LOGIN x y\r\n").decode()
    assert out == "a OK Begin TLS negotiation now\r\n"
    assert client.transport.tls_contexts == [FakeTLS.context]
    out = client.cmd("CAPABILITY")
    assert "AUTH=PLAIN" in out and "STARTTLS" not in out and "LOGINDISABLED" not in out
    assert "OK [CAPABILITY" in client.login()
    assert client.session.state is State.AUTHENTICATED


def test_authenticate_plain_with_initial_response(server: Server) -> None:
    """AUTHENTICATE PLAIN with SASL-IR logs in in one round trip (RFC 4959)."""
    client = server.connect()
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    out = client.cmd(f"AUTHENTICATE PLAIN {token}")
    assert f"{client.tag} OK [CAPABILITY" in out


def test_authenticate_plain_with_continuation_and_cancel(server: Server) -> None:
    """Without an initial response the server sends "+ "; "*" cancels with BAD."""
    client = server.connect()
    assert client.cmd("AUTHENTICATE PLAIN") == "+ \r\n"
    assert client.send(b"*\r\n").decode().startswith(f"{client.tag} BAD")
    assert client.cmd("AUTHENTICATE PLAIN") == "+ \r\n"
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    assert client.send(token + b"\r\n").decode().startswith(f"{client.tag} OK")


def test_wrong_password_answers_after_the_throttle_delay(server: Server) -> None:
    """A failed login is NO [AUTHENTICATIONFAILED], answered only after the throttle delay."""
    client = server.connect()
    assert client.cmd(f"LOGIN {USER} wrong") == ""
    server.clock.advance(1.0)
    assert f"{client.tag} NO [AUTHENTICATIONFAILED]" in client.output().decode()
    client.login()


def test_throttled_user_gets_bye(server: Server) -> None:
    """After too many failures of a user at an address, that user's login from there is refused
    with BYE and the connection closed."""
    for _ in range(3):
        server.throttle.failed("192.0.2.10", USER)
    client = server.connect()
    out = client.cmd(f"LOGIN {USER} {PASSWORD}")
    assert "* BYE" in out and client.closed


def test_another_users_failures_do_not_block_a_login(server: Server) -> None:
    """Another user's failures from the same address, up to their block, leave this login be."""
    for _ in range(3):
        server.throttle.failed("192.0.2.10", "student@example.test")
    server.connect().login()


def test_throttled_address_gets_bye(server: Server) -> None:
    """After failures for many users from one address, every login from it gets BYE."""
    for n in range(server.throttle.max_address_failures):
        server.throttle.failed("192.0.2.10", f"user{n}@example.test")
    client = server.connect()
    out = client.cmd(f"LOGIN {USER} {PASSWORD}")
    assert "* BYE" in out and client.closed


def test_commands_in_wrong_state_are_bad(server: Server) -> None:
    """SELECT before login and FETCH before SELECT are BAD; unknown commands are BAD."""
    client = server.connect()
    assert client.status("SELECT INBOX").startswith("BAD")
    client.login()
    assert client.status("FETCH 1 FLAGS").startswith("BAD")
    assert client.status("FROB").startswith("BAD")
    assert "* BAD" in client.send(b"\r\n").decode()


def test_id_namespace_enable_logout(server: Server) -> None:
    """ID, NAMESPACE and ENABLE answer; LOGOUT says BYE and closes."""
    client = server.connect()
    assert '* ID ("name" "mailsys"' in client.ok('ID ("name" "test" "version" "1")')
    client.login()
    assert '* NAMESPACE (("" ".")) NIL NIL' in client.ok("NAMESPACE")
    assert "* ENABLED" in client.ok("ENABLE CONDSTORE")
    out = client.cmd("LOGOUT")
    assert out.startswith("* BYE") and f"{client.tag} OK" in out and client.closed


# --- SELECT, FETCH, STORE ------------------------------------------------------------------------


def test_select_reports_counts_uids_and_flags(server: Server) -> None:
    """SELECT gives FLAGS, PERMANENTFLAGS, EXISTS, RECENT, UNSEEN, UIDVALIDITY, UIDNEXT."""
    for i in range(2):
        deliver(server.inbox, message(i))
    client = server.connect()
    client.login()
    out = client.select()
    assert "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded)" in out
    assert "PERMANENTFLAGS (" in out and "\\*)]" in out
    assert "* 2 EXISTS" in out and "* 2 RECENT" in out and "[UNSEEN 1]" in out
    assert re.search(r"\[UIDVALIDITY \d+\]", out) and "[UIDNEXT 3]" in out
    assert f"{client.tag} OK [READ-WRITE]" in out


def test_examine_is_read_only_and_select_of_missing_is_nonexistent(server: Server) -> None:
    """EXAMINE answers READ-ONLY and refuses STORE; SELECT of a missing mailbox is NONEXISTENT."""
    client = filled(server, 1)
    assert "[READ-ONLY]" in client.ok("EXAMINE INBOX")
    assert "NO [READ-ONLY]" in client.cmd("STORE 1 +FLAGS (\\Seen)")
    assert "NO [NONEXISTENT]" in client.cmd("SELECT Nowhere")
    assert client.session.state is State.AUTHENTICATED


def test_fetch_metadata_reads_no_message(server: Server) -> None:
    """FETCH of UID, FLAGS, size and date opens no message file once the sizes are known (a
    cold folder's are read by its first size FETCH, in one disk job)."""
    client = filled(server, 3)
    calls = server.pool.calls
    first = client.ok("FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE)")
    assert server.pool.calls == calls + 1  # the wire sizes of names without ,W=
    calls = server.pool.calls
    out = client.ok("FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE)")
    assert server.pool.calls == calls  # no disk work at all
    assert out.split("\r\n")[:3] == first.split("\r\n")[:3]
    assert out.count("FETCH (UID") == 3
    assert '* 1 FETCH (UID 1 FLAGS (\\Recent) RFC822.SIZE 80 INTERNALDATE "14-Nov-2023' in out


def test_body_sets_seen_and_peek_does_not(server: Server) -> None:
    """BODY[] sets \\Seen (reported with FLAGS); BODY.PEEK[] leaves flags alone."""
    client = filled(server, 2)
    out = client.ok("FETCH 1 BODY.PEEK[]")
    assert "FLAGS" not in out
    out = client.ok("FETCH 2 BODY[]")
    assert "FLAGS (\\Seen \\Recent)" in out
    names = os.listdir(server.inbox / "cur")
    assert sorted(SEEN in parse_name(n).flags for n in names) == [False, True]


def test_lf_message_is_sent_with_crlf_and_exact_sizes(server: Server) -> None:
    """A message stored with LF comes out with CRLF; RFC822.SIZE equals the literal size."""
    deliver(server.inbox, b"Subject: lf\n\nline one\nline \xe9\x00two\n")
    client = server.connect()
    client.login()
    client.select()
    out = client.send(b"f FETCH 1 (RFC822.SIZE BODY.PEEK[])\r\n")
    size = int(re.search(rb"RFC822.SIZE (\d+)", out).group(1))  # type: ignore[union-attr]
    literal = re.search(rb"BODY\[\] \{(\d+)\}\r\n", out)
    assert literal is not None and int(literal.group(1)) == size
    body = out[literal.end():literal.end() + size]
    assert body == b"Subject: lf\r\n\r\nline one\r\nline \xe9\x00two\r\n"


def test_fetch_sections_and_structure(server: Server) -> None:
    """HEADER.FIELDS, part numbers, MIME, partial fetches and BODYSTRUCTURE are answered."""
    data = (b"From: A <a@example.test>\r\nSubject: multi\r\nContent-Type: multipart/mixed; "
            b"boundary=b1\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nfirst\r\n--b1\r\n"
            b"Content-Type: text/html\r\n\r\n<p>second</p>\r\n--b1--\r\n")
    deliver(server.inbox, data)
    client = server.connect()
    client.login()
    client.select()
    out = client.ok("FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[2] "
                    "BODY.PEEK[1.MIME] BODY.PEEK[]<0.4> BODYSTRUCTURE ENVELOPE)")
    assert "BODY[HEADER.FIELDS (SUBJECT)] {18}\r\nSubject: multi\r\n\r\n" in out
    assert "BODY[2] {13}\r\n<p>second</p>" in out
    assert "BODY[1.MIME] {28}\r\nContent-Type: text/plain\r\n\r\n" in out
    assert "BODY[]<0> {4}\r\nFrom" in out
    assert '"mixed" ("boundary" "b1")' in out
    assert '((NIL NIL "a" "example.test"))' not in out  # the name is kept
    assert '(("A" NIL "a" "example.test"))' in out


def test_uid_fetch_always_includes_uid(server: Server) -> None:
    """UID FETCH reports UID even if not asked; UIDs beyond the last give the last for n:*."""
    client = filled(server, 2)
    out = client.ok("UID FETCH 5:* FLAGS")
    assert "* 2 FETCH (UID 2 FLAGS" in out
    assert "* 1 FETCH" not in out


def test_bad_sequence_numbers_are_bad(server: Server) -> None:
    """A message number past the end is BAD, as is a zero or garbage set."""
    client = filled(server, 2)
    assert client.status("FETCH 3 FLAGS").startswith("BAD")
    assert client.status("FETCH 0 FLAGS").startswith("BAD")
    assert client.status("FETCH 1 (FLAGS").startswith("BAD")
    client.ok("FETCH 2 FLAGS")


def test_store_add_remove_replace_and_silent(server: Server) -> None:
    """+FLAGS, -FLAGS and FLAGS change flags on disk; .SILENT sends no FETCH."""
    client = filled(server, 2)
    out = client.ok("STORE 1:2 +FLAGS (\\Flagged \\Seen)")
    assert "* 1 FETCH (FLAGS (\\Flagged \\Seen \\Recent))" in out
    out = client.ok("STORE 1 -FLAGS.SILENT (\\Seen)")
    assert "FETCH" not in out
    out = client.ok("UID STORE 2 FLAGS (\\Answered)")
    assert "* 2 FETCH (UID 2 FLAGS (\\Answered \\Recent))" in out
    flags = sorted("".join(sorted(parse_name(n).flags)) for n in
                   os.listdir(server.inbox / "cur"))
    assert flags == ["F", "R"]


def test_keywords_get_letters_and_survive(server: Server) -> None:
    """A new keyword gets a letter in the keyword file and is announced in FLAGS."""
    client = filled(server, 1)
    out = client.ok("STORE 1 +FLAGS ($Label1 Work)")
    assert "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded $Label1 Work)" in out
    assert "FLAGS ($Label1 Work \\Recent)" in out
    assert (server.inbox / KEYWORDS_NAME).read_text() == "0 $Label1\n1 Work\n"
    assert parse_name(os.listdir(server.inbox / "cur")[0]).flags == frozenset("ab")
    other = server.connect()
    other.login()
    assert "$Label1 Work" in other.select()
    assert "FLAGS ($Label1 Work)" in other.ok("FETCH 1 FLAGS")


def test_store_of_invalid_system_flag_is_bad(server: Server) -> None:
    """A \\Foo system flag cannot be stored."""
    client = filled(server, 1)
    assert client.status("STORE 1 +FLAGS (\\Foo)").startswith("BAD")


# --- SEARCH -------------------------------------------------------------------------------------


def test_search_subject_over_plain_headers(server: Server) -> None:
    """SEARCH SUBJECT over plain-ASCII headers finds the field's values, folded ones too."""
    deliver(server.inbox, b"From: x@example.test\r\nSubject: apple\r\n\r\nbody x\r\n")
    deliver(server.inbox, b"Subject: one\r\n two x\r\nTo: y@example.test\r\n\r\nbody\r\n")
    deliver(server.inbox, b"To: x@example.test\r\n\r\nno subject\r\n")
    deliver(server.inbox, b"Subject: Pear\r\nSubject: X-ray\r\n\r\nbody\r\n")
    client = server.connect()
    client.login()
    client.select()

    def search(keys: str) -> list[int]:
        out = client.ok(f"SEARCH {keys}")
        line = next(x for x in out.split("\r\n") if x.startswith("* SEARCH"))
        return [int(n) for n in line.split()[2:]]

    assert search("SUBJECT x") == [2, 4]  # folded value; second occurrence of the field
    assert search("SUBJECT \"one two\"") == []  # the fold's CRLF stays in the value
    assert search("SUBJECT PEAR") == [4]
    assert search("SUBJECT example") == []
    assert search("SUBJECT \"\"") == [1, 2, 4]


def test_search_keys(server: Server) -> None:
    """SEARCH combines flags, headers, bodies, sizes, sets, NOT and OR; UID SEARCH gives UIDs."""
    deliver(server.inbox, b"From: alice@example.test\r\nSubject: Hello there\r\n\r\nbody apple\r\n",
            mtime=1_700_000_000)
    deliver(server.inbox, b"From: bob@example.test\r\nSubject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\n"
            b"Date: Tue, 14 Nov 2023 10:00:00 +0000\r\n\r\nbody banana\r\n", mtime=1_700_100_000)
    deliver(server.inbox, b"From: carol@example.test\r\nSubject: big\r\n\r\n" + b"x" * 500,
            mtime=1_700_200_000)
    client = server.connect()
    client.login()
    client.select()
    client.ok("STORE 2 +FLAGS (\\Seen)")

    def search(keys: str) -> list[int]:
        out = client.ok(f"SEARCH {keys}")
        line = next(x for x in out.split("\r\n") if x.startswith("* SEARCH"))
        return [int(n) for n in line.split()[2:]]

    assert search("ALL") == [1, 2, 3]
    assert search("UNSEEN") == [1, 3]
    assert search("FROM bob") == [2]
    assert search("SUBJECT hello") == [1]
    assert search("SUBJECT zebra") == []  # in no header at all
    assert search("SUBJECT gr") == [2]  # only in the decoded encoded-word
    assert search("SUBJECT alice") == []  # in the header, but in another field
    assert search("SUBJECT BIG") == [3]  # case-insensitive, numbered past the misses
    assert search("CHARSET UTF-8 SUBJECT {5}\r\ngrüß".replace("{5}", "{6}")) == [2]
    assert search("BODY banana") == [2]
    assert search("TEXT carol") == [3]
    assert search("LARGER 300") == [3]
    assert search("NOT SEEN SMALLER 300") == [1]
    assert search("OR FROM alice FROM carol") == [1, 3]
    assert search("2:*") == [2, 3]
    assert search("UID 1,3") == [1, 3]
    assert search("SENTON 14-Nov-2023") == [2]
    assert search("SINCE 16-Nov-2023") == [2, 3]
    assert search("BEFORE 16-Nov-2023") == [1]
    assert search("HEADER Subject big") == [3]
    assert search("(SEEN FROM bob) NEW") == []
    out = client.ok("UID SEARCH FROM carol")
    assert "* SEARCH 3" in out
    assert "NO [BADCHARSET" in client.cmd("SEARCH CHARSET KOI8-R ALL")
    assert client.status("SEARCH FROB").startswith("BAD")


# --- EXPUNGE, COPY, MOVE, updates -------------------------------------------------------------


def test_expunge_reports_sequence_numbers_in_order(server: Server) -> None:
    """EXPUNGE of messages 2 and 4 of 5 says "4 EXPUNGE" then "2 EXPUNGE"."""
    client = filled(server, 5)
    client.ok("STORE 2,4 +FLAGS.SILENT (\\Deleted)")
    out = client.ok("EXPUNGE")
    assert out.index("* 4 EXPUNGE") < out.index("* 2 EXPUNGE")
    assert "FETCH (UID 1:* (UID)" not in out
    out = client.ok("FETCH 1:* (UID)")
    assert [int(x) for x in re.findall(r"UID (\d+)", out)] == [1, 3, 5]


def test_uid_expunge_only_expunges_the_given_uids(server: Server) -> None:
    """UID EXPUNGE (UIDPLUS) removes only deleted messages in its UID set."""
    client = filled(server, 3)
    client.ok("STORE 1:3 +FLAGS.SILENT (\\Deleted)")
    out = client.ok("UID EXPUNGE 2")
    assert "* 2 EXPUNGE" in out and "* 1 EXPUNGE" not in out


def test_copy_and_move_with_copyuid(server: Server) -> None:
    """COPY and MOVE answer COPYUID; MOVE expunges the source; a missing target is TRYCREATE."""
    client = filled(server, 3)
    client.ok("STORE 1 +FLAGS (\\Flagged Work)")
    out = client.ok("COPY 1:2 Trash")
    match = re.search(r"\[COPYUID (\d+) 1:2 1:2\]", out)
    assert match is not None
    out = client.ok("UID MOVE 3 Junk")
    assert re.search(r"\* OK \[COPYUID \d+ 3 1\]", out) and "* 3 EXPUNGE" in out
    assert "NO [TRYCREATE]" in client.cmd("COPY 1 Nowhere")
    # RFC 6851 §3.3: MOVE into the selected mailbox itself is a COPY and an EXPUNGE.
    out = client.ok("MOVE 1 INBOX")
    assert re.search(r"\* OK \[COPYUID \d+ \d+ \d+\]", out) and "* 1 EXPUNGE" in out
    client.ok("SELECT Trash")
    out = client.ok("FETCH 1 (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    # RFC 3501 §2.3.2: a copy is new to its mailbox, so the first session there sees \Recent.
    assert "FLAGS (\\Flagged Work \\Recent)" in out and "Subject: message 1" in out


def test_append_with_flags_date_and_continuation(server: Server) -> None:
    """APPEND waits with "+" for a synchronizing literal and answers APPENDUID."""
    client = server.connect()
    client.login()
    client.select()
    data = b"Subject: appended\r\n\r\nhello\r\n"
    out = client.send(b'a APPEND INBOX (\\Seen) "05-Jan-2024 10:00:00 +0100" {%d}\r\n'
                      % len(data))
    assert out.startswith(b"+ ")
    out = client.send(data + b"\r\n")
    assert re.search(rb"a OK \[APPENDUID \d+ 1\]", out)
    assert b"* 1 EXISTS" in out
    name = os.listdir(server.inbox / "cur")[0]
    assert parse_name(name).flags == {SEEN}
    assert (server.inbox / "cur" / name).read_bytes() == b"Subject: appended\n\nhello\n"
    assert os.stat(server.inbox / "cur" / name).st_mtime == parse_date_time(
        b"05-Jan-2024 10:00:00 +0100")
    out = client.send(b"b APPEND INBOX {%d+}\r\n" % len(data) + data + b"\r\n")
    assert re.search(rb"b OK \[APPENDUID \d+ 2\]", out)
    assert b"NO [TRYCREATE]" in client.send(b"c APPEND Nowhere {1+}\r\nx\r\n")


def test_too_big_literal_is_toobig_and_session_continues(tmp_path: Path) -> None:
    """A synchronizing or LITERAL+ literal over the limit is NO [TOOBIG]; the rest goes on."""
    server = Server(tmp_path, allow_plaintext_auth=True, max_literal_size=100)
    client = server.connect()
    client.login()
    out = client.send(b"a APPEND INBOX {101}\r\n")
    assert out == b"a NO [TOOBIG] Literal too large\r\n"
    out = client.send(b"b APPEND INBOX {200+}\r\n" + b"x" * 200 + b"\r\nc NOOP\r\n")
    assert out == b"b NO [TOOBIG] Literal too large\r\nc OK NOOP completed\r\n"


def test_overlong_command_is_bad_and_session_continues(tmp_path: Path) -> None:
    """A command line over the limit is BAD; the next command is served."""
    server = Server(tmp_path, allow_plaintext_auth=True, max_command_length=100)
    client = server.connect()
    out = client.send(b"a NOOP " + b"x" * 300 + b"\r\nb NOOP\r\n")
    assert out == b"a BAD Command line too long\r\nb OK NOOP completed\r\n"


def test_too_many_bad_commands_close_with_bye(tmp_path: Path) -> None:
    """After max_bad_commands BAD answers the server says BYE and closes."""
    server = Server(tmp_path, max_bad_commands=3)
    client = server.connect()
    out = client.send(b"a FROB\r\nb FROB\r\nc FROB\r\nd NOOP\r\n")
    assert out.endswith(b"* BYE Too many invalid commands\r\n") and client.closed


def test_other_sessions_changes_reported_at_noop_not_during_fetch(server: Server) -> None:
    """A second session's EXPUNGE and flag change reach the first at NOOP, not during FETCH."""
    first = filled(server, 3)
    second = selected(server)
    second.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
    second.ok("STORE 3 +FLAGS.SILENT (\\Flagged)")
    second.ok("EXPUNGE")
    out = first.ok("FETCH 1 FLAGS")
    assert "EXPUNGE" not in out
    out = first.ok("NOOP")
    assert "* 2 EXPUNGE" in out
    assert "* 2 FETCH (UID 3 FLAGS (\\Flagged \\Recent))" in out


def test_store_keeps_a_flag_another_session_set_meanwhile(server: Server) -> None:
    """+FLAGS adds to the flags the message has now, not to this session's older view of them."""
    first = filled(server, 1)
    second = selected(server)
    second.ok("STORE 1 +FLAGS.SILENT (\\Flagged)")
    out = first.ok("STORE 1 +FLAGS (\\Seen)")
    assert "* 1 FETCH (FLAGS (\\Flagged \\Seen \\Recent))" in out
    out = second.ok("NOOP")
    assert "FLAGS (\\Flagged \\Seen)" in out


def test_store_minus_keeps_a_flag_another_session_set_meanwhile(server: Server) -> None:
    """-FLAGS removes only what it names from the flags the message has now."""
    first = filled(server, 1)
    first.ok("STORE 1 +FLAGS.SILENT (\\Seen)")
    second = selected(server)
    second.ok("STORE 1 +FLAGS.SILENT (\\Answered)")
    out = first.ok("STORE 1 -FLAGS (\\Seen)")
    assert "* 1 FETCH (FLAGS (\\Answered \\Recent))" in out


def test_delivery_reported_to_idle_session(server: Server) -> None:
    """While idling, a delivery is announced at once with EXISTS; DONE ends IDLE with OK."""
    client = filled(server, 1)
    assert client.cmd("IDLE") == "+ idling\r\n"
    deliver(server.inbox, message(2))
    server.store.notify_delivered(USER)
    out = client.output().decode()
    assert "* 2 EXISTS" in out and "* 2 RECENT" in out
    assert client.send(b"DONE\r\n").decode() == f"{client.tag} OK IDLE terminated\r\n"


def test_close_expunges_silently_and_unselect_does_not(server: Server) -> None:
    """CLOSE removes \\Deleted messages without EXPUNGE responses; UNSELECT keeps them."""
    client = filled(server, 2)
    client.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    client.ok("UNSELECT")
    client.select()
    client.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    out = client.ok("CLOSE")
    assert "EXPUNGE" not in out and client.session.state is State.AUTHENTICATED
    assert len(os.listdir(server.inbox / "cur")) == 1


# --- mailboxes ---------------------------------------------------------------------------------


def test_list_special_use_children_and_status(server: Server) -> None:
    """LIST shows special-use and children attributes; LIST-STATUS adds STATUS lines."""
    client = server.connect()
    client.login()
    client.ok("CREATE Archive.2026")
    out = client.ok('LIST "" "*"')
    assert '* LIST (\\HasNoChildren) "." "INBOX"' in out
    assert '* LIST (\\HasChildren) "." "Archive"' in out
    assert '* LIST (\\HasNoChildren \\Sent) "." "Sent"' in out
    out = client.ok('LIST "" "%"')
    assert '"Archive.2026"' not in out
    assert '* LIST (\\Noselect) "." ""' in client.ok('LIST "" ""')
    out = client.ok('LIST (SPECIAL-USE) "" "*"')
    assert '"Trash"' in out and '"INBOX"' not in out
    out = client.ok('LIST "" "Archive*" RETURN (STATUS (MESSAGES UIDNEXT))')
    assert '* STATUS "Archive.2026" (MESSAGES 0 UIDNEXT 1)' in out


def test_create_delete_rename_and_subscriptions(server: Server) -> None:
    """CREATE makes parents, DELETE refuses a parent with children, RENAME moves children."""
    client = server.connect()
    client.login()
    client.ok("CREATE Projects.Alpha")
    assert "NO [ALREADYEXISTS]" in client.cmd("CREATE Projects")
    assert "NO [INUSE]" in client.cmd("DELETE Projects")
    client.ok("RENAME Projects Work")
    out = client.ok('LIST "" "Work*"')
    assert '"Work"' in out and '"Work.Alpha"' in out
    client.ok("DELETE Work.Alpha")
    assert "NO [NONEXISTENT]" in client.cmd("DELETE Work.Alpha")
    client.ok("UNSUBSCRIBE Junk")
    out = client.ok('LSUB "" "*"')
    assert '"INBOX"' in out and '"Junk"' not in out
    client.ok("SUBSCRIBE Junk")
    assert '"Junk"' in client.ok('LSUB "" "*"')
    assert "NO" in client.cmd("DELETE INBOX")


def test_international_names_use_modified_utf7(server: Server) -> None:
    """A mailbox created as "Entw&APw-rfe" is stored as "Entwürfe" and listed encoded."""
    client = server.connect()
    client.login()
    client.ok("CREATE Entw&APw-rfe")
    assert (server.inbox / ".Entwürfe").is_dir()
    assert '"Entw&APw-rfe"' in client.ok('LIST "" "*"')
    # Well-formed, but not modified UTF-7 (RFC 3501 §5.1.3): no mailbox can have the name.
    assert client.status("CREATE &Jjo").startswith("NO [CANNOT]")


def test_rename_inbox_moves_messages_and_keeps_inbox(server: Server) -> None:
    """RENAME INBOX moves its messages into the new folder and leaves the INBOX empty."""
    client = filled(server, 2)
    client.ok("UNSELECT")
    client.ok("RENAME INBOX Old")
    assert "* 0 EXISTS" in client.select()
    out = client.select("Old")
    assert "* 2 EXISTS" in out


def test_status_of_another_mailbox(server: Server) -> None:
    """STATUS counts messages, unseen and UIDNEXT of a mailbox."""
    client = server.connect()
    client.login()
    client.send(b"a APPEND Sent (\\Seen) {9+}\r\nSubject:\r\n\r\n")
    client.send(b"b APPEND Sent {9+}\r\nSubject:\r\n\r\n")
    out = client.ok("STATUS Sent (MESSAGES UNSEEN UIDNEXT)")
    assert '* STATUS "Sent" (MESSAGES 2 UNSEEN 1 UIDNEXT 3)' in out


# --- timeouts ------------------------------------------------------------------------------------


def test_autologout_after_thirty_minutes_idle(server: Server) -> None:
    """After login the session lives 30 minutes without input, then gets BYE and is closed."""
    client = server.connect()
    client.login()
    server.clock.advance(1799)
    assert not client.closed
    client.ok("NOOP")
    server.clock.advance(1799)
    assert not client.closed
    server.clock.advance(2)
    assert client.output().startswith(b"* BYE") and client.closed


def test_unauthenticated_connection_times_out_sooner(server: Server) -> None:
    """Before login the inactivity limit is three minutes."""
    client = server.connect()
    server.clock.advance(181)
    assert client.closed


def test_disconnect_while_selected_unsubscribes(server: Server) -> None:
    """A dropped session stops listening for changes of its folder."""
    client = filled(server, 1)
    client.lose()
    deliver(server.inbox, message(2))
    server.store.notify_delivered(USER)
    assert client.output() == b""


@pytest.mark.parametrize("login", [f"LOGIN {USER} wrong",
                                   "AUTHENTICATE PLAIN " + base64.b64encode(b"\0x\0y").decode()])
def test_leaving_during_the_delay_leaves_no_timer(server: Server, login: str) -> None:
    """A client that leaves while its failed login's answer is delayed leaves no timer behind."""
    client = server.connect()
    client.cmd(login)
    assert len(server.clock.getDelayedCalls()) == 2  # the idle timer and the delayed answer
    client.lose()
    assert server.clock.getDelayedCalls() == []


def test_line_too_long_ends_the_authenticate_exchange(server: Server) -> None:
    """An over-long line inside AUTHENTICATE ends it with BAD: the next line is a command, not
    credentials, and no failed login is counted."""
    client = server.connect()
    assert client.cmd("AUTHENTICATE PLAIN") == "+ \r\n"
    out = client.send(b"A" * 70000 + b"\r\n").decode()
    assert out == f"{client.tag} BAD Command line too long\r\n"
    assert client.status("NOOP") == "OK NOOP completed"
    assert len(server.throttle) == 0
    client.login()
