r"""The IMAP server engine: one ``IMAPSession`` per connection, from greeting to LOGOUT.

This module owns the dialogue (RFC 3501 IMAP4rev1 and the extensions listed in CAPABILITY): lines
and literals, the states (not authenticated, authenticated, selected, logout), login (LOGIN,
AUTHENTICATE PLAIN with SASL-IR, STARTTLS), ENABLE, SELECT and CLOSE, IDLE, and telling a session
what other sessions and deliveries changed (EXISTS, EXPUNGE and FETCH FLAGS, RFC 3501 §7). The
other commands live in command groups (mailsys.imap.mailboxes, messages, transfers, quota) that
share one ``CommandContext`` (mailsys.imap.context) with the session and fill its dispatch
table. Commands are handled strictly one at a time, in order; one waiting for the disk holds
those pipelined behind it.

A client that sends ENABLE IMAP4rev2 gets RFC 9051 behaviour from then on: no RECENT and no
\Recent, SELECT with a LIST response and OK [CLOSED], ESEARCH answers, UTF-8 mailbox names
(also after ENABLE UTF8=ACCEPT, RFC 6855). Everything else is the same engine for both.

CONDSTORE (RFC 7162 §3.1) is turned on by ENABLE CONDSTORE or the first command that uses it
(SELECT/EXAMINE (CONDSTORE), STATUS HIGHESTMODSEQ, FETCH MODSEQ or CHANGEDSINCE, STORE
UNCHANGEDSINCE, SEARCH MODSEQ): from then on SELECT reports HIGHESTMODSEQ and every FETCH
response about a flag change carries UID and MODSEQ. The mod-sequences are the store's.

IMAP sessions never take the POP3 maildrop lock (RFC 1939 §8): RFC 3501 lets several sessions
share a mailbox, and the store's per-folder locks keep UIDs and flags consistent while a POP3
session holds its lock. A POP3 session's deletions then reach IMAP sessions as EXPUNGEs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from mailsys.auth.login import LoginOutcome, Refusal
from mailsys.auth.portal import MailUser
from mailsys.auth.sasl import SASLError, decode_base64
from mailsys.config import Config, IMAPSection
from mailsys.connlimit import Crowding
from mailsys.delivery.quota import MailboxQuota
from mailsys.imap import search as searching
from mailsys.imap.context import (
    ANY,
    AUTHED,
    NOT_AUTHED,
    SELECTED,
    CommandContext,
    CommandSpec,
    Selected,
    State,
)
from mailsys.imap.flags import has_keyword
from mailsys.imap.mailboxes import MailboxCommands
from mailsys.imap.messages import MessageCommands
from mailsys.imap.names import SEPARATOR, encode_name
from mailsys.imap.parser import (
    Command,
    ContinueLiteral,
    Framer,
    ParseError,
    Reader,
    Rejected,
    Rejection,
    tag_of,
)
from mailsys.imap.quota import QuotaCommands
from mailsys.imap.responses import (
    AUTH_CANCELLED,
    AUTH_FAILED,
    AUTH_MALFORMED,
    BAD,
    BAD_CHARSET,
    BAD_MISSING_TAG,
    BYE_AUTOLOGOUT,
    BYE_INTERNAL_ERROR,
    BYE_LOGGING_OUT,
    BYE_LOGIN_BLOCKED,
    BYE_MAILBOX_GONE,
    BYE_TOO_MANY_CONNECTIONS,
    BYE_TOO_MANY_INVALID,
    BYE_UIDS_RESET,
    EXPECTED_DONE,
    LITERAL_TOO_BIG,
    LOGIN_BLOCKED,
    MISSING_COMMAND,
    NONEXISTENT,
    OK,
    OK_CLOSED,
    PRIVACY_REQUIRED,
    SERVER_BUG,
    TLS_ACTIVE,
    TLS_UNAVAILABLE,
    UID_NEEDS_COMMAND,
    UNKNOWN_COMMAND,
    UNKNOWN_UID_COMMAND,
    UNSUPPORTED_MECHANISM,
    RefusedError,
    completed,
    syntax_error,
    tagged,
    untagged,
    wrong_state,
)
from mailsys.imap.transfers import TransferCommands
from mailsys.journey.events import SessionJourney
from mailsys.mailbox.folder import MessageInfo
from mailsys.mailbox.keywords import read_keywords
from mailsys.mailbox.names import SEEN, TRASHED
from mailsys.mailbox.store import FolderView, InvalidFolderNameError, Refreshed
from mailsys.retrieval import MailboxServerFactory
from mailsys.session import ServerSession

log = Logger(namespace="mailsys.imap")

# Before login a connection gets this long between commands (RFC 3501 §5.4 sets the 30-minute
# minimum for authenticated sessions only).
PREAUTH_TIMEOUT = 180.0

# The messages before a report when none is under way (never changed: views replace lists).
_NOTHING: list[MessageInfo] = []

# What ENABLE can turn on, by upper-case name, and how ENABLED spells it.
_ENABLEABLE = {"IMAP4REV2": "IMAP4rev2", "UTF8=ACCEPT": "UTF8=ACCEPT", "CONDSTORE": "CONDSTORE"}



class IMAPSession(ServerSession):
    """One IMAP connection. Input is framed into lines and literals by a Framer and handled in
    order (mailsys.inputloop); commands go to the command groups through one dispatch table."""

    # A literal or a pipelined batch of commands may be large: buffer more before pausing.
    max_buffer_while_waiting = 256 * 1024

    protocol_name = "imap"
    log = log
    log_prefix = "imap "

    def __init__(self, factory: IMAPServerFactory) -> None:
        self._limits = factory.section  # the [imap] section, read directly
        super().__init__(factory, max_bad_commands=self._limits.max_bad_commands)
        self._factory = factory
        # Literals over the spool threshold go to disk, after login only (an APPEND's).
        self._framer = Framer(self._limits.max_command_length, self._limits.max_literal_size,
                              may_spool=lambda: self._state is State.AUTHENTICATED)
        # Never SELECTED: that state is "authenticated with a mailbox selected" (see state).
        self._state = State.NOT_AUTHENTICATED
        self._close_after_reply = False
        self._sasl_tag: bytes | None = None  # AUTHENTICATE waiting for the client's response
        self._idle_tag: bytes | None = None  # IDLE in progress
        # A change report under way: the selection, its messages before, what to do after
        # (attributes and bound methods made once: a wake-up allocates nothing per session
        # that lives through it, see MailboxStore.refresh_then).
        self._report_selected: Selected | None = None
        self._report_before: list[MessageInfo] = _NOTHING
        self._report_then: Callable[[], None] | None = None
        self._on_refreshed = self._refreshed
        self._on_idle_reported = self._idle_reported
        self._ctx = CommandContext(factory.store, SessionJourney(factory.journey), self._write,
                                   lambda: self.consumer)
        self._quota = QuotaCommands(self._ctx, factory.quota)  # RFC 9208
        self._transfers = TransferCommands(self._ctx, self._quota)
        self._commands: dict[bytes, CommandSpec] = {
            b"CAPABILITY": CommandSpec(self._do_capability, ANY),
            b"NOOP": CommandSpec(self._do_noop, ANY),
            b"LOGOUT": CommandSpec(self._do_logout, ANY, updates=False),
            b"ID": CommandSpec(self._do_id, ANY),
            b"STARTTLS": CommandSpec(self._do_starttls, NOT_AUTHED, updates=False),
            b"LOGIN": CommandSpec(self._do_login, NOT_AUTHED, updates=False),
            b"AUTHENTICATE": CommandSpec(self._do_authenticate, NOT_AUTHED, updates=False),
            # RFC 5161 §3.1 / RFC 9051 §6.3.1: ENABLE is valid in the authenticated state only.
            b"ENABLE": CommandSpec(self._do_enable, frozenset({State.AUTHENTICATED})),
            b"NAMESPACE": CommandSpec(self._do_namespace, AUTHED),
            b"SELECT": CommandSpec(self._do_select, AUTHED, updates=False),
            b"EXAMINE": CommandSpec(self._do_examine, AUTHED, updates=False),
            b"IDLE": CommandSpec(self._do_idle, AUTHED, updates=False),
            b"CHECK": CommandSpec(self._do_check, SELECTED),
            b"CLOSE": CommandSpec(self._do_close, SELECTED, updates=False),
            b"UNSELECT": CommandSpec(self._do_unselect, SELECTED, updates=False),
            **MailboxCommands(self._ctx).commands(),
            **MessageCommands(self._ctx).commands(),
            **self._transfers.commands(),
            **self._quota.commands(),
        }
        self._uid_commands = {name for name, spec in self._commands.items() if spec.takes_uid}

    # --- helpers -------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The session's state (RFC 3501 §3)."""
        if self._state is State.AUTHENTICATED and self._ctx.selected is not None:
            return State.SELECTED
        return self._state

    @property
    def user(self) -> str | None:
        """The logged-in user's mailbox, or None before login."""
        return self._ctx.mailbox

    @property
    def rev2(self) -> bool:
        """The client sent ENABLE IMAP4rev2: RFC 9051 behaviour."""
        return self._ctx.rev2

    @property
    def condstore(self) -> bool:
        """CONDSTORE is on for this session (RFC 7162 §3.1)."""
        return self._ctx.condstore

    def write(self, data: bytes) -> None:
        """Output to the client."""
        self._write(data)

    # --- connection events (Twisted) -----------------------------------------------------------

    # --- the session skeleton (mailsys.session) -------------------------------------------------

    @override
    def _implicit_tls(self) -> bool:
        return self._factory.implicit_tls  # RFC 8314 §3.3: 993 is TLS from the first byte

    @override
    def _refusal(self, crowding: Crowding) -> bytes:
        return BYE_TOO_MANY_CONNECTIONS

    @override
    def _greet(self) -> None:
        log.info("imap connect from {client} tls={tls}", client=self._client, tls=self._secure)
        self.write(untagged(f"OK [CAPABILITY {self._capabilities()}] "
                            f"{self._factory.hostname} IMAP4rev1 server ready"))

    @override
    def _session_ended(self) -> None:
        self._ctx.deselect()
        log.info("imap disconnect from {client} user={user}", client=self._client,
                 user=self._ctx.mailbox)

    @override
    def _idle_is_ours(self) -> bool:
        # Waiting for the disk, the password check or a big FETCH is our slowness; while the
        # client IDLEs the silence is its own (RFC 2177: it must re-IDLE within 29 minutes).
        return self._waiting and self._idle_tag is None

    @override
    def _timed_out(self) -> None:
        self.write(BYE_AUTOLOGOUT)
        self._close()

    def _timeout(self) -> float:
        if self._state is State.NOT_AUTHENTICATED:
            return min(PREAUTH_TIMEOUT, self._limits.idle_timeout)
        return self._limits.idle_timeout

    # --- the input loop (mailsys.inputloop) ------------------------------------------------------

    @override
    def _feed(self, data: bytes) -> None:
        self._framer.feed(data)

    @override
    def _buffered(self) -> int:
        return self._framer.pending

    @override
    def _discard_buffered(self) -> int:
        return self._framer.clear()

    @override
    def _idle_seconds(self) -> float:
        return self._timeout()

    @override
    def _internal_error_answer(self) -> bytes:
        return BYE_INTERNAL_ERROR

    @override
    def _step(self) -> bool:
        if self._idle_tag is not None or self._sasl_tag is not None:
            line = self._framer.next_line()
            if line is None:
                return False
            if self._idle_tag is not None:
                self._idle_line(b"" if isinstance(line, Rejected) else line)
            elif isinstance(line, Rejected):
                # An over-long response ends the exchange (never counted as a failed login);
                # the next line is a command again.
                tag, self._sasl_tag = self._sasl_tag, None
                assert tag is not None
                self._answer(syntax_error(tag, line.reason.value))
            else:
                self._sasl_line(line)
            return True
        event = self._framer.next_event()
        if event is None:
            return False
        if isinstance(event, ContinueLiteral):
            # RFC 3501 §7.5: the command continuation request for a synchronizing literal.
            self.write(b"+ Ready for literal data\r\n")
        elif isinstance(event, Rejected):
            tag = event.tag or b"*"
            if event.reason is Rejection.LITERAL_TOO_BIG:
                self._answer(LITERAL_TOO_BIG.to(tag))
            else:
                self._answer(syntax_error(tag, event.reason.value))
        elif isinstance(event, Command):
            self._dispatch(event.data, event)
        return True

    def _dispatch(self, data: bytes, command: Command | None = None) -> None:
        if command is not None and command.spooled:
            # A large literal's temporary file lives as long as its command.
            self._dispatch_spooled(data, command)
            return
        reader = Reader(data)
        try:
            tag = reader.tag()
            reader.space()
            name = reader.atom().upper()
        except ParseError:
            tag = tag_of(data)
            self._answer(MISSING_COMMAND.to(tag) if tag else BAD_MISSING_TAG)
            return
        uid = False
        if name == b"UID":
            try:
                reader.space()
                name = reader.atom().upper()
            except ParseError:
                self._answer(UID_NEEDS_COMMAND.to(tag))
                return
            if name not in self._uid_commands:
                self._answer(UNKNOWN_UID_COMMAND.to(tag))
                return
            uid = True
        spec = self._commands.get(name)
        if spec is None:
            self._answer(UNKNOWN_COMMAND.to(tag))
            return
        state = self.state
        if state not in spec.states:
            self._answer(wrong_state(tag, name, state.value))
            return
        try:
            result = spec.handler(tag, reader, uid)
        except searching.BadCharsetError:
            result = BAD_CHARSET.to(tag)
        except RefusedError as exc:
            result = exc.refusal.to(tag)
        except ParseError as exc:
            result = syntax_error(tag, str(exc))
        except Exception:
            log.failure("imap {command} failed for {client}", command=name.decode(),
                        client=self._client)
            result = SERVER_BUG.to(tag)
        self._deliver(tag, result, spec.updates_with_uid if uid else spec.updates)

    def _dispatch_spooled(self, data: bytes, command: Command) -> None:
        """A command with a literal the Framer spooled to a file: only APPEND takes one (the
        others get BAD); the files are closed once the command is answered."""
        reader = Reader(data, spooled=command.spooled)
        tag = tag_of(data)
        try:
            reader.tag()
            reader.space()
            name = reader.atom().upper()
            if name != b"APPEND" or self.state not in AUTHED:
                raise ParseError("Only APPEND takes a literal this large")
            result = self._transfers.append(tag, reader, False)
        except RefusedError as exc:
            result = exc.refusal.to(tag)
        except ParseError as exc:
            result = syntax_error(tag, str(exc)) if tag else BAD_MISSING_TAG
        except Exception:
            log.failure("imap APPEND failed for {client}", client=self._client)
            result = SERVER_BUG.to(tag)
        if isinstance(result, Deferred):
            def closed(value: object) -> object:
                command.close()
                return value

            result.addBoth(closed)
        else:
            command.close()
        self._deliver(tag, result, True)

    def _news_waiting(self) -> bool:
        """The selected mailbox may have changed since the client last heard."""
        selected = self._ctx.selected
        if selected is None:
            return False
        if selected.view.behind:
            # Our own change skipped over others' (FolderView._advance): a refresh reports
            # them, and only then is the view's HIGHESTMODSEQ up to date.
            selected.dirty = True
        return selected.dirty

    def _deliver(self, tag: bytes, result: bytes | Deferred[bytes] | None,
                 updates: bool) -> None:
        """Send a command's tagged answer, with the mailbox's news before it when allowed."""
        if result is None:
            return
        if isinstance(result, bytes):
            if not (updates and self._news_waiting()):
                self._answer(result)
                return
            result = succeed(result)
        self._waiting = True

        def with_updates(line: bytes) -> bytes | Deferred[bytes]:
            if updates and self._news_waiting():
                return self._report_changes_deferred().addCallback(lambda _: line)
            return line

        def unexpected(failure: Failure) -> bytes:
            log.failure("imap command failed for {client}", failure,
                        client=self._client)
            return SERVER_BUG.to(tag)

        chain: Deferred[Any] = result.addCallback(with_updates)
        self._await(chain.addErrback(unexpected), self._answer)

    def _answer(self, line: bytes) -> None:
        """Write a command's final answer; count BADs; close when the session is over."""
        if self._disconnected:
            return
        self.write(line)
        if line.split(b" ", 2)[1:2] == [BAD] and self._count_error():
            self.write(BYE_TOO_MANY_INVALID)
            self._close()
            return
        if self._close_after_reply and not self._closing:
            self._close()

    # --- capabilities and state ----------------------------------------------------------------

    def _plaintext_ok(self) -> bool:
        return self._secure or self._limits.allow_plaintext_auth

    def _capabilities(self) -> str:
        caps = ["IMAP4rev1", "IMAP4rev2", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE",
                "MULTIAPPEND"]
        if self._state is State.NOT_AUTHENTICATED:
            if self._tls_offered():
                caps.append("STARTTLS")
            # RFC 3501 §6.2.3 / RFC 8314: no passwords in the clear unless allowed.
            caps.append("AUTH=PLAIN" if self._plaintext_ok() else "LOGINDISABLED")
        else:
            caps += ["NAMESPACE", "UIDPLUS", "MOVE", "UNSELECT", "CHILDREN", "SPECIAL-USE",
                     "LIST-EXTENDED", "LIST-STATUS", "ESEARCH", "SEARCHRES", "BINARY",
                     "UTF8=ACCEPT", "STATUS=SIZE", "CONDSTORE",
                     f"APPENDLIMIT={self._limits.max_literal_size}"]
            caps += self._quota.capabilities()
        return " ".join(caps)

    # --- any state -----------------------------------------------------------------------------

    def _do_capability(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.end()
        self.write(untagged(f"CAPABILITY {self._capabilities()}"))
        return completed(tag, "CAPABILITY")

    def _do_noop(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.end()
        if self._ctx.selected is not None:
            self._ctx.selected.dirty = True  # NOOP is how clients poll (RFC 3501 §6.1.2)
        return completed(tag, "NOOP")

    def _do_check(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.end()
        assert self._ctx.selected is not None
        self._ctx.selected.dirty = True
        return completed(tag, "CHECK")

    def _do_logout(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.end()
        self._state = State.LOGOUT
        self._close_after_reply = True
        self.write(BYE_LOGGING_OUT)
        return completed(tag, "LOGOUT")

    def _do_id(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        # RFC 2971: the client's identification (NIL or a list of pairs), then ours.
        reader.space()
        if not reader.accept(b"NIL") and not reader.accept(b"nil"):
            items = reader.paren_list(reader.nstring)
            if len(items) % 2 or len(items) > 60:
                raise ParseError("ID needs field/value pairs")
            fields = {(k or b"").decode("utf-8", "replace")[:30]:
                      (v or b"").decode("utf-8", "replace")[:60]
                      for k, v in zip(items[::2], items[1::2], strict=True)}
            log.info("imap client {client} id {fields}", client=self._client,
                     fields=fields)
        reader.end()
        self.write(untagged('ID ("name" "mailsys" "vendor" "mailsys")'))
        return completed(tag, "ID")

    def _do_enable(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        # RFC 5161 §3.1: ENABLED lists what this command newly enabled; unknown names are
        # ignored. IMAP4rev2 (RFC 9051 §6.3.1) and UTF8=ACCEPT (RFC 6855 §3) change behaviour.
        reader.space()
        names = [reader.atom()]
        while reader.accept(b" "):
            names.append(reader.atom())
        reader.end()
        enabled = []
        for raw in names:
            name = raw.upper().decode("ascii", "replace")
            if name in _ENABLEABLE and name not in self._ctx.enabled:
                self._ctx.enabled.add(name)
                enabled.append(_ENABLEABLE[name])
        self.write(untagged(" ".join(["ENABLED", *enabled])))
        return completed(tag, "ENABLE")

    def _do_namespace(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.end()
        # RFC 2342: one personal namespace, no prefix, "." between levels.
        self.write(untagged(f'NAMESPACE (("" "{SEPARATOR}")) NIL NIL'))
        return completed(tag, "NAMESPACE")

    # --- not authenticated ---------------------------------------------------------------------

    def _do_starttls(self, tag: bytes, reader: Reader, uid: bool) -> bytes | None:
        reader.end()
        if self._secure:
            return TLS_ACTIVE.to(tag)
        if not self._tls_offered():
            return TLS_UNAVAILABLE.to(tag)
        context = self._tls_context("STARTTLS")
        if context is None:
            return TLS_UNAVAILABLE.to(tag)
        self._start_tls(context, tagged(tag, OK, "Begin TLS negotiation now"), "STARTTLS")
        return None

    def _do_login(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.space()
        user = reader.astring()
        reader.space()
        password = reader.astring()
        reader.end()
        if not self._plaintext_ok():
            return PRIVACY_REQUIRED.to(tag)
        return self._authenticate(tag, user.decode("utf-8", "surrogateescape"),
                                  password.decode("utf-8", "surrogateescape"))

    def _do_authenticate(self, tag: bytes, reader: Reader, uid: bool
                         ) -> bytes | Deferred[bytes] | None:
        reader.space()
        mechanism = reader.atom().upper()
        initial: bytes | None = None
        if reader.accept(b" "):
            initial = reader.data[reader.position:]  # RFC 4959 SASL-IR
            reader.position = len(reader.data)
        if mechanism != b"PLAIN":
            return UNSUPPORTED_MECHANISM.to(tag)
        if not self._plaintext_ok():
            return PRIVACY_REQUIRED.to(tag)
        if initial is None:
            self._sasl_tag = tag
            self.write(b"+ \r\n")  # RFC 4616: PLAIN starts with an empty challenge
            return None
        return self._sasl_response(tag, initial)

    def _sasl_line(self, line: bytes) -> None:
        tag, self._sasl_tag = self._sasl_tag, None
        assert tag is not None
        self._deliver(tag, self._sasl_response(tag, line), updates=False)

    def _sasl_response(self, tag: bytes, line: bytes) -> bytes | Deferred[bytes]:
        if line.strip() == b"*":
            return AUTH_CANCELLED.to(tag)
        try:
            login = self._login.plain(decode_base64(line))
        except SASLError as exc:
            log.info("imap bad AUTHENTICATE PLAIN from {client}: {reason}",
                     client=self._client, reason=str(exc))
            return AUTH_MALFORMED.to(tag)
        return login.addCallback(self._login_answer, tag)

    def _authenticate(self, tag: bytes, user: str, password: str) -> Deferred[bytes]:
        return self._login.attempt(user, password).addCallback(self._login_answer, tag)

    def _login_answer(self, outcome: LoginOutcome, tag: bytes) -> bytes:
        if outcome is Refusal.BLOCKED:
            # RFC 3501 §7.1.5: the server says BYE before it closes the connection.
            self._close_after_reply = True
            self.write(BYE_LOGIN_BLOCKED)
            return LOGIN_BLOCKED.to(tag)
        if outcome is Refusal.FAILED:
            return AUTH_FAILED.to(tag)
        return self._logged_in(tag, outcome)

    def _logged_in(self, tag: bytes, user: MailUser) -> bytes:
        self._ctx.mailbox = user.mailbox
        self._state = State.AUTHENTICATED
        self._reset_idle_timer()  # the authenticated session's idle time (RFC 3501 §5.4)
        log.info("imap login {user} from {client}", user=user.mailbox,
                 client=self._client)
        return tagged(tag, OK, "Logged in", f"CAPABILITY {self._capabilities()}")

    # --- selecting ------------------------------------------------------------------------------

    def _do_select(self, tag: bytes, reader: Reader, uid: bool) -> Deferred[bytes]:
        return self._open(tag, reader, readonly=False)

    def _do_examine(self, tag: bytes, reader: Reader, uid: bool) -> Deferred[bytes]:
        return self._open(tag, reader, readonly=True)

    def _open(self, tag: bytes, reader: Reader, readonly: bool) -> Deferred[bytes]:
        reader.space()
        name = self._ctx.mailbox_name(reader)
        condstore = False
        if reader.accept(b" "):
            # RFC 4466 select parameters; RFC 7162 §3.1.8: CONDSTORE is the one we know.
            for parameter in reader.paren_list(reader.atom):
                if parameter.upper() != b"CONDSTORE":
                    raise ParseError("Unknown SELECT parameter")
                condstore = True
        reader.end()
        if condstore:
            self._ctx.enabled.add("CONDSTORE")
        # RFC 3501 §6.3.1: SELECT first deselects; a failed SELECT leaves none selected.
        if self._ctx.selected is not None and self._ctx.rev2:
            self.write(OK_CLOSED)
        self._ctx.deselect()
        mailbox = self._ctx.mailbox
        assert mailbox is not None
        verb = "EXAMINE" if readonly else "SELECT"

        def opened(view: FolderView) -> Deferred[bytes]:
            def work() -> tuple[list[str], int]:
                # RFC 3501 §6.3.2: EXAMINE leaves \Recent to the next session; SELECT takes it.
                return (read_keywords(view.path),
                        view.folder.recent_from(view.uidnext, claim=not readonly))

            return self._ctx.run(work).addCallback(lambda found: answer(view, *found))

        def answer(view: FolderView, keywords: list[str], first_recent: int) -> bytes:
            if self._disconnected:
                return b""
            unsubscribe = self._ctx.store.subscribe(mailbox, view.name, self._changed)
            recent = {info.uid for info in view.messages if info.uid >= first_recent}
            rev2 = self._ctx.rev2
            selected = Selected(view, readonly, keywords, recent, unsubscribe,
                                exists=len(view.messages), show_recent=not rev2)
            self._ctx.selected = selected  # the state is SELECTED from here
            flags = selected.flag_names()
            out = [untagged(b"FLAGS (" + flags + b")"),
                   untagged(b"OK [PERMANENTFLAGS (" + (b"" if readonly else flags + b" \\*")
                            + b")] Flags permitted"),
                   untagged(b"%d EXISTS" % len(view.messages))]
            if rev2:
                # RFC 9051 §6.3.2: a LIST response with the mailbox's name; no RECENT and
                # no UNSEEN code (the client asks SEARCH for it).
                out.append(b'* LIST () "' + SEPARATOR.encode() + b'" '
                           + encode_name(view.name, utf8=True) + b"\r\n")
            else:
                out.append(untagged(b"%d RECENT" % len(recent)))
                unseen = next((n for n, info in enumerate(view.messages, 1)
                               if SEEN not in info.flags), None)
                if unseen is not None:
                    out.append(untagged(b"OK [UNSEEN %d] First unseen" % unseen))
            out.append(untagged(b"OK [UIDVALIDITY %d] UIDs valid" % view.uidvalidity))
            out.append(untagged(b"OK [UIDNEXT %d] Predicted next UID" % view.uidnext))
            if self._ctx.condstore:
                # RFC 7162 §3.1.2.1.
                out.append(untagged(b"OK [HIGHESTMODSEQ %d] Highest" % view.highest_modseq))
            self.write(b"".join(out))
            log.info("imap {verb} {user} {folder} messages={count}", verb=verb,
                     user=mailbox, folder=view.name, count=len(view.messages))
            return completed(tag, verb, "READ-ONLY" if readonly else "READ-WRITE")

        def failed(failure: Failure) -> bytes | Failure:
            if failure.check(FileNotFoundError, InvalidFolderNameError):
                return NONEXISTENT.to(tag)
            return failure

        # SELECT needs no wire sizes: a cold folder's files are not read for them (RFC822.SIZE,
        # LARGER/SMALLER and STATUS SIZE ask FolderView.with_sizes when they need them).
        return self._ctx.store.open_folder(mailbox, name, sizes=False).addCallbacks(opened,
                                                                                     failed)

    def _do_close(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.end()
        selected = self._ctx.selected
        assert selected is not None
        self._ctx.deselect()
        if selected.readonly:
            return completed(tag, "CLOSE")
        # RFC 3501 §6.4.2: CLOSE expunges silently.
        doomed = [info for info in selected.view.messages if TRASHED in info.flags]
        if not doomed:
            return completed(tag, "CLOSE")
        return self._ctx.delete_quietly(selected.view, doomed).addCallback(
            lambda _: completed(tag, "CLOSE"))

    def _do_unselect(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.end()
        self._ctx.deselect()  # RFC 3691: like CLOSE, without the expunge
        return completed(tag, "UNSELECT")

    # --- change reports (RFC 3501 §7.3.1, §7.4.1) --------------------------------------------

    def _changed(self) -> None:
        """The store says our folder may have changed (a delivery, another session)."""
        if self._ctx.notifying or self._ctx.selected is None:
            return
        self._ctx.selected.dirty = True
        if self._idle_tag is not None and not self._waiting:
            # RFC 2177: while idling, news goes out at once.
            self._waiting = True
            self._report_changes(self._on_idle_reported)

    def _idle_reported(self) -> None:
        """The news went out. A change announced meanwhile may have come after the folder was
        read: while still idling, look again rather than keep it until the next one."""
        selected = self._ctx.selected
        if (self._idle_tag is not None and selected is not None and selected.dirty
                and not self._disconnected and not self._closing):
            self._report_changes(self._on_idle_reported)
            return
        self._continue()

    def _report_changes_deferred(self) -> Deferred[None]:
        """``_report_changes`` for a command's answer, which waits on a Deferred."""
        reported: Deferred[None] = Deferred()
        self._report_changes(lambda: reported.callback(None))
        return reported

    def _report_changes(self, then: Callable[[], None]) -> None:
        """Refresh the view and tell the client what changed: EXPUNGE, EXISTS, RECENT, FLAGS;
        then call ``then``.

        A delivery wakes every session on the folder at once: the store syncs the folder once,
        works out the change once for the views that were in the same state and claims
        \\Recent for all of them in one batch (MailboxStore.refresh_then), so what is left here
        is this session's own lines. No Deferred is made unless keywords must be read.
        """
        selected = self._ctx.selected
        if selected is None:
            then()
            return
        assert self._report_selected is None, "one report at a time"
        selected.dirty = False
        # Kept on the session, not in a closure (see __init__).
        self._report_selected = selected
        self._report_before = selected.view.messages
        self._report_then = then
        # RFC 3501 §2.3.2: a read-only session leaves \Recent for the next one.
        selected.view.refresh_then(self._on_refreshed, claim=not selected.readonly)

    def _refreshed(self, outcome: Refreshed | Failure) -> None:
        """The store's answer to ``_report_changes``: tell the client, then carry on."""
        selected, before, then = self._report_selected, self._report_before, self._report_then
        assert selected is not None and then is not None
        self._report_selected, self._report_before, self._report_then = None, _NOTHING, None
        try:
            if isinstance(outcome, Failure):
                self._refresh_failed(selected, outcome)
            else:
                reading = self._tell(selected, before, outcome)
                if reading is not None:
                    reading.addErrback(lambda failure: self._refresh_failed(
                        selected, failure)).addBoth(lambda _: then())
                    return
        except Exception:
            self._refresh_failed(selected, Failure())
        then()

    def _tell(self, selected: Selected, before: list[MessageInfo], refreshed: Refreshed
              ) -> Deferred[None] | None:
        """Write what ``refreshed`` says changed (a Deferred when keywords must be read first)."""
        changes, first_recent = refreshed.changes, refreshed.first_recent
        if self._ctx.selected is not selected or self._disconnected:
            return None
        view = selected.view
        if changes.uidvalidity_changed:
            self.write(BYE_UIDS_RESET)
            self._close()
            return None
        out: list[bytes] = []
        if changes.expunged:
            positions = {info.uid: n for n, info in enumerate(before, 1)}
            for seq in sorted((positions[u] for u in changes.expunged if u in positions),
                              reverse=True):
                out.append(b"* %d EXPUNGE\r\n" % seq)
                selected.exists -= 1  # the client counts each EXPUNGE itself
            selected.recent.difference_update(changes.expunged)
        for info in changes.added:
            if info.uid >= first_recent:
                selected.recent.add(info.uid)
        if len(view.messages) != selected.exists or changes.added:
            # RFC 3501 §7.3.1: EXISTS never goes down without the EXPUNGEs before it.
            selected.exists = len(view.messages)
            out.append(b"* %d EXISTS\r\n" % selected.exists)
            if selected.show_recent:  # RFC 9051 §7.4: no RECENT in IMAP4rev2
                out.append(b"* %d RECENT\r\n" % len(selected.recent))
        unknown = any(not has_keyword(selected.keywords, letter)
                      for letter in changes.keyword_letters)
        self.write(b"".join(out))

        def report_flags(_: object = None) -> None:
            lines = []
            for info in changes.flags_changed:
                position = selected.position(info.uid)
                if position is not None:
                    lines.append(self._ctx.flags_response(position + 1, info, uid=True))
            self.write(b"".join(lines))

        if not unknown:
            if changes.flags_changed:
                report_flags()
            return None

        def reload(keywords: list[str]) -> None:
            if self._ctx.selected is not selected or self._disconnected:
                return
            selected.keywords = keywords
            selected.flag_cache.clear()
            self.write(untagged(b"FLAGS (" + selected.flag_names() + b")"))
            report_flags()

        return cast(Deferred[None], self._ctx.run(read_keywords, view.path).addCallback(reload))

    def _refresh_failed(self, selected: Selected, failure: Failure) -> None:
        """The refresh failed: the folder is gone (BYE, RFC 3501 §7.1.5) or worse; the
        session ends either way, since its view can no longer be trusted."""
        if self._ctx.selected is not selected:
            return
        if failure.check(FileNotFoundError):
            self.write(BYE_MAILBOX_GONE)
        else:
            log.failure("imap refresh failed for {user}", failure, user=self._ctx.mailbox)
            self.write(BYE_INTERNAL_ERROR)
        self._ctx.deselect()
        self._close()

    # --- IDLE (RFC 2177) ------------------------------------------------------------------------

    def _do_idle(self, tag: bytes, reader: Reader, uid: bool) -> None:
        reader.end()
        self._idle_tag = tag
        self.write(b"+ idling\r\n")
        if self._ctx.selected is not None and self._ctx.selected.dirty:
            self._changed()
        return None

    def _idle_line(self, line: bytes) -> None:
        tag, self._idle_tag = self._idle_tag, None
        assert tag is not None
        if line.strip().upper() == b"DONE":
            self._answer(tagged(tag, OK, "IDLE terminated"))
        else:
            self._answer(EXPECTED_DONE.to(tag))


class IMAPServerFactory(MailboxServerFactory[IMAPSection]):
    """Builds IMAP sessions for one listener."""

    quota: MailboxQuota | None = None  # per-mailbox limits (mailsys.imap.quota.set_quota)
    protocol_name = "imap"

    @classmethod
    @override
    def section_of(cls, config: Config) -> IMAPSection:
        return config.imap

    @override
    def buildProtocol(self, addr: IAddress | None) -> IMAPSession:
        session = IMAPSession(self)
        session.factory = self
        return session



