"""The mailbox store: users' Maildir++ mailboxes as POP3 and IMAP sessions see them.

This module owns the asynchronous side: where a user's mailbox and folders are, opening a folder
for a session (``FolderView``), the POP3 maildrop lock (RFC 1939 §8), and telling open sessions
that a folder changed (in-process deliveries at once, other processes' changes by polling). All
disk work runs in the DiskPool through mailsys.mailbox.folder; Deferreds fire on the reactor.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsys.diskio import DiskRunner
from mailsys.mailbox.folder import (
    Expunged,
    FlagChange,
    FlagResult,
    Folder,
    MessageInfo,
    SyncResult,
)
from mailsys.mailbox.layout import (
    HIERARCHY_SEPARATOR,
    INBOX,
    InvalidFolderNameError,
    InvalidMailboxNameError,
    NameTooLongError,
    create_maildir,
    folder_directory,
    folder_names,
    folder_path,
    mailbox_path,
)

log = Logger(namespace="mailsys.mailbox")

# The path rules are the Maildir format's (mailsys.mailbox.layout); sessions import them here.
__all__ = [
    "DEFAULT_FOLDERS",
    "HIERARCHY_SEPARATOR",
    "INBOX",
    "FolderChanges",
    "FolderView",
    "InvalidFolderNameError",
    "InvalidMailboxNameError",
    "MailboxInUseError",
    "MailboxLock",
    "MailboxStore",
    "NameTooLongError",
    "Refreshed",
    "folder_directory",
    "mailbox_path",
]

T = TypeVar("T")

# Created with every new mailbox (RFC 6154 SPECIAL-USE names that clients recognise).
DEFAULT_FOLDERS = ("Sent", "Drafts", "Trash", "Junk")
# A mailbox whose INBOX holds this file has had its default folders created.
INITIALISED_MARKER = "mailsys-initialised"
POP3_LOCK_NAME = "mailsys-pop3.lock"


class MailboxInUseError(Exception):
    """Another POP3 session holds the mailbox (RFC 1939 §8, RFC 2449 [IN-USE])."""


@dataclass(frozen=True)
class FolderChanges:
    """What a refresh found since the view's previous state."""

    added: tuple[MessageInfo, ...] = ()  # new messages, in UID order
    expunged: tuple[int, ...] = ()  # UIDs gone (deleted by another session)
    # Messages whose flags (or mod-sequence, RFC 7162 §3.1) another session or program changed.
    flags_changed: tuple[MessageInfo, ...] = ()
    uidvalidity_changed: bool = False  # everything the session knew is void (RFC 3501 §2.3.1.1)

    @property
    def any(self) -> bool:
        return bool(self.added or self.expunged or self.flags_changed or self.uidvalidity_changed)

    @cached_property
    def keyword_letters(self) -> frozenset[str]:
        """The keyword letters (lower case, mailsys.mailbox.keywords) on the added and changed
        messages: worked out once for every session this change is handed to."""
        return frozenset(letter for info in (*self.added, *self.flags_changed)
                         for letter in info.flags if letter.islower())


NO_CHANGES = FolderChanges()


@dataclass(frozen=True)
class Refreshed:
    """A view's refresh as handed to its session: what changed, and from which UID the new
    messages are \\Recent for that session after its claim (RFC 3501 §2.3.2; the view's
    UIDNEXT when there was nothing to claim)."""

    changes: FolderChanges
    first_recent: int


# What a refresh is handed: the outcome, or the failure of the sync or of the claim.
RefreshCallback = Callable[["Refreshed | Failure"], None]


@dataclass(slots=True)
class _Waiting:
    """Who waits for one sync of a folder, in the order they asked: refreshes of views (in
    parallel lists, so that a wake-up of thousands of sessions makes no object per session) and
    sync_shared's Deferreds."""

    views: list[FolderView] = field(default_factory=list)
    claims: list[bool | None] = field(default_factory=list)  # claim \Recent, look, or neither
    thens: list[RefreshCallback] = field(default_factory=list)
    deferreds: list[Deferred[SyncResult]] = field(default_factory=list)

    def extend(self, other: _Waiting) -> None:
        """Add ``other``'s waiters after ours."""
        self.views.extend(other.views)
        self.claims.extend(other.claims)
        self.thens.extend(other.thens)
        self.deferreds.extend(other.deferreds)


