"""The outbound ESMTP client: one ``SMTPClient`` per connection to another mail server.

This module owns our side of the SMTP dialogue when we deliver: reading (multi-line) replies,
EHLO with the HELO fallback, STARTTLS (RFC 3207), AUTH PLAIN and LOGIN (RFC 4954), the extensions
we use when offered (PIPELINING RFC 2920, SIZE RFC 1870, 8BITMIME RFC 6152, SMTPUTF8 RFC 6531,
DSN RFC 3461), dot-stuffing whatever the chunking (RFC 5321 §4.5.2) and the client timeouts of
RFC 5321 §4.5.3.2. It knows nothing of queues, MX records or policies: mailsys.delivery.relay
decides where to connect and what a reply means for each recipient.

twisted.mail's SMTPClient is not used: it dot-stuffs per 16 KiB chunk, so a "." line at a chunk
boundary ends the message early, and it has no PIPELINING, SIZE, 8BITMIME, SMTPUTF8 or DSN.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from service_identity import VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from mailsys.address import encode_xtext
from mailsys.replies import Reply
from mailsys.tls import describe_tls

log = Logger(namespace="mailsys.smtp.client")

# How much of the message is read and written at a time.
CHUNK_SIZE = 64 * 1024
# RFC 5321 §4.5.3.1.5 limits a reply line to 512 octets; we accept more from lenient servers,
# but not without bound.
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100

# Locally decided refusals, before a MAIL command is sent. RFC 1870 §6.1 (SIZE), RFC 6152 §3
# (8BITMIME, X.6.3 "conversion required but not supported"), RFC 6531 §3.2 (SMTPUTF8, X.6.7).
TOO_BIG_FOR_PEER = Reply(552, "5.3.4", "Message too big for the destination server")
NEEDS_8BITMIME = Reply(554, "5.6.3", "The message is 8-bit, but the server does not offer 8BITMIME")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "The message needs SMTPUTF8, which the server does not offer")

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")


@dataclass(frozen=True)
class ClientTimeouts:
    """Seconds to wait for each reply: RFC 5321 §4.5.3.2's minimums by default."""

    greeting: float = 300.0  # §4.5.3.2.1 initial 220 message: 5 minutes
    mail: float = 300.0  # §4.5.3.2.2 MAIL: 5 minutes
    rcpt: float = 300.0  # §4.5.3.2.3 RCPT: 5 minutes
    data_init: float = 120.0  # §4.5.3.2.4 DATA initiation: 2 minutes
    data_block: float = 180.0  # §4.5.3.2.5 data block: 3 minutes
    data_end: float = 600.0  # §4.5.3.2.6 DATA termination: 10 minutes
    other: float = 300.0  # EHLO, STARTTLS, AUTH, RSET, QUIT: as for MAIL


@dataclass(frozen=True)
class ServerReply:
    """A reply from the server: its code and the text of each line (without code and separator)."""

    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str:
        """The enhanced status code of the first line (RFC 2034 §4), or ""."""
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        return match.group(1) if match else ""

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        """One line: the code and the text of every line (what attempts and DSNs quote)."""
        return " ".join([str(self.code), *[line.strip() for line in self.lines if line.strip()]])

    @classmethod
    def local(cls, reply: Reply) -> ServerReply:
        """A reply we decided ourselves, in the same shape as the server's."""
        text = f"{reply.enhanced} {reply.text}" if reply.enhanced else reply.text
        return cls(reply.code, (text,))


