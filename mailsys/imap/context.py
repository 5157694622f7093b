r"""What an IMAP command group may use of its session: the ``CommandContext``.

The session (mailsys.imap.session) owns the protocol: lines and literals, the state machine,
login, STARTTLS, IDLE and the change reports. The command groups (mailsys.imap.mailboxes,
messages, transfers, quota) each take one ``CommandContext`` and register their commands in the
session's dispatch table as ``CommandSpec`` entries; they never see the session itself. The
context holds exactly what commands share: the store, the logged-in mailbox, the selected
folder's view (``Selected``), the ENABLEd extensions, the writer of untagged responses, the disk
runner, the change notifier and the journey recorder.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer

from mailsys.imap.flags import RECENT, names_of
from mailsys.imap.names import MailboxNameError, canonical, decode_name
from mailsys.imap.parser import ParseError, Reader, SequenceSet
from mailsys.imap.responses import INVALID_NAME, NAME_TOO_LONG, RefusedError, untagged
from mailsys.journey.events import SessionJourney
from mailsys.mailbox.folder import MessageInfo
from mailsys.mailbox.layout import NameTooLongError, delivered_queue_id, folder_directory
from mailsys.mailbox.store import FolderView, InvalidFolderNameError, MailboxStore


class State(enum.Enum):
    """The session states of RFC 3501 §3."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


ANY = frozenset(State) - {State.LOGOUT}
AUTHED = frozenset({State.AUTHENTICATED, State.SELECTED})
SELECTED = frozenset({State.SELECTED})
NOT_AUTHED = frozenset({State.NOT_AUTHENTICATED})

# A command's handler: (tag, the reader after the command name, UID form?) -> the tagged
# answer, a Deferred of it, or None when the command answers later itself (IDLE, STARTTLS).
Handler = Callable[[bytes, Reader, bool], "bytes | Deferred[bytes] | None"]


@dataclass(frozen=True)
class CommandSpec:
    """One entry of the session's dispatch table."""

    handler: Handler
    states: frozenset[State]
    # RFC 3501 §7.4.1: no EXPUNGE while answering FETCH, STORE or SEARCH (their UID forms
    # may): changes are reported at the end of every other command.
    updates: bool = True
    updates_with_uid: bool = True
    takes_uid: bool = False  # has a UID form (RFC 3501 §6.4.8, RFC 4315, RFC 6851)


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

    def targets(self, numbers: SequenceSet, uid: bool) -> list[tuple[int, MessageInfo]]:
        """(sequence number, message) for a sequence set or UID set, in mailbox order."""
        messages = self.view.messages
        if not messages:
            return []
        if numbers.saved:
            # RFC 5182 §2.1: "$" is the saved UIDs, for UID and sequence-number commands alike.
            saved = self.saved
            return [(n, info) for n, info in enumerate(messages, 1) if info.uid in saved]
        if uid:
            uids = self.uids()
            ranges = numbers.resolve(uids[-1])
            if len(ranges) == 1:  # the common "1:*" or "n:m": one slice, in order
                start = bisect.bisect_left(uids, ranges[0][0])
                end = bisect.bisect_right(uids, ranges[0][1])
                return list(zip(range(start + 1, end + 1), messages[start:end], strict=True))
            positions: set[int] = set()
            for low, high in ranges:
                start = bisect.bisect_left(uids, low)
                end = bisect.bisect_right(uids, high)
                positions.update(range(start, end))
            return [(p + 1, messages[p]) for p in sorted(positions)]
        largest = len(messages)
        ranges = numbers.resolve(largest)
        if any(high > largest for _, high in ranges):
            raise ParseError("Invalid message sequence number")
        if len(ranges) == 1:
            low, high = ranges[0]
            return list(zip(range(low, high + 1), messages[low - 1:high], strict=True))
        positions = set()
        for low, high in ranges:
            positions.update(range(low - 1, high))
        return [(p + 1, messages[p]) for p in sorted(positions)]


