"""Connection limits of the POP3 and IMAP listeners (SMTP's are in test_smtp_session.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailsys.config import Config, load
from mailsys.connlimit import ConnectionCounter, Crowding
from mailsys.imap.session import IMAPServerFactory
from mailsys.pop3.server import POP3ServerFactory
from mailsys.retrieval import mailbox_listeners
from tests.unit import imap_support
from tests.unit.test_pop3_session import Server as POP3Server


def test_counter_counts_in_total_and_per_address() -> None:
    """The counter refuses past either limit and forgets released connections."""
    counter = ConnectionCounter(max_total=3, max_per_client=2)
    assert counter.admit("a") is None and counter.admit("a") is None
    assert counter.admit("a") is Crowding.CLIENT
    assert counter.admit("b") is None
    assert counter.admit("c") is Crowding.TOTAL
    counter.release("a")
    assert counter.admit("c") is None
    counter.release("a")
    assert counter.by_client == {"b": 1, "c": 1} and counter.total == 2


def test_pop3_refuses_past_the_per_client_limit(tmp_path: Path) -> None:
    """A POP3 connection over the per-address limit gets -ERR [SYS/TEMP] and is closed."""
    server = POP3Server(tmp_path, max_connections_per_client=2)
    first = server.connect("192.0.2.1")
    server.connect("192.0.2.1")
    third = server.connect("192.0.2.1")
    assert third.greeting == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    assert third.closed
    assert server.connect("192.0.2.2").greeting.startswith(b"+OK ")
    first.lose()
    assert server.connect("192.0.2.1").greeting.startswith(b"+OK ")


def test_pop3_refuses_past_the_total_limit(tmp_path: Path) -> None:
    """Past max_connections every address is refused until a session ends."""
    server = POP3Server(tmp_path, max_connections=2)
    first = server.connect("192.0.2.1")
    server.connect("192.0.2.2")
    assert server.connect("192.0.2.3").greeting.startswith(b"-ERR [SYS/TEMP]")
    first.lose()
    assert server.connect("192.0.2.3").greeting.startswith(b"+OK ")


def test_refused_pop3_connection_ignores_input_and_frees_nothing(tmp_path: Path) -> None:
    """A refused POP3 connection runs no command, and its end does not free another's place."""
    server = POP3Server(tmp_path, max_connections=1)
    server.connect("192.0.2.1")
    refused = server.connect("192.0.2.2")
    assert refused.send(b"USER demo@example.test\r\n") == b""
    refused.lose()
    refused.lose()
    assert server.factory.connections.total == 1
    assert server.connect("192.0.2.3").greeting.startswith(b"-ERR [SYS/TEMP]")


def test_imap_refuses_past_the_per_client_limit(tmp_path: Path) -> None:
    """An IMAP connection over the per-address limit gets BYE [UNAVAILABLE] and is closed."""
    server = imap_support.Server(tmp_path, max_connections_per_client=1)
    first = server.connect("192.0.2.1")
    refused = server.connect("192.0.2.1")
    assert refused.greeting == b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
    assert refused.transport.disconnecting
    assert refused.cmd("LOGIN demo@example.test secret") == ""
    refused.session.connectionLost()
    assert server.factory.connections.total == 1
    first.session.connectionLost()
    assert server.connect("192.0.2.1").greeting.startswith(b"* OK ")


def test_imap_refuses_past_the_total_limit(tmp_path: Path) -> None:
    """Past max_connections every address is refused."""
    server = imap_support.Server(tmp_path, max_connections=1)
    server.connect("192.0.2.1")
    assert server.connect("192.0.2.2").greeting.startswith(b"* BYE [UNAVAILABLE]")


@pytest.fixture
def two_listener_config(tmp_path: Path) -> Config:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    path = tmp_path / "mailsys.toml"
    path.write_text(f"""
[storage]
spool = "{tmp_path}/spool"
maildirs = "{tmp_path}/maildirs"
users = "{tmp_path}/users"
[tls]
certificate = "{cert}"
key = "{key}"
[pop3]
listen = ["tcp:0"]
listen_tls = ["tcp:0"]
max_connections = 7
max_connections_per_client = 3
[imap]
listen = ["tcp:0"]
listen_tls = ["tcp:0"]
max_connections = 9
max_connections_per_client = 4
""")
    return load(path)


@pytest.mark.parametrize("kind", [POP3ServerFactory, IMAPServerFactory])
def test_plain_and_tls_listeners_share_one_counter(two_listener_config: Config,
                                                   kind: type[Any]) -> None:
    """The STARTTLS/STLS and implicit-TLS listeners of a protocol count against one limit."""
    unused: Any = None  # neither store, portal, throttle, clock nor TLS is used here
    listeners: list[tuple[str, Any]] = mailbox_listeners(
        kind, two_listener_config, unused, unused, unused, object(), unused)  # type: ignore[arg-type]
    plain = listeners[0][1]
    inner = listeners[1][1].wrappedFactory
    assert plain.connections is inner.connections
    section = kind.section_of(two_listener_config)
    assert plain.connections.max_total == section.max_connections
    assert plain.connections.max_per_client == section.max_connections_per_client
