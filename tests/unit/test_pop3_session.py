"""The POP3 session: states, commands, STLS, AUTH PLAIN, throttling, limits and UPDATE."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import classImplements

from mailsys.auth.portal import MailRealm
from mailsys.auth.throttle import LoginThrottle
from mailsys.mailbox.names import SEEN, parse_name
from mailsys.mailbox.store import MailboxStore
from mailsys.pop3.server import POP3ServerFactory, POP3Session, uidl_of
from mailsys.testing import make_config
from tests.unit.mailbox_support import ImmediatePool, deliver, message, result_of

USER = "demo@example.test"
PASSWORD = "secret"


class TLSRecordingTransport(StringTransport):
    """A StringTransport whose startTLS records the context and negotiates nothing."""

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)  # type: ignore[no-untyped-call]
        self.tls_contexts: list[object] = []

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:  # noqa: N802, N803
        self.tls_contexts.append(contextFactory)


classImplements(TLSRecordingTransport, ITLSTransport)  # type: ignore[misc]


class FakeTLS:
    """A TLS context source handing out a marker object."""

    context = object()

    def server_context(self) -> Any:
        return self.context


class Server:
    """A POP3 factory over a tmp Maildir root, a Clock and an in-memory password database."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.clock = Clock()
        self.pool = ImmediatePool()
        self.store = MailboxStore(root, self.pool)
        checker = InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode()})
        self.portal = Portal(MailRealm(), [checker])
        self.throttle = LoginThrottle(self.clock, max_failures=3)
        implicit_tls = bool(settings.pop("implicit_tls", False))
        config = make_config("mail.example.test", pop3=settings)
        self.factory = POP3ServerFactory(config, self.store, self.portal, self.throttle,
                                         self.clock, FakeTLS(), implicit_tls=implicit_tls)

    @property
    def inbox(self) -> Path:
        return self.store.mailbox_path(USER)

    def connect(self, client: str = "192.0.2.10") -> Client:
        return Client(self, client)


class Client:
    """One session over a recording transport."""

    def __init__(self, server: Server, host: str) -> None:
        peer = IPv4Address("TCP", host, 40000)
        self.transport = TLSRecordingTransport(peer)
        self.session: POP3Session = server.factory.buildProtocol(peer)
        self.session.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        self._seen = 0
        self.greeting = self.output()

    def output(self) -> bytes:
        value: bytes = self.transport.value()  # type: ignore[no-untyped-call]
        new, self._seen = value[self._seen:], len(value)
        return new

    def send(self, data: bytes) -> bytes:
        self.session.dataReceived(data)
        return self.output()

    def cmd(self, line: str) -> str:
        return self.send(line.encode() + b"\r\n").decode("utf-8", "replace")

    def login(self) -> str:
        self.cmd(f"USER {USER}")
        return self.cmd(f"PASS {PASSWORD}")

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        self.session.connectionLost(connectionDone)


@pytest.fixture
def server(tmp_path: Path) -> Server:
    return Server(tmp_path / "maildirs", allow_plaintext_auth=True)


@pytest.fixture
def strict(tmp_path: Path) -> Server:
    return Server(tmp_path / "maildirs")


def fill(server: Server, *bodies: bytes) -> None:
    for body in bodies:
        deliver(server.inbox, body)


def unstuff(response: bytes) -> bytes:
    """The message a client gets from a '+OK ...' multi-line response (RFC 1939 §3)."""
    head, _, rest = response.partition(b"\r\n")
    assert head.startswith(b"+OK"), head
    assert rest.endswith(b"\r\n.\r\n") or rest == b".\r\n"
    lines = rest[:-3].split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


# --- greeting, CAPA, STLS -----------------------------------------------------------------------


def test_greeting(server: Server) -> None:
    """The greeting is +OK with the host name, and no APOP timestamp."""
    client = server.connect()
    assert client.greeting == b"+OK mail.example.test POP3 server ready\r\n"


