r"""The IMAP server engine: one ``IMAPSession`` per connection, from greeting to LOGOUT.

This module owns the dialogue (RFC 3501 IMAP4rev1 and the extensions listed in CAPABILITY): the
states (not authenticated, authenticated, selected, logout), login (LOGIN, AUTHENTICATE PLAIN
with SASL-IR, STARTTLS), the mailbox commands, and telling a session what other sessions and
deliveries changed (EXISTS, EXPUNGE and FETCH FLAGS, RFC 3501 §7). Commands are handled strictly
one at a time, in order; one waiting for the disk holds those pipelined behind it.

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

import bisect
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
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
from mailsys.imap.flags import RECENT, has_keyword, names_of
from mailsys.imap.mailboxes import MailboxCommands
from mailsys.imap.messages import MessageCommands
from mailsys.imap.names import SEPARATOR, MailboxNameError, canonical, decode_name, encode_name
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
    BAD,
    INVALID_NAME,
    NAME_TOO_LONG,
    NO,
    OK,
    RefusedError,
    tagged,
    untagged,
)
from mailsys.imap.transfers import TransferCommands
from mailsys.mailbox.folder import MessageInfo
from mailsys.mailbox.keywords import read_keywords
from mailsys.mailbox.layout import NameTooLongError, folder_directory
from mailsys.mailbox.names import SEEN, TRASHED
from mailsys.mailbox.store import FolderView, InvalidFolderNameError
from mailsys.retrieval import MailboxServerFactory
from mailsys.session import ServerSession

log = Logger(namespace="mailsys.imap")

# Before login a connection gets this long between commands (RFC 3501 §5.4 sets the 30-minute
# minimum for authenticated sessions only).
PREAUTH_TIMEOUT = 180.0

# What ENABLE can turn on, by upper-case name, and how ENABLED spells it.
_ENABLEABLE = {"IMAP4REV2": "IMAP4rev2", "UTF8=ACCEPT": "UTF8=ACCEPT", "CONDSTORE": "CONDSTORE"}



class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


_ANY = frozenset(State) - {State.LOGOUT}
_AUTHED = frozenset({State.AUTHENTICATED, State.SELECTED})
_SELECTED = frozenset({State.SELECTED})
_NOT_AUTHED = frozenset({State.NOT_AUTHENTICATED})


@dataclass
class Selected:
    """The selected mailbox: the session's view, and what it has told the client."""

    view: FolderView
    readonly: bool
    keywords: list[str]
    recent: set[int]
    unsubscribe: Callable[[], None]
    exists: int = 0  # the message count the client was last told
    dirty: bool = False  # the folder may have changed since the last refresh
    _uids: list[int] = field(default_factory=list)
    _uids_of: list[MessageInfo] | None = None
    flag_cache: dict[tuple[frozenset[str], bool], bytes] = field(default_factory=dict)
    # RFC 9051 §2.3.2: IMAP4rev2 has no \Recent flag; fixed for the selection's life because
    # ENABLE is refused while a mailbox is selected.
    show_recent: bool = True
    saved: frozenset[int] = frozenset()  # the UIDs of "$" (RFC 5182 §2.1), empty at SELECT

    def uids(self) -> list[int]:
        """The UIDs in sequence order (rebuilt when the view's list changed)."""
        if self._uids_of is not self.view.messages:
            self._uids = [info.uid for info in self.view.messages]
            self._uids_of = self.view.messages
        return self._uids

    def position(self, uid: int) -> int | None:
        """The 0-based position of ``uid`` in the view, or None."""
        uids = self.uids()
        index = bisect.bisect_left(uids, uid)
        return index if index < len(uids) and uids[index] == uid else None

    def flags(self, info: MessageInfo) -> bytes:
        """The message's flag list (without parentheses), \\Recent included."""
        recent = self.show_recent and info.uid in self.recent
        key = (info.flags, recent)
        cached = self.flag_cache.get(key)
        if cached is None:
            names = names_of(info.flags, self.keywords)
            if recent:
                names.append(RECENT)
            cached = self.flag_cache[key] = " ".join(names).encode("utf-8", "replace")
        return cached

    def flag_names(self) -> bytes:
        names = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "$Forwarded"]
        names += [k for k in self.keywords if k]
        return " ".join(names).encode("utf-8", "replace")


