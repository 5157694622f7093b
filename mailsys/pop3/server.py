"""The POP3 server engine: one ``POP3Session`` per connection, and its factory.

This module owns the POP3 dialogue on 110 and 995: RFC 1939 (USER/PASS, STAT, LIST, RETR, DELE,
RSET, TOP, UIDL, NOOP, QUIT and the AUTHORIZATION/TRANSACTION/UPDATE states), CAPA and response
codes (RFC 2449, RFC 3206), STLS (RFC 2595) and AUTH PLAIN (RFC 5034, RFC 4616). Messages come
from the mailbox store (mailsys.mailbox); passwords are checked through a twisted.cred portal,
and failures are throttled per user and client address (mailsys.auth.throttle).

Commands are handled strictly one at a time, in order: a command waiting for the disk or the
password check holds the ones pipelined behind it (RFC 2449 §6.6 PIPELINING).
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IPushProducer,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from mailsys.auth.login import LoginOutcome, Refusal
from mailsys.auth.portal import MailUser
from mailsys.auth.sasl import SASLError, decode_base64
from mailsys.config import Config, POP3Section
from mailsys.connlimit import Crowding
from mailsys.journey.events import SessionJourney
from mailsys.mailbox.folder import Folder, MessageInfo, MessageVanishedError, adding
from mailsys.mailbox.layout import delivered_queue_id
from mailsys.mailbox.names import SEEN
from mailsys.mailbox.store import INBOX, FolderView, MailboxInUseError, MailboxLock
from mailsys.mailbox.wire import WireEncoder, encode_pop3, top_lines
from mailsys.retrieval import MailboxServerFactory
from mailsys.session import ServerSession

log = Logger(namespace="mailsys.pop3")

# Messages up to this size are read and encoded in one go in a disk thread; larger ones are
# streamed in chunks of STREAM_CHUNK, written only as fast as the client reads.
SMALL_MESSAGE = 256 * 1024
STREAM_CHUNK = 64 * 1024
# How much of the messages after the one being retrieved is read ahead (per session).
READ_AHEAD_BYTES = 1024 * 1024
# RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
_UIDL_CHARS = re.compile(r"[\x21-\x7e]{1,70}")


# --- responses (RFC 1939 §3: "+OK" or "-ERR", RFC 2449 §8 response codes in brackets) -------------


def _ok(text: str = "") -> bytes:
    return f"+OK {text}\r\n".encode() if text else b"+OK\r\n"


def _err(text: str, code: str | None = None) -> bytes:
    return (f"-ERR [{code}] {text}\r\n" if code else f"-ERR {text}\r\n").encode()


def _multiline(text: str, lines: list[str]) -> bytes:
    """A multi-line response (RFC 1939 §3): "+OK", the lines, then "." alone."""
    body = "".join(f"{line}\r\n" for line in lines)
    return _ok(text) + body.encode("utf-8", "surrogateescape") + b".\r\n"


GREETING_TEXT = "POP3 server ready"
BYE = _ok("Bye")
ERR_UNKNOWN = _err("Unknown command")
ERR_WRONG_STATE = _err("Command not valid in this state")
ERR_SYNTAX = _err("Syntax error")
ERR_NO_SUCH_MESSAGE = _err("No such message")
ERR_DELETED = _err("Message is deleted")
ERR_LINE_TOO_LONG = _err("Command line too long")
ERR_TOO_MANY_ERRORS = _err("Too many errors, closing connection")
ERR_INTERNAL = _err("Internal error", "SYS/TEMP")
# RFC 3206 §4: SYS/TEMP, a problem the client may expect to go away.
ERR_TOO_MANY_CONNECTIONS = _err("Too many connections, try again later", "SYS/TEMP")
ERR_NEED_USER = _err("Send USER first")
ERR_AUTH_FAILED = _err("Authentication failed", "AUTH")
# RFC 2595 §2.3 / RFC 8314 §3: no passwords in the clear unless the administrator allows it.
ERR_PLAINTEXT = _err("Plaintext authentication disallowed without TLS; use STLS", "AUTH")
ERR_THROTTLED = _err("Too many failed logins; try again later", "SYS/TEMP")
# RFC 2449 §8.1.2: the maildrop is locked by another session.
ERR_IN_USE = _err("Mailbox is in use by another POP3 session", "IN-USE")
ERR_MAILBOX = _err("Cannot open the mailbox", "SYS/TEMP")
ERR_MECHANISM = _err("Unsupported authentication mechanism")
ERR_AUTH_CANCELLED = _err("Authentication cancelled")
ERR_AUTH_SYNTAX = _err("Malformed authentication response")
ERR_TLS_ACTIVE = _err("TLS is already active")
ERR_TLS_UNAVAILABLE = _err("TLS is not available")
ERR_MESSAGE_GONE = _err("Message was deleted by another session", "SYS/PERM")
ERR_UPDATE_FAILED = _err("Some deleted messages were not removed", "SYS/TEMP")
STLS_READY = _ok("Begin TLS negotiation")
SASL_CONTINUE = b"+ \r\n"  # RFC 5034 §4: an empty server challenge



class _State(enum.Enum):
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"


def _octets(info: MessageInfo) -> int:
    """The message's size as LIST, STAT and RETR give it (RFC 1939 §5: with CRLF line ends).
    Known for every message: the maildrop is opened with its sizes (MailboxStore.open_folder)."""
    assert info.wire_size is not None
    return info.wire_size


def uidl_of(key: str) -> str:
    """The POP3 unique-id of a message: its Maildir key, or a hash of it if unfit (RFC 1939 §7).

    It depends only on the key, so it survives flag changes, restarts and UID file rebuilds.
    """
    if _UIDL_CHARS.fullmatch(key):
        return key
    return hashlib.blake2s(key.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def _encode_whole(folder: Folder, info: MessageInfo) -> bytes:
    """Disk thread: the whole message as a POP3 multi-line body."""
    return encode_pop3(folder.read_message(info))


def _encode_top(folder: Folder, info: MessageInfo, lines: int) -> bytes:
    """Disk thread: header and ``lines`` body lines as a POP3 multi-line body (RFC 1939 TOP)."""
    data = folder.read_prefix(info, lambda prefix: top_lines(prefix, lines) is not None)
    part = top_lines(data, lines)
    return encode_pop3(data if part is None else part)


def _read_batch(folder: Folder, infos: list[tuple[int, MessageInfo]]
                ) -> dict[int, bytes | BaseException]:
    """Disk thread: several small messages encoded for RETR; a failure is kept per message."""
    out: dict[int, bytes | BaseException] = {}
    for number, info in infos:
        try:
            out[number] = _encode_whole(folder, info)
        except Exception as exc:
            out[number] = exc
    return out


class _ReadAhead:
    """Reads small messages in batches ahead of the client's RETRs.

    POP3 clients fetch in order, one RETR after another: served from memory, a RETR costs no
    thread hop, and one disk-thread call reads READ_AHEAD_BYTES worth of messages while the
    client is busy with the previous ones. A RETR out of order simply starts a new batch.
    """

    def __init__(self, session: POP3Session, view: FolderView, deleted: set[int]) -> None:
        self._session = session
        self._view = view
        self._deleted = deleted
        self._ready: dict[int, bytes | BaseException] = {}
        self._ready_bytes = 0
        self._pending: Deferred[None] | None = None
        self._pending_numbers: set[int] = set()
        self._next = 1  # the first number not yet read or being read

    def take(self, number: int) -> bytes | BaseException | Deferred[bytes]:
        """Message ``number`` encoded: at once if read ahead, else a Deferred."""
        if number in self._ready:
            body = self._pop(number)
            self._refill()
            return body
        if number not in self._pending_numbers:
            self._ready.clear()
            self._ready_bytes = 0
            self._next = number
            if self._pending is None:
                self._refill()
            if number not in self._pending_numbers:
                # A batch for other numbers is in flight: read this one on its own.
                info = self._view.messages[number - 1]
                return self._session.run(_encode_whole, self._view.folder, info)
        assert self._pending is not None
        result: Deferred[bytes] = Deferred()

        def arrived(_: object) -> None:
            body = self._pop(number) if number in self._ready else None
            if body is None:  # pragma: no cover - the batch failed as a whole
                info = self._view.messages[number - 1]
                self._session.run(_encode_whole, self._view.folder, info).chainDeferred(result)
            elif isinstance(body, BaseException):
                result.errback(body)
            else:
                result.callback(body)

        self._pending.addCallback(arrived)
        return result

    def _pop(self, number: int) -> bytes | BaseException:
        body = self._ready.pop(number)
        if isinstance(body, bytes):
            self._ready_bytes -= len(body)
        return body

    def _refill(self) -> None:
        """Start the next batch when less than half a batch is left ahead."""
        if self._pending is not None:
            return
        if self._ready_bytes >= READ_AHEAD_BYTES // 2:
            return
        messages = self._view.messages
        batch: list[tuple[int, MessageInfo]] = []
        size = 0
        number = self._next
        while number <= len(messages) and size < READ_AHEAD_BYTES:
            info = messages[number - 1]
            if info.size > SMALL_MESSAGE:
                break  # streamed when asked for
            if number not in self._deleted and number not in self._ready:
                batch.append((number, info))
                size += info.size
            number += 1
        if not batch:
            return
        self._next = number
        self._pending_numbers = {n for n, _ in batch}
        d = self._session.run(_read_batch, self._view.folder, batch)

        def done(bodies: dict[int, bytes | BaseException]) -> None:
            self._pending = None
            self._pending_numbers = set()
            self._ready.update(bodies)
            self._ready_bytes += sum(len(b) for b in bodies.values() if isinstance(b, bytes))

        def failed(failure: Failure) -> None:  # pragma: no cover - _read_batch never raises
            self._pending = None
            self._pending_numbers = set()

        self._pending = d.addCallbacks(done, failed)


@implementer(IPushProducer)
class _MessageStream:
    """Streams one large message to the client: chunks read in a disk thread, encoded across
    chunk boundaries, and written only while the transport wants more (RFC 1939 §3 stuffing)."""

    def __init__(self, session: POP3Session, file: BinaryIO, done: Deferred[None]) -> None:
        self._session = session
        self._file = file
        self._encoder = WireEncoder(stuff_dots=True)
        self._done = done
        self._paused = False
        self._reading = False
        self._finished = False

    def start(self) -> None:
        self._session.consumer.registerProducer(self, True)
        self._read_next()

    def _read_next(self) -> None:
        if self._finished or self._paused or self._reading:
            return
        self._reading = True
        self._session.run(self._file.read, STREAM_CHUNK).addCallbacks(self._got, self._fail)

    def _got(self, chunk: bytes) -> None:
        self._reading = False
        if self._finished:
            return
        transport = self._session.transport_
        if not chunk:
            transport.write(self._encoder.finish() + b".\r\n")
            self._end(None)
            return
        transport.write(self._encoder.feed(chunk))
        self._read_next()

    def _fail(self, failure: Failure) -> None:
        self._reading = False
        self._end(failure)

    def _end(self, failure: Failure | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._session.consumer.unregisterProducer()
        self._session.run(self._file.close)
        if failure is None:
            self._done.callback(None)
        else:
            self._done.errback(failure)

    # IPushProducer methods (a zope interface, hence no @override: mypy finds no base class).
    def pauseProducing(self) -> None:  # noqa: N802
        self._paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self._paused = False
        self._read_next()

    def stopProducing(self) -> None:  # noqa: N802
        # The connection is gone: stop quietly; the session has already cleaned up.
        if not self._finished:
            self._finished = True
            self._session.run(self._file.close)


class POP3Session(ServerSession):
    """One POP3 connection, from the greeting to QUIT (or a dropped connection).

    Input is buffered and handled one command at a time; a command whose answer needs the disk
    or the password check sets ``_waiting`` and later commands stay buffered until it is done, so
    answers leave in command order. Deletions happen only in the UPDATE state, after QUIT
    (RFC 1939 §6); a connection that drops deletes nothing.
    """

    protocol_name = "pop3"
    log = log
    log_prefix = "pop3 "

    def __init__(self, factory: POP3ServerFactory) -> None:
        self._limits = factory.section  # the [pop3] section, read directly
        super().__init__(factory, max_bad_commands=self._limits.max_bad_commands)
        self._factory = factory
        self._store = factory.store
        self._state = _State.AUTHORIZATION
        self._swallowing = False
        self._user: str | None = None  # from USER, waiting for PASS
        self._sasl_pending = False  # AUTH PLAIN without initial response: next line answers
        self._close_after_reply = False  # the answer being prepared is the session's last
        self._mailbox: str | None = None
        self._lock: MailboxLock | None = None
        self._view: FolderView | None = None
        self._deleted: set[int] = set()  # message numbers marked by DELE
        self._retrieved: set[int] = set()  # message numbers sent by RETR
        self._ahead: _ReadAhead | None = None  # small messages read before they are asked for
        self._uidls: list[str] | None = None
        self._journey = SessionJourney(factory.journey)
        self._commands: dict[bytes, Callable[[bytes], bytes | Deferred[bytes] | None]] = {
            b"USER": self._do_user,
            b"PASS": self._do_pass,
            b"AUTH": self._do_auth,
            b"CAPA": self._do_capa,
            b"STLS": self._do_stls,
            b"QUIT": self._do_quit,
            b"NOOP": self._do_noop,
            b"STAT": self._do_stat,
            b"LIST": self._do_list,
            b"RETR": self._do_retr,
            b"DELE": self._do_dele,
            b"RSET": self._do_rset,
            b"TOP": self._do_top,
            b"UIDL": self._do_uidl,
        }

    # --- helpers other objects use -------------------------------------------------------------

    def run(self, func: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run blocking work in the store's disk pool."""
        return self._store.pool.run(func, *args)

    # --- the session skeleton (mailsys.session) -------------------------------------------------

    @override
    def _implicit_tls(self) -> bool:
        return self._factory.implicit_tls  # RFC 8314 §3.3: 995 is TLS from the first byte

    @override
    def _refusal(self, crowding: Crowding) -> bytes:
        return ERR_TOO_MANY_CONNECTIONS

    @override
    def _greet(self) -> None:
        log.info("pop3 connect from {client} tls={tls}", client=self._client, tls=self._secure)
        self._transport.write(_ok(f"{self._factory.hostname} {GREETING_TEXT}"))

    @override
    def _timed_out(self) -> None:
        # RFC 1939 §3: close without a response and without entering the UPDATE state.
        self._close()

    @override
    def _session_ended(self) -> None:
        self._ahead = None
        if self._state is not _State.UPDATE:
            # RFC 1939 §6: without QUIT there is no UPDATE state; nothing is deleted.
            self._release()
        log.info("pop3 disconnect from {client} user={user} retrieved={retrieved} "
                 "deleted={deleted}", client=self._client, user=self._mailbox,
                 retrieved=len(self._retrieved), deleted=len(self._deleted))

    @override
    def _reset_after_tls(self) -> None:
        self._user = None  # forget anything learnt before TLS

    # --- the input loop (mailsys.inputloop) ------------------------------------------------------

    @override
    def _idle_seconds(self) -> float:
        return self._limits.idle_timeout

    @override
    def _step(self) -> bool:
        return self._line_step()

    @override
    def _internal_error_answer(self) -> bytes:
        return ERR_INTERNAL

    def _line_step(self) -> bool:
        buf = self._buffer
        start = self._offset
        lf = buf.find(b"\n", start)
        limit = self._limits.max_command_length
        if lf < 0:
            if len(buf) - start > limit:
                self._swallowing = True  # too long: drop it up to its end, then answer once
                self._sasl_pending = False  # an AUTH exchange ends with that answer
                self._buffer = b""
                self._offset = 0
                return False
            if start:
                self._buffer = buf[start:]
                self._offset = 0
            return False
        self._offset = lf + 1
        if self._swallowing:
            self._swallowing = False
            self._answer(ERR_LINE_TOO_LONG, error=True)
            return True
        if lf + 1 - start > limit:
            self._sasl_pending = False  # the next line is a command, never credentials
            self._answer(ERR_LINE_TOO_LONG, error=True)
            return True
        # RFC 1939 §3 says CRLF; a bare LF is accepted too (no smuggling risk in POP3).
        line = buf[start:lf].removesuffix(b"\r")
        if self._sasl_pending:
            self._sasl_pending = False
            self._deliver(self._sasl_response(line))
            return True
        self._dispatch(line)
        return True

    def _dispatch(self, line: bytes) -> None:
        verb, _, argument = line.partition(b" ")
        command = self._commands.get(verb.upper())
        if command is None:
            self._answer(ERR_UNKNOWN, error=True)
            return
        self._deliver(command(argument))

    def _deliver(self, result: bytes | Deferred[bytes] | None) -> None:
        """Send a command's answer now, or when its Deferred fires (holding later commands)."""
        if result is None:
            return
        if isinstance(result, bytes):
            self._reply(result)
            return
        self._await(result.addErrback(self._unexpected), self._reply)

    def _reply(self, answer: bytes) -> None:
        self._answer(answer, error=answer.startswith(b"-ERR"))
        if self._close_after_reply and not self._closing:
            self._close()

    def _unexpected(self, failure: Failure) -> bytes:
        log.failure("internal error in POP3 session with {client}", failure,
                    client=self._client)
        self._close_after_reply = True
        return ERR_INTERNAL

    def _answer(self, data: bytes, *, error: bool = False) -> None:
        if self._disconnected:
            return
        self._write(data)
        if error and self._count_error():
            self._transport.write(ERR_TOO_MANY_ERRORS)
            self._close()

    # --- state ---------------------------------------------------------------------------------

    def _plaintext_ok(self) -> bool:
        return self._secure or self._limits.allow_plaintext_auth

    def _message(self, argument: bytes) -> tuple[int, MessageInfo] | bytes:
        """Parse a message number (RFC 1939 §3: 1-based, deleted ones are invalid)."""
        view = self._view
        assert view is not None
        text = argument.strip()
        if not text.isdigit() or len(text) > 10:
            return ERR_SYNTAX
        number = int(text)
        if not 1 <= number <= len(view.messages):
            return ERR_NO_SUCH_MESSAGE
        if number in self._deleted:
            return ERR_DELETED
        return number, view.messages[number - 1]

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- AUTHORIZATION -------------------------------------------------------------------------

    def _do_capa(self, argument: bytes) -> bytes:
        # RFC 2449 §5: capabilities of the AUTHORIZATION state are announced in both states.
        lines = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._plaintext_ok():
            lines.append("USER")
            lines.append("SASL PLAIN")
        if self._tls_offered():
            lines.append("STLS")
        lines.append("IMPLEMENTATION mailsys")
        return _multiline("Capability list follows", lines)

    def _do_user(self, argument: bytes) -> bytes:
        if self._state is not _State.AUTHORIZATION:
            return ERR_WRONG_STATE
        if not self._plaintext_ok():
            return ERR_PLAINTEXT
        name = argument.strip()
        if not name:
            return ERR_SYNTAX
        self._user = name.decode("utf-8", "surrogateescape")
        # RFC 1939 §7 allows -ERR for an unknown user; we never tell which users exist.
        return _ok("Send PASS")

    def _do_pass(self, argument: bytes) -> bytes | Deferred[bytes] | None:
        if self._state is not _State.AUTHORIZATION:
            return ERR_WRONG_STATE
        if self._user is None:
            return ERR_NEED_USER
        user, self._user = self._user, None
        if not argument:
            return ERR_SYNTAX
        # The password is the rest of the line, spaces included.
        return self._authenticate(user, argument.decode("utf-8", "surrogateescape"))

    def _do_auth(self, argument: bytes) -> bytes | Deferred[bytes] | None:
        if self._state is not _State.AUTHORIZATION:
            return ERR_WRONG_STATE
        if not self._plaintext_ok():
            return ERR_PLAINTEXT
        mechanism, _, initial = argument.strip().partition(b" ")
        if not mechanism:
            # Not in RFC 5034, but widely used (RFC 1734 clients): list the mechanisms.
            return b"+OK\r\nPLAIN\r\n.\r\n"
        if mechanism.upper() != b"PLAIN":
            return ERR_MECHANISM
        self._user = None
        if not initial:
            self._sasl_pending = True
            self._write(SASL_CONTINUE)  # sent with the batch, like any answer
            return None
        return self._sasl_response(initial)

    def _sasl_response(self, line: bytes) -> bytes | Deferred[bytes] | None:
        if line.strip() == b"*":
            # RFC 5034 §4: the client cancelled; the server must answer -ERR.
            return ERR_AUTH_CANCELLED
        try:
            login = self._login.plain(decode_base64(line))
        except SASLError as exc:
            log.info("pop3 bad AUTH PLAIN from {client}: {reason}",
                     client=self._client, reason=str(exc))
            return ERR_AUTH_SYNTAX
        return login.addCallback(self._login_answer)

    def _authenticate(self, user: str, password: str) -> Deferred[bytes]:
        return self._login.attempt(user, password).addCallback(self._login_answer)

    def _login_answer(self, outcome: LoginOutcome) -> bytes | Deferred[bytes]:
        if outcome is Refusal.BLOCKED:
            self._close_after_reply = True
            return ERR_THROTTLED
        if outcome is Refusal.FAILED:
            return ERR_AUTH_FAILED
        return self._logged_in(outcome)

    def _logged_in(self, user: MailUser) -> Deferred[bytes]:
        mailbox = user.mailbox
        d = self._store.lock_mailbox(mailbox)

        def locked(lock: MailboxLock) -> Deferred[bytes]:
            if self._disconnected:
                lock.release()
                return succeed(b"")
            self._lock = lock
            return self._store.open_folder(mailbox, INBOX).addCallbacks(opened, open_failed)

        def opened(view: FolderView) -> bytes:
            if self._disconnected:
                self._release()
                return b""
            self._view = view
            self._mailbox = mailbox
            self._state = _State.TRANSACTION
            total = sum(_octets(info) for info in view.messages)
            log.info("pop3 login {user} from {client} messages={count}", user=mailbox,
                     client=self._client, count=len(view.messages))
            return _ok(f"Logged in, {len(view.messages)} messages ({total} octets)")

        def open_failed(failure: Failure) -> bytes:
            log.failure("pop3 cannot open the mailbox of {user}", failure, user=mailbox)
            self._release()
            return ERR_MAILBOX

        def lock_failed(failure: Failure) -> bytes:
            if isinstance(failure.value, MailboxInUseError):
                log.info("pop3 mailbox {user} in use, refused {client}", user=mailbox,
                         client=self._client)
                return ERR_IN_USE
            log.failure("pop3 cannot lock the mailbox of {user}", failure, user=mailbox)
            return ERR_MAILBOX

        return d.addCallbacks(locked, lock_failed)

    def _do_stls(self, argument: bytes) -> bytes | None:
        if argument.strip():
            return ERR_SYNTAX
        if self._state is not _State.AUTHORIZATION:
            return ERR_WRONG_STATE  # RFC 2595 §4: only in the AUTHORIZATION state
        if self._secure:
            return ERR_TLS_ACTIVE
        if not self._tls_offered():
            return ERR_TLS_UNAVAILABLE
        context = self._tls_context("STLS")
        if context is None:
            return ERR_TLS_UNAVAILABLE
        self._start_tls(context, STLS_READY, "STLS")
        return None

    def _do_quit(self, argument: bytes) -> bytes | Deferred[bytes]:
        self._close_after_reply = True
        if self._state is _State.AUTHORIZATION:
            return BYE
        # RFC 1939 §6: QUIT in the TRANSACTION state enters UPDATE: delete, then answer.
        self._state = _State.UPDATE
        return self._update()

    # --- TRANSACTION ---------------------------------------------------------------------------

    def _transaction(self) -> bytes | None:
        return None if self._state is _State.TRANSACTION else ERR_WRONG_STATE

    def _do_noop(self, argument: bytes) -> bytes:
        return self._transaction() or _ok()

    def _do_stat(self, argument: bytes) -> bytes:
        refusal = self._transaction()
        if refusal is not None:
            return refusal
        assert self._view is not None
        live = [info for number, info in enumerate(self._view.messages, 1)
                if number not in self._deleted]
        return _ok(f"{len(live)} {sum(_octets(info) for info in live)}")

    def _do_list(self, argument: bytes) -> bytes:
        refusal = self._transaction()
        if refusal is not None:
            return refusal
        assert self._view is not None
        if argument.strip():
            found = self._message(argument)
            if isinstance(found, bytes):
                return found
            number, info = found
            return _ok(f"{number} {_octets(info)}")
        lines = [f"{number} {_octets(info)}"
                 for number, info in enumerate(self._view.messages, 1)
                 if number not in self._deleted]
        return _multiline(f"{len(lines)} messages", lines)

    def _do_uidl(self, argument: bytes) -> bytes:
        refusal = self._transaction()
        if refusal is not None:
            return refusal
        assert self._view is not None
        if argument.strip():
            found = self._message(argument)
            if isinstance(found, bytes):
                return found
            number, _ = found
            return _ok(f"{number} {self._uidl(number)}")
        lines = [f"{number} {self._uidl(number)}"
                 for number in range(1, len(self._view.messages) + 1)
                 if number not in self._deleted]
        return _multiline("", lines)

    def _uidl(self, number: int) -> str:
        if self._uidls is None:
            assert self._view is not None
            self._uidls = [uidl_of(info.key) for info in self._view.messages]
        return self._uidls[number - 1]

    def _do_dele(self, argument: bytes) -> bytes:
        refusal = self._transaction()
        if refusal is not None:
            return refusal
        found = self._message(argument)
        if isinstance(found, bytes):
            return found
        number, info = found
        self._deleted.add(number)  # applied in the UPDATE state only (RFC 1939 §6)
        self._record("pop3.dele", number, info)
        return _ok(f"Message {number} deleted")

    def _do_rset(self, argument: bytes) -> bytes:
        refusal = self._transaction()
        if refusal is not None:
            return refusal
        self._deleted.clear()
        return _ok()

    def _do_retr(self, argument: bytes) -> bytes | Deferred[bytes]:
        refusal = self._transaction()
        if refusal is not None:
            return refusal
        found = self._message(argument)
        if isinstance(found, bytes):
            return found
        number, info = found
        assert self._view is not None
        folder = self._view.folder
        header = _ok(f"{_octets(info)} octets")
        self._record("pop3.retr", number, info)
        if info.size <= SMALL_MESSAGE:

            if self._ahead is None:
                self._ahead = _ReadAhead(self, self._view, self._deleted)
            body = self._ahead.take(number)
            if isinstance(body, bytes):
                self._retrieved.add(number)  # the common case: read ahead, answered at once
                return header + body
            if isinstance(body, MessageVanishedError):
                return ERR_MESSAGE_GONE
            if isinstance(body, BaseException):
                raise body  # unexpected: logged, -ERR internal error, closed (_process)

            def send(data: bytes) -> bytes:
                self._retrieved.add(number)
                return header + data

            return body.addCallbacks(send, self._read_failed)

        def stream(file: BinaryIO) -> Deferred[bytes]:
            if self._disconnected:
                file.close()
                return succeed(b"")
            self._transport.write(header)
            done: Deferred[None] = Deferred()
            _MessageStream(self, file, done).start()

            def streamed(_: None) -> bytes:
                self._retrieved.add(number)
                return b""

            def broken(failure: Failure) -> bytes:
                # The +OK is out: the only honest thing left is to close the connection.
                log.failure("pop3 RETR stream failed for {user}", failure, user=self._mailbox)
                self._close_after_reply = True
                return b""

            return done.addCallbacks(streamed, broken)

        return self.run(folder.open_message, info).addCallbacks(stream, self._read_failed)

    def _record(self, kind: str, number: int, info: MessageInfo) -> None:
        """A step of the journey of a message this server delivered (others have none)."""
        queue_id = delivered_queue_id(info.key)
        if queue_id is not None:
            self._journey.emit(kind, queue_id, user=self._mailbox, number=number,
                               size=_octets(info))

    def _do_top(self, argument: bytes) -> bytes | Deferred[bytes]:
        refusal = self._transaction()
        if refusal is not None:
            return refusal
        parts = argument.split()
        if len(parts) != 2 or not parts[1].isdigit():
            return ERR_SYNTAX
        found = self._message(parts[0])
        if isinstance(found, bytes):
            return found
        _, info = found
        assert self._view is not None
        lines = min(int(parts[1]), 10**9)

        def send(body: bytes) -> bytes:
            return _ok() + body

        return self.run(_encode_top, self._view.folder, info, lines).addCallbacks(
            send, self._read_failed)

    def _read_failed(self, failure: Failure) -> bytes | Failure:
        if isinstance(failure.value, MessageVanishedError):
            return ERR_MESSAGE_GONE
        return failure  # unexpected: _unexpected logs it and closes

    # --- UPDATE --------------------------------------------------------------------------------

    def _update(self) -> Deferred[bytes]:
        """RFC 1939 §6: remove the messages marked deleted, then answer QUIT.

        Retrieved messages that stay are then marked seen, so that an IMAP session shows them
        read. That is not part of POP3, so it happens after the answer and the lock's release
        (under the folder's own lock, like any flag change).
        """
        view = self._view
        assert view is not None
        doomed = [view.messages[number - 1] for number in sorted(self._deleted)]
        seen = [(info, adding({SEEN})) for number, info in enumerate(view.messages, 1)
                if number in self._retrieved and number not in self._deleted
                and SEEN not in info.flags]
        mailbox = self._mailbox
        store = self._store

        def done(deleted: list[int]) -> bytes:
            self._release()
            log.info("pop3 update for {user}: deleted={deleted}", user=mailbox,
                     deleted=len(deleted))
            if seen:

                def marked(_: object) -> None:
                    # IMAP sessions on the mailbox hear of the new \Seen flags at once.
                    assert mailbox is not None
                    store.notify_changed(mailbox, INBOX)

                view.set_flags(seen).addCallback(marked).addErrback(
                    lambda failure: log.failure("pop3 marking seen failed for {user}", failure,
                                                user=mailbox))
            return BYE

        def failed(failure: Failure) -> bytes:
            self._release()
            log.failure("pop3 update failed for {user}", failure, user=mailbox)
            return ERR_UPDATE_FAILED

        d: Deferred[list[int]] = view.delete(doomed) if doomed else succeed([])
        return d.addCallbacks(done, failed)


class POP3ServerFactory(MailboxServerFactory[POP3Section]):
    """Builds POP3 sessions for one listener."""

    protocol_name = "pop3"

    @classmethod
    @override
    def section_of(cls, config: Config) -> POP3Section:
        return config.pop3

    @override
    def buildProtocol(self, addr: IAddress | None) -> POP3Session:
        session = POP3Session(self)
        session.factory = self
        return session