@dataclass(frozen=True)
class Capabilities:
    """What EHLO offered: keyword (upper case) -> parameter text; empty after HELO."""

    keywords: dict[str, str] = field(default_factory=dict)
    esmtp: bool = True

    @classmethod
    def from_reply(cls, reply: ServerReply) -> Capabilities:
        keywords: dict[str, str] = {}
        for line in reply.lines[1:]:  # the first line is the server's name and greeting
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                keywords[keyword.upper()] = params.strip()
        return cls(keywords)

    def __contains__(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    @property
    def size_limit(self) -> int | None:
        """RFC 1870 §4: SIZE with a number > 0 is the server's fixed limit; 0 or none: no limit."""
        value = self.keywords.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    @property
    def auth_mechanisms(self) -> tuple[str, ...]:
        return tuple(m.upper() for m in self.keywords.get("AUTH", "").split())


@dataclass(frozen=True)
class OutboundRecipient:
    """A recipient as RCPT TO carries it, with its DSN parameters (RFC 3461 §4)."""

    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None  # "addr-type;address", not yet xtext-encoded


@dataclass(frozen=True)
class Transaction:
    """One message to send: the envelope as MAIL and RCPT carry it."""

    sender: str
    recipients: tuple[OutboundRecipient, ...]
    size: int
    body: str | None = None  # "7BIT" or "8BITMIME"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None


@dataclass
class TransactionResult:
    """What the server answered: MAIL, each RCPT in order, and the final reply to the data.

    ``data`` is None when the transaction ended before the message was sent (MAIL refused, no
    recipient accepted, DATA refused): ``data_refusal`` then holds DATA's reply, if any.
    """

    mail: ServerReply
    rcpt: list[ServerReply]
    data: ServerReply | None = None
    data_refusal: ServerReply | None = None

    def reply_for(self, index: int) -> ServerReply:
        """The reply that decides recipient ``index``: its RCPT refusal, or else the outcome
        of MAIL or of the data."""
        if not self.mail.is_success:
            return self.mail
        rcpt = self.rcpt[index]
        if not rcpt.is_success:
            return rcpt
        if self.data is not None:
            return self.data
        assert self.data_refusal is not None
        return self.data_refusal


class SMTPClientError(Exception):
    """The session cannot go on; ``reason`` is safe to record in an attempt and a DSN."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SMTPTimeoutError(SMTPClientError):
    """No reply (or no progress sending data) within the RFC 5321 §4.5.3.2 time."""


class SMTPConnectionLostError(SMTPClientError):
    """The connection closed before the reply we were waiting for."""


class SMTPProtocolError(SMTPClientError):
    """The server sent something that is not an SMTP reply."""


class TLSFailedError(SMTPClientError):
    """The TLS handshake failed (for example the certificate did not verify)."""


class LocalRefusalError(Exception):
    """We refuse to send this message to this server (too big, needs an extension it lacks)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class MessageSource(TypingProtocol):
    """The bytes of a message, read a chunk at a time (the spool file, from a disk thread)."""

    def read(self, size: int) -> Deferred[bytes]:
        """The next at most ``size`` bytes; b"" at the end."""

    def close(self) -> None:
        """Release the source (early, when the transaction fails)."""


class BytesSource:
    """A MessageSource over bytes in memory, in chunks of at most ``chunk_size``."""

    def __init__(self, data: bytes, chunk_size: int | None = None) -> None:
        self._data = memoryview(data)
        self._chunk_size = chunk_size
        self._offset = 0
        self.closed = False

    def read(self, size: int) -> Deferred[bytes]:
        if self._chunk_size is not None:
            size = min(size, self._chunk_size)
        chunk = bytes(self._data[self._offset : self._offset + size])
        self._offset += len(chunk)
        d: Deferred[bytes] = Deferred()
        d.callback(chunk)
        return d

    def close(self) -> None:
        self.closed = True


class DotStuffer:
    """RFC 5321 §4.5.2 transparency for a message fed in chunks of any size.

    A "." at the start of a line is doubled, and the end is marked with CRLF "." CRLF. The state
    between chunks is whether the last byte ended a line, and a CR held back until we know
    whether its LF follows, so a "." line is stuffed wherever the chunks are cut.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        self._held = b""
        if data.endswith(b"\r"):
            self._held = b"\r"
            data = data[:-1]
        if not data:
            return b""
        out = data.replace(b"\r\n.", b"\r\n..")
        if self._line_start and out[:1] == b".":
            out = b"." + out
        self._line_start = data.endswith(b"\r\n")
        return out

    def finish(self) -> bytes:
        """What ends the message: a CRLF if the last line lacks one, then "." CRLF."""
        if self._held:
            return b"\r\r\n.\r\n"  # a lone CR at the very end; complete the line after it
        return (b"" if self._line_start else b"\r\n") + b".\r\n"


@dataclass(eq=False)
class _Waiting:
    deferred: Deferred[ServerReply]
    timeout: float
    what: str
    timer: IDelayedCall | None = None


@implementer(IPushProducer)
class SMTPClient(Protocol):
    """One client connection. Commands return Deferreds that fire with the server's reply, in
    order; several may be outstanding (pipelining). A timeout, a protocol error or a lost
    connection fails every outstanding Deferred with an SMTPClientError.
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeouts: ClientTimeouts | None = None,
        *,
        implicit_tls: bool = False,
    ) -> None:
        self._clock = clock
        self.timeouts = timeouts or ClientTimeouts()
        self._buffer = b""
        self._lines: list[str] = []
        self._waiting: deque[_Waiting] = deque()
        self.greeting: Deferred[ServerReply] = Deferred()
        self.capabilities = Capabilities({}, esmtp=False)
        self.tls: str | None = None  # describe_tls() once TLS is up
        # RFC 8314 §3.3: on an implicit-TLS connection the handshake comes before the greeting.
        self._tls_started = implicit_tls
        self.connected = False
        self.failure: SMTPClientError | None = None
        self.in_transaction = False  # MAIL accepted and the transaction not ended
        self.messages = 0  # transactions completed on this connection
        self._paused = False
        self._resumed: Deferred[None] | None = None
        self._stall_timer: IDelayedCall | None = None
        self.peer = ""

    # -- connection events (Twisted) -------------------------------------------------------------

    @override
    def connectionMade(self) -> None:
        self.connected = True
        assert self.transport is not None
        peer = self.transport.getPeer()
        self.peer = str(getattr(peer, "host", ""))
        # Commands and data go out in few, deliberate writes (a pipelined group, the last
        # chunk with the end marker): Nagle's algorithm would only hold the last write back
        # until the peer's delayed ACK, some 40 ms per message.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        self._expect(self.timeouts.greeting, "greeting", self.greeting)

    @override
    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self.connected:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    self._fail(SMTPProtocolError("reply line too long"))
                return
            raw, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            self._line(raw.removesuffix(b"\r"))

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self._cancel_stall()
        if self.failure is None:
            self.failure = self._loss_reason(reason)
        self._fail_waiting(self.failure)

    def _fail_waiting(self, error: SMTPClientError) -> None:
        waiting, self._waiting = self._waiting, deque()
        for item in waiting:
            _cancel(item.timer)
            item.deferred.errback(Failure(error))
        if self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.errback(Failure(error))

    def _loss_reason(self, reason: Failure) -> SMTPClientError:
        value = reason.value
        if self._tls_started and self.tls is None and not isinstance(value, ConnectionDone):
            return TLSFailedError(f"TLS handshake failed: {describe_tls_failure(value)}")
        if isinstance(value, ConnectionDone):
            return SMTPConnectionLostError("connection closed by the server")
        return SMTPConnectionLostError(f"connection lost: {_exception_text(value)}")

    # -- replies ---------------------------------------------------------------------------------

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        # RFC 5321 §4.2: Reply-code [ ("-" / SP) textstring ] CRLF
        if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
            self._fail(SMTPProtocolError(f"not an SMTP reply: {text[:80]!r}"))
            return
        if self._lines and self._lines[0][:3] != text[:3]:
            self._fail(SMTPProtocolError("reply lines with different codes"))
            return
        self._lines.append(text)
        if text[3:4] == "-":
            if len(self._lines) > MAX_REPLY_LINES:
                self._fail(SMTPProtocolError("reply with too many lines"))
            return
        lines, self._lines = self._lines, []
        reply = ServerReply(int(lines[0][:3]), tuple(line[4:] for line in lines))
        if not self._waiting:
            # Unsolicited (a 421 before the server closes): note it, the close will follow.
            log.info("unsolicited reply from {peer}: {reply}", peer=self.peer, reply=str(reply))
            if reply.code == 421:
                self.failure = SMTPConnectionLostError(f"server closed: {reply}")
            return
        item = self._waiting.popleft()
        _cancel(item.timer)
        if self._waiting and self._waiting[0].timer is None:
            self._arm(self._waiting[0])
        item.deferred.callback(reply)

    def _expect(self, timeout: float, what: str, d: Deferred[ServerReply] | None = None) -> (
        Deferred[ServerReply]
    ):
        item = _Waiting(d if d is not None else Deferred(), timeout, what)
        self._waiting.append(item)
        if len(self._waiting) == 1:
            self._arm(item)
        return item.deferred

    def _arm(self, item: _Waiting) -> None:
        """Only the oldest outstanding reply is timed: the others wait behind it."""
        item.timer = self._clock.callLater(item.timeout, self._timed_out, item)

    def _timed_out(self, item: _Waiting) -> None:
        item.timer = None
        self._fail(SMTPTimeoutError(f"timeout waiting for the reply to {item.what}"))

    def _fail(self, error: SMTPClientError) -> None:
        """Give up on the connection: record why and drop it (connectionLost fails the rest)."""
        if self.failure is None:
            self.failure = error
        log.info("giving up on {peer}: {reason}", peer=self.peer, reason=error.reason)
        self.connected = False
        self._cancel_stall()
        if self.transport is not None:
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                self.transport.loseConnection()
        # Not left to connectionLost: whoever waits must hear now, however the transport
        # reports the close.
        self._fail_waiting(self.failure)

    # -- commands --------------------------------------------------------------------------------

    def command(self, line: str, timeout: float | None = None, what: str = "") -> (
        Deferred[ServerReply]
    ):
        """Send one command line; fires with its reply."""
        return self.pipeline([(line, timeout, what)])[0]

    def pipeline(self, commands: Sequence[tuple[str, float | None, str]]) -> (
        list[Deferred[ServerReply]]
    ):
        """Send several commands in one write (RFC 2920 §3.1); one Deferred per reply."""
        if not self.connected or self.transport is None:
            error = self.failure or SMTPConnectionLostError("not connected")
            return [_failed(error) for _ in commands]
        out = []
        results = []
        for line, timeout, what in commands:
            out.append(line.encode("utf-8") + b"\r\n")
            label = what or line.split(" ", 1)[0].upper()
            results.append(self._expect(timeout or self.timeouts.other, label))
        self.transport.write(b"".join(out))
        return results

    def ehlo(self, name: str) -> Deferred[Capabilities]:
        """EHLO, and HELO if the server does not know EHLO (RFC 5321 §4.1.4)."""
        return Deferred.fromCoroutine(self._ehlo(name))

    async def _ehlo(self, name: str) -> Capabilities:
        reply = await self.command(f"EHLO {name}")
        if reply.is_success:
            self.capabilities = Capabilities.from_reply(reply)
        elif reply.code in (500, 501, 502, 504, 550):
            # An old server: RFC 5321 §3.2 fall back to HELO.
            helo = await self.command(f"HELO {name}")
            if not helo.is_success:
                raise SMTPClientError(f"HELO refused: {helo}")
            self.capabilities = Capabilities({}, esmtp=False)
        else:
            raise SMTPClientError(f"EHLO refused: {reply}")
        if self._tls_started:
            self.tls = describe_tls(self.transport) or "TLS"
        return self.capabilities

    def starttls(
        self, creator: IOpenSSLClientConnectionCreator, name: str
    ) -> Deferred[ServerReply]:
        """STARTTLS (RFC 3207); on 220 start TLS and EHLO again as ``name``. Fires with the
        STARTTLS reply; a refusal is not an error (the caller's policy decides)."""
        return Deferred.fromCoroutine(self._starttls(creator, name))

    async def _starttls(self, creator: IOpenSSLClientConnectionCreator, name: str) -> ServerReply:
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            return reply
        # RFC 3207 §4.2: anything read before the handshake is not to be trusted.
        self._buffer = b""
        assert self.transport is not None
        ITLSTransport(self.transport).startTLS(creator)
        self._tls_started = True
        # RFC 3207 §4.2: the client must discard what it knew and EHLO again.
        self.capabilities = Capabilities({}, esmtp=False)
        await self._ehlo(name)
        return reply

    def authenticate(self, user: str, password: str) -> Deferred[ServerReply]:
        """AUTH PLAIN (RFC 4616) if offered, else LOGIN; fires with the final reply."""
        return Deferred.fromCoroutine(self._authenticate(user, password))

    async def _authenticate(self, user: str, password: str) -> ServerReply:
        mechanisms = self.capabilities.auth_mechanisms
        if "PLAIN" in mechanisms or "LOGIN" not in mechanisms:
            token = _b64(f"\0{user}\0{password}".encode())
            # RFC 4954 §4: the initial response saves a round trip.
            reply = await self.command(f"AUTH PLAIN {token}", what="AUTH")
            if reply.code == 334:
                reply = await self.command("*", what="AUTH")  # no sane server asks again
            return reply
        reply = await self.command("AUTH LOGIN", what="AUTH")
        if reply.code != 334:
            return reply
        reply = await self.command(_b64(user.encode()), what="AUTH")
        if reply.code != 334:
            return reply
        return await self.command(_b64(password.encode()), what="AUTH")

    def reset(self) -> Deferred[ServerReply]:
        """RSET: end any transaction (before reusing the connection for another message)."""
        d = self.command("RSET")

        def done(reply: ServerReply) -> ServerReply:
            if reply.is_success:
                self.in_transaction = False
            return reply

        return d.addCallback(done)

    def quit(self) -> Deferred[None]:
        """QUIT politely; the connection is closed whatever the answer."""
        if not self.connected:
            return _succeeded(None)
        d = self.command("QUIT")

        def close(_: object) -> None:
            if self.transport is not None:
                self.transport.loseConnection()

        return d.addBoth(close)

    # -- a mail transaction ----------------------------------------------------------------------

    def check(self, txn: Transaction) -> None:
        """Raise LocalRefusalError if this server must not be sent ``txn`` at all."""
        caps = self.capabilities
        limit = caps.size_limit
        if limit is not None and txn.size > limit:
            raise LocalRefusalError(TOO_BIG_FOR_PEER.with_text(
                f"{TOO_BIG_FOR_PEER.text} ({txn.size} bytes, the server takes {limit})"
            ))
        if txn.body == "8BITMIME" and "8BITMIME" not in caps:
            raise LocalRefusalError(NEEDS_8BITMIME)
        if txn.smtputf8 and "SMTPUTF8" not in caps:
            raise LocalRefusalError(NEEDS_SMTPUTF8)

    def send(self, txn: Transaction, source: MessageSource) -> Deferred[TransactionResult]:
        """Run one mail transaction; fails with LocalRefusalError before any command, or with
        SMTPClientError if the connection fails. The source is closed in every case."""
        d = Deferred.fromCoroutine(self._send(txn, source))

        def closed(result: object) -> object:
            source.close()
            return result

        return d.addBoth(closed)

    def _mail_line(self, txn: Transaction) -> str:
        caps = self.capabilities
        params = []
        if "SIZE" in caps:
            params.append(f"SIZE={txn.size}")  # RFC 1870 §6
        if txn.body is not None and "8BITMIME" in caps:
            params.append(f"BODY={txn.body}")  # RFC 6152 §2
        if txn.smtputf8 and "SMTPUTF8" in caps:
            params.append("SMTPUTF8")  # RFC 6531 §3.4
        if "DSN" in caps:
            if txn.ret is not None:
                params.append(f"RET={txn.ret}")  # RFC 3461 §4.3
            if txn.envid is not None:
                params.append(f"ENVID={encode_xtext(txn.envid)}")  # RFC 3461 §4.4
        return " ".join([f"MAIL FROM:<{txn.sender}>", *params])

    def _rcpt_line(self, recipient: OutboundRecipient) -> str:
        params = []
        if "DSN" in self.capabilities:
            if recipient.notify is not None:
                params.append(f"NOTIFY={','.join(recipient.notify)}")  # RFC 3461 §4.1
            if recipient.orcpt is not None:
                addr_type, _, address = recipient.orcpt.partition(";")
                params.append(f"ORCPT={addr_type};{encode_xtext(address)}")  # RFC 3461 §4.2
        return " ".join([f"RCPT TO:<{recipient.address}>", *params])

    async def _send(self, txn: Transaction, source: MessageSource) -> TransactionResult:
        self.check(txn)
        timeouts = self.timeouts
        mail_line = self._mail_line(txn)
        rcpt_lines = [self._rcpt_line(r) for r in txn.recipients]
        if "PIPELINING" in self.capabilities:
            # RFC 2920 §3.1: MAIL, the RCPTs and DATA in one group; DATA ends it.
            replies = self.pipeline(
                [(mail_line, timeouts.mail, "MAIL")]
                + [(line, timeouts.rcpt, "RCPT") for line in rcpt_lines]
                + [("DATA", timeouts.data_init, "DATA")]
            )
            try:
                mail = await replies[0]
                self.in_transaction = mail.is_success
                rcpt = [await d for d in replies[1:-1]]
                data_start = await replies[-1]
            except BaseException:
                # The connection failed: the replies not awaited yet failed too; they were
                # never going to be read, so they are not "unhandled".
                for d in replies:
                    d.addErrback(lambda _: None)
                raise
        else:
            mail = await self.command(mail_line, timeouts.mail, "MAIL")
            if not mail.is_success:
                return TransactionResult(mail, [mail] * len(rcpt_lines))
            self.in_transaction = True
            rcpt = []
            for line in rcpt_lines:
                rcpt.append(await self.command(line, timeouts.rcpt, "RCPT"))
            if not any(r.is_success for r in rcpt):
                return TransactionResult(mail, rcpt)
            data_start = await self.command("DATA", timeouts.data_init, "DATA")
        result = TransactionResult(mail, rcpt)
        if data_start.code != 354:
            result.data_refusal = data_start
            return result
        if not mail.is_success or not any(r.is_success for r in rcpt):
            # RFC 2920 §3.1: the server should have refused DATA; end the empty message.
            refusal = await self._finish_data(b".\r\n")
            result.data_refusal = ServerReply(554, ("5.5.1 No valid recipients",))
            log.info("{peer} accepted DATA without recipients: {reply}", peer=self.peer,
                     reply=str(refusal))
            return result
        result.data = await self._stream(source)
        return result

    async def _stream(self, source: MessageSource) -> ServerReply:
        assert self.transport is not None
        stuffer = DotStuffer()
        # Each chunk is written once the next one is read, so that the last one leaves
        # together with the end marker, in one write.
        pending = b""
        IConsumer(self.transport).registerProducer(self, True)
        try:
            while True:
                chunk = await source.read(CHUNK_SIZE)
                if not self.connected:
                    raise self.failure or SMTPConnectionLostError("connection lost")
                if not chunk:
                    break
                if pending:
                    self.transport.write(pending)
                pending = stuffer.feed(chunk)
                if self._paused:
                    await self._wait_resumed()
        except SMTPClientError:
            raise
        except Exception as exc:
            # The rest of the message cannot be read: never end it with ".", which would have
            # the server deliver a truncated message. Drop the connection instead.
            log.failure("cannot read the message for {peer}", peer=self.peer)
            self._fail(SMTPClientError("local error reading the message"))
            raise SMTPClientError("local error reading the message") from exc
        finally:
            if self.transport is not None and self.connected:
                IConsumer(self.transport).unregisterProducer()
        return await self._finish_data(pending + stuffer.finish())

    async def _finish_data(self, end: bytes) -> ServerReply:
        assert self.transport is not None
        d = self._expect(self.timeouts.data_end, "end of data")
        self.transport.write(end)
        reply = await d
        # RFC 5321 §4.1.1.4: the reply to the end of data ends the transaction, whatever it is.
        self.in_transaction = False
        self.messages += 1
        return reply

    # -- flow control while sending data (IPushProducer) -----------------------------------------

    def _wait_resumed(self) -> Deferred[None]:
        self._resumed = Deferred()
        # RFC 5321 §4.5.3.2.5: each block of data must make progress within 3 minutes.
        self._stall_timer = self._clock.callLater(self.timeouts.data_block, self._stalled)
        return self._resumed

    def _stalled(self) -> None:
        self._stall_timer = None
        self._fail(SMTPTimeoutError("timeout sending the message data"))

    def _cancel_stall(self) -> None:
        _cancel(self._stall_timer)
        self._stall_timer = None

    def pauseProducing(self) -> None:  # noqa: N802 - IPushProducer
        self._paused = True

    def resumeProducing(self) -> None:  # noqa: N802 - IPushProducer
        self._paused = False
        self._cancel_stall()
        if self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.callback(None)

    def stopProducing(self) -> None:  # noqa: N802 - IPushProducer
        self._fail(SMTPConnectionLostError("the connection stopped taking data"))


