"""IMAP conformance rules found by Dovecot's imaptest and a hostile-input run, one test per rule,
over a StringTransport session (the scripted imaptest cases they come from are named)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailsys.imap.binary import decode_quoted_printable
from mailsys.imap.bodystructure import body_structure, envelope, parse_message
from mailsys.imap.parser import Command, ContinueLiteral, Framer, SpooledLiteral
from tests.unit.imap_support import Client, Server, filled, selected
from tests.unit.mailbox_support import deliver, message


@pytest.fixture
def server(tmp_path: Path) -> Server:
    return Server(tmp_path / "maildirs", allow_plaintext_auth=True)


def logged_in(server: Server) -> Client:
    client = server.connect()
    client.login()
    return client


def append(client: Client, folder: str, data: bytes, flags: str = "") -> str:
    """APPEND ``data`` with a non-synchronizing literal; the server's whole answer."""
    prefix = f"APPEND {folder} {flags + ' ' if flags else ''}".encode()
    return client.cmd(prefix + b"{%d+}\r\n" % len(data) + data)


# --- hostile input: bounded nesting, long names, large literals --------------------------------


@pytest.mark.parametrize("keys", [
    "(" * 500 + "ALL" + ")" * 500,
    "OR ALL " * 1000 + "ALL",
    "NOT " * 10000 + "ALL",
])
def test_deeply_nested_search_is_bad_not_an_internal_error(server: Server, keys: str) -> None:
    """SEARCH keys nested hundreds deep are a syntax error (BAD), never a RecursionError
    (RFC 3501 §6.4.4 sets no depth, §7.1.3 BAD is for input the server cannot parse)."""
    client = filled(server, 1)
    assert client.status(f"SEARCH {keys}").startswith("BAD ")
    assert client.status("SEARCH NOT NOT (OR SEEN (ALL))").startswith("OK")


def test_mailbox_name_too_long_for_the_store_is_no_limit(server: Server) -> None:
    """A name whose Maildir++ directory would pass 255 bytes is NO [LIMIT] (RFC 5530), for a
    long name and for a hierarchy 100 levels deep; nothing is created."""
    client = logged_in(server)
    assert client.status("CREATE " + "x" * 10_000).startswith("NO [LIMIT]")
    assert client.status("CREATE " + ".".join(["level"] * 100)).startswith("NO [LIMIT]")
    assert client.status("SELECT " + "y" * 300).startswith("NO [LIMIT]")
    assert not list(server.inbox.glob(".x*")) and not list(server.inbox.glob(".level*"))


def test_invalid_modified_utf7_name_is_no_and_tilde_is_an_atom(server: Server) -> None:
    """"~" not before "{" is an atom character, not a literal8 (RFC 3501 §9, RFC 3516 §4.4);
    a name that is not modified UTF-7 names no mailbox: NO, not BAD (RFC 3501 §5.1.3)."""
    client = logged_in(server)
    assert client.status('LIST "" ~foo').startswith("OK")
    assert client.status("SELECT ~foo").startswith("NO")
    assert client.status("SELECT !#$&'+,-.0123456789:;<=>?@^_`|[}").startswith("NO")
    assert client.status('LIST "" !#$&\'+,-.0123456789:;<=>?@^_`|[}%*').startswith("OK")


def test_framer_spools_a_large_literal_to_a_file() -> None:
    """A literal over the spool threshold goes to a temporary file as it arrives; the command's
    text holds none of it (the issue's 50 MB APPEND held in memory)."""
    framer = Framer(max_line=1000, max_literal=10_000, spool_threshold=100)
    body = b"x" * 500
    framer.feed(b"a APPEND INBOX {500}\r\n")
    assert framer.next_event() == ContinueLiteral(500)
    framer.feed(body[:200])
    assert framer.next_event() is None
    framer.feed(body[200:] + b"\r\n")
    event = framer.next_event()
    assert isinstance(event, Command)
    assert event.data == b"a APPEND INBOX {500}\r\n"
    (offset, spooled), = event.spooled.items()
    assert offset == len(event.data) and isinstance(spooled, SpooledLiteral)
    assert spooled.file.read() == body
    event.close()
    assert spooled.file.closed