def test_capa_before_tls_hides_plaintext_login(strict: Server) -> None:
    """Without TLS and plaintext not allowed, CAPA offers STLS but neither USER nor SASL."""
    lines = strict.connect().cmd("CAPA").split("\r\n")
    assert lines[0].startswith("+OK") and lines[-2] == "."
    assert {"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "STLS"} <= set(lines)
    assert "USER" not in lines and "SASL PLAIN" not in lines


def test_capa_after_stls_offers_login_not_stls(strict: Server) -> None:
    """After STLS, CAPA offers USER and SASL PLAIN, and no longer STLS (RFC 2595 §4)."""
    client = strict.connect()
    assert client.cmd("STLS") == "+OK Begin TLS negotiation\r\n"
    assert client.transport.tls_contexts == [FakeTLS.context]
    lines = client.cmd("CAPA").split("\r\n")
    assert "USER" in lines and "SASL PLAIN" in lines and "STLS" not in lines


def test_plaintext_login_refused_before_tls(strict: Server) -> None:
    """USER and AUTH before TLS are refused with [AUTH] unless the config allows them."""
    client = strict.connect()
    assert client.cmd(f"USER {USER}").startswith("-ERR [AUTH] ")
    assert client.cmd("AUTH PLAIN").startswith("-ERR [AUTH] ")
    client.cmd("STLS")
    assert client.login().startswith("+OK Logged in")


def test_pipelined_plaintext_after_stls_is_discarded(strict: Server) -> None:
    """Bytes pipelined after STLS in the same segment are dropped, never executed in TLS."""
    client = strict.connect()
    reply = client.send(b"STLS\r\nUSER " + USER.encode() + b"\r\nPASS secret\r\n")
    assert reply == b"+OK Begin TLS negotiation\r\n"
    assert client.cmd("PASS secret").startswith("-ERR Send USER first")


def test_stls_twice_and_in_transaction(strict: Server) -> None:
    """STLS is refused once TLS is on, and outside the AUTHORIZATION state."""
    client = strict.connect()
    client.cmd("STLS")
    assert client.cmd("STLS").startswith("-ERR TLS is already active")
    client.login()
    assert client.cmd("STLS").startswith("-ERR")


def test_implicit_tls_listener_is_secure(tmp_path: Path) -> None:
    """On a 995-style listener login works at once and STLS is not offered."""
    server = Server(tmp_path, implicit_tls=True)
    client = server.connect()
    assert "STLS" not in client.cmd("CAPA").split("\r\n")
    assert client.login().startswith("+OK")


# --- authentication -----------------------------------------------------------------------------


def test_user_pass_login(server: Server) -> None:
    """USER then PASS logs in and reports the maildrop."""
    fill(server, message(1), message(2))
    client = server.connect()
    assert client.cmd(f"USER {USER}") == "+OK Send PASS\r\n"
    reply = client.cmd(f"PASS {PASSWORD}")
    assert reply.startswith("+OK Logged in, 2 messages (")


def test_pass_without_user(server: Server) -> None:
    """PASS without USER is an error."""
    assert server.connect().cmd("PASS x").startswith("-ERR")


def test_wrong_password_answered_after_delay(server: Server) -> None:
    """A wrong password is answered -ERR [AUTH] only after the throttle's delay."""
    client = server.connect()
    client.cmd(f"USER {USER}")
    assert client.cmd("PASS wrong") == ""
    server.clock.advance(0.99)
    assert client.output() == b""
    server.clock.advance(0.01)
    assert client.output() == b"-ERR [AUTH] Authentication failed\r\n"


def test_unknown_user_costs_the_same(server: Server) -> None:
    """An unknown user gets the same delay and answer as a wrong password."""
    client = server.connect()
    client.cmd("USER nobody@example.test")
    assert client.cmd("PASS secret") == ""
    server.clock.advance(1.0)
    assert client.output() == b"-ERR [AUTH] Authentication failed\r\n"
    # counted like any failure: as a wrong password for a user that exists would be
    assert server.throttle.delay_for("192.0.2.10", "nobody@example.test") == 1.0
    client = server.connect()
    client.cmd(f"USER {USER}")
    client.cmd("PASS wrong")
    server.clock.advance(1.0)
    assert client.output() == b"-ERR [AUTH] Authentication failed\r\n"
    assert server.throttle.delay_for("192.0.2.10", USER) == 1.0


def test_commands_wait_behind_a_delayed_failure(server: Server) -> None:
    """Commands pipelined behind a failing PASS are answered after it, in order."""
    client = server.connect()
    assert client.send(f"USER {USER}\r\nPASS bad\r\nNOOP\r\n".encode()) == b"+OK Send PASS\r\n"
    server.clock.advance(1.0)
    assert client.output() == (b"-ERR [AUTH] Authentication failed\r\n"
                               b"-ERR Command not valid in this state\r\n")


def test_throttled_user_is_disconnected(server: Server) -> None:
    """After too many failures a user gets -ERR [SYS/TEMP] at that address and is disconnected;
    the user still logs in from another address."""
    for attempt in range(3):
        client = server.connect()
        client.cmd(f"USER {USER}")
        client.cmd("PASS wrong")
        server.clock.advance(60)
        reply = client.output()
        if attempt < 2:
            assert reply == b"-ERR [AUTH] Authentication failed\r\n"
    assert reply.startswith(b"-ERR [SYS/TEMP] Too many failed logins")
    assert client.closed
    client = server.connect()
    client.cmd(f"USER {USER}")
    assert client.cmd(f"PASS {PASSWORD}").startswith("-ERR [SYS/TEMP]")
    assert client.closed
    other = server.connect("192.0.2.99")
    assert other.login().startswith("+OK")


def test_success_resets_the_throttle(server: Server) -> None:
    """A successful login clears the user's earlier failures at that address."""
    client = server.connect()
    client.cmd(f"USER {USER}")
    client.cmd("PASS wrong")
    server.clock.advance(1)
    client.output()
    assert server.throttle.delay_for("192.0.2.10", USER) == 1.0
    assert client.login().startswith("+OK")
    assert server.throttle.delay_for("192.0.2.10", USER) == 0.0


def test_another_users_failures_do_not_block_a_login(server: Server) -> None:
    """A user blocked at an address does not block another user's login from it."""
    for _ in range(server.throttle.max_failures):
        server.throttle.failed("192.0.2.10", "student@example.test")
    assert server.connect().login().startswith("+OK")


def test_throttled_address_is_disconnected(server: Server) -> None:
    """After failures for many users from one address, every login from it is refused."""
    for n in range(server.throttle.max_address_failures):
        server.throttle.failed("192.0.2.10", f"user{n}@example.test")
    client = server.connect()
    client.cmd(f"USER {USER}")
    assert client.cmd(f"PASS {PASSWORD}").startswith("-ERR [SYS/TEMP]")
    assert client.closed


def plain(authzid: str, user: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def test_auth_plain_initial_response(server: Server) -> None:
    """AUTH PLAIN with an initial response logs in (RFC 5034)."""
    assert server.connect().cmd(f"AUTH PLAIN {plain('', USER, PASSWORD)}").startswith(
        "+OK Logged in")


def test_auth_plain_continuation(server: Server) -> None:
    """AUTH PLAIN alone gets "+ " and the next line is the response."""
    client = server.connect()
    assert client.cmd("AUTH PLAIN") == "+ \r\n"
    assert client.cmd(plain(USER, USER, PASSWORD)).startswith("+OK Logged in")


def test_auth_cancelled(server: Server) -> None:
    """A "*" response cancels the exchange with -ERR (RFC 5034 §4)."""
    client = server.connect()
    client.cmd("AUTH PLAIN")
    assert client.cmd("*").startswith("-ERR Authentication cancelled")
    assert client.login().startswith("+OK")


def test_auth_malformed_and_unknown_mechanism(server: Server) -> None:
    """Bad base64 and unknown mechanisms are refused; AUTH alone lists PLAIN."""
    client = server.connect()
    assert client.cmd("AUTH PLAIN !!!").startswith("-ERR Malformed")
    assert client.cmd("AUTH CRAM-MD5").startswith("-ERR Unsupported")
    assert client.cmd("AUTH") == "+OK\r\nPLAIN\r\n.\r\n"


def test_auth_for_another_user_fails(server: Server) -> None:
    """An authorization identity other than the user is a failed login."""
    client = server.connect()
    assert client.cmd(f"AUTH PLAIN {plain('boss@example.test', USER, PASSWORD)}") == ""
    server.clock.advance(1)
    assert client.output().startswith(b"-ERR [AUTH]")


def test_mailbox_in_use(server: Server) -> None:
    """A second POP3 session on a locked mailbox gets -ERR [IN-USE] (RFC 2449 §8.1.2)."""
    first = server.connect()
    first.login()
    second = server.connect("192.0.2.11")
    assert second.login().startswith("-ERR [IN-USE] ")
    first.cmd("QUIT")
    first.lose()
    assert second.login().startswith("+OK")


# --- transaction ------------------------------------------------------------------------------


def test_stat_list_uidl(server: Server) -> None:
    """STAT, LIST and UIDL report wire sizes and stable unique ids."""
    fill(server, message(1), b"Subject: lf\n\nbody\n")
    client = server.connect()
    client.login()
    infos = client.session._view.messages  # type: ignore[union-attr]
    sizes = [len(message(1)), len(b"Subject: lf\n\nbody\n") + 3]
    assert client.cmd("STAT") == f"+OK 2 {sum(sizes)}\r\n"
    assert client.cmd("LIST") == f"+OK 2 messages\r\n1 {sizes[0]}\r\n2 {sizes[1]}\r\n.\r\n"
    assert client.cmd("LIST 2") == f"+OK 2 {sizes[1]}\r\n"
    assert client.cmd("UIDL") == (f"+OK\r\n1 {uidl_of(infos[0].key)}\r\n"
                                  f"2 {uidl_of(infos[1].key)}\r\n.\r\n")
    assert client.cmd("UIDL 1") == f"+OK 1 {uidl_of(infos[0].key)}\r\n"


@pytest.mark.parametrize("argument", ["0", "3", "x", "-1", "", "99999999999"])
def test_bad_message_numbers(server: Server, argument: str) -> None:
    """Message numbers out of range or malformed are -ERR."""
    fill(server, message(1), message(2))
    client = server.connect()
    client.login()
    assert client.cmd(f"RETR {argument}").startswith("-ERR")


def test_uidl_is_valid_and_stable(tmp_path: Path) -> None:
    """Unique ids are 1-70 printable characters and do not depend on flags (RFC 1939 §7)."""
    assert uidl_of("1700.M1.host") == "1700.M1.host"
    long = uidl_of("x" * 71)
    assert len(long) == 32 and long == uidl_of("x" * 71)
    assert uidl_of("a b") != "a b"


def test_retr_sends_stuffed_message_and_lists_wire_size(server: Server) -> None:
    """RETR sends the message dot-stuffed; the client gets back exactly LIST's size."""
    body = b".starts with a dot\r\n..two\r\n.\r\nend\r\n"
    fill(server, message(1, body))
    client = server.connect()
    client.login()
    size = int(client.cmd("LIST 1").split()[2])
    response = client.cmd("RETR 1").encode()
    assert response.startswith(f"+OK {size} octets\r\n".encode())
    assert unstuff(response) == message(1, body)
    assert len(unstuff(response)) == size


def test_retr_dot_line_at_16384(server: Server) -> None:
    """A "." line at byte 16384 is stuffed (twisted.mail's POP3 got this wrong)."""
    header = b"Subject: dots\r\n\r\n"
    filler = b"y" * (16384 - len(header) - 2) + b"\r\n"
    data = header + filler + b".\r\nafter\r\n"
    assert data.index(b"\r\n.\r\n") + 2 == 16384
    fill(server, data)
    client = server.connect()
    client.login()
    response = client.cmd("RETR 1").encode()
    assert unstuff(response) == data


def test_large_message_streamed_with_stuffing(server: Server) -> None:
    """A large message is streamed by a producer; dots at every chunk boundary are stuffed."""
    lines = []
    size = 0
    while size < 600_000:
        line = b".\r\n" if size % 65536 > 65500 else b"z" * 70 + b"\r\n"
        lines.append(line)
        size += len(line)
    data = b"Subject: big\r\n\r\n" + b"".join(lines) + b".edge\r\n"
    fill(server, data)
    client = server.connect()
    client.login()
    response = client.cmd("RETR 1").encode()
    assert unstuff(response) == data
    assert client.transport.producer is None  # unregistered when done
    assert client.cmd("NOOP") == "+OK\r\n"


def test_large_message_waits_while_paused(server: Server) -> None:
    """While the transport pauses the stream, nothing more is read or written."""
    data = b"Subject: big\r\n\r\n" + b"w" * 300_000 + b"\r\n"
    fill(server, data)
    client = server.connect()
    client.login()
    client.transport.write = _pausing_write(client)  # type: ignore[method-assign]
    written = client.send(b"RETR 1\r\nNOOP\r\n")
    assert 0 < len(written) < len(data)
    producer = client.transport.producer
    assert producer is not None
    while client.transport.producer is not None:
        producer.resumeProducing()
    response = written + client.output()
    assert response.endswith(b"\r\n.\r\n+OK\r\n")
    assert unstuff(response[:-5]) == data


def _pausing_write(client: Client) -> Any:
    original: Any = StringTransport.write

    def write(data: bytes) -> None:
        original(client.transport, data)
        producer = client.transport.producer
        if producer is not None:
            producer.pauseProducing()

    return write


def test_top(server: Server) -> None:
    """TOP sends the header, the blank line and n body lines, dot-stuffed."""
    fill(server, message(1, b"one\r\n.two\r\nthree\r\n"))
    client = server.connect()
    client.login()
    head = message(1, b"")
    assert unstuff(client.cmd("TOP 1 0").encode()) == head
    assert unstuff(client.cmd("TOP 1 2").encode()) == head + b"one\r\n.two\r\n"
    assert unstuff(client.cmd("TOP 1 99").encode()) == message(1, b"one\r\n.two\r\nthree\r\n")
    assert client.cmd("TOP 1").startswith("-ERR")


def test_dele_rset_and_deleted_messages(server: Server) -> None:
    """DELE marks; marked messages vanish from STAT/LIST and are refused; RSET unmarks."""
    fill(server, message(1), message(2))
    client = server.connect()
    client.login()
    assert client.cmd("DELE 1") == "+OK Message 1 deleted\r\n"
    assert client.cmd("DELE 1").startswith("-ERR")
    assert client.cmd("RETR 1").startswith("-ERR")
    assert client.cmd("STAT").startswith("+OK 1 ")
    assert client.cmd("LIST").startswith("+OK 1 messages\r\n2 ")
    assert client.cmd("RSET") == "+OK\r\n"
    assert client.cmd("STAT").startswith("+OK 2 ")


def test_quit_applies_deletions_and_marks_seen(server: Server) -> None:
    """QUIT deletes marked messages and marks retrieved ones seen (UPDATE state)."""
    fill(server, message(1), message(2), message(3))
    client = server.connect()
    client.login()
    client.cmd("RETR 2")
    client.cmd("DELE 1")
    client.cmd("TOP 3 0")
    assert client.cmd("QUIT") == "+OK Bye\r\n"
    assert client.closed
    names = sorted(os.listdir(server.inbox / "cur"))
    assert len(names) == 2
    flags = {parse_name(name).uid: parse_name(name).flags for name in names}
    assert flags == {2: frozenset({SEEN}), 3: frozenset()}


def test_seen_marks_at_quit_are_announced_to_other_sessions(server: Server) -> None:
    """IMAP sessions on the mailbox are told to look again once QUIT has marked messages seen."""
    fill(server, message(1))
    calls: list[int] = []
    server.store.subscribe(USER, "INBOX", lambda: calls.append(1))
    client = server.connect()
    client.login()
    client.cmd("RETR 1")
    client.cmd("QUIT")
    assert calls


def test_dropped_connection_deletes_nothing(server: Server) -> None:
    """Without QUIT nothing is deleted and the lock is released."""
    fill(server, message(1))
    client = server.connect()
    client.login()
    client.cmd("DELE 1")
    client.lose()
    assert len(os.listdir(server.inbox / "cur")) == 1
    assert server.connect().login().startswith("+OK Logged in, 1 messages")


def test_transaction_commands_need_login(server: Server) -> None:
    """STAT, LIST, RETR... before login are refused."""
    client = server.connect()
    for command in ("STAT", "LIST", "RETR 1", "DELE 1", "UIDL", "TOP 1 1", "RSET", "NOOP"):
        assert client.cmd(command) == "-ERR Command not valid in this state\r\n"


def test_quit_in_authorization(server: Server) -> None:
    """QUIT before login just says goodbye."""
    client = server.connect()
    assert client.cmd("QUIT") == "+OK Bye\r\n"
    assert client.closed


def test_pipelined_commands_answered_in_order(server: Server) -> None:
    """Commands sent together are answered in order (RFC 2449 PIPELINING)."""
    fill(server, message(1))
    client = server.connect()
    replies = client.send(f"USER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\nNOOP\r\n".encode())
    lines = replies.split(b"\r\n")
    assert lines[0].startswith(b"+OK Send") and lines[1].startswith(b"+OK Logged")
    assert lines[2].startswith(b"+OK 1 ") and lines[3] == b"+OK"


def test_commands_are_case_insensitive_and_lf_tolerated(server: Server) -> None:
    """Keywords are case-insensitive; a line ending in bare LF still works."""
    assert server.connect().send(b"noop\n") == b"-ERR Command not valid in this state\r\n"
    assert server.connect().send(b"capa\r\n").startswith(b"+OK")


# --- limits and errors --------------------------------------------------------------------------


def test_idle_timeout_closes_silently_without_update(server: Server) -> None:
    """After the idle timeout the connection closes, with no answer and no deletion."""
    fill(server, message(1))
    client = server.connect()
    client.login()
    client.cmd("DELE 1")
    server.clock.advance(599)
    assert not client.closed
    client.cmd("NOOP")
    server.clock.advance(599)
    assert not client.closed
    server.clock.advance(1)
    assert client.closed and client.output() == b""
    client.lose()
    assert len(os.listdir(server.inbox / "cur")) == 1


def test_too_many_bad_commands(tmp_path: Path) -> None:
    """After max_bad_commands errors the session says so and closes."""
    server = Server(tmp_path, max_bad_commands=3)
    client = server.connect()
    client.cmd("FOO")
    client.cmd("BAR")
    assert client.cmd("BAZ") == ("-ERR Unknown command\r\n"
                                 "-ERR Too many errors, closing connection\r\n")
    assert client.closed


def test_long_command_line(tmp_path: Path) -> None:
    """A line over max_command_length is refused once, and the session goes on."""
    server = Server(tmp_path, max_command_length=100, allow_plaintext_auth=True)
    client = server.connect()
    assert client.send(b"NOOP " + b"x" * 200) == b""
    assert client.send(b"x" * 50 + b"\r\n") == b"-ERR Command line too long\r\n"
    assert client.cmd("NOOP " + "y" * 120) == "-ERR Command line too long\r\n"
    assert client.login().startswith("+OK")


def test_unexpected_exception_gives_internal_error(server: Server,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception is logged, answered "-ERR ... Internal error" and closes."""
    client = server.connect()
    client.login()

    def broken(argument: bytes) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setitem(client.session._commands, b"STAT", broken)
    reply = client.cmd("STAT")
    assert reply == "-ERR [SYS/TEMP] Internal error\r\n"
    assert "boom" not in reply and client.closed


def test_failed_disk_read_gives_internal_error(server: Server) -> None:
    """A disk error during RETR becomes -ERR internal error and a clean close."""
    fill(server, message(1))
    client = server.connect()
    client.login()
    for name in os.listdir(server.inbox / "cur"):
        os.chmod(server.inbox / "cur" / name, 0)
    if os.geteuid() == 0:  # root reads anything: break the file another way
        for name in os.listdir(server.inbox / "cur"):
            path = server.inbox / "cur" / name
            path.unlink()
            path.mkdir()
    assert client.cmd("RETR 1") == "-ERR [SYS/TEMP] Internal error\r\n"
    assert client.closed


def test_message_deleted_by_another_session(server: Server) -> None:
    """A message another session removed is -ERR [SYS/PERM], and the session goes on."""
    fill(server, message(1))
    client = server.connect()
    client.login()
    for name in os.listdir(server.inbox / "cur"):
        os.unlink(server.inbox / "cur" / name)
    assert client.cmd("RETR 1").startswith("-ERR [SYS/PERM]")
    assert client.cmd("NOOP") == "+OK\r\n"


class QueuedPool:
    """A disk pool whose work waits until the test runs it (to see the reactor side wait)."""

    def __init__(self) -> None:
        self.queue: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def run(self, func: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((func, args, d))
        return d

    def drain(self) -> None:
        while self.queue:
            func, args, d = self.queue.pop(0)
            try:
                result = func(*args)
            except Exception as exc:
                d.errback(exc)
            else:
                d.callback(result)


def test_read_ahead_in_order_and_out_of_order(server: Server) -> None:
    """RETRs in order are served from the read-ahead; an out-of-order one still gets its own."""
    bodies = [message(i, b"." * i + b"\r\n") for i in range(6)]
    fill(server, *bodies)
    client = server.connect()
    client.login()
    pool = QueuedPool()
    server.store.pool = pool  # type: ignore[assignment]
    assert client.cmd("RETR 1") == ""  # waits for the batch read
    pool.drain()
    assert unstuff(client.output()) == bodies[0]
    assert unstuff(client.cmd("RETR 2").encode()) == bodies[1]  # from memory, no wait
    assert pool.queue == []
    assert unstuff(client.cmd("RETR 5").encode()) == bodies[4]
    client.cmd("DELE 6")
    assert client.cmd("RETR 1") == ""  # behind what was read ahead: read again
    pool.drain()
    assert unstuff(client.output()) == bodies[0]
    assert client.cmd("RETR 6").startswith("-ERR")


def test_read_ahead_while_batch_pending(server: Server) -> None:
    """A message outside the batch in flight is read on its own, not after the batch."""
    big = message(1, b"b" * 300_000 + b"\r\n")  # large: ends the batch, streamed when asked
    fill(server, message(0), big, message(2))
    client = server.connect()
    client.login()
    pool = QueuedPool()
    server.store.pool = pool  # type: ignore[assignment]
    client.cmd("RETR 1")
    assert len(pool.queue) == 1  # the batch: message 1 only
    ahead = client.session._ahead
    assert ahead is not None
    later = ahead.take(3)
    assert isinstance(later, Deferred) and len(pool.queue) == 2
    pool.drain()
    assert unstuff(client.output()) == message(0)
    assert unstuff(b"+OK\r\n" + result_of(later)) == message(2)


@pytest.mark.parametrize("login", [f"USER {USER}\r\nPASS wrong\r\n",
                                   "AUTH PLAIN " + base64.b64encode(b"\0x\0y").decode() + "\r\n"])
def test_leaving_during_the_delay_leaves_no_timer(server: Server, login: str) -> None:
    """A client that leaves while its failed login's answer is delayed leaves no timer behind."""
    client = server.connect()
    client.send(login.encode())
    assert len(server.clock.getDelayedCalls()) == 2  # the idle timer and the delayed answer
    client.lose()
    assert server.clock.getDelayedCalls() == []


@pytest.mark.parametrize("bad", [b"A" * 5000 + b"\r\n", b"A" * 3000, b"B" * 2049 + b"\r\n"])
def test_line_too_long_ends_the_auth_exchange(server: Server, bad: bytes) -> None:
    """An over-long line inside AUTH PLAIN ends the exchange: the next line is a command, not
    credentials, and no failed login is counted."""
    client = server.connect()
    assert client.cmd("AUTH PLAIN") == "+ \r\n"
    out = client.send(bad)
    if not bad.endswith(b"\n"):
        out += client.send(b"\r\n")
    assert out == b"-ERR Command line too long\r\n"
    assert client.cmd("NOOP") == "-ERR Command not valid in this state\r\n"
    assert len(server.throttle) == 0
    assert client.login().startswith("+OK")