@dataclass(frozen=True)
class _Spec:
    handler: Callable[[bytes, Reader, bool], bytes | Deferred[bytes] | None]
    states: frozenset[State]
    # RFC 3501 §7.4.1: no EXPUNGE while answering FETCH, STORE or SEARCH (their UID forms
    # may): changes are reported at the end of every other command.
    updates: bool = True
    updates_with_uid: bool = True


class IMAPSession(MailboxCommands, MessageCommands, TransferCommands, QuotaCommands,
                  ServerSession):
    """One IMAP connection. Input is framed into lines and literals by a Framer and handled in
    order (mailsys.inputloop)."""

    # A literal or a pipelined batch of commands may be large: buffer more before pausing.
    max_buffer_while_waiting = 256 * 1024

    protocol_name = "imap"
    log = log
    log_prefix = "imap "

    def __init__(self, factory: IMAPServerFactory) -> None:
        self._limits = factory.section  # the [imap] section, read directly
        super().__init__(factory, max_bad_commands=self._limits.max_bad_commands)
        self._factory = factory
        self._store = factory.store
        # Literals over the spool threshold go to disk, after login only (an APPEND's).
        self._framer = Framer(self._limits.max_command_length, self._limits.max_literal_size,
                              may_spool=lambda: self._state in _AUTHED)
        self._state = State.NOT_AUTHENTICATED
        self._mailbox: str | None = None
        self._selected: Selected | None = None
        self._close_after_reply = False
        self._sasl_tag: bytes | None = None  # AUTHENTICATE waiting for the client's response
        self._idle_tag: bytes | None = None  # IDLE in progress
        self._notifying = False  # our own change notification: not news to us
        self._enabled: set[str] = set()  # ENABLEd extensions (RFC 5161), upper case
        self._commands: dict[bytes, _Spec] = {
            b"CAPABILITY": _Spec(self._do_capability, _ANY),
            b"NOOP": _Spec(self._do_noop, _ANY),
            b"LOGOUT": _Spec(self._do_logout, _ANY, updates=False),
            b"ID": _Spec(self._do_id, _ANY),
            b"STARTTLS": _Spec(self._do_starttls, _NOT_AUTHED, updates=False),
            b"LOGIN": _Spec(self._do_login, _NOT_AUTHED, updates=False),
            b"AUTHENTICATE": _Spec(self._do_authenticate, _NOT_AUTHED, updates=False),
            # RFC 5161 §3.1 / RFC 9051 §6.3.1: ENABLE is valid in the authenticated state only.
            b"ENABLE": _Spec(self._do_enable, frozenset({State.AUTHENTICATED})),
            b"NAMESPACE": _Spec(self._do_namespace, _AUTHED),
            b"SELECT": _Spec(self._do_select, _AUTHED, updates=False),
            b"EXAMINE": _Spec(self._do_examine, _AUTHED, updates=False),
            b"CREATE": _Spec(self._do_create, _AUTHED),
            b"DELETE": _Spec(self._do_delete, _AUTHED),
            b"RENAME": _Spec(self._do_rename, _AUTHED),
            b"SUBSCRIBE": _Spec(self._do_subscribe, _AUTHED),
            b"UNSUBSCRIBE": _Spec(self._do_unsubscribe, _AUTHED),
            b"LIST": _Spec(self._do_list, _AUTHED),
            b"LSUB": _Spec(self._do_lsub, _AUTHED),
            b"STATUS": _Spec(self._do_status, _AUTHED),
            b"APPEND": _Spec(self._do_append, _AUTHED),
            b"IDLE": _Spec(self._do_idle, _AUTHED, updates=False),
            b"CHECK": _Spec(self._do_check, _SELECTED),
            b"CLOSE": _Spec(self._do_close, _SELECTED, updates=False),
            b"UNSELECT": _Spec(self._do_unselect, _SELECTED, updates=False),
            b"EXPUNGE": _Spec(self._do_expunge, _SELECTED),
            b"SEARCH": _Spec(self._do_search, _SELECTED, updates=False),
            b"FETCH": _Spec(self._do_fetch, _SELECTED, updates=False),
            b"STORE": _Spec(self._do_store, _SELECTED, updates=False),
            b"COPY": _Spec(self._do_copy, _SELECTED),
            b"MOVE": _Spec(self._do_move, _SELECTED),
        }
        for name, handler in self._quota_commands().items():  # RFC 9208 (mailsys.imap.quota)
            self._commands[name] = _Spec(handler, _AUTHED)
        self._uid_commands = {b"FETCH", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"EXPUNGE"}

    # --- helpers -------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def run(self, func: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Blocking work in the store's disk pool."""
        return self._store.pool.run(func, *args)

    def write(self, data: bytes) -> None:
        """Output to the client (FETCH runs and the mailbox commands write through this)."""
        self._write(data)

    # --- connection events (Twisted) -----------------------------------------------------------

    # --- the session skeleton (mailsys.session) -------------------------------------------------

    @override
    def _implicit_tls(self) -> bool:
        return self._factory.implicit_tls  # RFC 8314 §3.3: 993 is TLS from the first byte

    @override
    def _refusal(self, crowding: Crowding) -> bytes:
        # RFC 3501 §7.1.5: BYE as the greeting refuses the connection; RFC 5530 §3.
        return untagged("BYE [UNAVAILABLE] Too many connections, try again later")

    @override
    def _greet(self) -> None:
        log.info("imap connect from {client} tls={tls}", client=self._client, tls=self._secure)
        self.write(untagged(f"OK [CAPABILITY {self._capabilities()}] "
                            f"{self._factory.hostname} IMAP4rev1 server ready"))

    @override
    def _session_ended(self) -> None:
        self._deselect()
        log.info("imap disconnect from {client} user={user}", client=self._client,
                 user=self._mailbox)

    @override
    def _idle_is_ours(self) -> bool:
        # Waiting for the disk, the password check or a big FETCH is our slowness; while the
        # client IDLEs the silence is its own (RFC 2177: it must re-IDLE within 29 minutes).
        return self._waiting and self._idle_tag is None

    @override
    def _timed_out(self) -> None:
        # RFC 3501 §5.4: an inactivity autologout, announced by an untagged BYE.
        self.write(untagged("BYE Autologout; idle for too long"))
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
        return untagged("BYE Internal server error")

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
                self._answer(tagged(tag, BAD, line.reason.value))
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
                # RFC 4469 §7 / RFC 7889: TOOBIG; the literal was not read (or was dropped).
                self._answer(tagged(tag, NO, "Literal too large", "TOOBIG"))
            else:
                self._answer(tagged(tag, BAD, event.reason.value))
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
            self._answer(tagged(tag, BAD, "Missing command") if tag else
                         untagged("BAD Missing or invalid tag"))
            return
        uid = False
        if name == b"UID":
            try:
                reader.space()
                name = reader.atom().upper()
            except ParseError:
                self._answer(tagged(tag, BAD, "UID needs a command"))
                return
            if name not in self._uid_commands:
                self._answer(tagged(tag, BAD, "Unknown UID command"))
                return
            uid = True
        spec = self._commands.get(name)
        if spec is None:
            self._answer(tagged(tag, BAD, "Unknown command"))
            return
        if self._state not in spec.states:
            self._answer(tagged(tag, BAD, f"{name.decode()} not allowed "
                                          f"in the {self._state.value} state"))
            return
        try:
            result = spec.handler(tag, reader, uid)
        except searching.BadCharsetError:
            result = tagged(tag, NO, "Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
        except RefusedError as exc:
            result = tagged(tag, NO, exc.message, exc.code)
        except ParseError as exc:
            result = tagged(tag, BAD, str(exc) or "Syntax error")
        except Exception:
            log.failure("imap {command} failed for {client}", command=name.decode(),
                        client=self._client)
            result = tagged(tag, NO, "Internal server error", "SERVERBUG")
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
            if name != b"APPEND" or self._state not in _AUTHED:
                raise ParseError("Only APPEND takes a literal this large")
            result = self._do_append(tag, reader, False)
        except RefusedError as exc:
            result = tagged(tag, NO, exc.message, exc.code)
        except ParseError as exc:
            result = (tagged(tag, BAD, str(exc) or "Syntax error") if tag
                      else untagged("BAD Missing or invalid tag"))
        except Exception:
            log.failure("imap APPEND failed for {client}", client=self._client)
            result = tagged(tag, NO, "Internal server error", "SERVERBUG")
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
        selected = self._selected
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
                return self._report_changes().addCallback(lambda _: line)
            return line

        def unexpected(failure: Failure) -> bytes:
            log.failure("imap command failed for {client}", failure,
                        client=self._client)
            return tagged(tag, NO, "Internal server error", "SERVERBUG")

        chain: Deferred[Any] = result.addCallback(with_updates)
        self._await(chain.addErrback(unexpected), self._answer)

    def _answer(self, line: bytes) -> None:
        """Write a command's final answer; count BADs; close when the session is over."""
        if self._disconnected:
            return
        self.write(line)
        if line.split(b" ", 2)[1:2] == [BAD] and self._count_error():
            self.write(untagged("BYE Too many invalid commands"))
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
            caps += self._quota_capabilities()
        return " ".join(caps)

    @property
    @override
    def rev2(self) -> bool:
        """The client sent ENABLE IMAP4rev2: RFC 9051 behaviour."""
        return "IMAP4REV2" in self._enabled

    @property
    @override
    def utf8(self) -> bool:
        """Mailbox names travel in UTF-8 (RFC 9051 §5.1, RFC 6855 §3), not modified UTF-7."""
        return self.rev2 or "UTF8=ACCEPT" in self._enabled

    @property
    @override
    def condstore(self) -> bool:
        """A CONDSTORE-enabling command was seen (RFC 7162 §3.1)."""
        return "CONDSTORE" in self._enabled

    @override
    def _condstore_used(self) -> None:
        """A CONDSTORE-enabling command: turn CONDSTORE on for the rest of the connection.

        RFC 7162 §3.1: when that happens with a mailbox selected, the client is told the
        mailbox's HIGHESTMODSEQ at once (a SELECT (CONDSTORE) reports it itself).
        """
        if self.condstore:
            return
        self._enabled.add("CONDSTORE")
        if self._selected is not None:
            self.write(untagged(b"OK [HIGHESTMODSEQ %d] Highest"
                                % self._selected.view.highest_modseq))

    def _mailbox_name(self, reader: Reader) -> str:
        """A mailbox argument as the store names it (modified UTF-7 or UTF-8 decoded)."""
        raw = reader.astring()
        try:
            name = canonical(decode_name(raw, utf8=self.utf8))
        except MailboxNameError:
            # Well-formed as an astring: no mailbox has this name (NO, as Dovecot; not BAD).
            raise RefusedError(*INVALID_NAME) from None
        # The store's own rule (mailsys.mailbox.layout): a folder is one directory ".name"
        # holding every level, so a name past NAME_MAX bytes can never be a mailbox.
        try:
            folder_directory(name)
        except NameTooLongError:
            raise RefusedError(*NAME_TOO_LONG) from None
        except InvalidFolderNameError:
            pass  # each command answers this in its own way (NONEXISTENT, CANNOT, TRYCREATE)
        return name

    # --- any state -----------------------------------------------------------------------------

    def _do_capability(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.end()
        self.write(untagged(f"CAPABILITY {self._capabilities()}"))
        return tagged(tag, OK, "CAPABILITY completed")

    def _do_noop(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.end()
        if self._selected is not None:
            self._selected.dirty = True  # NOOP is how clients poll (RFC 3501 §6.1.2)
        return tagged(tag, OK, "NOOP completed")

    def _do_check(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.end()
        assert self._selected is not None
        self._selected.dirty = True
        return tagged(tag, OK, "CHECK completed")

    def _do_logout(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.end()
        self._state = State.LOGOUT
        self._close_after_reply = True
        self.write(untagged("BYE Logging out"))
        return tagged(tag, OK, "LOGOUT completed")

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
        return tagged(tag, OK, "ID completed")

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
            if name in _ENABLEABLE and name not in self._enabled:
                self._enabled.add(name)
                enabled.append(_ENABLEABLE[name])
        self.write(untagged(" ".join(["ENABLED", *enabled])))
        return tagged(tag, OK, "ENABLE completed")

    def _do_namespace(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.end()
        # RFC 2342: one personal namespace, no prefix, "." between levels.
        self.write(untagged(f'NAMESPACE (("" "{SEPARATOR}")) NIL NIL'))
        return tagged(tag, OK, "NAMESPACE completed")

    # --- not authenticated ---------------------------------------------------------------------

    def _do_starttls(self, tag: bytes, reader: Reader, uid: bool) -> bytes | None:
        reader.end()
        if self._secure:
            return tagged(tag, BAD, "TLS is already active")
        if not self._tls_offered():
            return tagged(tag, NO, "TLS is not available")
        context = self._tls_context("STARTTLS")
        if context is None:
            return tagged(tag, NO, "TLS is not available")
        self._start_tls(context, tagged(tag, OK, "Begin TLS negotiation now"), "STARTTLS")
        return None

    def _do_login(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.space()
        user = reader.astring()
        reader.space()
        password = reader.astring()
        reader.end()
        if not self._plaintext_ok():
            return tagged(tag, NO, "Plaintext authentication disallowed without TLS",
                          "PRIVACYREQUIRED")
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
            return tagged(tag, NO, "Unsupported authentication mechanism", "CANNOT")
        if not self._plaintext_ok():
            return tagged(tag, NO, "Plaintext authentication disallowed without TLS",
                          "PRIVACYREQUIRED")
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
            # RFC 3501 §6.2.2: a cancelled exchange is answered BAD.
            return tagged(tag, BAD, "Authentication cancelled")
        try:
            login = self._login.plain(decode_base64(line))
        except SASLError as exc:
            log.info("imap bad AUTHENTICATE PLAIN from {client}: {reason}",
                     client=self._client, reason=str(exc))
            return tagged(tag, BAD, "Malformed authentication response")
        return login.addCallback(self._login_answer, tag)

    def _authenticate(self, tag: bytes, user: str, password: str) -> Deferred[bytes]:
        return self._login.attempt(user, password).addCallback(self._login_answer, tag)

    def _login_answer(self, outcome: LoginOutcome, tag: bytes) -> bytes:
        if outcome is Refusal.BLOCKED:
            # RFC 3501 §7.1.5: the server says BYE before it closes the connection.
            self._close_after_reply = True
            self.write(untagged("BYE Too many failed logins; try again later"))
            return tagged(tag, NO, "Too many failed logins", "UNAVAILABLE")
        if outcome is Refusal.FAILED:
            return tagged(tag, NO, "Authentication failed", "AUTHENTICATIONFAILED")
        return self._logged_in(tag, outcome)

    def _logged_in(self, tag: bytes, user: MailUser) -> bytes:
        self._mailbox = user.mailbox
        self._state = State.AUTHENTICATED
        self._reset_idle_timer()  # the authenticated session's idle time (RFC 3501 §5.4)
        log.info("imap login {user} from {client}", user=user.mailbox,
                 client=self._client)
        return tagged(tag, OK, "Logged in", f"CAPABILITY {self._capabilities()}")

    # --- selecting ------------------------------------------------------------------------------

    def _deselect(self) -> None:
        selected, self._selected = self._selected, None
        if selected is not None:
            selected.unsubscribe()
        if self._state is State.SELECTED:
            self._state = State.AUTHENTICATED

    def _do_select(self, tag: bytes, reader: Reader, uid: bool) -> Deferred[bytes]:
        return self._open(tag, reader, readonly=False)

    def _do_examine(self, tag: bytes, reader: Reader, uid: bool) -> Deferred[bytes]:
        return self._open(tag, reader, readonly=True)

    def _open(self, tag: bytes, reader: Reader, readonly: bool) -> Deferred[bytes]:
        reader.space()
        name = self._mailbox_name(reader)
        condstore = False
        if reader.accept(b" "):
            # RFC 4466 select parameters; RFC 7162 §3.1.8: CONDSTORE is the one we know.
            for parameter in reader.paren_list(reader.atom):
                if parameter.upper() != b"CONDSTORE":
                    raise ParseError("Unknown SELECT parameter")
                condstore = True
        reader.end()
        if condstore:
            self._enabled.add("CONDSTORE")
        # RFC 3501 §6.3.1: SELECT first deselects; a failed SELECT leaves none selected.
        if self._selected is not None and self.rev2:
            # RFC 9051 §7.1: the previous mailbox's updates end here.
            self.write(untagged("OK [CLOSED] Previous mailbox closed"))
        self._deselect()
        mailbox = self._mailbox
        assert mailbox is not None
        verb = "EXAMINE" if readonly else "SELECT"

        def opened(view: FolderView) -> Deferred[bytes]:
            def work() -> tuple[list[str], int]:
                # RFC 3501 §6.3.2: EXAMINE leaves \Recent to the next session; SELECT takes it.
                return (read_keywords(view.path),
                        view.folder.recent_from(view.uidnext, claim=not readonly))

            return self.run(work).addCallback(lambda found: answer(view, *found))

        def answer(view: FolderView, keywords: list[str], first_recent: int) -> bytes:
            if self._disconnected:
                return b""
            unsubscribe = self._store.subscribe(mailbox, view.name, self._changed)
            recent = {info.uid for info in view.messages if info.uid >= first_recent}
            rev2 = self.rev2
            selected = Selected(view, readonly, keywords, recent, unsubscribe,
                                exists=len(view.messages), show_recent=not rev2)
            self._selected = selected
            self._state = State.SELECTED
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
            if self.condstore:
                # RFC 7162 §3.1.2.1.
                out.append(untagged(b"OK [HIGHESTMODSEQ %d] Highest" % view.highest_modseq))
            self.write(b"".join(out))
            log.info("imap {verb} {user} {folder} messages={count}", verb=verb,
                     user=mailbox, folder=view.name, count=len(view.messages))
            return tagged(tag, OK, f"{verb} completed",
                          "READ-ONLY" if readonly else "READ-WRITE")

        def failed(failure: Failure) -> bytes | Failure:
            if failure.check(FileNotFoundError, InvalidFolderNameError):
                return tagged(tag, NO, "No such mailbox", "NONEXISTENT")
            return failure

        return self._store.open_folder(mailbox, name).addCallbacks(opened, failed)

    def _do_close(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.end()
        selected = self._selected
        assert selected is not None
        self._deselect()
        if selected.readonly:
            return tagged(tag, OK, "CLOSE completed")
        # RFC 3501 §6.4.2: CLOSE expunges silently.
        doomed = [info for info in selected.view.messages if TRASHED in info.flags]
        if not doomed:
            return tagged(tag, OK, "CLOSE completed")
        return self._delete_quietly(selected.view, doomed).addCallback(
            lambda _: tagged(tag, OK, "CLOSE completed"))

    def _do_unselect(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.end()
        self._deselect()  # RFC 3691: like CLOSE, without the expunge
        return tagged(tag, OK, "UNSELECT completed")

    def _delete_quietly(self, view: FolderView, infos: list[MessageInfo]) -> Deferred[list[int]]:
        self._notifying = True
        try:
            return view.delete(infos)
        finally:
            self._notifying = False

    # --- change reports (RFC 3501 §7.3.1, §7.4.1) --------------------------------------------

    def _changed(self) -> None:
        """The store says our folder may have changed (a delivery, another session)."""
        if self._notifying or self._selected is None:
            return
        self._selected.dirty = True
        if self._idle_tag is not None and not self._waiting:
            # RFC 2177: while idling, news goes out at once.
            self._waiting = True

            def done(_: object) -> None:
                self._continue()

            self._report_changes().addBoth(done)

    def _report_changes(self) -> Deferred[None]:
        """Refresh the view and tell the client what changed: EXPUNGE, EXISTS, RECENT, FLAGS."""
        selected = self._selected
        if selected is None:
            return succeed(None)
        selected.dirty = False
        before = selected.view.messages

        def claim(changes: Any) -> Any:
            if not changes.added or changes.uidvalidity_changed:
                return (changes, selected.view.uidnext)
            # RFC 3501 §2.3.2: the first session told of a new message sees it \Recent; a
            # read-only one leaves it recent for the next.
            view = selected.view
            return self.run(lambda: view.folder.recent_from(
                view.uidnext, claim=not selected.readonly)).addCallback(
                lambda first: (changes, first))

        def refreshed(found: tuple[Any, int]) -> Deferred[None] | None:
            changes, first_recent = found
            if self._selected is not selected or self._disconnected:
                return None
            view = selected.view
            if changes.uidvalidity_changed:
                self.write(untagged("BYE The mailbox's UIDs were reset; please reconnect"))
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
                selected.exists = len(view.messages)
                out.append(b"* %d EXISTS\r\n" % selected.exists)
                if selected.show_recent:  # RFC 9051 §7.4: no RECENT in IMAP4rev2
                    out.append(b"* %d RECENT\r\n" % len(selected.recent))
            unknown = any(letter.islower() and not has_keyword(selected.keywords, letter)
                          for info in (*changes.added, *changes.flags_changed)
                          for letter in info.flags)
            self.write(b"".join(out))

            def report_flags(_: object = None) -> None:
                lines = []
                for info in changes.flags_changed:
                    position = selected.position(info.uid)
                    if position is not None:
                        lines.append(self._flags_response(position + 1, info, uid=True))
                self.write(b"".join(lines))

            if not unknown:
                report_flags()
                return None

            def reload(keywords: list[str]) -> None:
                selected.keywords = keywords
                selected.flag_cache.clear()
                self.write(untagged(b"FLAGS (" + selected.flag_names() + b")"))
                report_flags()

            return cast(Deferred[None], self.run(read_keywords, view.path).addCallback(reload))

        def failed(failure: Failure) -> None:
            if self._selected is not selected:
                return
            if failure.check(FileNotFoundError):
                self.write(untagged("BYE The selected mailbox was deleted or renamed"))
            else:
                log.failure("imap refresh failed for {user}", failure, user=self._mailbox)
                self.write(untagged("BYE Internal server error"))
            self._deselect()
            self._close()

        return selected.view.refresh().addCallback(claim).addCallback(refreshed).addErrback(
            failed)

    def _flags_response(self, seq: int, info: MessageInfo, *, uid: bool) -> bytes:
        """``* seq FETCH ([UID u] FLAGS (...) [MODSEQ (m)])`` for a flag change; RFC 7162 §3.1:
        with CONDSTORE on, UID and MODSEQ are always in it."""
        selected = self._selected
        assert selected is not None
        if not self.condstore:
            uid_part = b"UID %d " % info.uid if uid else b""
            return b"* %d FETCH (%sFLAGS (%s))\r\n" % (seq, uid_part, selected.flags(info))
        return b"* %d FETCH (UID %d FLAGS (%s) MODSEQ (%d))\r\n" % (
            seq, info.uid, selected.flags(info), info.modseq)

    # --- IDLE (RFC 2177) ------------------------------------------------------------------------

    def _do_idle(self, tag: bytes, reader: Reader, uid: bool) -> None:
        reader.end()
        self._idle_tag = tag
        self.write(b"+ idling\r\n")
        if self._selected is not None and self._selected.dirty:
            self._changed()
        return None

    def _idle_line(self, line: bytes) -> None:
        tag, self._idle_tag = self._idle_tag, None
        assert tag is not None
        if line.strip().upper() == b"DONE":
            self._answer(tagged(tag, OK, "IDLE terminated"))
        else:
            self._answer(tagged(tag, BAD, "Expected DONE"))

    # --- mailboxes ------------------------------------------------------------------------------

    def _notify(self, folder: str) -> None:
        """Tell the other sessions on ``folder`` that it changed. If it is our own selected
        folder and the change was not made through our view (APPEND, COPY into it), we refresh
        too."""
        assert self._mailbox is not None
        self._notifying = True
        try:
            self._store.notify_changed(self._mailbox, folder)
        finally:
            self._notifying = False

    def _added_to(self, folder: str) -> None:
        self._notify(folder)
        if self._selected is not None and self._selected.view.name == folder:
            self._selected.dirty = True



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



