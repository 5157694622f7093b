"""The ESMTP server engine: one ``SMTPSession`` per connection and the factory that counts them.

This module owns the SMTP dialogue on 25, 587 and 465: our own line splitting (so bare CR and bare
LF are seen precisely), the command state machine of RFC 5321 §4.1 with the extensions we
advertise (PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING, DSN, STARTTLS,
AUTH), reply order under pipelining, every input limit, and the hand-over of an accepted message to
the IMessageSink. AUTH (RFC 4954: PLAIN and LOGIN, only over TLS) logs in through a twisted.cred
portal, with failures throttled per user and client address. What is accepted is the Policy's
business (mailsys.smtp.policy); message content rules live in mailsys.smtp.message; address
syntax in mailsys.address.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from mailsys import replies
from mailsys.address import AddressError, MailRequest, RcptRequest, parse_mail, parse_rcpt
from mailsys.auth.login import LoginLimiter, LoginOutcome, Refusal
from mailsys.auth.sasl import SASLError, decode_base64
from mailsys.auth.throttle import LoginThrottle
from mailsys.config import Config
from mailsys.connlimit import ConnectionCounter, Crowding
from mailsys.defence.intake import ClientDefence, IntakeDefence, MessageDetails, MessageVerdict
from mailsys.diskio import DiskRunner, is_no_space
from mailsys.envelope import Envelope, Recipient
from mailsys.interfaces import IMessageSink, MessageRefusedError
from mailsys.journey.events import NULL_RECORDER, SessionJourney
from mailsys.journey.interfaces import IJourneyRecorder
from mailsys.replies import Reply
from mailsys.routing import Destination
from mailsys.session import ServerSession, SessionMetrics
from mailsys.smtp.linelimit import fit_lines
from mailsys.smtp.message import (
    MessageBuffer,
    field_value,
    has_field,
    header_section,
    message_id_of,
)
from mailsys.smtp.policy import Policy, RecipientRejected, SessionInfo, StorageGate
from mailsys.tls import TLSContextSource, describe_tls
from mailsys.transports import connection_write, write_now

log = Logger()

# Replies that count as client errors for max_bad_commands: unknown commands, syntax errors,
# bad sequence, unsupported parameters (RFC 5321 §4.2.2).
_ERROR_CODES = frozenset({500, 501, 502, 503, 555})

# RFC 4954 §3: the SASL mechanisms listed after the AUTH keyword. Both send the password in the
# clear, so AUTH is only ever offered inside TLS.
_MECHANISMS = (b"PLAIN", b"LOGIN")


class ListenerRole(enum.Enum):
    """Which service a listener offers: MTA (25), submission with STARTTLS (587), implicit TLS
    submission (465, RFC 8314)."""

    MTA = "mta"
    SUBMISSION = "submission"
    SUBMISSIONS = "submissions"


class _Mode(enum.Enum):
    COMMAND = "command"
    SWALLOW = "swallow"  # discarding an over-long command line up to its LF
    DATA = "data"
    BDAT = "bdat"


@dataclass
class _Transaction:
    """One mail transaction: from MAIL to the end of DATA/BDAT LAST, RSET or a new EHLO."""

    mail: MailRequest
    recipients: list[tuple[RcptRequest, list[Destination]]] = field(default_factory=list)
    message: MessageBuffer | None = None
    chunking: bool = False  # BDAT has been used (RFC 3030: DATA is then out of sequence)
    failed: bool = False  # a BDAT chunk was refused: more BDAT is refused until RSET or MAIL


@functools.lru_cache(maxsize=512)
def _wire(reply: Reply) -> bytes:
    return b"\r\n".join(reply.lines()) + b"\r\n"


_last_date: tuple[int, str] = (-1, "")


def _rfc5322_date(when: float) -> str:
    """``when`` as an RFC 5322 §3.3 date in UTC; formatted once per second at most."""
    global _last_date
    second = int(when)
    if _last_date[0] != second:
        _last_date = (second, formatdate(second, usegmt=True).replace(" GMT", " +0000"))
    return _last_date[1]


_QUEUED = ("{queue_id}: from=<{sender}> size={size} nrcpt={nrcpt} client={client} "
           "proto={proto} queued")
_QUEUED_AUTHENTICATED = ("{queue_id}: from=<{sender}> size={size} nrcpt={nrcpt} client={client} "
                         "sasl_username={sasl_username} proto={proto} queued")


class SMTPSession(ServerSession):
    """One SMTP connection, from greeting to QUIT.

    Input is kept in ``_buffer`` from ``_offset`` on and processed strictly one command at a
    time (mailsys.inputloop). A command whose answer is a Deferred (policy, spool) pauses
    processing; later commands stay buffered until it fires, so replies always leave in command
    order (RFC 2920 §3). Replies are collected in ``_out`` and written once per processed batch.
    """

    # While a command waits for a Deferred, at most this much further input is buffered before
    # the transport is asked to stop reading (a client pipelining a message far ahead of us).
    max_buffer_while_waiting = 256 * 1024

    protocol_name = "smtp"
    log = log

    def __init__(self, factory: SMTPServerFactory) -> None:
        # The [smtp] section, read directly (config values are checked when the file is read).
        self._limits = factory.config.smtp
        super().__init__(factory, max_bad_commands=self._limits.max_bad_commands)
        self._factory = factory
        self._role = factory.role
        self._hostname = factory.hostname
        # What EHLO advertises, as of this session's start: after a reload (mailsys.reload) a
        # second EHLO (after STARTTLS) still names the SIZE this session enforces.
        self._ehlo_replies = factory.ehlo_replies
        self._policy = factory.policy
        self._sink = factory.sink
        self._mode = _Mode.COMMAND
        self._out: list[bytes] = []
        # Every answer so far went straight to the socket: nothing is buffered in the
        # transport, so the next may too (mailsys.transports.write_now).
        self._direct = True
        self._connected_at = 0.0
        self._helo: str | None = None
        self._esmtp = False
        self._auth_user: str | None = None  # the canonical mailbox that AUTH logged in
        self._txn: _Transaction | None = None
        self._messages = 0
        self._chunk_remaining = 0
        self._chunk_last = False
        self._chunk_refusal: Reply | None = None
        # The journey of this session's messages (mailsys.journey): each command with its
        # reply, tied by transaction number to the queue id the message finally gets.
        self._journey = SessionJourney(factory.journey)
        self._tls_recorded = False
        self._quit = False
        # The intake defences of this connection (mailsys.defence), made at connect.
        self._defence: ClientDefence | None = None
        self._pregreet: IDelayedCall | None = None  # the greeting pause (postscreen's test)
        self._auth_mechanism = ""
        # When set, complete lines go here instead of to the command table: the way for a
        # command with continuation lines (AUTH's SASL exchange, RFC 4954 §4) to read them,
        # with the same CRLF, length and ordering rules as commands. It clears itself.
        self._line_handler: Callable[[bytes], Reply | Deferred[Reply] | None] | None = None
        self._commands: dict[bytes, Callable[[bytes], Reply | Deferred[Reply] | None]] = {
            b"EHLO": self._do_ehlo,
            b"HELO": self._do_helo,
            b"MAIL": self._do_mail,
            b"RCPT": self._do_rcpt,
            b"DATA": self._do_data,
            b"BDAT": self._do_bdat,
            b"RSET": self._do_rset,
            b"NOOP": self._do_noop,
            b"QUIT": self._do_quit,
            b"VRFY": self._do_vrfy,
            b"EXPN": self._do_expn,
            b"HELP": self._do_help,
            b"STARTTLS": self._do_starttls,
            b"AUTH": self._do_auth,
        }

    # --- the session skeleton (mailsys.session) -------------------------------------------------

    @override
    def _client_label(self, host: str) -> str:
        return _client_label(host)

    @override
    def _implicit_tls(self) -> bool:
        return self._role is ListenerRole.SUBMISSIONS  # RFC 8314 §3.3: 465 is TLS at once

    @override
    def _refusal(self, crowding: Crowding) -> bytes:
        if crowding is Crowding.TOTAL:
            return _wire(replies.TOO_MANY_CONNECTIONS)
        return _wire(replies.TOO_MANY_FROM_CLIENT)

    @override
    def _sheddable(self) -> bool:
        return True  # until a transaction completes (mailsys.connlimit)

    @override
    def _shed_answer(self) -> bytes:
        return _wire(replies.SHED_IDLE)

    @override
    def _greet(self) -> None:
        # No line here: the disconnect line says when the session began and what it did, and
        # a log event costs a measurable share of the reactor per message.
        self._connected_at = self._clock.seconds()
        self._journey.emit("smtp.connect", client=self._client_address,
                           listener=self._role.value)
        defence = self._factory.defence
        if defence is not None:
            self._defence = client = defence.client(self._client_address, self._journey.emit,
                                                    local_address=self._local_address)
            refusal = client.connected()
            if refusal is not None:
                self._send_now(_wire(refusal))
                self._close()
                return
            pause = defence.section.greeting_pause
            if pause is not None and defence.inbound and not client.exempt:
                # postscreen's pregreet test: the first line of a multi-line greeting, then a
                # pause; a client that talks before the last line is a bot (RFC 5321 §4.2.1:
                # the client must wait for the whole reply).
                self._send_now(self._factory.greeting_first)
                self._pregreet = self._clock.callLater(pause, self._greeting_paused)
                return
        # Sent at once: buffered, it would cost a reactor iteration of its own.
        self._send_now(self._factory.greeting)

    def _local_address(self) -> str:
        """The address the client reached (what a HELO naming our own address would name)."""
        return str(getattr(self._transport.getHost(), "host", ""))

    def _greeting_paused(self) -> None:
        self._pregreet = None
        if not self._disconnected and not self._closing:
            self._send_now(self._factory.greeting)

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._pregreet is not None and not self._closing:
            self._pregreet.cancel()
            self._pregreet = None
            log.info("pregreet from {client}: talked before the greeting", client=self._client)
            if self._defence is not None:
                self._defence.decided("pregreet", "refuse", "talked before the greeting",
                                      reply=str(replies.PREGREET))
            self._send_now(_wire(replies.PREGREET))
            self._close()
            return
        super().dataReceived(data)

    @override
    def _session_ended(self) -> None:
        if self._pregreet is not None:
            self._pregreet.cancel()
            self._pregreet = None
        lost = self._lost_message()
        if not self._quit:
            # A session that ends with QUIT is no step worth its cost on the hot path; one that
            # breaks off (inside DATA, timed out, dropped) is part of its message's story.
            self._journey.emit("smtp.close", reason=lost or "closed without QUIT",
                               messages=self._messages)
        log.info("disconnect from {client} helo=<{helo}> messages={messages} "
                 "errors={errors} duration={duration}s" + (" {lost}" if lost else ""),
                 client=self._client, helo=self._helo or "",
                 messages=self._messages, errors=self._errors,
                 duration=round(self._clock.seconds() - self._connected_at, 3), lost=lost)

    @override
    def _timed_out(self) -> None:
        self._out.append(_wire(replies.IDLE_TIMEOUT))
        self._close()

    @override
    def _close(self) -> None:
        self._closing = True
        self._flush()  # the replies of this batch go out, then the connection closes

    @override
    def _send_now(self, data: bytes) -> None:
        self._out.append(data)
        self._flush()

    @override
    def _reset_after_tls(self) -> None:
        # RFC 3207 §4.2: forget everything learnt before TLS; the client must EHLO again.
        self._helo = None
        self._esmtp = False
        self._txn = None
        self._auth_user = None
        self._journey.end_transaction()

    def _lost_message(self) -> str:
        """What a client that went away in the middle of a message took with it, or ""."""
        txn = self._txn
        if txn is None or txn.message is None:
            return ""  # no message begun, or complete and handed to the sink (not lost)
        command = "BDAT" if txn.chunking else "DATA"
        return f"lost connection after {command} ({txn.message.octets} bytes)"

    # --- the input loop (mailsys.inputloop) ------------------------------------------------------

    @override
    def _idle_seconds(self) -> float:
        if self._messages == 0 and self._connections.stressed:
            # Near the cap: no transaction completed yet, so a short leash (mailsys.connlimit).
            return min(self._limits.stress_idle_timeout, self._limits.idle_timeout)
        return self._limits.idle_timeout

    @override
    def _step(self) -> bool:
        mode = self._mode
        if mode is _Mode.COMMAND:
            return self._command_step()
        if mode is _Mode.DATA:
            return self._data_step()
        if mode is _Mode.BDAT:
            return self._chunk_step()
        return self._swallow_step()

    @override
    def _internal_error_answer(self) -> bytes:
        return _wire(replies.INTERNAL_ERROR_CLOSING)

    @override
    def _batch_done(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self._disconnected:
            self._out.clear()
            return
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            if self._direct:
                # Nothing waits in the transport: one send, no epoll_ctl (transports.write_now).
                self._direct = write_now(self._transport, data)
            else:
                connection_write(self._transport, data)
        if self._closing:
            self._transport.loseConnection()

    def _command_step(self) -> bool:
        buf = self._buffer
        start = self._offset
        # Commands end with CRLF. We split at LF so a client ending lines with a bare LF gets an
        # answer rather than silence, and refuse any line that does not end in exactly CRLF.
        lf = buf.find(b"\n", start)
        limit = self._limits.max_command_length
        if lf < 0:
            if len(buf) - start > limit:
                # RFC 5321 §4.5.3.1.4: too long; drop it up to its end, then reply once.
                self._line_handler = None  # an AUTH exchange ends with that reply
                self._mode = _Mode.SWALLOW
                self._buffer = b""
                self._offset = 0
                return True
            if start:
                self._buffer = buf[start:]
                self._offset = 0
            return False
        self._offset = lf + 1
        if lf + 1 - start > limit:
            # An AUTH exchange in progress ends with this reply: the next line is a command
            # again, never taken as credentials.
            self._line_handler = None
            self._reply(replies.LINE_TOO_LONG)
            return True
        line = buf[start:lf]
        if line[-1:] != b"\r" or b"\r" in line[:-1]:
            # RFC 5321 §2.3.8: bare CR or LF; never execute such a line (nor take it as an
            # AUTH response: the exchange ends here).
            self._line_handler = None
            self._reply(replies.BARE_LINE_ENDING_COMMAND)
            return True
        handler = self._line_handler
        if handler is not None:
            self._line_handler = None
            self._answer(handler(line[:-1]))
        else:
            self._dispatch(line[:-1])
        return True

    def _swallow_step(self) -> bool:
        lf = self._buffer.find(b"\n", self._offset)
        if lf < 0:
            self._buffer = b""
            self._offset = 0
            return False
        self._offset = lf + 1
        self._mode = _Mode.COMMAND
        self._reply(replies.LINE_TOO_LONG)
        return True

    def _data_step(self) -> bool:
        txn = self._txn
        assert txn is not None and txn.message is not None
        data = self._buffer[self._offset:] if self._offset else self._buffer
        self._buffer = b""
        self._offset = 0
        if not data:
            return False
        rest = txn.message.feed_data(data)
        if rest is None:
            return False
        self._buffer = rest
        self._mode = _Mode.COMMAND
        self._answer(self._message_complete(txn))
        return True

    def _chunk_step(self) -> bool:
        start = self._offset
        available = len(self._buffer) - start
        if available <= 0 and self._chunk_remaining:
            return False
        take = min(available, self._chunk_remaining)
        chunk = self._buffer[start : start + take]
        self._offset = start + take
        self._chunk_remaining -= take
        txn = self._txn
        if self._chunk_refusal is None and txn is not None and txn.message is not None:
            txn.message.feed_chunk(chunk)
        if self._chunk_remaining:
            return False
        self._mode = _Mode.COMMAND
        self._answer(self._chunk_complete())
        return True

    def _dispatch(self, line: bytes) -> None:
        space = line.find(b" ")
        if space < 0:
            verb, argument = line.upper(), b""
        else:
            verb, argument = line[:space].upper(), line[space + 1 :]
        command = self._commands.get(verb)
        if command is None:
            self._reply(replies.COMMAND_UNRECOGNIZED)
            return
        journal = verb in _JOURNAL_COMMANDS and self._journey.recording
        if journal and verb == b"MAIL" and (self._txn is None or self._txn.failed):
            self._journey.begin_transaction()  # RFC 5321 §3.3: MAIL starts a transaction
        try:
            result = command(argument)
        except Exception:
            log.failure("internal error handling {verb} from {client}",
                        verb=verb.decode("ascii", "replace"), client=self._client)
            self._txn = None
            result = replies.INTERNAL_ERROR
        if journal and result is not None:
            result = self._journal(verb, argument, result)
        self._answer(result)

    def _journal(self, verb: bytes, argument: bytes,
                 result: Reply | Deferred[Reply]) -> Reply | Deferred[Reply]:
        """Record MAIL or RCPT with the reply it gets, refused ones too (RFC 5321 §4.1.1.2-3)."""
        def record(reply: Reply) -> Reply:
            path = _command_path(argument)
            if verb == b"MAIL":
                self._journey.emit("smtp.mail", sender=path, reply=str(reply))
            else:
                self._journey.emit("smtp.rcpt", recipient=path, reply=str(reply))
            return reply

        if isinstance(result, Reply):
            return record(result)
        return result.addCallback(record)

    def _answer(self, result: Reply | Deferred[Reply] | None) -> None:
        if result is None:
            return
        if isinstance(result, Reply):
            self._reply(result)
            return
        self._await(result.addErrback(self._unexpected), self._reply)

    def _unexpected(self, failure: Failure) -> Reply:
        log.failure("internal error in SMTP session with {client}", failure, client=self._client)
        self._txn = None
        return replies.INTERNAL_ERROR

    def _count_refusal(self, reply: Reply) -> None:
        """A recipient or message refused: counted by reply code for monitoring."""
        if self._metrics is not None:
            self._metrics.refused(reply.code)

    def _reply(self, reply: Reply) -> None:
        self._out.append(_wire(reply))
        if reply.code in _ERROR_CODES and self._count_error():
            self._out.append(_wire(replies.TOO_MANY_ERRORS))
            self._closing = True

    # --- state ---------------------------------------------------------------------------------

    def _session_info(self) -> SessionInfo:
        return SessionInfo(
            hostname=self._hostname,
            client_address=self._client_address,
            helo=self._helo,
            tls=self._secure,
            authenticated_user=self._auth_user,
        )

    def _can_starttls(self) -> bool:
        return (
            self._factory.tls is not None
            and not self._secure
            and self._role is not ListenerRole.SUBMISSIONS
        )

    def _auth_listener(self) -> bool:
        """True if this listener does AUTH at all: submission, or port 25 when configured."""
        return self._factory.portal is not None and (
            self._role is not ListenerRole.MTA or self._limits.offer_auth
        )

    def _can_auth(self) -> bool:
        """True if EHLO offers AUTH now: never before TLS (RFC 8314 §3, RFC 4954 §4)."""
        return self._secure and self._auth_listener()

    def _protocol_name(self, smtputf8: bool) -> str:
        """The Received "with" value: RFC 3848 (ESMTPS/A/SA) and RFC 6531 §3.7.3 (UTF8SMTP...)."""
        if not self._esmtp:
            return "SMTP"
        suffix = ("S" if self._secure else "") + ("A" if self._auth_user else "")
        return ("UTF8SMTP" if smtputf8 else "ESMTP") + suffix

    def _new_message(self) -> MessageBuffer:
        limits = self._limits
        return MessageBuffer(
            max_size=limits.max_message_size,
            max_line_length=limits.max_line_length,
            max_received=limits.max_received_headers,
        )

    # --- commands ------------------------------------------------------------------------------

    def _do_ehlo(self, argument: bytes) -> Reply | None:
        helo = _helo_name(argument)
        if helo is None:
            return replies.SYNTAX_ERROR
        # RFC 5321 §4.1.4: EHLO in the middle of a session resets it like RSET.
        self._txn = None
        self._helo = helo
        self._esmtp = True
        if self._defence is not None:
            self._defence.greeted(helo)
        self._record_helo("EHLO", helo)
        self._out.append(self._ehlo_replies[self._can_starttls(), self._can_auth()])
        return None

    def _do_helo(self, argument: bytes) -> Reply | None:
        helo = _helo_name(argument)
        if helo is None:
            return replies.SYNTAX_ERROR
        self._txn = None
        self._helo = helo
        self._esmtp = False
        if self._defence is not None:
            self._defence.greeted(helo)
        self._record_helo("HELO", helo)
        self._out.append(self._factory.helo_reply)
        return None

    def _record_helo(self, command: str, helo: str) -> None:
        journey = self._journey
        journey.end_transaction()
        if self._secure and not self._tls_recorded:
            # The first greeting after the handshake: what TLS the client got (RFC 3207 §4.2).
            self._tls_recorded = True
            journey.emit("smtp.tls", tls=describe_tls(self._transport) or "",
                         implicit=self._implicit_tls())
        journey.emit("smtp.ehlo", command=command, name=helo, reply="250")

    def _do_mail(self, argument: bytes) -> Reply | Deferred[Reply]:
        if self._helo is None:
            return replies.NEED_EHLO
        if self._txn is not None and not self._txn.failed:
            return replies.NESTED_MAIL
        policy = self._policy
        if policy.requires_tls_before_mail and not self._secure:
            return replies.TLS_REQUIRED  # RFC 3207 §4
        if policy.requires_auth and self._auth_user is None:
            return replies.AUTH_REQUIRED  # RFC 4954 §6
        try:
            request = parse_mail(
                argument.decode("utf-8"), extended=self._esmtp, auth=self._auth_listener()
            )
        except UnicodeDecodeError:
            return replies.SYNTAX_ERROR
        except AddressError as error:
            return error.reply
        if request.size is not None and request.size > self._limits.max_message_size:
            return replies.MESSAGE_TOO_BIG  # RFC 1870 §6.1
        storage = self._factory.storage
        refusal = storage.refusal(request.size) if storage is not None else None
        if refusal is not None:
            self._count_refusal(refusal)  # the free-space floor's refusals are refusals too
            return refusal  # RFC 5321 §4.2.2 452, RFC 3463 4.3.1: no room for the message now
        self._txn = None
        defence = self._defence
        if defence is not None:
            judged = defence.mail(_path_text(request), self._auth_user)
            if isinstance(judged, Reply):
                return judged
            if judged is not None:
                return judged.addCallback(self._defence_passed, request)
        return self._check_sender(request)

    def _defence_passed(self, refusal: Reply | None,
                        request: MailRequest) -> Reply | Deferred[Reply]:
        if refusal is not None:
            return refusal
        return self._check_sender(request)

    def _check_sender(self, request: MailRequest) -> Deferred[Reply]:
        d = self._policy.check_sender(self._session_info(), request.sender)
        return d.addCallbacks(self._sender_checked, self._lookup_failed, callbackArgs=(request,))

    def _sender_checked(self, refusal: Reply | None, request: MailRequest) -> Reply:
        if refusal is not None:
            log.info("reject MAIL from {client}: {reply}; from=<{sender}>", client=self._client,
                     reply=str(refusal), sender=_path_text(request))
            return refusal
        self._txn = _Transaction(request)
        return replies.SENDER_OK

    def _lookup_failed(self, failure: Failure) -> Reply:
        log.failure("policy lookup failed for {client}", failure, client=self._client)
        return replies.LOOKUP_FAILED

    def _do_rcpt(self, argument: bytes) -> Reply | Deferred[Reply]:
        if self._helo is None:
            return replies.NEED_EHLO
        txn = self._txn
        if txn is None or txn.failed:
            return replies.NEED_MAIL
        if txn.chunking:
            return replies.BAD_SEQUENCE
        if len(txn.recipients) >= self._limits.max_recipients:
            return replies.TOO_MANY_RECIPIENTS  # RFC 5321 §4.5.3.1.10
        try:
            request = parse_rcpt(
                argument.decode("utf-8"), smtputf8=txn.mail.smtputf8, extended=self._esmtp
            )
        except UnicodeDecodeError:
            return replies.SYNTAX_ERROR
        except AddressError as error:
            return error.reply
        if self._defence is not None:
            refusal = self._defence.recipient(str(request.recipient), self._auth_user)
            if refusal is not None:
                if refusal.code == 421:
                    self._closing = True  # a directory harvest: told to go away
                self._count_refusal(refusal)
                return refusal
        d = self._policy.check_recipient(self._session_info(), request.recipient)
        return d.addCallbacks(
            self._recipient_accepted,
            self._recipient_refused,
            callbackArgs=(txn, request),
            errbackArgs=(request,),
        )

    def _recipient_accepted(
        self, destinations: list[Destination], txn: _Transaction, request: RcptRequest
    ) -> Reply:
        txn.recipients.append((request, destinations))
        return replies.RECIPIENT_OK

    def _recipient_refused(self, failure: Failure, request: RcptRequest) -> Reply:
        if isinstance(failure.value, RecipientRejected):
            reply = failure.value.reply
            log.info("reject RCPT from {client}: {reply}; to=<{recipient}>", client=self._client,
                     reply=str(reply), recipient=str(request.recipient))
            self._count_refusal(reply)
            if self._defence is not None and reply.enhanced == "5.1.1":
                self._defence.recipient_unknown()  # towards the directory harvest limit
            return reply
        return self._lookup_failed(failure)

    def _do_data(self, argument: bytes) -> Reply:
        if argument:
            return replies.SYNTAX_ERROR
        refusal = self._transaction_refusal()
        if refusal is not None:
            return refusal
        txn = self._txn
        assert txn is not None
        if txn.chunking:
            return replies.BAD_SEQUENCE  # RFC 3030 §2: no DATA once BDAT was used
        txn.message = self._new_message()
        self._mode = _Mode.DATA
        return replies.START_INPUT

    def _transaction_refusal(self) -> Reply | None:
        """Why DATA or BDAT cannot start a message now, if it cannot."""
        if self._helo is None:
            return replies.NEED_EHLO
        txn = self._txn
        if txn is None:
            return replies.NEED_MAIL
        if txn.failed:
            return replies.CHUNK_AFTER_FAILURE
        if not txn.recipients:
            return replies.NO_VALID_RECIPIENTS  # RFC 5321 §3.3, RFC 2920 §3.1
        return None

    def _do_bdat(self, argument: bytes) -> Reply | Deferred[Reply] | None:
        # RFC 3030 §2: bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF
        parts = argument.split(b" ")
        if (
            not 1 <= len(parts) <= 2
            or not parts[0].isdigit()
            or len(parts[0]) > 20
            or (len(parts) == 2 and parts[1].upper() != b"LAST")
        ):
            return replies.SYNTAX_ERROR
        size = int(parts[0])
        refusal = self._transaction_refusal()
        if refusal is None:
            txn = self._txn
            assert txn is not None
            txn.chunking = True
            if txn.message is None:
                txn.message = self._new_message()
        # Whatever the answer, the chunk's octets follow and must be read (RFC 3030 §2).
        self._chunk_refusal = refusal
        self._chunk_last = len(parts) == 2
        self._chunk_remaining = size
        if size == 0:
            return self._chunk_complete()
        self._mode = _Mode.BDAT
        return None

    def _chunk_complete(self) -> Reply | Deferred[Reply]:
        if self._chunk_refusal is not None:
            refusal, self._chunk_refusal = self._chunk_refusal, None
            return refusal
        txn = self._txn
        assert txn is not None and txn.message is not None
        if self._chunk_last:
            txn.message.finish_chunks()
        if txn.message.error is not None:
            error = txn.message.error
            log.info("reject BDAT from {client}: {reply}", client=self._client, reply=str(error))
            txn.message = None
            txn.failed = True
            return error
        if not self._chunk_last:
            return replies.CHUNK_OK
        return self._message_complete(txn)

    def _message_complete(self, txn: _Transaction) -> Reply | Deferred[Reply]:
        """The data of ``txn`` is complete: refuse it or hand it to the sink."""
        # RFC 5321 §4.1.1.4: whatever the outcome, the transaction is over.
        self._txn = None
        buffer = txn.message
        assert buffer is not None
        txn.message = None
        if buffer.error is not None:
            log.info("reject message from {client}: {reply}; from=<{sender}>",
                     client=self._client, reply=str(buffer.error), sender=_path_text(txn.mail))
            self._journey.emit("smtp.data", command="BDAT" if txn.chunking else "DATA",
                               size=buffer.octets, reply=str(buffer.error))
            self._count_refusal(buffer.error)
            return buffer.error
        content = buffer.message()
        if buffer.long_lines and self._auth_user is not None:
            # Submitted mail is signed next: sign what will be sent, so re-encode the lines
            # over RFC 5321's limit now rather than at the relay (mailsys.smtp.linelimit).
            threads = self._factory.threads
            if threads is None:
                content = fit_lines(content)
            else:
                fitted: Deferred[bytes] = threads.run(fit_lines, content)
                fitted.addErrback(self._not_fitted, content)
                return fitted.addCallback(self._prepared, txn)
        return self._prepared(content, txn)

    def _not_fitted(self, failure: Failure, content: bytes) -> bytes:
        # Never a reason to refuse: the relay makes it fit when it sends it.
        log.failure("cannot re-encode the long lines of a message from {client}", failure,
                    client=self._client)
        return content

    def _prepared(self, content: bytes, txn: _Transaction) -> Reply | Deferred[Reply]:
        """The message's content is final: add our fields and hand it on."""
        try:
            queue_id = self._sink.new_queue_id()
            mail = txn.mail
            protocol = self._protocol_name(mail.smtputf8)
            added = b"" if self._auth_user is None else self._submission_fields(queue_id, content)
            received = self._received(queue_id, txn, protocol)
            message = received + added + content
            envelope = Envelope(
                queue_id=queue_id,
                sender=str(mail.sender) if mail.sender is not None else "",
                recipients=_recipients(txn),
                received_at=self._clock.seconds(),
                size=len(message),
                body=mail.body,
                smtputf8=mail.smtputf8,
                ret=mail.ret,
                envid=mail.envid,
                client_address=self._client_address,
                client_helo=self._helo or "",
                protocol=protocol,
                auth_user=self._auth_user,
            )
        except Exception:
            log.failure("cannot prepare a message from {client}", client=self._client)
            return replies.SPOOL_FAILED
        message_id = subject = None
        if self._journey.recording:
            # The client's field, or the one added for it (never a copy of the whole message).
            header = header_section(content)
            message_id = message_id_of(header) or message_id_of(added)
            # The Subject as sent (encoded words and all), for the web page's list of messages.
            raw_subject = field_value(header, b"Subject")
            subject = None if raw_subject is None else raw_subject.decode("utf-8", "replace")
        defence = self._defence
        if defence is None:
            return self._submit(envelope, message, message_id, txn.chunking, subject)

        def details() -> MessageDetails:
            return MessageDetails(self._client_address, self._helo or "", envelope.sender,
                                  tuple(str(r.recipient) for r, _ in txn.recipients), queue_id,
                                  self._auth_user)

        verdict = defence.message(message, details, self._auth_user)
        if isinstance(verdict, MessageVerdict):
            return self._judged(verdict, envelope, message, len(received), message_id,
                                txn.chunking, subject)
        return verdict.addCallback(self._judged, envelope, message, len(received), message_id,
                                   txn.chunking, subject)

    def _judged(self, verdict: MessageVerdict, envelope: Envelope, message: bytes, head: int,
                message_id: str | None, chunking: bool,
                subject: str | None) -> Reply | Deferred[Reply]:
        """The intake defences' verdict on a complete message (mailsys.defence)."""
        if verdict.reply is not None:
            log.info("{queue_id}: reject from=<{sender}> client={client}: {reply}",
                     queue_id=envelope.queue_id, sender=envelope.sender, client=self._client,
                     reply=str(verdict.reply))
            self._journey.emit("smtp.data", command="BDAT" if chunking else "DATA",
                               size=envelope.size, reply=str(verdict.reply))
            self._count_refusal(verdict.reply)
            return verdict.reply
        if verdict.fields:
            # After our Received field: trace fields come first (RFC 5321 §4.4).
            message = message[:head] + verdict.fields + message[head:]
            envelope.size = len(message)
        if verdict.junk:
            for recipient in envelope.recipients:
                recipient.folder = "Junk"
        return self._submit(envelope, message, message_id, chunking, subject)

    def _submit(self, envelope: Envelope, message: bytes, message_id: str | None,
                chunking: bool, subject: str | None) -> Deferred[Reply]:
        d = maybeDeferred(self._sink.submit, envelope, message)
        answer = d.addCallbacks(
            self._queued, self._spool_failed, callbackArgs=(envelope,), errbackArgs=(envelope,)
        )
        if self._journey.recording:
            answer.addCallback(self._record_data, envelope, message_id, chunking, subject)
        return answer

    def _record_data(self, reply: Reply, envelope: Envelope, message_id: str | None,
                     chunking: bool, subject: str | None) -> Reply:
        queued = reply.code == 250
        self._journey.emit("smtp.data", envelope.queue_id if queued else None,
                           message_id if queued else None,
                           command="BDAT" if chunking else "DATA", size=envelope.size,
                           reply=str(reply), subject=subject)
        return reply

    def _queued(self, _: object, envelope: Envelope) -> Reply:
        # One line per accepted message (the hot path), with what its journey starts from;
        # the authenticated user as Postfix names it (sasl_username=).
        self._messages += 1
        if self._messages == 1:
            self._connections.completed(self)  # a real sender: never shed (mailsys.connlimit)
        log.info(
            _QUEUED if envelope.auth_user is None else _QUEUED_AUTHENTICATED,
            queue_id=envelope.queue_id, sender=envelope.sender, size=envelope.size,
            nrcpt=len(envelope.recipients), client=self._client, proto=envelope.protocol,
            sasl_username=envelope.auth_user,
        )
        return replies.QUEUED.with_text(f"{replies.QUEUED.text} as {envelope.queue_id}")

    def _spool_failed(self, failure: Failure, envelope: Envelope) -> Reply:
        refusal = failure.value
        if isinstance(refusal, MessageRefusedError):
            # A check's verdict (mail authentication), not a storage failure.
            log.info("{queue_id}: reject from=<{sender}> client={client}: {reply}; {reason}",
                     queue_id=envelope.queue_id, sender=envelope.sender, client=self._client,
                     reply=str(refusal.reply), reason=refusal.reason)
            return refusal.reply
        if is_no_space(failure.value):
            # The spool logged the path and error; RFC 3463 X.3.1: mail system full.
            log.info("{queue_id}: from=<{sender}> size={size} client={client} not accepted: "
                     "spool full", queue_id=envelope.queue_id, sender=envelope.sender,
                     size=envelope.size, client=self._client)
            return replies.SYSTEM_FULL
        log.failure(
            "{queue_id}: from=<{sender}> size={size} nrcpt={nrcpt} client={client} "
            "not accepted: spool failure",
            failure, queue_id=envelope.queue_id, sender=envelope.sender, size=envelope.size,
            nrcpt=len(envelope.recipients), client=self._client,
        )
        self._count_refusal(replies.SPOOL_FAILED)
        return replies.SPOOL_FAILED

    def _received(self, queue_id: str, txn: _Transaction, protocol: str) -> bytes:
        """The Received field this hop prepends (RFC 5321 §4.4, RFC 5322 §3.6.7).

        Besides the client (unless hidden) it records, as comments in Postfix's style, the TLS
        version and cipher and the authenticated user (RFC 3848 names the protocol).
        """
        utf8 = txn.mail.smtputf8  # RFC 6532: UTF-8 in header fields only with SMTPUTF8
        parts = []
        if not self._factory.hide_client_address:
            parts.append(f"from {_printable(self._helo or 'unknown', utf8)} ({self._client})")
        if self._secure:
            tls = describe_tls(self._transport)
            if tls is not None:
                parts.append(f"({tls})")
        if self._auth_user is not None:
            parts.append(f"(Authenticated sender: {_printable(self._auth_user, utf8)})")
        parts.append(f"by {self._hostname} (mailsys) with {protocol} id {queue_id}")
        if len(txn.recipients) == 1:
            parts.append(f"for <{_printable(str(txn.recipients[0][0].recipient), utf8)}>")
        text = "\r\n\t".join(parts)
        return f"Received: {text}; {_rfc5322_date(self._clock.seconds())}\r\n".encode()

    def _submission_fields(self, queue_id: str, content: bytes) -> bytes:
        """The Date and Message-ID fields a submitted message lacks (RFC 6409 §8.2, §8.3)."""
        header = header_section(content)
        fields = b""
        if not has_field(header, b"Date"):
            fields += f"Date: {_rfc5322_date(self._clock.seconds())}\r\n".encode("ascii")
        if not has_field(header, b"Message-ID"):
            # RFC 5322 §3.6.4: unique; the queue id is, and the host name makes it global.
            fields += f"Message-ID: <{queue_id}@{self._hostname}>\r\n".encode("ascii")
        return fields

    def _do_rset(self, argument: bytes) -> Reply:
        if argument:
            return replies.SYNTAX_ERROR
        self._txn = None
        self._journey.end_transaction()
        return replies.RESET_OK

    def _do_noop(self, argument: bytes) -> Reply:
        return replies.OK  # RFC 5321 §4.1.1.9: an argument is allowed and ignored

    def _do_quit(self, argument: bytes) -> Reply:
        if argument:
            return replies.SYNTAX_ERROR
        self._closing = True
        self._quit = True
        return replies.BYE

    def _do_vrfy(self, argument: bytes) -> Reply:
        if not argument.strip():
            return replies.SYNTAX_ERROR
        return replies.VRFY_CANNOT  # RFC 5321 §3.5.3: 252, not a directory service

    def _do_expn(self, argument: bytes) -> Reply:
        return replies.NOT_IMPLEMENTED

    def _do_help(self, argument: bytes) -> Reply:
        return replies.HELP

    # --- AUTH (RFC 4954) --------------------------------------------------------------------
    #
    # The SASL exchange reads its continuation lines through _line_handler, so they obey the
    # same CRLF, length and ordering rules as commands. The password is checked in a thread by
    # the portal's checker; while that (and a throttled failure's delay) is pending the session
    # waits, later input stays buffered, and the reactor serves everyone else.

    def _do_auth(self, argument: bytes) -> Reply | Deferred[Reply] | None:
        if not self._auth_listener():
            return replies.NOT_IMPLEMENTED  # port 25 by default: no AUTH at all
        if not self._esmtp:
            return replies.AUTH_NEEDS_EHLO  # AUTH is an ESMTP extension (RFC 4954 §3)
        if not self._secure:
            # Never offered in plaintext (RFC 8314 §3); the client must STARTTLS first.
            return replies.TLS_REQUIRED
        if self._auth_user is not None:
            return replies.ALREADY_AUTHENTICATED  # RFC 4954 §4
        if self._txn is not None:
            return replies.AUTH_IN_TRANSACTION  # RFC 4954 §4
        # RFC 4954 §4: "AUTH" SP sasl-mech [SP initial-response]
        parts = argument.split(b" ")
        mechanism = parts[0].upper()
        self._auth_mechanism = mechanism.decode("ascii", "replace")
        if not mechanism:
            return replies.AUTH_NO_MECHANISM
        if len(parts) > 2:
            return replies.SYNTAX_ERROR
        if mechanism not in _MECHANISMS:
            return replies.AUTH_UNKNOWN_MECHANISM
        if self._login.blocked():
            return self._auth_blocked()
        initial = parts[1] if len(parts) == 2 else None
        if mechanism == b"PLAIN":
            if initial is None:
                self._line_handler = self._plain_response
                return replies.AUTH_CONTINUE
            return self._plain_response(initial, initial=True)
        if initial is None:
            self._line_handler = self._login_username
            return replies.LOGIN_USERNAME
        # Clients may send LOGIN's user name as an initial response.
        return self._login_username(initial, initial=True)

    def _sasl_decode(self, line: bytes, *, initial: bool) -> bytes | Reply:
        """The decoded client response, or the reply that ends the exchange."""
        if not initial and line == b"*":
            log.info("AUTH cancelled by {client}", client=self._client)
            return replies.AUTH_CANCELLED  # RFC 4954 §4
        try:
            # RFC 4954 §4: "=" is an empty initial response.
            return decode_base64(line)
        except SASLError:
            log.info("AUTH from {client}: response not base64", client=self._client)
            return replies.AUTH_BAD_BASE64

    def _plain_response(self, line: bytes, *, initial: bool = False) -> Reply | Deferred[Reply]:
        decoded = self._sasl_decode(line, initial=initial)
        if isinstance(decoded, Reply):
            return decoded
        try:
            login = self._login.plain(decoded)  # RFC 4616 §2
        except SASLError as exc:
            log.info("AUTH PLAIN from {client}: {reason}", client=self._client, reason=str(exc))
            return self._login_failed("")
        return login.addCallbacks(self._login_answer, self._login_error)

    def _login_username(self, line: bytes, *, initial: bool = False) -> Reply:
        decoded = self._sasl_decode(line, initial=initial)
        if isinstance(decoded, Reply):
            return decoded
        user = decoded.decode("utf-8", "surrogateescape")
        self._line_handler = functools.partial(self._login_password, user)
        return replies.LOGIN_PASSWORD

    def _login_password(self, user: str, line: bytes) -> Reply | Deferred[Reply]:
        decoded = self._sasl_decode(line, initial=False)
        if isinstance(decoded, Reply):
            return decoded
        return self._authenticate(user, decoded.decode("utf-8", "surrogateescape"))

    def _authenticate(self, user: str, password: str) -> Deferred[Reply]:
        return self._login.attempt(user, password).addCallbacks(
            self._login_answer, self._login_error)

    def _login_failed(self, user: str) -> Deferred[Reply]:
        """Malformed credentials: a failed login like a wrong password, after the same delay,
        so the answer does not tell them apart."""
        return self._login.failed(user).addCallback(self._login_answer)

    def _login_answer(self, outcome: LoginOutcome) -> Reply:
        if outcome is Refusal.BLOCKED:
            return self._auth_blocked()
        if outcome is Refusal.FAILED:
            # Not even the user name tried: it may be a password typed in the wrong field.
            self._journey.emit("smtp.auth", mechanism=self._auth_mechanism,
                               reply=str(replies.AUTH_INVALID))
            return replies.AUTH_INVALID  # RFC 4954 §6: 535 5.7.8
        self._auth_user = outcome.mailbox
        log.info("AUTH {user} from {client}", user=outcome.mailbox, client=self._client)
        self._journey.emit("smtp.auth", user=outcome.mailbox, mechanism=self._auth_mechanism,
                           reply=str(replies.AUTH_OK))
        return replies.AUTH_OK

    def _login_error(self, failure: Failure) -> Reply:
        log.failure("AUTH from {client}: cannot check the password", failure, client=self._client)
        return replies.AUTH_TEMPORARY_FAILURE

    def _auth_blocked(self) -> Reply:
        log.info("AUTH from {client} refused: too many failures", client=self._client)
        self._closing = True
        return replies.TOO_MANY_AUTH_FAILURES

    def _do_starttls(self, argument: bytes) -> Reply | None:
        if argument:
            return replies.SYNTAX_ERROR
        if self._secure:
            return replies.TLS_ALREADY_ACTIVE
        if not self._can_starttls():
            return replies.NOT_IMPLEMENTED
        if self._helo is None:
            return replies.NEED_EHLO
        if not ITLSTransport.providedBy(self._transport):
            return replies.TLS_UNAVAILABLE
        context = self._tls_context("STARTTLS")
        if context is None:
            return replies.TLS_UNAVAILABLE
        self._start_tls(context, _wire(replies.READY_TLS), "STARTTLS")
        return None


