"""What the SMTP, POP3 and IMAP sessions need of a transport beyond ``write``.

Optional producer calls (a test's StringTransport has no pauseProducing), and handing a reply to
the kernel at once instead of at the reactor's next turn. Reactor thread only.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.interfaces import ITransport


def call_optional(transport: object, method: str) -> None:
    """Call an optional transport method (pauseProducing/resumeProducing) if it has one."""
    function = getattr(transport, method, None)
    if function is not None:
        function()


def send_now(transport: object) -> None:
    """Send what ``transport`` has buffered now rather than when the reactor next polls.

    ``write`` only buffers: the bytes leave when the reactor's next poll finds the socket
    writable, one more loop iteration (two epoll_ctl calls, a poll and a dispatch) for every
    request-response round trip, which is most of a POP3 RETR's or an SMTP command's cost on
    our side. ``doWrite`` (IWriteDescriptor) sends from the same buffer on a non-blocking
    socket: what the kernel does not take stays buffered for the reactor, exactly as before,
    and a send error stays for the reactor to find on its next poll (doWrite only returns it).

    Over TLS started in the session (STARTTLS, STLS) the TCP connection itself holds the
    encrypted records; over implicit TLS the TLS protocol wraps it and it is one step down.
    Nothing happens for other transports (tests' StringTransport), while a producer paces the
    connection (a streamed message), or once the connection is closing: there doWrite would
    finish the close, which is the reactor's to do.
    """
    connection = transport
    if not isinstance(connection, tcp.Connection):
        connection = getattr(connection, "transport", None)  # implicit TLS's TLSMemoryBIOProtocol
        if not isinstance(connection, tcp.Connection):
            return
    if connection.disconnecting or connection.disconnected or connection.producer is not None:
        return
    connection.doWrite()


def write_now(transport: ITransport, data: bytes) -> bool:
    """Send ``data`` straight to the socket, if ``transport`` is a plain TCP connection with
    nothing buffered ahead of it (the caller knows: every earlier write went this way and
    returned True). True if the kernel took all of it.

    ``write`` then ``send_now`` costs two epoll_ctl calls per answer (the descriptor is watched
    for writability, then no longer) besides the send; an SMTP command's answer almost always
    fits the socket buffer, and then one send is all it needs. Otherwise (TLS, a producer, a
    closing connection, a partial send or a send error) what is left is written as before: it
    waits in the transport for the reactor, which also finds any error; the caller then writes
    through the transport from then on, since bytes are buffered there.
    """
    connection = transport
    if (not isinstance(connection, tcp.Connection) or connection.TLS or not connection.connected
            or connection.disconnecting or connection.disconnected
            or connection.producer is not None):
        connection_write(transport, data)
        return False
    sent = connection.writeSomeData(data)
    if isinstance(sent, int) and sent == len(data):
        return True
    rest = data[sent:] if isinstance(sent, int) else data
    connection_write(transport, rest)
    return False


def connection_write(transport: ITransport, data: bytes) -> None:
    """``transport.write(data)``, sent now as far as the kernel takes it (send_now)."""
    transport.write(data)
    send_now(transport)