def describe_tls_failure(value: object) -> str:
    """A one-line reason for a failed handshake: OpenSSL's reason, or the name mismatch."""
    if isinstance(value, VerificationError):
        names = []
        for err in getattr(value, "errors", []):
            mismatched = getattr(err, "mismatched_id", None)
            hostname = getattr(mismatched, "hostname", None)
            if hostname is not None:
                names.append(hostname.decode() if isinstance(hostname, bytes) else str(hostname))
        target = f" {names[0]}" if names else ""
        return f"the certificate does not match the host name{target}"
    args: Any = getattr(value, "args", ())
    if args and isinstance(args[0], list):
        reasons = [str(item[2]) for item in args[0] if isinstance(item, tuple) and len(item) > 2]
        if reasons:
            return "; ".join(reasons)
    return _exception_text(value)


def _exception_text(value: object) -> str:
    text = str(value).strip()
    name = type(value).__name__
    return f"{name}: {text}" if text else name


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _cancel(timer: IDelayedCall | None) -> None:
    if timer is not None and timer.active():
        timer.cancel()


def _failed(error: Exception) -> Deferred[ServerReply]:
    d: Deferred[ServerReply] = Deferred()
    d.errback(Failure(error))
    return d


def _succeeded(value: None) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.callback(value)
    return d