class SMTPServerFactory(ServerFactory):
    """Builds SMTP sessions for one listener and counts them, in total and per client address."""

    noisy = False  # no 'Starting factory' lines: the service logs its listeners

    def __init__(
        self,
        config: Config,
        role: ListenerRole,
        policy: Policy,
        sink: IMessageSink,
        clock: IReactorTime,
        tls: TLSContextSource | None = None,
        *,
        portal: Portal | None = None,
        throttle: LoginLimiter | None = None,
        journey: IJourneyRecorder = NULL_RECORDER,
        storage: StorageGate | None = None,
        defence: IntakeDefence | None = None,
    ) -> None:
        # The intake defences (mailsys.defence): consulted at connect, HELO, MAIL, RCPT and
        # the end of DATA; None: none (tests of the bare engine).
        self.defence = defence
        # Threads for CPU work on a whole message (re-encoding long lines); None: inline.
        self.threads: DiskRunner | None = None
        self.journey = journey
        self.role = role
        # Free-space floor of the spool (mailsys.smtp.policy.StorageFloor), asked at MAIL FROM.
        self.storage = storage
        self.policy = policy
        self.sink = sink
        self.clock = clock
        self.tls = tls
        # AUTH needs a portal (none: the listener offers no AUTH). One throttle is shared by
        # every listener and protocol, so a guesser cannot switch ports to start afresh.
        self.portal = portal
        self.metrics: SessionMetrics | None = None  # set by the service (mailsys.web.metrics)
        self.throttle: LoginLimiter | None = throttle
        if portal is not None and throttle is None:
            self.throttle = LoginThrottle(clock)
        smtp = config.smtp
        self.connections = ConnectionCounter(smtp.max_connections, smtp.max_connections_per_client,
                                             shed_idle=True,
                                             stress_fraction=smtp.stress_percent / 100)
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Serve the next sessions with ``config`` (a reload, mailsys.reload); a session already
        open keeps the limits it started with."""
        self.config = config
        self.hostname = config.server.hostname
        # Submission privacy: the client's address stays out of the Received field.
        self.hide_client_address = (self.role is not ListenerRole.MTA
                                    and config.submission.hide_client_address)
        smtp = config.smtp
        # The counts of open connections stay; only the limits change.
        self.connections.max_total = smtp.max_connections
        self.connections.max_per_client = smtp.max_connections_per_client
        self.connections.stress_fraction = smtp.stress_percent / 100
        hostname = self.hostname
        self.greeting = _wire(
            replies.GREETING.with_text(f"{hostname} {replies.GREETING.text}")
        )
        # The first line of a greeting held back by the pregreet test (RFC 5321 §4.2.1).
        self.greeting_first = b"220-" + hostname.encode("ascii", "replace") + b"\r\n"
        self.helo_reply = _wire(Reply(250, "", hostname))  # RFC 2034 §3: no enhanced code
        keywords = [
            "PIPELINING",  # RFC 2920
            f"SIZE {smtp.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "SMTPUTF8",  # RFC 6531
            "ENHANCEDSTATUSCODES",  # RFC 2034
            "CHUNKING",  # RFC 3030
            "DSN",  # RFC 3461
        ]
        auth = "AUTH " + " ".join(m.decode("ascii") for m in _MECHANISMS)  # RFC 4954 §3
        self.ehlo_replies: dict[tuple[bool, bool], bytes] = {
            (starttls, offer_auth): _wire(Reply(250, "", "\n".join(
                [hostname, *keywords]
                + (["STARTTLS"] if starttls else [])
                + ([auth] if offer_auth else [])
            )))
            for starttls in (False, True)
            for offer_auth in (False, True)
        }

    def ehlo_reply(self, offer_starttls: bool, offer_auth: bool = False) -> bytes:
        """The EHLO reply on the wire, with STARTTLS (RFC 3207) and AUTH (RFC 4954) when they
        can be used."""
        return self.ehlo_replies[offer_starttls, offer_auth]

    @override
    def buildProtocol(self, addr: IAddress | None) -> SMTPSession:
        session = SMTPSession(self)
        session.factory = self
        return session



def _recipients(txn: _Transaction) -> list[Recipient]:
    """One Recipient per distinct destination, in RCPT order (duplicates delivered once)."""
    seen: set[tuple[str, str]] = set()
    result = []
    for request, destinations in txn.recipients:
        for destination in destinations:
            key = (destination.address.lower(), destination.kind.value)
            if key in seen:
                continue
            seen.add(key)
            result.append(
                Recipient(
                    address=destination.address,
                    original=str(request.recipient),
                    kind=destination.kind,
                    mailbox=destination.mailbox,
                    orcpt=request.orcpt,
                    notify=request.notify,
                )
            )
    return result


def _helo_name(argument: bytes) -> str | None:
    text = argument.strip(b" ").decode("utf-8", "replace")
    return text or None


def _printable(text: str, utf8: bool) -> str:
    """``text`` safe inside a header field: printable characters, ASCII unless ``utf8``."""
    if text.isprintable() and (utf8 or text.isascii()):
        return text
    return "".join(c if c.isprintable() and (utf8 or c.isascii()) else "?" for c in text)


def _client_label(host: str) -> str:
    """The client as an address literal (RFC 5321 §4.1.3): [192.0.2.1] or [IPv6:2001:db8::1]."""
    if not host:
        return "[unknown]"
    if ":" in host:
        return f"[IPv6:{host}]"
    return f"[{host}]"



_JOURNAL_COMMANDS = frozenset({b"MAIL", b"RCPT"})


def _command_path(argument: bytes) -> str:
    """The address of a MAIL FROM:<...> or RCPT TO:<...> argument as the client sent it."""
    text = argument.decode("utf-8", "replace")
    start = text.find("<")
    end = text.find(">", start + 1)
    if start >= 0 and end > start:
        return text[start + 1 : end]
    return text.partition(":")[2].strip().split(" ")[0]


def _path_text(request: MailRequest) -> str:
    return str(request.sender) if request.sender is not None else ""
