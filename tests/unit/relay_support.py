"""A scripted remote mail server and a dialer that connects the real SMTPClient to it over a
StringTransport, so relay tests run without sockets or a reactor (time is a Clock)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from twisted.internet import error as net_error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailsys.smtp.client import ClientTimeouts, SMTPClient
from mailsys.smtp.testing import FakeTLSConnection, TLSRecordingTransport

DEFAULT_EHLO = ("PIPELINING", "SIZE 10000000", "8BITMIME", "SMTPUTF8", "DSN", "STARTTLS")


@dataclass
class Received:
    """One transaction the fake server accepted."""

    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    mail_line: str = ""
    rcpt_lines: list[str] = field(default_factory=list)
    auth: str | None = None


@dataclass
class FakeMTA:
    """A remote SMTP server played by the test.

    ``rcpt`` maps addresses to replies (default 250); ``data_replies`` are used one per
    message, then ``data_reply``. ``tls_error`` makes the handshake after STARTTLS fail.
    """

    name: str
    greeting: str = "220 {name} ESMTP fake"
    ehlo: tuple[str, ...] = DEFAULT_EHLO
    mail_reply: str = "250 2.1.0 Sender ok"
    rcpt: dict[str, str] = field(default_factory=dict)
    data_reply: str = "250 2.0.0 Ok: queued"
    data_replies: list[str] = field(default_factory=list)
    tls_error: str | None = None
    credentials: tuple[str, str] | None = None  # AUTH accepted for these only
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    commands: list[str] = field(default_factory=list)
    sessions: list[FakeSession] = field(default_factory=list)

    def reply_lines(self, code: int, lines: list[str]) -> bytes:
        out = [f"{code}-{line}" for line in lines[:-1]] + [f"{code} {lines[-1]}"]
        return "".join(line + "\r\n" for line in out).encode()


class FakeSession(TLSRecordingTransport):
    """The server side of one connection: parses what the client writes, answers at once."""

    def __init__(self, mta: FakeMTA, client: SMTPClient, address: str) -> None:
        peer: IPv4Address | IPv6Address = (
            IPv6Address("TCP", address, 25) if ":" in address else IPv4Address("TCP", address, 25)
        )
        super().__init__(peer)
        self.mta = mta
        self.client = client
        self.inbuf = b""
        self.in_data = False
        self.data = b""
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.mail_line = ""
        self.rcpt_lines: list[str] = []
        self.tls = False
        self.auth: str | None = None
        self.auth_step: str | None = None
        self.handshake_error: str | None = None
        self.closed = False
        mta.sessions.append(self)

    def answer(self, text: str) -> None:
        if not self.closed:
            self.client.dataReceived(text.encode() if text.endswith("\r\n") else
                                     (text + "\r\n").encode())

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        self.inbuf += data
        while not self.closed:
            if self.in_data:
                end = self.inbuf.find(b"\r\n.\r\n")
                if self.data == b"" and self.inbuf.startswith(b".\r\n"):
                    end, self.inbuf = -2, b"\r\n" + self.inbuf
                if end < 0:
                    return
                raw, self.inbuf = self.inbuf[: end + 2], self.inbuf[end + 5 :]
                self.in_data = False
                self.finish_data(raw.replace(b"\r\n..", b"\r\n.").removeprefix(b"\r\n"))
                continue
            end = self.inbuf.find(b"\r\n")
            if end < 0:
                return
            line, self.inbuf = self.inbuf[:end].decode("utf-8"), self.inbuf[end + 2 :]
            self.command(line)

    def finish_data(self, raw: bytes) -> None:
        data = raw[1:] if raw.startswith(b"..") else raw
        mta = self.mta
        reply = mta.data_replies.pop(0) if mta.data_replies else mta.data_reply
        if reply.startswith("2"):
            mta.received.append(Received(self.sender or "", list(self.recipients), data,
                                         self.tls, self.mail_line, list(self.rcpt_lines),
                                         self.auth))
        self.sender, self.recipients = None, []
        self.answer(reply)

    def command(self, line: str) -> None:
        mta = self.mta
        if self.handshake_error is not None:
            self.close(Failure(SSL.Error([("SSL routines", "", self.handshake_error)])))
            return
        mta.commands.append(line)
        if self.auth_step == "user":
            self.auth_step = "pass"
            self.auth_user = base64.b64decode(line).decode()
            self.answer("334 UGFzc3dvcmQ6")
            return
        if self.auth_step == "pass":
            self.auth_step = None
            self.check_auth(self.auth_user, base64.b64decode(line).decode())
            return
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            lines = [mta.name, *[k for k in mta.ehlo if not (self.tls and k == "STARTTLS")]]
            if mta.credentials is not None:
                lines.append("AUTH PLAIN LOGIN")
            self.client.dataReceived(mta.reply_lines(250, lines))
        elif verb == "HELO":
            self.answer(f"250 {mta.name}")
        elif verb == "STARTTLS":
            self.answer("220 2.0.0 Ready to start TLS")
            if mta.tls_error is not None:
                self.handshake_error = mta.tls_error  # the handshake (the next bytes) fails
            else:
                self.tls = True
        elif verb == "AUTH":
            parts = line.split(" ")
            if parts[1].upper() == "PLAIN":
                _, user, password = base64.b64decode(parts[2]).decode().split("\0")
                self.check_auth(user, password)
            else:
                self.auth_step = "user"
                self.answer("334 VXNlcm5hbWU6")
        elif verb == "MAIL":
            self.mail_line = line
            if mta.mail_reply.startswith("2"):
                self.sender = line[line.index("<") + 1 : line.index(">")]
            self.answer(mta.mail_reply)
        elif verb == "RCPT":
            address = line[line.index("<") + 1 : line.index(">")]
            reply = mta.rcpt.get(address, "250 2.1.5 Recipient ok")
            if self.sender is None:
                reply = "503 5.5.1 need MAIL"
            elif reply.startswith("2"):
                self.recipients.append(address)
                self.rcpt_lines.append(line)
            self.answer(reply)
        elif verb == "DATA":
            if self.recipients:
                self.in_data = True
                self.data = b""
                self.answer("354 go ahead")
            else:
                self.answer("554 5.5.1 No valid recipients")
        elif verb == "RSET":
            self.sender, self.recipients, self.rcpt_lines = None, [], []
            self.answer("250 2.0.0 reset")
        elif verb == "QUIT":
            self.answer("221 2.0.0 bye")
            self.close()
        else:
            self.answer("502 5.5.1 no")

    def check_auth(self, user: str, password: str) -> None:
        if self.mta.credentials == (user, password):
            self.auth = user
            self.answer("235 2.7.0 ok")
        else:
            self.answer("535 5.7.8 bad credentials")

    def close(self, reason: Failure | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.connectionLost(reason or Failure(ConnectionDone()))

    def loseConnection(self) -> None:  # noqa: N802 - ITransport
        super().loseConnection()
        self.close()

    def abortConnection(self) -> None:  # noqa: N802 - ITCPTransport
        self.close()


class FakeDialer:
    """Connects to the FakeMTA at (address, port), or fails as the test says."""

    def __init__(self, clock: Clock, timeouts: ClientTimeouts | None = None) -> None:
        self.clock = clock
        self.timeouts = timeouts
        self.hosts: dict[tuple[str, int], FakeMTA | Exception] = {}
        self.connects: list[tuple[str, int, object]] = []
        self.on_connect: Callable[[FakeMTA], None] | None = None

    def add(self, address: str, mta: FakeMTA, port: int = 25) -> FakeMTA:
        self.hosts[address, port] = mta
        return mta

    def refuse(self, address: str, port: int = 25) -> None:
        self.hosts[address, port] = net_error.ConnectionRefusedError("refused")

    def connect(self, address: str, port: int, creator: Any) -> Deferred[SMTPClient]:
        self.connects.append((address, port, creator))
        target = self.hosts.get((address, port), net_error.ConnectionRefusedError("nothing"))
        if isinstance(target, Exception):
            return fail(target)
        client = SMTPClient(self.clock, self.timeouts, implicit_tls=creator is not None)
        session = FakeSession(target, client, address)
        if creator is not None:
            session.tls = True
            session.tls_handle = FakeTLSConnection()
        target.connections += 1
        client.makeConnection(session)
        session.answer(target.greeting.format(name=target.name))
        return succeed(client)