class CommandContext:
    """The state and services the command groups share with their session.

    The session creates one per connection and changes ``mailbox`` (at login) and ``selected``
    (SELECT, CLOSE); the groups read them and use the methods below.
    """

    def __init__(self, store: MailboxStore, journey: SessionJourney,
                 write: Callable[[bytes], None], consumer: Callable[[], IConsumer]) -> None:
        self.store = store
        self.write = write  # output to the client, in order
        self.consumer = consumer  # the transport, for a FETCH's push producer
        self.mailbox: str | None = None  # the logged-in user's mailbox
        self.selected: Selected | None = None
        self.enabled: set[str] = set()  # ENABLEd extensions (RFC 5161), upper case
        # Set while our own change is announced to the store: not news to this session.
        self.notifying = False
        self._journey = journey

    # --- the logged-in mailbox ------------------------------------------------------------------

    @property
    def user(self) -> str:
        """The logged-in user's mailbox (commands that need it run after login only)."""
        mailbox = self.mailbox
        assert mailbox is not None
        return mailbox

    def inbox(self) -> Path:
        """The logged-in user's Maildir."""
        return self.store.mailbox_path(self.user)

    def run(self, func: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Blocking work in the store's disk pool."""
        return self.store.pool.run(func, *args)

    # --- extensions (RFC 5161 ENABLE) -----------------------------------------------------------

    @property
    def rev2(self) -> bool:
        """The client sent ENABLE IMAP4rev2: RFC 9051 behaviour."""
        return "IMAP4REV2" in self.enabled

    @property
    def utf8(self) -> bool:
        """Mailbox names travel in UTF-8 (RFC 9051 §5.1, RFC 6855 §3), not modified UTF-7."""
        return self.rev2 or "UTF8=ACCEPT" in self.enabled

    @property
    def condstore(self) -> bool:
        """A CONDSTORE-enabling command was seen (RFC 7162 §3.1)."""
        return "CONDSTORE" in self.enabled

    def condstore_used(self) -> None:
        """A CONDSTORE-enabling command: turn CONDSTORE on for the rest of the connection.

        RFC 7162 §3.1: when that happens with a mailbox selected, the client is told the
        mailbox's HIGHESTMODSEQ at once (a SELECT (CONDSTORE) reports it itself).
        """
        if self.condstore:
            return
        self.enabled.add("CONDSTORE")
        if self.selected is not None:
            self.write(untagged(b"OK [HIGHESTMODSEQ %d] Highest"
                                % self.selected.view.highest_modseq))

    # --- arguments --------------------------------------------------------------------------------

    def mailbox_name(self, reader: Reader) -> str:
        """A mailbox argument as the store names it (modified UTF-7 or UTF-8 decoded)."""
        raw = reader.astring()
        try:
            name = canonical(decode_name(raw, utf8=self.utf8))
        except MailboxNameError:
            # Well-formed as an astring: no mailbox has this name (NO, as Dovecot; not BAD).
            raise RefusedError(INVALID_NAME) from None
        # The store's own rule (mailsys.mailbox.layout): a folder is one directory ".name"
        # holding every level, so a name past NAME_MAX bytes can never be a mailbox.
        try:
            folder_directory(name)
        except NameTooLongError:
            raise RefusedError(NAME_TOO_LONG) from None
        except InvalidFolderNameError:
            pass  # each command answers this in its own way (NONEXISTENT, CANNOT, TRYCREATE)
        return name

    # --- the selected mailbox ---------------------------------------------------------------------

    def deselect(self) -> None:
        """Leave the selected mailbox, if any (the session is then authenticated)."""
        selected, self.selected = self.selected, None
        if selected is not None:
            selected.unsubscribe()

    def delete_quietly(self, view: FolderView, infos: list[MessageInfo]
                       ) -> Deferred[list[int]]:
        """Delete messages through ``view`` without hearing of it as another's change."""
        self.notifying = True
        try:
            return view.delete(infos)
        finally:
            self.notifying = False

    def expunge(self, doomed: list[MessageInfo]) -> Deferred[None]:
        """Delete messages of the selected mailbox and send their EXPUNGE responses."""
        selected = self.selected
        assert selected is not None
        if not doomed:
            return succeed(None)
        before = selected.view.messages
        positions = {info.uid: n for n, info in enumerate(before, 1)}

        def deleted(uids: list[int]) -> None:
            seqs = sorted((positions[u] for u in uids if u in positions), reverse=True)
            self.write(b"".join(b"* %d EXPUNGE\r\n" % seq for seq in seqs))
            selected.recent.difference_update(uids)
            selected.exists -= len(seqs)

        return self.delete_quietly(selected.view, doomed).addCallback(deleted)

    def flags_response(self, seq: int, info: MessageInfo, *, uid: bool) -> bytes:
        """``* seq FETCH ([UID u] FLAGS (...) [MODSEQ (m)])`` for a flag change; RFC 7162 §3.1:
        with CONDSTORE on, UID and MODSEQ are always in it."""
        selected = self.selected
        assert selected is not None
        if not self.condstore:
            uid_part = b"UID %d " % info.uid if uid else b""
            return b"* %d FETCH (%sFLAGS (%s))\r\n" % (seq, uid_part, selected.flags(info))
        return b"* %d FETCH (UID %d FLAGS (%s) MODSEQ (%d))\r\n" % (
            seq, info.uid, selected.flags(info), info.modseq)

    # --- telling others ---------------------------------------------------------------------------

    def notify(self, folder: str) -> None:
        """Tell the other sessions on ``folder`` that it changed (not news to this one)."""
        self.notifying = True
        try:
            self.store.notify_changed(self.user, folder)
        finally:
            self.notifying = False

    def added_to(self, folder: str) -> None:
        """Messages were put into ``folder`` (APPEND, COPY, MOVE): others hear of it; if it is
        our own selected folder, the change did not go through our view, so we refresh too."""
        self.notify(folder)
        if self.selected is not None and self.selected.view.name == folder:
            self.selected.dirty = True

    def record(self, kind: str, info: MessageInfo, folder: str, **fields: Any) -> None:
        """A step in the journey of a message this server delivered (others have none)."""
        queue_id = delivered_queue_id(info.key)
        if queue_id is not None:
            self._journey.emit(kind, queue_id, user=self.mailbox, folder=folder, uid=info.uid,
                               **fields)