def test_append_of_a_spooled_literal_stores_the_message(server: Server) -> None:
    """APPEND of a literal that was spooled to a file stores it whole, with the right
    RFC822.SIZE; another command with such a literal is BAD, and its file is closed."""
    client = logged_in(server)
    client.session._framer.spool_threshold = 64
    data = message(1, b"line\r\n" * 100)
    out = append(client, "INBOX", data)
    assert re.search(r"OK \[APPENDUID \d+ 1\]", out), out
    client.select()
    out = client.ok("FETCH 1 (RFC822.SIZE BODY.PEEK[])")
    assert f"RFC822.SIZE {len(data)}" in out and data.decode() in out
    out = client.cmd(b'LOGIN {100+}\r\n' + b"u" * 100 + b" pw")
    assert f"{client.tag} BAD" in out


# --- \Recent (RFC 3501 §2.3.2) -----------------------------------------------------------------


def test_recent_is_taken_by_the_first_read_write_select(server: Server) -> None:
    """Appended messages are \\Recent: EXAMINE and STATUS show them without taking them,
    the first SELECT takes them (RFC 3501 §2.3.2, §6.3.2, §6.3.10), later ones see none."""
    client = logged_in(server)
    client.ok("CREATE box")
    append(client, "box", message(1))
    append(client, "box", message(2))
    assert "* 2 RECENT" in client.ok("EXAMINE box")
    client.ok("CLOSE")
    assert "RECENT 2" in client.ok("STATUS box (MESSAGES RECENT)")
    out = client.ok("SELECT box")
    assert "* 2 RECENT" in out
    assert "FLAGS (\\Recent)" in client.ok("FETCH 1 FLAGS")
    assert "* SEARCH 1 2\r\n" in client.ok("SEARCH NEW")
    assert "* SEARCH\r\n" in client.ok("SEARCH OLD")
    client.ok("CLOSE")
    assert "RECENT 0" in client.ok("STATUS box (RECENT)")
    assert "* 0 RECENT" in client.ok("SELECT box")


def test_new_message_is_recent_in_exactly_one_session(server: Server) -> None:
    """A message arriving while two sessions have the mailbox selected is \\Recent in the one
    told of it first, never in both (RFC 3501 §2.3.2)."""
    first = filled(server, 1)
    second = selected(server)
    deliver(server.inbox, message(2))
    assert "* 2 RECENT" in first.ok("NOOP")  # message 1 from its SELECT, and message 2
    out = second.ok("NOOP")
    assert "* 2 EXISTS" in out and "* 0 RECENT" in out


# --- sections of message/rfc822 parts (RFC 3501 §6.4.5) ----------------------------------------

_INNER = (b"From: sub@domain.org\r\nSubject: submsg\r\nContent-Type: multipart/digest; "
          b'boundary="foo"\r\n\r\nprologue\r\n\r\n--foo \r\n\r\nFrom: m1@example.com\r\n'
          b"Subject: m1\r\n\r\nm1 body\r\n\r\n--foo \r\nX-Mime: m2 header\r\n\r\n"
          b"From: m2@example.com\r\nSubject: m2\r\n\r\nm2 body\r\n\r\n--foo--\r\n")
_OUTER = (b"From: user@domain.org\r\nMime-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n"
          + _INNER)