# Claims waiting for a batch: the requests (seen_up_to, claim) and who takes their answers.
_ClaimRequest = tuple[list[tuple[int, bool]], Callable[[list[int] | Failure], None]]


class MailboxLock:
    """An exclusive POP3 lock on one mailbox; ``release()`` when the session ends."""

    def __init__(self, store: MailboxStore, mailbox: str, fd: int) -> None:
        self._store = store
        self.mailbox = mailbox
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.close(fd)  # releases the flock; a tiny syscall, fine on the reactor
        self._store._pop3_locked.discard(self.mailbox)


class MailboxStore:
    """Every user's mailbox under ``root`` (``root/<domain>/<user>/`` Maildir++)."""

    def __init__(self, root: Path, pool: DiskRunner, *,
                 default_folders: Iterable[str] = DEFAULT_FOLDERS,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.pool = pool
        self.default_folders = tuple(default_folders)
        self._clock = clock
        self._initialised: set[str] = set()
        self._pop3_locked: set[str] = set()
        self._subscribers: dict[tuple[str, str], list[Callable[[], None]]] = {}
        self._stamps: dict[tuple[str, str], tuple[int, int]] = {}
        self._polling = False
        # Folder syncs for views' refreshes, by folder path: the one running, and the one that
        # every refresh asked for meanwhile will share (see sync_shared).
        self._sync_running: dict[str, Deferred[SyncResult]] = {}
        self._sync_next: dict[str, tuple[Folder, str, _Waiting]] = {}
        # While notify_changed tells the watchers, the syncs they ask for are gathered here and
        # started after the last one asked: one sync for them all, not one for the first and
        # one for the rest.
        self._gathering: dict[str, tuple[Folder, str, _Waiting]] | None = None
        # \Recent claims by folder path: those waiting for the claim batch running to end.
        self._claims_running: set[str] = set()
        self._claims_next: dict[str, tuple[Folder, list[_ClaimRequest]]] = {}

    # --- paths ----------------------------------------------------------------------------------

    def mailbox_path(self, mailbox: str) -> Path:
        """The INBOX Maildir of ``mailbox``; InvalidMailboxNameError if unusable."""
        return mailbox_path(self.root, mailbox)

    def folder_path(self, mailbox: str, folder: str = INBOX) -> Path:
        """The Maildir directory of ``folder`` in ``mailbox``."""
        return folder_path(self.mailbox_path(mailbox), folder)

    def folder(self, mailbox: str, folder: str = INBOX) -> Folder:
        """The blocking Folder object (for disk-thread work and tests)."""
        directory = folder_directory(folder)
        inbox = self.mailbox_path(mailbox)
        return Folder(inbox if directory is None else inbox / directory,
                      subfolder=directory is not None, clock=self._clock)

    def sync_shared(self, folder: Folder, name: str) -> Deferred[SyncResult]:
        """``folder.sync()`` in a disk thread, shared with the other refreshes of that folder.

        When a delivery wakes every session watching a folder (thousands of IDLE clients), each
        asks for a sync; one sync serves them all. A sync already running may have read the
        directory before the change the caller reacts to, so a caller never joins it: it joins
        the next one, which starts when the running one ends and serves every caller that came
        meanwhile. A folder removed meanwhile is not recreated (FileNotFoundError naming
        ``name``, the folder's name for the client).
        """
        waiting: Deferred[SyncResult] = Deferred()
        key = os.fspath(folder.path)
        joined, start = self._waiting_for(key, folder, name)
        joined.deferreds.append(waiting)
        if start:
            self._start_sync(key, folder, name, joined)
        return waiting

    def refresh_then(self, view: FolderView, then: RefreshCallback, *,
                     claim: bool | None) -> None:
        """Refresh ``view`` with the next shared sync of its folder (see sync_shared) and call
        ``then`` with a ``Refreshed`` (or the Failure), on the reactor.

        This is the wake-up of every session watching a folder, so the work is done once per
        folder change, not once per session: the difference from the previous state is worked
        out once for all the views that were in that same state (FolderView._adopt), and the
        \\Recent claims of every view that gained messages go to the disk in one batch, in the
        order the views asked (``claim`` True for a read-write session, False for a read-only
        one, None for no claim). No Deferred, and no object, is made per view: with thousands
        of sessions, objects that live through a wake-up are what makes the cyclic garbage
        collector walk the whole heap.
        """
        folder = view.folder
        key = os.fspath(folder.path)
        waiting, start = self._waiting_for(key, folder, view.name)
        waiting.views.append(view)
        waiting.claims.append(claim)
        waiting.thens.append(then)
        if start:
            self._start_sync(key, folder, view.name, waiting)

    def _waiting_for(self, key: str, folder: Folder, name: str) -> tuple[_Waiting, bool]:
        """The waiters of the next sync of ``folder`` that a caller may join, and whether the
        caller, once it has joined, starts that sync (none is running and the watchers are not
        being told of a change: see notify_changed)."""
        gathering = self._gathering
        if key in self._sync_running or gathering is not None:
            queue = self._sync_next if key in self._sync_running else gathering
            assert queue is not None
            pending = queue.get(key)
            if pending is None:
                pending = queue[key] = (folder, name, _Waiting())
            return pending[2], False
        return _Waiting(), True

    def _join_syncs(self, key: str, folder: Folder, name: str, waiting: _Waiting) -> None:
        """Waiters gathered while sessions were told of a change: the next sync is theirs."""
        if key in self._sync_running:
            pending = self._sync_next.get(key)
            if pending is None:
                self._sync_next[key] = (folder, name, waiting)
            else:
                pending[2].extend(waiting)
        else:
            self._start_sync(key, folder, name, waiting)

    def _start_sync(self, key: str, folder: Folder, name: str, waiting: _Waiting) -> None:
        def work() -> SyncResult:
            # A folder deleted or renamed meanwhile must not be recreated by syncing it.
            if folder.subfolder and not folder.path.is_dir():
                raise FileNotFoundError(f"folder {name!r} is gone")
            return folder.sync(sizes=False)  # sizes are read when asked for (with_sizes)

        def done(result: SyncResult | Failure) -> None:
            del self._sync_running[key]
            queued = self._sync_next.pop(key, None)
            if queued is not None:
                self._start_sync(key, *queued)
            for d in waiting.deferreds:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)
            if waiting.views:
                self._refreshed(key, folder, result, waiting)

        running: Deferred[SyncResult] = self.pool.run(work)
        self._sync_running[key] = running
        running.addBoth(done)

    def _refreshed(self, key: str, folder: Folder, result: SyncResult | Failure,
                   waiting: _Waiting) -> None:
        """A shared sync ended: bring each waiting view up to date, claim \\Recent for those
        that gained messages in one batch, and hand every session its outcome."""
        if isinstance(result, Failure):
            for then in waiting.thens:
                _hand(then, result)
            return
        shared: dict[int, tuple[SyncResult, FolderChanges]] = {}
        messages = list(result.messages)
        claiming: list[int] = []  # positions in ``waiting`` of the views that claim
        found: list[FolderChanges] = []
        for n, view in enumerate(waiting.views):
            changes = view._adopt(result, messages, shared)
            found.append(changes)
            if (waiting.claims[n] is not None and changes.added
                    and not changes.uidvalidity_changed):
                claiming.append(n)
            else:
                _hand(waiting.thens[n], Refreshed(changes, view.uidnext))
        if not claiming:
            return

        def claimed(answers: list[int] | Failure) -> None:
            for position, n in enumerate(claiming):
                _hand(waiting.thens[n], answers if isinstance(answers, Failure)
                      else Refreshed(found[n], answers[position]))

        # RFC 3501 §2.3.2: the first read-write session told of a new message sees it \Recent.
        self._claim(key, folder, ([(waiting.views[n].uidnext, bool(waiting.claims[n]))
                                   for n in claiming], claimed))

    def recent_from_shared(self, folder: Folder, seen_up_to: int, *,
                           claim: bool) -> Deferred[int]:
        """``folder.recent_from`` in a disk thread, in one batch with the other sessions'
        claims on that folder (``Folder.recent_from_many``), in the order they were asked."""
        waiting: Deferred[int] = Deferred()

        def answer(answers: list[int] | Failure) -> None:
            if isinstance(answers, Failure):
                waiting.errback(answers)
            else:
                waiting.callback(answers[0])

        self._claim(os.fspath(folder.path), folder, ([(seen_up_to, claim)], answer))
        return waiting

    def _claim(self, key: str, folder: Folder, request: _ClaimRequest) -> None:
        pending = self._claims_next.get(key)
        if pending is None:
            pending = self._claims_next[key] = (folder, [])
        pending[1].append(request)
        if key not in self._claims_running:
            self._start_claims(key)

    def _start_claims(self, key: str) -> None:
        folder, claims = self._claims_next.pop(key)
        self._claims_running.add(key)
        requests = [one for asked, _ in claims for one in asked]
        running: Deferred[list[int]] = self.pool.run(folder.recent_from_many, requests)

        def done(result: list[int] | Failure) -> None:
            self._claims_running.discard(key)
            if key in self._claims_next:
                self._start_claims(key)
            start = 0
            for asked, answer in claims:
                if isinstance(result, Failure):
                    answer(result)
                else:
                    answer(result[start:start + len(asked)])
                start += len(asked)

        running.addBoth(done)

    # --- opening --------------------------------------------------------------------------------

    def open_folder(self, mailbox: str, folder: str = INBOX, *,
                    sizes: bool = True) -> Deferred[FolderView]:
        """Open ``folder`` for a session: its messages with UIDs, sizes and flags.

        Creates the mailbox and its default folders the first time. Fails with
        FileNotFoundError for a folder that does not exist (the INBOX always does). Without
        ``sizes`` a message not sized yet has wire_size None (FolderView.with_sizes gives it):
        an IMAP SELECT needs no sizes, and reading every file of a large new folder for them
        was most of a cold SELECT's time.
        """
        try:
            target = self.folder(mailbox, folder)
        except (InvalidMailboxNameError, InvalidFolderNameError) as exc:
            return _failed(exc)
        name = INBOX if folder.upper() == INBOX else folder

        def work() -> SyncResult:
            self._initialise(mailbox)
            if target.subfolder and not target.path.is_dir():
                raise FileNotFoundError(f"no folder {name!r}")
            return target.sync(sizes=sizes)

        def opened(result: SyncResult) -> FolderView:
            self._initialised.add(mailbox)
            return FolderView(self, mailbox, name, target, result)

        return self.pool.run(work).addCallback(opened)

    def _initialise(self, mailbox: str) -> None:
        """Disk thread: create the INBOX and, once per new mailbox, the default folders."""
        if mailbox in self._initialised:
            return
        inbox = self.mailbox_path(mailbox)
        if (inbox / INITIALISED_MARKER).exists():
            return
        create_maildir(inbox)
        for name in self.default_folders:
            create_maildir(folder_path(inbox, name), subfolder=True)
        (inbox / INITIALISED_MARKER).touch(mode=0o600)
        log.info("created mailbox {mailbox} with folders {folders}", mailbox=mailbox,
                 folders=", ".join(self.default_folders))

    def list_folders(self, mailbox: str) -> Deferred[list[str]]:
        """The names of every folder of ``mailbox``, INBOX first, then sorted."""
        try:
            inbox = self.mailbox_path(mailbox)
        except InvalidMailboxNameError as exc:
            return _failed(exc)

        def work() -> list[str]:
            self._initialise(mailbox)
            return [INBOX, *folder_names(inbox)]

        return self.pool.run(work)

    def create_folder(self, mailbox: str, name: str) -> Deferred[None]:
        """Create folder ``name`` (and, Maildir++ style, nothing for its parents)."""
        try:
            directory = folder_directory(name)
            inbox = self.mailbox_path(mailbox)
        except (InvalidMailboxNameError, InvalidFolderNameError) as exc:
            return _failed(exc)
        if directory is None:
            return _failed(FileExistsError("INBOX always exists"))

        def work() -> None:
            self._initialise(mailbox)
            if (inbox / directory).exists():
                raise FileExistsError(f"folder {name!r} exists")
            create_maildir(inbox / directory, subfolder=True)

        return self.pool.run(work)

    # --- the POP3 maildrop lock -----------------------------------------------------------------

    def lock_mailbox(self, mailbox: str) -> Deferred[MailboxLock]:
        """Lock ``mailbox`` for one POP3 session; fails with MailboxInUseError if held.

        RFC 1939 §8: a POP3 server must lock the maildrop. The lock is an flock on a file in the
        INBOX, so a second server process on the same Maildirs respects it too; the kernel drops
        it if the process dies.
        """
        if mailbox in self._pop3_locked:
            return _failed(MailboxInUseError(mailbox))
        try:
            inbox = self.mailbox_path(mailbox)
        except InvalidMailboxNameError as exc:
            return _failed(exc)
        self._pop3_locked.add(mailbox)

        def work() -> int:
            self._initialise(mailbox)
            fd = os.open(inbox / POP3_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MailboxInUseError(mailbox) from None
            except BaseException:
                os.close(fd)
                raise
            return fd

        def locked(fd: int) -> MailboxLock:
            return MailboxLock(self, mailbox, fd)

        def failed(failure: Any) -> Any:
            self._pop3_locked.discard(mailbox)
            return failure

        return self.pool.run(work).addCallbacks(locked, failed)

    # --- change notification --------------------------------------------------------------------

    def subscribe(self, mailbox: str, folder: str, callback: Callable[[], None]
                  ) -> Callable[[], None]:
        """Call ``callback`` (on the reactor) when ``folder`` of ``mailbox`` may have changed.

        Returns the function that unsubscribes. The callback only says "look again": the
        session calls FolderView.refresh() to learn what changed.
        """
        key = (mailbox, INBOX if folder.upper() == INBOX else folder)
        self._subscribers.setdefault(key, []).append(callback)

        def unsubscribe() -> None:
            callbacks = self._subscribers.get(key)
            if callbacks is not None and callback in callbacks:
                callbacks.remove(callback)
                if not callbacks:
                    del self._subscribers[key]
                    self._stamps.pop(key, None)

        return unsubscribe

    def notify_changed(self, mailbox: str, folder: str = INBOX) -> None:
        """Tell the sessions watching ``folder`` that it changed (in-process writers call this)."""
        key = (mailbox, INBOX if folder.upper() == INBOX else folder)
        self._stamps.pop(key, None)
        outer = self._gathering is not None
        if not outer:
            self._gathering = {}
        try:
            for callback in list(self._subscribers.get(key, ())):
                try:
                    callback()
                except Exception:
                    log.failure("change callback for {mailbox}/{folder} failed",
                                mailbox=mailbox, folder=key[1])
        finally:
            if not outer:
                gathered, self._gathering = self._gathering, None
                for path, (target, name, waiting) in (gathered or {}).items():
                    self._join_syncs(path, target, name, waiting)

    def notify_delivered(self, mailbox: str) -> None:
        """The delivery hook: a message was just delivered to ``mailbox``'s INBOX."""
        self.notify_changed(mailbox, INBOX)

    def poll(self) -> Deferred[None]:
        """Look for changes made by other processes in every watched folder (a timer calls it).

        A folder's new/ or cur/ directory changes its mtime whenever a message is added, removed
        or renamed (flags); the first poll of a folder only records it.
        """
        if self._polling or not self._subscribers:
            return succeed(None)
        keys = list(self._subscribers)
        folders: list[Folder | None] = []
        for key in keys:
            try:
                folders.append(self.folder(*key))
            except (InvalidMailboxNameError, InvalidFolderNameError):
                folders.append(None)

        def work() -> list[tuple[int, int] | None]:
            return [folder.stamp() if folder is not None else None for folder in folders]

        def compare(stamps: list[tuple[int, int] | None]) -> None:
            self._polling = False
            for key, stamp in zip(keys, stamps, strict=True):
                if stamp is None or key not in self._subscribers:
                    continue
                previous = self._stamps.get(key)
                self._stamps[key] = stamp
                if previous is not None and previous != stamp:
                    self.notify_changed(*key)
                    self._stamps[key] = stamp

        def failed(failure: Any) -> None:
            self._polling = False
            log.failure("polling mailboxes failed", failure)

        self._polling = True
        return self.pool.run(work).addCallbacks(compare, failed)


class FolderView:
    """One session's view of one folder: the messages as of its last refresh.

    Sessions only ever see their own view change when they call ``refresh()`` (IMAP reports the
    difference; POP3 never refreshes, RFC 1939 §8). All methods return Deferreds.

    ``messages`` is replaced, never changed in place: views refreshed to the same state share
    one list.
    """

    def __init__(self, store: MailboxStore, mailbox: str, name: str, folder: Folder,
                 result: SyncResult) -> None:
        self.store = store
        self.mailbox = mailbox
        self.name = name
        self.folder = folder
        self.uidvalidity = result.uidvalidity
        self.uidnext = result.uidnext
        self.highest_modseq = result.highest_modseq  # RFC 7162 §3.1.2.1, as of this view
        # A change of our own found others' changes this view has not seen between its
        # HIGHESTMODSEQ and ours: it may not claim the higher value until it refreshes.
        self.behind = False
        self.messages: list[MessageInfo] = list(result.messages)
        # The sync whose messages ``messages`` holds, until a change of our own makes the list
        # differ: views with the same base share the work of a refresh (``_adopt``).
        self._base: SyncResult | None = result

    @property
    def path(self) -> Path:
        return self.folder.path

    def refresh(self) -> Deferred[FolderChanges]:
        """Sync with the disk and update this view; fires with what changed."""
        done: Deferred[Refreshed] = Deferred()

        def hand(outcome: Refreshed | Failure) -> None:
            if isinstance(outcome, Failure):
                done.errback(outcome)
            else:
                done.callback(outcome)

        self.store.refresh_then(self, hand, claim=None)
        return done.addCallback(lambda refreshed: refreshed.changes)

    def refresh_then(self, then: RefreshCallback, *, claim: bool | None) -> None:
        """Refresh with the store's next shared sync; ``then`` gets the outcome, with the
        \\Recent claim done (MailboxStore.refresh_then)."""
        self.store.refresh_then(self, then, claim=claim)

    def _adopt(self, result: SyncResult, messages: list[MessageInfo],
               shared: dict[int, tuple[SyncResult, FolderChanges]]) -> FolderChanges:
        """Take ``result`` as this view's state (``messages``: its list, one for every view the
        same sync refreshes); return what changed since the previous state.

        ``shared`` holds, for one sync, the changes worked out from each base (by identity): a
        view whose list is still its base's takes them as they are, without comparing the lists
        again; a view changed by its own session is compared in full.
        """
        self.highest_modseq = result.highest_modseq
        self.behind = False
        base = self._base
        if base is result:
            return NO_CHANGES
        known = shared.get(id(base)) if base is not None else None
        if known is not None and known[0] is base:
            changes = known[1]
        else:
            changes = self._difference(result)
            if base is not None:
                shared[id(base)] = (base, changes)  # holding the base keeps its id its own
        self.uidvalidity = result.uidvalidity
        self.uidnext = result.uidnext
        self.messages = messages
        self._base = result
        return changes

    def _difference(self, result: SyncResult) -> FolderChanges:
        """What changed from this view's messages to ``result`` (RFC 3501 §7.4.1: the session
        reports every UID gone, §7.3.1 the new count, §7.4.2 changed flags)."""
        if result.uidvalidity != self.uidvalidity:
            return FolderChanges(added=result.messages, uidvalidity_changed=True)
        before = {info.uid: info for info in self.messages}
        now = {info.uid: info for info in result.messages}
        added = tuple(info for info in result.messages if info.uid not in before)
        expunged = tuple(uid for uid in before if uid not in now)
        changed = tuple(info for uid, info in now.items() if uid in before and (
            before[uid].flags != info.flags or before[uid].modseq != info.modseq))
        return FolderChanges(added, expunged, changed)

    def with_sizes(self, infos: list[MessageInfo]) -> Deferred[list[MessageInfo]]:
        """``infos`` with every wire size known: at once when they all are, else after one
        disk job that reads the files of the others (Folder.wire_sizes). The view keeps the
        sizes learnt, so a later command does not ask again."""
        if all(info.wire_size is not None for info in infos):
            return succeed(infos)
        missing = [info for info in infos if info.wire_size is None]

        def learnt(sizes: dict[int, int]) -> list[MessageInfo]:
            def sized(info: MessageInfo) -> MessageInfo:
                wire = sizes.get(info.uid) if info.wire_size is None else None
                return info if wire is None else replace(info, wire_size=wire)

            # Still its base's list for a refresh: sizes are no change a session reports.
            self.messages = [sized(info) for info in self.messages]
            return [sized(info) for info in infos]

        return self.store.pool.run(self.folder.wire_sizes, missing).addCallback(learnt)

    def read(self, info: MessageInfo) -> Deferred[bytes]:
        """The message's bytes as stored (fails with MessageVanishedError if expunged)."""
        return self.store.pool.run(self.folder.read_message, info)

    def read_prefix(self, info: MessageInfo, accept: Callable[[bytes], bool]) -> Deferred[bytes]:
        """Read in chunks until ``accept(data)`` is true (called in the disk thread) or EOF."""
        return self.store.pool.run(self.folder.read_prefix, info, accept)

    def open_message(self, info: MessageInfo) -> Deferred[BinaryIO]:
        """An open file of the message, for streaming large ones; read it in the DiskPool."""
        return self.store.pool.run(self.folder.open_message, info)

    def set_flags(self, changes: Iterable[tuple[MessageInfo, FlagChange]]
                  ) -> Deferred[list[MessageInfo]]:
        """Set each message's flags; the view is updated with the new names and flags."""
        return self.store_flags(changes).addCallback(lambda result: list(result.updated))

    def store_flags(self, changes: Iterable[tuple[MessageInfo, FlagChange]], *,
                    unchanged_since: int | None = None) -> Deferred[FlagResult]:
        """Set each message's flags, conditionally with ``unchanged_since`` (RFC 7162 §3.1.3).

        The view takes every message's state as found (names, flags, mod-sequences): the
        updated ones' and those that failed the condition, which the caller reports.
        """
        changes = list(changes)

        def done(result: FlagResult) -> FlagResult:
            by_uid = {info.uid: info for info in (*result.updated, *result.modified)}
            self.messages = [by_uid.get(info.uid, info) for info in self.messages]
            self._base = None  # no longer any sync's list
            self._advance(result.previous_highest, result.highest_modseq)
            return result

        return self.store.pool.run(self.folder.store_flags, changes,
                                   unchanged_since=unchanged_since).addCallback(done)

    def delete(self, infos: Iterable[MessageInfo]) -> Deferred[list[int]]:
        """Delete messages for good (POP3 UPDATE, IMAP EXPUNGE); fires with the UIDs deleted."""
        infos = list(infos)

        def done(result: Expunged) -> list[int]:
            gone = set(result.uids)
            self.messages = [info for info in self.messages if info.uid not in gone]
            self._base = None  # no longer any sync's list
            if result.uids:
                # RFC 7162 §3.1.2.1: the expunge raised HIGHESTMODSEQ.
                self._advance(result.previous_highest, result.highest_modseq)
                self.store.notify_changed(self.mailbox, self.name)
            return result.uids

        return self.store.pool.run(self.folder.expunge, infos).addCallback(done)

    def _advance(self, previous: int, highest: int) -> None:
        """Take HIGHESTMODSEQ ``highest`` after a change of ours, if this view knew every change
        up to ``previous`` (the folder's value before ours); else wait for the refresh that
        reports the changes between (a client told HIGHESTMODSEQ n must have heard of every
        change up to n, RFC 7162 §3.1.2.1)."""
        if self.highest_modseq >= previous:
            self.highest_modseq = max(self.highest_modseq, highest)
        elif highest > self.highest_modseq:
            self.behind = True


def _hand(then: RefreshCallback, outcome: Refreshed | Failure) -> None:
    """Give one session its refresh outcome; its error is its own, not the other sessions'."""
    try:
        then(outcome)
    except Exception:
        log.failure("a refresh callback failed")


def _failed(exc: BaseException) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(exc)
    return d
