"""The skeleton the SMTP, POP3 and IMAP sessions share: admission against the connection
limits, the idle timer, the bad-command count, answers awaited in command order, STARTTLS with
the plaintext discard and state reset, the login flow's lifetime, and closing.

Built on mailsys.inputloop (input handled strictly in order). The order of things is decided
here; a protocol says its words through the hooks (``_refusal``, ``_greet``, ``_timed_out``,
``_session_ended``, ``_reset_after_tls``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Protocol, TypeVar, cast

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ISSLTransport,
    ITLSTransport,
    ITransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from mailsys.auth.login import LoginFlow, LoginLimiter
from mailsys.connlimit import ConnectionCounter, Crowding
from mailsys.inputloop import InputLoopSession
from mailsys.tls import TLSContextSource

_T = TypeVar("_T")


class SessionMetrics(Protocol):
    """What a listener's sessions report for monitoring (mailsys.web.metrics.ListenerMetrics);
    every call is cheap and never fails."""

    def opened(self) -> None:
        """A connection was admitted: a session begins."""

    def closed(self) -> None:
        """An admitted session's connection is gone."""

    def login_failed(self) -> None:
        """A login failed (wrong password, unknown user, bad SASL)."""

    def refused(self, code: int) -> None:
        """A message or recipient was refused with the reply ``code``."""


class SessionFactory(Protocol):
    """What a session takes from its listener's factory."""

    @property
    def metrics(self) -> SessionMetrics | None: ...

    @property
    def connections(self) -> ConnectionCounter: ...

    @property
    def clock(self) -> IReactorTime: ...

    @property
    def tls(self) -> TLSContextSource | None: ...

    @property
    def portal(self) -> Portal | None: ...

    @property
    def throttle(self) -> LoginLimiter | None: ...