def test_sections_of_a_message_rfc822_message(server: Server) -> None:
    """For a message whose body is a message/rfc822, BODY[1] is the whole encapsulated message,
    1.HEADER/1.TEXT its header and body, 1.n its digest's parts, 1.n.MIME their MIME header
    (RFC 3501 §6.4.5; imaptest fetch-body-message-rfc822-mime)."""
    deliver(server.inbox, _OUTER)
    client = selected(server)

    def section(name: str) -> str:
        out = client.ok(f"FETCH 1 BODY.PEEK[{name}]")
        match = re.search(r"\{(\d+)\}\r\n", out)
        assert match is not None, out
        start = match.end()
        return out[start:start + int(match.group(1))]

    assert section("1") == _INNER.decode()
    assert section("1.HEADER").startswith("From: sub@domain.org") and section(
        "1.HEADER").endswith('boundary="foo"\r\n\r\n')
    assert section("1.TEXT").startswith("prologue")
    assert section("1.1") == "From: m1@example.com\r\nSubject: m1\r\n\r\nm1 body\r\n"
    assert section("1.1.MIME") == "\r\n"
    assert section("1.2.MIME") == "X-Mime: m2 header\r\n\r\n"
    assert section("1.2.HEADER") == "From: m2@example.com\r\nSubject: m2\r\n\r\n"
    assert section("1.2.TEXT") == "m2 body\r\n"


def test_sections_of_nested_message_rfc822(server: Server) -> None:
    """Two message/rfc822 levels: BODY[1.1] is the innermost message whole (RFC 3501 §6.4.5;
    imaptest fetch-body-message-rfc822-x2)."""
    innermost = b"From: sub@domain.org\r\nSubject: submsg\r\n\r\nHello world\r\n"
    middle = b"From: user2@domain.org\r\nContent-Type: message/rfc822\r\n\r\n" + innermost
    deliver(server.inbox, b"From: a@b.c\r\nContent-Type: message/rfc822\r\n\r\n" + middle)
    client = selected(server)
    out = client.ok("FETCH 1 (BODY.PEEK[1.1] BODY.PEEK[1.TEXT])")
    assert f"BODY[1.1] {{{len(innermost)}}}\r\n{innermost.decode()}" in out
    assert f"BODY[1.TEXT] {{{len(innermost)}}}\r\n{innermost.decode()}" in out


# --- BINARY of quoted-printable (RFC 3516 §4.2, RFC 2045 §6.7) ----------------------------------


def test_quoted_printable_decoding_follows_rfc_2045() -> None:
    """Soft line breaks join lines, trailing white space is padding, =XX is an octet and a
    stray "=" stays (RFC 2045 §6.7 rules 1, 3 and 5; imaptest fetch-binary-mime-qp)."""
    body = (b"hello  \r\nbar=\r\n\r\nfoo\t=\r\nbar\r\nfoo\t \t= \r\n=62\r\nfoo = \t\r\nbar\r\n"
            b"foo =\r\n=62\r\nfoo  \r\nbar=\r\n\r\nfoo_bar\r\n")
    decoded = decode_quoted_printable(body)
    assert decoded == (b"hello\r\nbar\r\nfoo\tbar\r\nfoo\t \tb\r\nfoo bar\r\nfoo b\r\nfoo\r\n"
                       b"bar\r\nfoo_bar\r\n")
    assert len(decoded) == 65
    assert decode_quoted_printable(b"a=3Db =ZZ") == b"a=b =ZZ"


