"""The input loop the SMTP, POP3 and IMAP sessions share: client input handled strictly in order.

Input is buffered and handled one step (a command, a line of a message, a literal) at a time.
A step whose answer must wait for the disk, the password check or the policy sets ``_waiting``;
input that arrives meanwhile stays buffered, and once more than ``max_buffer_while_waiting``
bytes wait the transport stops reading. So answers leave in the order the commands came
(RFC 2920 §3, RFC 2449 §6.6, RFC 3501 §5.5) and a pipelining client cannot make us buffer
without bound. Reactor thread only. mailsys.session builds the protocol sessions' common
skeleton (admission, idle timer, STARTTLS, close) on this loop.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, ITransport
from twisted.internet.protocol import Protocol
from typing_extensions import override

from mailsys.transports import call_optional, send_now


class InputLoopSession(Protocol):
    """A server session that handles its input in order; subclasses say what a step is."""

    # Input buffered while an answer is awaited before reading pauses.
    max_buffer_while_waiting = 64 * 1024
    _transport: ITransport  # set by the subclass's connectionMade

    def __init__(self) -> None:
        self._buffer = b""  # input not yet handled is _buffer[_offset:]
        self._offset = 0
        self._waiting = False  # an answer is awaited: later input stays buffered
        self._processing = False  # the loop is running (a Deferred may fire inside it)
        self._reading_paused = False
        self._closing = False  # the session is ending: no more input is handled
        self._disconnected = False
        self._unsent = False  # output written since the loop last sent it
        self._timer: IDelayedCall | None = None  # the idle timer

    # --- what a subclass provides --------------------------------------------------------------

    def _idle_seconds(self) -> float:
        """How long the client may now stay silent."""
        raise NotImplementedError

    def _step(self) -> bool:
        """Handle the next piece of buffered input; False when nothing more can be done now."""
        raise NotImplementedError

    def _step_failed(self) -> None:
        """A step raised: log it, tell the client something safe, and close (the input position
        may be inconsistent now). Never a traceback to the peer."""
        raise NotImplementedError

    # --- buffering (IMAP's framer replaces these two) ------------------------------------------

    def _feed(self, data: bytes) -> None:
        if self._offset < len(self._buffer):
            self._buffer = self._buffer[self._offset:] + data
        else:
            self._buffer = data
        self._offset = 0

    def _buffered(self) -> int:
        return len(self._buffer) - self._offset

    # --- the loop ------------------------------------------------------------------------------

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._timer is not None:
            self._timer.reset(self._idle_seconds())
        self._feed(data)
        if not self._waiting:
            self._process()
        elif self._buffered() > self.max_buffer_while_waiting and not self._reading_paused:
            self._reading_paused = True
            call_optional(self._transport, "pauseProducing")

    def _write(self, data: bytes) -> None:
        """Write output; it leaves when the current batch of input has been handled."""
        if not self._disconnected and data:
            self._transport.write(data)
            self._unsent = True

    def _process(self) -> None:
        """Handle buffered input until it runs out, an answer is awaited, or we close."""
        if self._processing:
            return  # a Deferred fired synchronously inside the loop: the loop carries on
        self._processing = True
        try:
            while not self._waiting and not self._closing and self._step():
                pass
        except Exception:
            self._step_failed()
        finally:
            self._processing = False
        self._batch_done()

    def _batch_done(self) -> None:
        """The loop stopped: the answers to this batch of input go out now, not a reactor
        turn later (mailsys.transports.send_now)."""
        if self._unsent:
            self._unsent = False
            send_now(self._transport)

    def _continue(self) -> None:
        """An awaited answer was written: read again if reading paused, and handle what
        was buffered meanwhile."""
        self._waiting = False
        if self._reading_paused:
            self._reading_paused = False
            call_optional(self._transport, "resumeProducing")
        self._process()
