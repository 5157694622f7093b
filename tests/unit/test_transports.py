"""Transport helpers: optional producer calls, and replies sent without waiting for the reactor."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from mailsys.transports import call_optional, send_now, write_now


@pytest.fixture
def connection() -> Iterator[tuple[tcp.Connection, socket.socket]]:
    """A real TCP-like connection over a socket pair, on a reactor that never runs."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5.0)
    conn = tcp.Connection(ours, Protocol(), MemoryReactor())
    conn.connected = True  # as tcp.Server sets it for an accepted connection
    yield conn, theirs
    ours.close()
    theirs.close()


class _Wrapper:
    """Stands for implicit TLS: a protocol-transport whose ``transport`` is the TCP one."""

    def __init__(self, transport: tcp.Connection) -> None:
        self.transport = transport


def test_send_now_sends_before_the_reactor_runs(
        connection: tuple[tcp.Connection, socket.socket]) -> None:
    """Bytes written to a TCP transport reach the peer at send_now, with no reactor turn."""
    conn, peer = connection
    conn.write(b"+OK hello\r\n")
    send_now(conn)
    assert peer.recv(100) == b"+OK hello\r\n"


def test_send_now_reaches_through_a_wrapping_protocol(
        connection: tuple[tcp.Connection, socket.socket]) -> None:
    """Under implicit TLS the TCP connection one step down is the one flushed."""
    conn, peer = connection
    conn.write(b"* OK\r\n")
    send_now(_Wrapper(conn))
    assert peer.recv(100) == b"* OK\r\n"


def test_send_now_leaves_a_closing_connection_to_the_reactor(
        connection: tuple[tcp.Connection, socket.socket]) -> None:
    """Once loseConnection was asked for, the buffered bytes and the close stay the reactor's."""
    conn, peer = connection
    conn.write(b"221 Bye\r\n")
    conn.loseConnection()
    send_now(conn)
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)
    assert not conn.disconnected


def test_send_now_leaves_a_producer_paced_connection_alone(
        connection: tuple[tcp.Connection, socket.socket]) -> None:
    """While a producer streams into the connection the reactor paces it, not send_now."""
    conn, peer = connection

    class Producer:
        def pauseProducing(self) -> None: ...  # noqa: N802
        def resumeProducing(self) -> None: ...  # noqa: N802
        def stopProducing(self) -> None: ...  # noqa: N802

    conn.registerProducer(Producer(), True)
    conn.write(b"data\r\n")
    send_now(conn)
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)


def test_send_now_ignores_other_transports() -> None:
    """A test's StringTransport (no socket) is left as it is."""
    transport = StringTransport()
    transport.write(b"x")
    send_now(transport)
    send_now(object())
    assert transport.value() == b"x"


def test_call_optional_calls_only_what_exists() -> None:
    """pauseProducing is called where the transport has it and skipped where it has not."""
    transport = StringTransport()
    call_optional(transport, "pauseProducing")
    assert transport.producerState == "paused"
    call_optional(object(), "pauseProducing")


def test_write_now_sends_without_watching_the_socket(
        connection: tuple[tcp.Connection, socket.socket]) -> None:
    """An answer the kernel takes whole goes out in one send: the reactor is never asked to
    watch the socket for writing."""
    conn, peer = connection
    reactor = conn.reactor
    assert isinstance(reactor, MemoryReactor)
    assert write_now(conn, b"250 OK\r\n") is True
    assert peer.recv(100) == b"250 OK\r\n"
    assert reactor.getWriters() == []


def test_write_now_leaves_what_the_kernel_refused_to_the_reactor(
        connection: tuple[tcp.Connection, socket.socket]) -> None:
    """When the socket buffer is full, the rest waits in the transport for the reactor, in
    order, and the caller is told to write through the transport from then on."""
    conn, peer = connection
    big = bytes(range(256)) * 40_000  # far more than a socket pair's buffer
    assert write_now(conn, big) is False
    received = b""
    peer.setblocking(False)
    deadline = time.monotonic() + 10
    while len(received) < len(big) and time.monotonic() < deadline:
        conn.doWrite()  # the reactor's turns
        with contextlib.suppress(BlockingIOError):
            received += peer.recv(1 << 20)
    assert received == big


def test_write_now_writes_through_other_transports() -> None:
    """A transport that is not a plain TCP connection (a test's, implicit TLS) is written
    to, and the caller told the bytes went through it."""
    transport = StringTransport()
    assert write_now(transport, b"250 OK\r\n") is False
    assert transport.value() == b"250 OK\r\n"