def test_binary_fetch_decodes_quoted_printable(server: Server) -> None:
    """BINARY[1] and BINARY.SIZE[1] of a quoted-printable part are its decoded octets
    (RFC 3516 §4.2)."""
    deliver(server.inbox, b"From: a@b.c\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                          b"caf=C3=A9 =\r\nau lait\r\n")
    client = selected(server)
    out = client.ok("FETCH 1 (BINARY.SIZE[1] BINARY.PEEK[1])")
    assert "BINARY.SIZE[1] 15" in out and "café au lait\r\n" in out


# --- LIST-EXTENDED and LSUB (RFC 5258, RFC 3501 §6.3.9) ------------------------------------------


@pytest.mark.parametrize("command", [
    'LIST (IMAPTEST) "" ""',
    'LIST (RECURSIVEMATCH) "" ""',
    'LIST (RECURSIVEMATCH REMOTE) "" ""',
    'LIST "" "" RETURN (IMAPTEST)',
])
def test_list_extended_syntax_errors_are_bad(server: Server, command: str) -> None:
    """An unknown selection or return option, or RECURSIVEMATCH without an option it can
    modify, is BAD (RFC 5258 §3)."""
    assert logged_in(server).status(command).startswith("BAD ")


def subscriptions(server: Server) -> Client:
    client = logged_in(server)
    client.ok("UNSUBSCRIBE box")  # from now on only what is subscribed below is
    for name in ("box", "box.test", "box.test2.test", "box.test3.test3"):
        client.ok(f"CREATE {name}")
    for name in ("box.test", "box.test2.test", "box.test3.test3"):
        client.ok(f"SUBSCRIBE {name}")
    return client


def test_lsub_shows_unsubscribed_parents_as_noselect(server: Server) -> None:
    """LSUB with "%" lists the parent of a subscribed child that "%" does not reach, flagged
    \\Noselect (RFC 3501 §6.3.9)."""
    client = subscriptions(server)
    out = client.ok('LSUB "" box.%')
    assert '* LSUB () "." "box.test"\r\n' in out
    assert '* LSUB (\\Noselect) "." "box.test2"\r\n' in out
    assert '* LSUB (\\Noselect) "." "box.test3"\r\n' in out
    assert "box.test2.test" not in out


def test_recursivematch_reports_childinfo(server: Server) -> None:
    """LIST (SUBSCRIBED RECURSIVEMATCH) returns an unsubscribed parent of a subscribed child
    the pattern does not match, with CHILDINFO ("SUBSCRIBED") (RFC 5258 §3.5)."""
    client = subscriptions(server)
    out = client.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" box.test2% RETURN (CHILDREN)')
    assert '"." "box.test2" ("CHILDINFO" ("SUBSCRIBED"))\r\n' in out
    assert "\\Subscribed" not in out
    out = client.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" box*test3')
    assert "CHILDINFO" not in out and '"." "box.test3.test3"\r\n' in out


# --- MOVE, SEARCH FROM, UIDVALIDITY ---------------------------------------------------------------


def test_move_into_the_selected_mailbox(server: Server) -> None:
    """MOVE into the selected mailbox copies with COPYUID, then expunges the original and
    reports the copy (RFC 6851 §3.3; imaptest move)."""
    client = filled(server, 2)
    out = client.ok("MOVE 1 INBOX")
    assert re.search(r"\* OK \[COPYUID \d+ 1 3\]", out), out
    assert "* 1 EXPUNGE" in out and "* 2 EXISTS" in out
    assert "* 1 FETCH (UID 2)" in client.ok("FETCH 1:* UID") and "UID 3" in client.ok(
        "FETCH 2 UID")


def test_search_from_matches_addresses_in_every_form(server: Server) -> None:
    """FROM/TO match a whole address with a display name, comments inside it or in a group
    (RFC 3501 §6.4.4; imaptest search-addresses)."""
    headers = [
        b"From: user-from@domain.org\r\n",
        b"From: RealFrom <user-from@domain.org>\r\n",
        b"From: <user-from (comment)@ (comment) domain.org>\r\n",
        b"From: user-from@domain.org (RealFrom)\r\n",
        b"From: other@domain.org\r\nTo: groupname: groupuser1@domain.org, g2@domain.org;\r\n",
    ]
    for header in headers:
        deliver(server.inbox, header + b"\r\nbody\r\n")
    client = selected(server)
    assert "* SEARCH 1 2 3 4\r\n" in client.ok("SEARCH FROM user-from@domain.org")
    assert "* SEARCH 2 4\r\n" in client.ok("SEARCH FROM realfrom")
    assert "* SEARCH 5\r\n" in client.ok("SEARCH TO groupuser1@domain.org")
    assert "* SEARCH 5\r\n" in client.ok("SEARCH TO groupname")


def test_recreated_mailbox_gets_a_new_uidvalidity(server: Server) -> None:
    """A mailbox deleted and created again within the same second gets a greater UIDVALIDITY
    (RFC 3501 §2.3.1.1), so a client's cache of UID 1 is void."""
    client = logged_in(server)
    client.ok("CREATE box")
    append(client, "box", message(1))
    before = re.search(r"UIDVALIDITY (\d+)", client.ok("STATUS box (UIDVALIDITY)"))
    client.ok("DELETE box")
    client.ok("CREATE box")
    append(client, "box", message(2))
    after = re.search(r"UIDVALIDITY (\d+)", client.ok("STATUS box (UIDVALIDITY)"))
    assert before is not None and after is not None
    assert int(after.group(1)) > int(before.group(1))


# --- ENVELOPE and BODYSTRUCTURE as Dovecot gives them ---------------------------------------------


def test_text_part_without_charset_reports_us_ascii() -> None:
    """A text part whose Content-Type has no charset reports ("CHARSET" "us-ascii") after its
    other parameters (RFC 2045 §5.2 default, as Dovecot writes it)."""
    part = parse_message(b"Content-Type: text/plain; format=flowed\r\n\r\nhi\r\n")
    assert body_structure(part, extended=False).startswith(
        b'("text" "plain" ("format" "flowed" "CHARSET" "us-ascii") NIL NIL "7BIT" 4 1')


def test_envelope_joins_repeated_to_and_cc_fields() -> None:
    """Several To (and Cc) fields give one address list with all of them in ENVELOPE, as
    Dovecot does (RFC 5322 §3.6 allows one, real mail has more)."""
    part = parse_message(b"To: a@x.org\r\nCc: c@x.org\r\nTo: b@y.org\r\nCc: d@y.org\r\n\r\n")
    value = envelope(part)
    assert b'((NIL NIL "a" "x.org")(NIL NIL "b" "y.org"))' in value
    assert b'((NIL NIL "c" "x.org")(NIL NIL "d" "y.org"))' in value


def test_address_without_domain_has_missing_domain_host() -> None:
    """An address with no domain gets host MISSING_DOMAIN, not "" (Dovecot's spelling; NIL
    would mean a group, RFC 3501 §7.4.2)."""
    assert envelope(parse_message(b"From: localuser\r\n\r\n")).count(
        b'(NIL NIL "localuser" "MISSING_DOMAIN")') == 3  # From, Sender, Reply-To


def test_binary_append_is_stored_as_base64_and_decodes_exactly(server: Server) -> None:
    """A literal8 APPEND with a binary part is stored with that part in base64 (RFC 3516
    §4.4): BODY[1] carries no NUL, BINARY[1] gives back the exact octets, bare LFs included
    (imaptest append-binary)."""
    client = logged_in(server)
    content = b"\x00-\xe4\n\r\n\n"
    data = (b"From: user@domain.org\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: binary\r\n\r\n" + content)
    out = client.cmd(b"APPEND INBOX ~{%d+}\r\n" % len(data) + data)
    assert f"{client.tag} OK" in out, out
    client.select()
    body = client.ok("FETCH 1 BODY.PEEK[1]")
    assert "\x00" not in body and "AC3kCg0KCg==" in body
    raw = client.send(b"b FETCH 1 (BINARY.SIZE[1] BINARY.PEEK[1])\r\n")
    assert b"BINARY.SIZE[1] 7" in raw and b"BINARY[1] ~{7}\r\n" + content in raw


def test_large_literal_before_login_is_refused_not_spooled(server: Server) -> None:
    """Before login no literal over the spool threshold is taken (nothing legitimate needs
    one, and it would go to disk): it is refused as too big, with no continuation."""
    client = server.connect()
    client.session._framer.spool_threshold = 64
    out = client.send(b"a LOGIN {100}\r\n")
    assert out.startswith(b"a ") and b"+ " not in out, out
    client.login()
    out = client.send(b"b APPEND INBOX {100}\r\n")
    assert out.startswith(b"+ "), out


def test_rename_that_would_grow_a_child_name_too_long_is_no_limit(server: Server) -> None:
    """RENAME whose new prefix would make a child's directory name pass NAME_MAX is NO [LIMIT]
    from the store's own check, and nothing is renamed (RFC 5530 LIMIT)."""
    client = logged_in(server)
    child = "p." + "c" * 240
    client.ok(f"CREATE {child}")
    assert client.status("RENAME p " + "q" * 20).startswith("NO [LIMIT]")
    assert (server.inbox / ("." + child)).is_dir()