class ServerSession(InputLoopSession):
    """One client connection of a mail protocol, from admission to close."""

    protocol_name: ClassVar[str]  # "smtp", "pop3", "imap": the login flow's log word
    log: ClassVar[Logger]
    log_prefix: ClassVar[str] = ""  # put before every line this skeleton logs

    def __init__(self, factory: SessionFactory, *, max_bad_commands: int) -> None:
        super().__init__()
        self._clock = factory.clock
        self._connections = factory.connections
        self._tls_source = factory.tls
        self._max_bad_commands = max_bad_commands
        self._client_address = ""
        self._client = "[unknown]"  # the address as the log shows it
        self._admitted = False  # admitted: opened, logged, its end reported
        self._counted = False  # counted by the connection limits (released when lost or shed)
        self._last_input = 0.0  # when the client last sent something (shedding picks by it)
        self._secure = False
        self._errors = 0  # client errors, up to max_bad_commands
        self._login = LoginFlow(factory.portal, factory.throttle, self._clock, "",
                                self.protocol_name)
        self._metrics = factory.metrics
        if self._metrics is not None:
            self._login.on_failure = self._metrics.login_failed

    # --- what a protocol provides ---------------------------------------------------------------

    def _implicit_tls(self) -> bool:
        """True on a listener that is TLS from the first byte (RFC 8314 §3.3)."""
        return False

    def _refusal(self, crowding: Crowding) -> bytes:
        """The greeting that refuses a connection over a limit."""
        raise NotImplementedError

    def _greet(self) -> None:
        """The admitted connection's greeting."""
        raise NotImplementedError

    def _timed_out(self) -> None:
        """The client was silent too long: say so if the protocol does, and close."""
        raise NotImplementedError

    def _internal_error_answer(self) -> bytes:
        """What the client is told before the session closes on an internal error."""
        raise NotImplementedError

    def _session_ended(self) -> None:
        """An admitted session's connection is gone: release what it holds, log its line."""

    def _sheddable(self) -> bool:
        """True if the connection limits may close this session to make room near the cap
        (mailsys.connlimit); SMTP says so until a transaction completes."""
        return False

    def _shed_answer(self) -> bytes:
        """What a session closed to make room is told."""
        raise NotImplementedError

    def _reset_after_tls(self) -> None:
        """TLS has started: forget what was learnt in plaintext."""

    def _idle_is_ours(self) -> bool:
        """True if the session is silent because we are the slow one (policy, disk, the
        password check), so the idle timer must not end it."""
        return self._waiting

    def _client_label(self, host: str) -> str:
        return f"[{host}]"

    def _discard_buffered(self) -> int:
        """Drop the input not yet handled; how many bytes (IMAP's framer replaces this)."""
        dropped = self._buffered()
        self._buffer = b""
        self._offset = 0
        return dropped

    def _send_now(self, data: bytes) -> None:
        """Write ``data`` (after anything already answered) before the transport changes."""
        self._transport.write(data)

    # --- helpers --------------------------------------------------------------------------------

    @property
    def transport_(self) -> ITransport:
        """The connected transport (typed)."""
        return self._transport

    @property
    def consumer(self) -> IConsumer:
        """The transport as the consumer a producer registers with (every transport is one)."""
        return cast(IConsumer, self._transport)

    # --- connection events (Twisted) -----------------------------------------------------------

    @override
    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        self._transport = transport
        peer = transport.getPeer()
        self._client_address = str(getattr(peer, "host", ""))
        self._client = self._client_label(self._client_address)
        self._login.client_address = self._client_address
        self._last_input = self._clock.seconds()
        crowding = self._connections.admit(self._client_address,
                                           self if self._sheddable() else None)
        if crowding is not None:
            self.log.info("{prefix}refused connection from {client}: {why}",
                          prefix=self.log_prefix, client=self._client, why=crowding.value)
            self._closing = True
            self._transport.write(self._refusal(crowding))
            self._transport.loseConnection()
            return
        self._admitted = True
        self._counted = True
        if self._metrics is not None:
            self._metrics.opened()
        self._secure = self._implicit_tls() or ISSLTransport.providedBy(transport)
        self._timer = self._clock.callLater(self._idle_seconds(), self._idle_timeout)
        self._greet()

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._disconnected:
            return
        self._disconnected = True
        self._closing = True
        if not self._admitted:
            return  # refused at the greeting: nothing was counted, opened or logged in
        self._admitted = False
        if self._counted:
            self._counted = False
            self._connections.release(self._client_address, self)
        if self._metrics is not None:
            self._metrics.closed()
        self._login.cancel()  # a throttled failure's answer is not given to nobody
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._session_ended()

    @override
    def dataReceived(self, data: bytes) -> None:
        self._last_input = self._clock.seconds()
        super().dataReceived(data)

    def idle_since(self) -> float:
        """When the client last sent something (mailsys.connlimit.Sheddable)."""
        return self._last_input

    def shed(self) -> None:
        """Closed to make room near the connection cap; the counter already forgot us
        (mailsys.connlimit.Sheddable)."""
        self._counted = False
        if self._disconnected or self._closing:
            return
        self.log.info("{prefix}shed idle connection from {client}: listener near its cap",
                      prefix=self.log_prefix, client=self._client)
        self._send_now(self._shed_answer())
        self._close()

    @override
    def _step_failed(self) -> None:
        # The input position may be inconsistent now: say something safe and close; the
        # traceback goes to the log, never to the peer.
        self.log.failure("internal error in {protocol} session with {client}",
                         protocol=self.protocol_name.upper(), client=self._client)
        self._send_now(self._internal_error_answer())
        self._close()

    # --- idle timer -----------------------------------------------------------------------------

    def _idle_timeout(self) -> None:
        self._timer = None
        if self._disconnected or self._closing:
            return
        if self._idle_is_ours():
            self._timer = self._clock.callLater(self._idle_seconds(), self._idle_timeout)
            return
        self.log.info("{prefix}idle timeout for {client}", prefix=self.log_prefix,
                      client=self._client)
        self._timed_out()

    def _reset_idle_timer(self) -> None:
        """The idle time allowed changed (IMAP after login): count it from now."""
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_seconds())

    # --- answers and errors ---------------------------------------------------------------------

    def _await(self, result: Deferred[_T], answer: Callable[[_T], None]) -> None:
        """Hold later input until ``result`` fires, then ``answer`` it (unless the client has
        gone) and carry on with what was buffered: answers leave in command order (RFC 2920
        §3, RFC 2449 §6.6, RFC 3501 §5.5). ``result`` must not fail: the protocol turns its
        failures into an answer first."""
        self._waiting = True

        def resume(value: _T) -> None:
            if self._disconnected:
                return
            answer(value)
            self._continue()

        result.addCallback(resume)

    def _count_error(self) -> bool:
        """Count a client error; True when that reached max_bad_commands: the protocol says
        so and closes."""
        self._errors += 1
        if self._errors >= self._max_bad_commands and not self._closing:
            self.log.info("{prefix}too many errors from {client}", prefix=self.log_prefix,
                          client=self._client)
            return True
        return False

    def _close(self) -> None:
        """End the session: no more input is handled, and the transport closes once what
        was written has gone out."""
        self._closing = True
        if not self._disconnected:
            self._transport.loseConnection()

    # --- STARTTLS -------------------------------------------------------------------------------

    def _tls_offered(self) -> bool:
        """True if STARTTLS (STLS) can be offered now."""
        return (self._tls_source is not None and not self._secure
                and ITLSTransport.providedBy(self._transport))

    def _tls_context(self, command: str) -> IOpenSSLServerConnectionCreator | None:
        """The server's TLS context, or None (logged) when there is no usable certificate."""
        if self._tls_source is None:
            return None
        try:
            return self._tls_source.server_context()
        except Exception:
            self.log.failure("{prefix}no TLS context for {command} from {client}",
                             prefix=self.log_prefix, command=command, client=self._client)
            return None

    def _start_tls(self, context: IOpenSSLServerConnectionCreator, ready: bytes,
                   command: str) -> None:
        """Answer ``ready`` in plaintext, then turn TLS on and forget the plaintext state."""
        self._send_now(ready)
        # RFC 3207 §4.2, RFC 2595 §4, RFC 3501 §6.2.1 (CVE-2011-0411): what the client
        # pipelined after the command in plaintext must not be executed inside TLS. Drop it.
        dropped = self._discard_buffered()
        if dropped:
            self.log.info("{prefix}discarded {dropped} plaintext bytes after {command} from "
                          "{client}", prefix=self.log_prefix, dropped=dropped, command=command,
                          client=self._client)
        ITLSTransport(self._transport).startTLS(context)
        self._secure = True
        self._reset_after_tls()
        self.log.info("{prefix}{command} with {client}", prefix=self.log_prefix,
                      command=command, client=self._client)
