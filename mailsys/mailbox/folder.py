"""One Maildir folder on disk: its messages, their UIDs, flags and sizes (blocking; disk threads).

Everything here blocks and is called from DiskPool threads, never from the reactor. Every change
of a folder's names or UID file happens under the folder's lock: a per-process thread lock plus
an flock on ``mailsys-uidlist.lock`` for other processes, so two sessions (or two servers) on one
mailbox never assign a UID twice or lose one.

A message's identity in its folder is its key (the Maildir unique name without our fields).
When a session first sees a message in new/, sync() gives it the next UID, records it in the UID
file and moves it to ``cur/<key>,S=<size>,W=<wiresize>,U=<uid>:2,<flags>``, so that the size,
the wire size and the UID can be read from the name alone, and a lost UID file is rebuilt from
the names without changing any UID.

Wire sizes are deferred, as Dovecot defers them: a message whose name carries no ``,W=`` (mail
another program put into the Maildir) is numbered without reading its file, its wire size left
unknown (None) in the UID file and its name. The file is read for it only when a size is needed:
sync(sizes=True) for a POP3 session (whose greeting, STAT and LIST give sizes), wire_sizes() for
an IMAP command that asks (FETCH RFC822.SIZE, SEARCH LARGER/SMALLER, STATUS SIZE); either records
what it computed in the UID file, so each file is read for its size at most once. A cold SELECT
of a large folder then costs a directory scan, one rename per new message and one UID file.

Every message also has a mod-sequence (RFC 7162 §3.1), kept in the UID file with the flags it was
given for: a flag change through set_flags/store_flags, a flag change by another program (noticed
by the next sync as a name whose flags differ from the recorded ones), a new message and an
expunge each take the next value of the folder's HIGHESTMODSEQ, so it only ever grows.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from twisted.logger import Logger

from mailsys.diskio import fsync_directory
from mailsys.mailbox.layout import (
    MaildirName,
    create_maildir,
    file_name,
    find_message,
    format_base,
    parse_name,
)
from mailsys.mailbox.uidlist import (
    JOURNAL_NAME,
    MAX_MODSEQ,
    MAX_UID,
    MODSEQ_RESERVE,
    UIDLIST_NAME,
    CorruptUidListError,
    Floor,
    UidEntry,
    UidList,
    append_journal,
    read_uidlist,
    read_uidvalidity_floor,
    write_state,
)
from mailsys.mailbox.wire import wire_size

log = Logger(namespace="mailsys.mailbox")

LOCK_NAME = "mailsys-uidlist.lock"
# The first UID that no read-write session has been told of yet: messages from it on carry
# \Recent for the next session that selects the folder (RFC 3501 §2.3.2).
RECENT_NAME = "mailsys-recent"
# In the INBOX directory: the last UIDVALIDITY given to any folder of the mailbox, so that a
# folder deleted and created again gets a greater one even within the same second. (Not the
# per-folder floor file of mailsys.mailbox.uidlist, which lives in each folder.)
LAST_UIDVALIDITY_NAME = "mailsys-uidvalidity-last"
# Maildir++: every folder below the INBOX holds an empty file of this name.
_READ_CHUNK = 256 * 1024


class MessageVanishedError(LookupError):
    """The message's file is gone: another session deleted (expunged) it."""


@dataclass(frozen=True)
class MessageInfo:
    """What a session knows of one message at its last sync."""

    uid: int
    key: str  # identity in the folder: stable across flag changes, renames and rebuilds
    name: str  # the file's name in cur/ when last seen (flag changes by others rename it)
    size: int  # bytes on disk
    # Octets with CRLF line ends: what POP3 LIST and IMAP RFC822.SIZE report; None while not
    # computed yet (see the module docstring: Folder.wire_sizes gives it).
    wire_size: int | None
    flags: frozenset[str]  # Maildir flag letters (mailsys.mailbox.names)
    internal_date: float  # the file's mtime: when it was delivered (IMAP INTERNALDATE)
    recent: bool = False  # this sync moved it out of new/ (IMAP \\Recent)
    modseq: int = 0  # RFC 7162 §3.1: given at its last flag change (or arrival)


@dataclass(frozen=True)
class SyncResult:
    """The folder as one sync() saw it."""

    uidvalidity: int
    uidnext: int
    messages: tuple[MessageInfo, ...]  # in UID order
    rebuilt: str | None = None  # why the UID file had to be rebuilt, if it was
    new_uidvalidity: bool = False  # UIDs could not be kept: a new UIDVALIDITY was chosen
    highest_modseq: int = 1  # RFC 7162 §3.1.2.1 HIGHESTMODSEQ
    sizes_known: bool = True  # every message's wire_size is known


# A message's new flags: a fixed set, or worked out from the flags its file has at the moment
# of the change (under the folder's lock), so that "+FLAGS \\Seen" keeps a flag another session
# set since this one last looked (RFC 3501 §6.4.6 adds to the flags the message has).
FlagChange = frozenset[str] | Callable[[frozenset[str]], frozenset[str]]


def adding(flags: frozenset[str] | set[str]) -> Callable[[frozenset[str]], frozenset[str]]:
    """The flag change that adds ``flags`` to whatever flags the message has then."""
    added = frozenset(flags)
    return lambda current: current | added


@dataclass(frozen=True)
class FlagResult:
    """What store_flags did."""

    updated: tuple[MessageInfo, ...]  # now carrying the requested flags (with their modseq)
    modified: tuple[MessageInfo, ...]  # failed UNCHANGEDSINCE: left as they are (RFC 7162 §3.1.3)
    highest_modseq: int
    # HIGHESTMODSEQ before this change: a view that knew it may claim highest_modseq; one that
    # did not has changes of others' between to report first.
    previous_highest: int


@dataclass(frozen=True)
class Expunged:
    """What expunge did: the UIDs deleted, and HIGHESTMODSEQ before and after (as FlagResult)."""

    uids: list[int]
    previous_highest: int
    highest_modseq: int


_process_locks: dict[str, threading.Lock] = {}
_process_locks_guard = threading.Lock()

# A folder whose new/, cur/ and UID file are unchanged since a sync that found nothing to do is
# not scanned again (SELECT, STATUS and refreshes of a large folder then cost a few stat calls).
# Directory mtimes come from a coarse kernel clock, so a stamp is trusted only when it was
# already SETTLE_SECONDS old as the scan began: a change after the scan then always moves it
# (Dovecot trusts maildir mtimes by the same rule).
SETTLE_SECONDS = 2.0
# On a file system with sub-second time stamps (ext4, XFS, btrfs, tmpfs: their mtimes have
# nanoseconds), a stamp only needs to be older than the kernel's timestamp tick (a few ms).
# A stamp whose every mtime falls on a whole second may come from a coarse file system (FAT,
# some NFS servers), and gets the full SETTLE_SECONDS.
SETTLE_SECONDS_FINE = 0.1
SYNC_CACHE_FOLDERS = 256
# A UID file's journal of flag changes is folded into the file once it exceeds a quarter of the
# file's size, and never before it reaches this (a small folder rewrites its file cheaply).
JOURNAL_MIN_COMPACT = 64 * 1024
_sync_cache: OrderedDict[str, tuple[tuple[int, ...], SyncResult]] = OrderedDict()
_sync_cache_guard = threading.Lock()


# Each folder's UID file as last parsed or written, with the file's stat then: a sync that finds
# the file unchanged does not parse it again. A rewrite is a rename, so it always moves the stat.
# The UidList objects kept here are only ever read.
_uidlist_cache: OrderedDict[str, tuple[tuple[int, ...], UidList]] = OrderedDict()


# What the last scan of each folder found, by "sub/name". Maildir message files never change
# under a name (the spec: a change of flags is a rename, a change of content a new message), so
# a name seen before needs neither a stat nor a parse: a rescan of a folder of 5,000 messages
# costs a readdir and dictionary lookups. A file edited in place against that rule keeps its
# old size until the process restarts (Dovecot trusts its index the same way).
_scan_memo: OrderedDict[str, dict[str, _Found]] = OrderedDict()


def _journal_stat(path: str) -> tuple[int, ...]:
    """The UID file journal's (size, mtime, inode); zeros while there is none."""
    try:
        st = os.stat(f"{path}/{JOURNAL_NAME}")
    except FileNotFoundError:
        return (0, 0, 0)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _uidlist_signature(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(f"{path}/{UIDLIST_NAME}")
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, *_journal_stat(path))


def _remember_uidlist(path: str, uids: UidList) -> None:
    signature = _uidlist_signature(path)
    with _sync_cache_guard:
        if signature is None:
            _uidlist_cache.pop(path, None)
            return
        _uidlist_cache[path] = (signature, uids)
        _uidlist_cache.move_to_end(path)
        while len(_uidlist_cache) > SYNC_CACHE_FOLDERS:
            _uidlist_cache.popitem(last=False)


def _load_uidlist(directory: Path) -> UidList | None:
    """The folder's UID file (read_uidlist), parsed again only when the file changed."""
    path = os.fspath(directory)
    signature = _uidlist_signature(path)
    if signature is None:
        return None
    with _sync_cache_guard:
        cached = _uidlist_cache.get(path)
    if cached is not None and cached[0] == signature:
        return cached[1]
    uids = read_uidlist(directory)
    if uids is not None and not uids.damaged_lines:
        _remember_uidlist(path, uids)
    return uids


def _folder_stamp(path: str) -> tuple[int, ...] | None:
    """The state sync() depends on: new/ and cur/ (mtime, inode), the UID file's and its
    journal's stat. The first three are the mtimes that must have settled."""
    try:
        new = os.stat(f"{path}/new")
        cur = os.stat(f"{path}/cur")
        uids = os.stat(f"{path}/{UIDLIST_NAME}")
    except FileNotFoundError:
        return None
    return (new.st_mtime_ns, cur.st_mtime_ns, uids.st_mtime_ns, new.st_ino, cur.st_ino,
            uids.st_ino, uids.st_size, *_journal_stat(path))


def _settle_ns(stamp: tuple[int, ...]) -> int:
    """How old a stamp's mtimes must be to be trusted (see SETTLE_SECONDS)."""
    fine = all(mtime % 1_000_000_000 for mtime in stamp[:3])
    return int((SETTLE_SECONDS_FINE if fine else SETTLE_SECONDS) * 1e9)


def _process_lock(directory: Path) -> threading.Lock:
    key = os.fspath(directory)
    with _process_locks_guard:
        lock = _process_locks.get(key)
        if lock is None:
            lock = _process_locks[key] = threading.Lock()
        return lock


def new_uidvalidity(previous: int | None, now: float) -> int:
    """A UIDVALIDITY for a (re)numbered folder: the time, and always above ``previous``.

    RFC 3501 §2.3.1.1: a new UIDVALIDITY must be greater than any earlier one of the folder.
    """
    value = max(1, int(now) & MAX_UID)
    if previous is not None and value <= previous:
        value = previous + 1 if previous < MAX_UID else 1
    return value


@dataclass(frozen=True)
class _Found:
    """A message file found by a directory scan."""

    sub: str  # "cur" or "new"
    name: str
    parsed: MaildirName
    size: int
    mtime: float


class Folder:
    """A Maildir folder at ``path``; all methods block (call them in a disk thread)."""

    def __init__(self, path: Path, *, subfolder: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.subfolder = subfolder
        self._clock = clock
        self._unembedded = False  # the last sync left a name without ,U= (a rename failed)

    # --- locking --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock: this process's threads, and other processes by flock."""
        with _process_lock(self.path):
            try:
                fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            except FileNotFoundError:
                create_maildir(self.path, subfolder=self.subfolder)
                fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    # --- sync -----------------------------------------------------------------------------------

    def sync(self, *, sizes: bool = True) -> SyncResult:
        """Bring the UID file up to date with the directory and return every message.

        New messages (in new/, or in cur/ without a UID yet) get the next UIDs in delivery order
        and messages in new/ move to cur/. A missing or damaged UID file is rebuilt keeping
        every UID that can still be known; only when the UIDVALIDITY itself is lost does the
        folder get a new one. With ``sizes`` every message's wire size is known in the result
        (files whose names and UID lines lack it are read); without, a message not yet sized
        has wire_size None.
        """
        key = os.fspath(self.path)
        with self.locked():
            before = _folder_stamp(key)
            if before is not None:
                with _sync_cache_guard:
                    cached = _sync_cache.get(key)
                    if (cached is not None and cached[0] == before
                            and (cached[1].sizes_known or not sizes)):
                        _sync_cache.move_to_end(key)
                        return cached[1]
            started_ns = time.time_ns()
            result = self._sync_locked(sizes=sizes)
            after = _folder_stamp(key)
            settled = before is not None and max(before[:3]) < started_ns - _settle_ns(before)
            with _sync_cache_guard:
                if after is not None and after == before and settled:
                    _sync_cache[key] = (after, result)
                    _sync_cache.move_to_end(key)
                    while len(_sync_cache) > SYNC_CACHE_FOLDERS:
                        _sync_cache.popitem(last=False)
                else:
                    _sync_cache.pop(key, None)
            return result

    def _sync_locked(self, *, sizes: bool = True) -> SyncResult:
        try:
            uids = _load_uidlist(self.path)
            damage = None if uids is None or not uids.damaged_lines else (
                f"{uids.damaged_lines} damaged line(s) in the UID file")
        except CorruptUidListError as exc:
            uids, damage = None, f"unreadable UID file ({exc})"
        found = self._scan()
        if uids is not None and damage is None:
            missing = [key for key in uids.entries if key not in found]
            if missing:
                # A concurrent rename by a client that does not take our lock can hide a file
                # from one readdir (POSIX allows it); look again before calling it expunged.
                again = self._scan()
                for key in missing:
                    if key in again:
                        found[key] = again[key]
        rebuilt: str | None = None
        renumbered = False
        if uids is None or damage is not None:
            floor = read_uidvalidity_floor(self.path) if damage is None else None
            if (damage is None and floor is None
                    and not any(item.sub == "cur" for item in found.values())):
                # Never numbered before (a new folder, or mail delivered before any session):
                # sessions move every message they number into cur/.
                uids = UidList(self._fresh_uidvalidity(), 1)
                # A new folder's messages are all \Recent (RFC 3501 §2.3.2).
                self._write_recent(1)
            elif damage is None and floor is not None and not found:
                # An emptied folder whose UID file was lost.
                uids = UidList(floor[0], floor[1],
                               highest_modseq=self._modseq_start(floor, None))
            else:
                rebuilt = damage or "UID file missing"
                uids, renumbered = self._rebuild(uids, found)
                log.warn("{path}: rebuilt the UID file ({reason}); {outcome}",
                         path=str(self.path), reason=rebuilt,
                         outcome="new UIDVALIDITY" if renumbered else "all known UIDs kept")
            changed = True
        else:
            changed = False
        old_entries = uids.entries
        entries: dict[str, UidEntry] = {}
        unknown: list[_Found] = []
        highest = uids.highest_modseq
        if highest < 1:
            # A version 1 file: mod-sequences start here, above any that a newer version gave
            # out before an older one rewrote the file (RFC 7162 §3.1.2.1: never backwards).
            floor = read_uidvalidity_floor(self.path)
            highest = floor.modseq_ceiling if floor and floor.modseq_ceiling else 1
            changed = True
        for key, item in found.items():
            entry = old_entries.get(key)
            if entry is None:
                unknown.append(item)
                continue
            if entry.size != item.size:
                # The file changed under its name (edited by hand): its wire size is stale.
                entry = replace(entry, size=item.size,
                                wire_size=self._wire_size(item) if sizes else None)
                changed = True
            elif entry.wire_size is None and sizes:
                entry = replace(entry, wire_size=self._wire_size(item))
                changed = True
            if entry.flags != item.parsed.flags:
                # RFC 7162 §3.1: another program renamed the file (a flag change we did not
                # make), or its flags were never recorded: it gets a new mod-sequence.
                highest += 1
                entry = replace(entry, modseq=highest, flags=item.parsed.flags)
                changed = True
            entries[key] = entry
        if len(entries) != len(old_entries):
            changed = True  # some messages were expunged by someone else
            highest += 1  # RFC 7162 §3.1.2.1: HIGHESTMODSEQ grows on expunge too
        unknown.sort(key=lambda item: (item.mtime, item.name))
        uidnext = uids.uidnext
        for item in unknown:
            if uidnext > MAX_UID:  # pragma: no cover - 4 billion messages in one folder
                raise OSError(errno.EOVERFLOW, "UIDs exhausted", os.fspath(self.path))
            highest += 1
            wire = self._wire_size(item) if sizes else self._named_wire_size(item)
            entries[item.parsed.key] = UidEntry(uidnext, item.size, wire, highest,
                                                item.parsed.flags)
            uidnext += 1
            changed = True
        if highest > MAX_MODSEQ:  # pragma: no cover - 2**63 changes
            raise OSError(errno.EOVERFLOW, "mod-sequences exhausted", os.fspath(self.path))
        state = UidList(uids.uidvalidity, uidnext, entries, highest_modseq=highest)
        # Renames first, then the UID file: should we crash in between, the keys still match
        # the files, and no UID of this sync has been shown to anyone yet.
        self._unembedded = False
        messages = self._settle(state, found)
        if changed:
            self._write(state, messages)
        return SyncResult(state.uidvalidity, state.uidnext, messages, rebuilt, renumbered,
                          state.highest_modseq,
                          all(info.wire_size is not None for info in messages))

    def _fresh_uidvalidity(self) -> int:
        """A UIDVALIDITY for a folder numbered for the first time: greater than any other
        this mailbox has given (RFC 3501 §2.3.1.1: a mailbox deleted and created again must
        not reuse its UIDVALIDITY, or a client's cache shows the wrong messages)."""
        inbox = self.path.parent if self.subfolder else self.path
        fd = os.open(inbox / LAST_UIDVALIDITY_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # shared by every folder of the mailbox
            raw = os.read(fd, 64).strip()
            last = int(raw) if raw.isdigit() else None
            value = new_uidvalidity(last, self._clock())
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, b"%d\n" % value)
            os.fsync(fd)
        finally:
            os.close(fd)
        return value

    def recent_from(self, seen_up_to: int, *, claim: bool) -> int:
        """The first UID that is still \\Recent (RFC 3501 §2.3.2); with ``claim`` (a
        read-write session that has now been told of every UID below ``seen_up_to``) the
        messages below ``seen_up_to`` stop being recent for every later session.

        Under the folder's lock, so two sessions never both get \\Recent for one message.
        """
        if self.subfolder and not self.path.is_dir():
            return seen_up_to  # deleted meanwhile: taking the lock would create it again
        try:
            raw = (self.path / RECENT_NAME).read_bytes().strip()
        except FileNotFoundError:
            raw = b""
        if raw.isdigit() and int(raw) >= seen_up_to:
            # Nothing this session was told of is recent any more, and the first recent UID
            # only grows: the answer under the lock could only be as large, and means the
            # same to the caller. Without the lock, the thousands of sessions that a delivery
            # wakes after the first has claimed the message do not wait for each other.
            return int(raw)
        with self.locked():
            try:
                raw = (self.path / RECENT_NAME).read_bytes().strip()
            except FileNotFoundError:
                # A folder numbered before \Recent was kept: its messages are not new, and
                # the ones that arrive from now on are.
                self._write_recent(seen_up_to)
                return seen_up_to
            first = int(raw) if raw.isdigit() else seen_up_to
            if claim and seen_up_to > first:
                self._write_recent(seen_up_to)
        return first

    def recent_from_many(self, requests: list[tuple[int, bool]]) -> list[int]:
        """``recent_from(seen_up_to, claim=claim)`` for each request in order, as if one after
        the other, under one lock and with one read and at most one write of the file: the
        sessions a delivery wakes all ask at once."""
        if self.subfolder and not self.path.is_dir():
            return [seen_up_to for seen_up_to, _ in requests]
        with self.locked():
            try:
                raw = (self.path / RECENT_NAME).read_bytes().strip()
            except FileNotFoundError:
                raw = b""
            if raw.isdigit():
                first = stored = int(raw)
                answers = []
                for seen_up_to, claim in requests:
                    answers.append(first)
                    if claim and seen_up_to > first:
                        first = seen_up_to
                if first != stored:
                    self._write_recent(first)
                return answers
        # No file, or an unreadable one: rare; each request as recent_from answers it.
        return [self.recent_from(seen_up_to, claim=claim) for seen_up_to, claim in requests]

    def _write_recent(self, first: int) -> None:
        # Not fsync'd: after a crash messages may be \Recent once more, which is harmless.
        tmp = self.path / (RECENT_NAME + ".tmp")
        tmp.write_bytes(b"%d\n" % first)
        os.replace(tmp, self.path / RECENT_NAME)

    def _modseq_start(self, floor: Floor | None, damaged: UidList | None) -> int:
        """Where the mod-sequences of a rebuilt UID file resume: above any a client saw.

        A readable header's HIGHESTMODSEQ is the last one written; the side file's ceiling is
        above every value ever given. With neither, the clock in microseconds is (counters
        start at 1 and grow by one per change, far slower).
        """
        known = [1]
        if damaged is not None:
            known.append(damaged.highest_modseq)
        if floor is not None and floor.modseq_ceiling is not None:
            known.append(floor.modseq_ceiling)
        elif damaged is None:
            known.append(int(self._clock() * 1_000_000))
        return min(max(known), MAX_MODSEQ)

    def _rebuild(self, damaged: UidList | None, found: dict[str, _Found]) -> tuple[UidList, bool]:
        """A UID list for ``found`` keeping every UID still known; True if renumbered.

        Sources, most trusted first: the readable lines of a damaged UID file, the ``,U=`` field
        of each name. UIDNEXT is the highest of the damaged file's, the side file's and every
        known UID + 1, so a UID is never given to a second message.
        """
        floor = read_uidvalidity_floor(self.path)
        uidvalidity: int | None = None
        uidnext = 1
        if damaged is not None:
            uidvalidity, uidnext = damaged.uidvalidity, damaged.uidnext
        if floor is not None:
            if uidvalidity is None:
                uidvalidity = floor[0]
            if floor[0] == uidvalidity:
                uidnext = max(uidnext, floor[1])
        claims: dict[str, int] = {}
        for key, item in found.items():
            if damaged is not None and key in damaged.entries:
                claims[key] = damaged.entries[key].uid
            elif item.parsed.uid is not None:
                claims[key] = item.parsed.uid
        owners: dict[int, list[str]] = {}
        for key, uid in claims.items():
            owners.setdefault(uid, []).append(key)
        entries: dict[str, UidEntry] = {}
        for uid, keys in owners.items():
            if len(keys) == 1 and 0 < uid <= MAX_UID:
                item = found[keys[0]]
                old = damaged.entries.get(keys[0]) if damaged is not None else None
                # A readable line keeps its mod-sequence and recorded flags; a UID known only
                # from a name gets a new mod-sequence in sync (flags None).
                wire = old.wire_size if old is not None and old.size == item.size else None
                entries[keys[0]] = UidEntry(
                    uid, item.size, self._named_wire_size(item) if wire is None else wire,
                    old.modseq if old is not None else 0, old.flags if old is not None else None)
        renumbered = uidvalidity is None
        if renumbered:
            previous = floor[0] if floor is not None else None
            uidvalidity = new_uidvalidity(previous, self._clock())
        assert uidvalidity is not None
        if entries:
            uidnext = max(uidnext, max(entry.uid for entry in entries.values()) + 1)
        return UidList(uidvalidity, uidnext, entries,
                       highest_modseq=self._modseq_start(floor, damaged)), renumbered

    def _settle(self, state: UidList, found: dict[str, _Found]) -> tuple[MessageInfo, ...]:
        """Move new/ messages into cur/ and give every name its ``,U=``; return the messages."""
        messages = []
        root = os.fspath(self.path)
        cur = f"{root}/cur/"
        for key, entry in state.entries.items():
            item = found[key]
            parsed = item.parsed
            name = item.name
            recent = item.sub == "new"
            if recent or parsed.uid != entry.uid:
                # In cur/ a missing or stale ,U= comes from another Maildir writer, a copied
                # file or a renumbering; left alone it would mislead the next rebuild.
                base = format_base(key, size=item.size, wire_size=entry.wire_size, uid=entry.uid)
                target = file_name(base, parsed.flags)
                try:
                    os.rename(f"{root}/{item.sub}/{name}", cur + target)
                    name = target
                except FileNotFoundError:
                    # Moved by another Maildir client meanwhile; the next sync finds it again.
                    if recent:
                        continue
                    self._unembedded = True
            messages.append(MessageInfo(
                uid=entry.uid, key=key, name=name, size=item.size, wire_size=entry.wire_size,
                flags=parsed.flags, internal_date=item.mtime, recent=recent, modseq=entry.modseq,
            ))
        messages.sort(key=lambda info: info.uid)
        return tuple(messages)

    def _scan(self) -> dict[str, _Found]:
        found: dict[str, _Found] = {}
        root = os.fspath(self.path)
        with _sync_cache_guard:
            seen = _scan_memo.get(root, {})
        memo: dict[str, _Found] = {}
        for sub in ("cur", "new"):
            try:
                entries = list(os.scandir(f"{root}/{sub}"))
            except FileNotFoundError:
                create_maildir(self.path, subfolder=self.subfolder)
                continue
            for entry in entries:
                name = entry.name
                where = f"{sub}/{name}"
                item = seen.get(where)
                if item is None:
                    if name.startswith(".") or "\n" in name or "\r" in name:
                        continue  # not a message (hidden files, names the UID file cannot hold)
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    if not entry.is_file():
                        continue
                    item = _Found(sub, name, parse_name(name), st.st_size, st.st_mtime)
                key = item.parsed.key
                if key in found:
                    # Two files with one unique name break the Maildir rule; keep both
                    # messages by giving this one a fresh name.
                    key = f"{key}.D{secrets.token_hex(6)}"
                    fresh = key + name[len(item.parsed.base):]
                    try:
                        os.rename(f"{root}/{sub}/{name}", f"{root}/{sub}/{fresh}")
                    except FileNotFoundError:
                        continue
                    parsed = replace(parse_name(fresh), key=key, uid=None)
                    item = replace(item, name=fresh, parsed=parsed)
                    where = f"{sub}/{fresh}"
                memo[where] = item
                found[key] = item
        with _sync_cache_guard:
            _scan_memo[root] = memo
            _scan_memo.move_to_end(root)
            while len(_scan_memo) > SYNC_CACHE_FOLDERS:
                _scan_memo.popitem(last=False)
        return found

    @staticmethod
    def _named_wire_size(item: _Found) -> int | None:
        """The wire size the file's name carries (for the size the scan saw), or None."""
        parsed = item.parsed
        if parsed.wire_size is not None and parsed.size == item.size:
            return parsed.wire_size
        return None

    def _wire_size(self, item: _Found) -> int:
        named = self._named_wire_size(item)
        if named is not None:
            return named
        return self._read_wire_size(f"{self.path}/{item.sub}/{item.name}", item.size)

    @staticmethod
    def _read_wire_size(path: str, size: int) -> int:
        """The wire size of the file at ``path``, read whole (``size``: as last seen); the
        size itself if the file is gone."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return size
        try:
            # One read of the size the scan saw (a quarter faster than a buffered file object
            # over the 5,000 reads of a cold folder); more only if the file is larger after all.
            data = os.read(fd, size + 1)
            if len(data) > size:
                data += b"".join(iter(lambda: os.read(fd, _READ_CHUNK), b""))
        finally:
            os.close(fd)
        return wire_size(data)

    def _write(self, state: UidList, messages: tuple[MessageInfo, ...] | None) -> None:
        """Write the UID file; also the side file when the names could not restore UIDNEXT
        (``messages``: the sync's; None when the UIDs did not change) or HIGHESTMODSEQ has
        reached the side file's mod-sequence ceiling."""
        floor = read_uidvalidity_floor(self.path)
        need_floor = floor is None or floor[0] != state.uidvalidity
        if (messages is not None and not need_floor and floor is not None
                and floor[1] < state.uidnext):
            # A rebuild from the names alone sets UIDNEXT past the highest ,U= it finds. If no
            # name carries the highest UID ever given (it was expunged), the floor must.
            top = max((info.uid for info in messages), default=0)
            need_floor = top + 1 < state.uidnext or self._unembedded
        ceiling = floor.modseq_ceiling if floor is not None else None
        if ceiling is None or state.highest_modseq >= ceiling:
            ceiling = min(state.highest_modseq + MODSEQ_RESERVE, MAX_MODSEQ)
            need_floor = True
        write_state(self.path, state, floor=need_floor, modseq_ceiling=ceiling)
        _remember_uidlist(os.fspath(self.path), state)

    def _record_flags(self, state: UidList,
                      journal: list[tuple[str, int, frozenset[str]]]) -> None:
        """Make flag changes durable: a few journal lines, or a rewrite of the whole UID file
        when the journal is past the larger of JOURNAL_MIN_COMPACT and a quarter of the file,
        when HIGHESTMODSEQ reaches the side file's ceiling (only a rewrite raises it), or when
        the journal's last line was cut short (append_journal refuses)."""
        path = os.fspath(self.path)
        floor = read_uidvalidity_floor(self.path)
        try:
            base_size = os.stat(f"{path}/{UIDLIST_NAME}").st_size
        except FileNotFoundError:
            base_size = 0
        rewrite = (floor is None or floor.modseq_ceiling is None
                   or state.highest_modseq >= floor.modseq_ceiling
                   or _journal_stat(path)[0] > max(JOURNAL_MIN_COMPACT, base_size // 4))
        if rewrite or not append_journal(self.path, journal):
            self._write(state, None)
        else:
            _remember_uidlist(path, state)

    # --- reading and changing messages ----------------------------------------------------------

    def wire_sizes(self, infos: Iterable[MessageInfo]) -> dict[int, int]:
        """The wire size of each message (by UID), reading the files of those not sized yet,
        and recording what was read in the UID file (one write, under the folder's lock), so
        that no later session reads them for it again. A message expunged meanwhile counts
        its size on disk as last seen (no client can fetch it any more)."""
        sizes: dict[int, int] = {}
        computed: dict[str, tuple[int, int]] = {}  # key -> (size it is for, wire size)
        for info in infos:
            if info.wire_size is not None:
                sizes[info.uid] = info.wire_size
                continue
            path = f"{self.path}/cur/{info.name}"
            if not os.path.exists(path):
                path = self._find(info.key) or path  # renamed by a flag change meanwhile
            wire = self._read_wire_size(path, info.size)
            sizes[info.uid] = wire
            computed[info.key] = (info.size, wire)
        if computed:
            with self.locked():
                try:
                    recorded = _load_uidlist(self.path)
                except CorruptUidListError:
                    recorded = None
                if (recorded is not None and not recorded.damaged_lines
                        and recorded.highest_modseq >= 1):  # a version 1 file waits for a sync
                    entries = dict(recorded.entries)
                    learnt = False
                    for key, (size, wire) in computed.items():
                        entry = entries.get(key)
                        if entry is not None and entry.wire_size is None and entry.size == size:
                            entries[key] = replace(entry, wire_size=wire)
                            learnt = True
                    if learnt:
                        self._write(replace(recorded, entries=entries), None)
        return sizes

    def _find(self, key: str) -> str | None:
        """The current path of the message with ``key``, by a directory scan (slow path)."""
        return find_message(self.path, key)

    def open_message(self, info: MessageInfo) -> BinaryIO:
        """An open binary file of the message; MessageVanishedError if it was expunged.

        A flag change by another session renames the file: it is then found by its key.
        """
        path: str | None = f"{self.path}/cur/{info.name}"
        for _ in range(3):
            if path is None:
                break
            try:
                return open(path, "rb")
            except FileNotFoundError:
                path = self._find(info.key)  # renamed: look again
        raise MessageVanishedError(info.key)

    def read_message(self, info: MessageInfo) -> bytes:
        """The message's bytes as stored; MessageVanishedError if it was expunged.

        Plain descriptor reads sized by the last sync, not a buffered file object: a FETCH of
        a whole folder reads thousands of small files, and the object costs more than the read.
        """
        path: str | None = f"{self.path}/cur/{info.name}"
        for _ in range(3):
            if path is None:
                break
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                path = self._find(info.key)  # renamed: look again
                continue
            try:
                chunks = [os.read(fd, info.size + 1)]
                # Read on to the end: the file may have grown, or a read may come back short.
                while chunk := os.read(fd, _READ_CHUNK):
                    chunks.append(chunk)
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            finally:
                os.close(fd)
        raise MessageVanishedError(info.key)

    def read_prefix(self, info: MessageInfo, accept: Callable[[bytes], bool]) -> bytes:
        """Read the message in chunks until ``accept(data so far)`` or the end of the file."""
        with self.open_message(info) as f:
            data = b""
            while True:
                chunk = f.read(_READ_CHUNK)
                data += chunk
                if not chunk or accept(data):
                    return data

    def set_flags(self, changes: Iterable[tuple[MessageInfo, FlagChange]]) -> list[MessageInfo]:
        """Give each message its new flag set (a rename in cur/); returns the updated infos.

        Messages expunged meanwhile are left out of the result.
        """
        return list(self.store_flags(changes).updated)

    def store_flags(self, changes: Iterable[tuple[MessageInfo, FlagChange]], *,
                    unchanged_since: int | None = None) -> FlagResult:
        """Give each message its new flag set (a rename in cur/) and a new mod-sequence.

        With ``unchanged_since`` (RFC 7162 §3.1.3 UNCHANGEDSINCE) a message whose mod-sequence
        is higher is left alone and listed as modified. The check and the change happen under
        the folder's lock, against the UID file and the file's current name, so a change by
        another session or program since this session's last sync counts. A message whose
        flags already are the requested ones keeps its mod-sequence. Messages expunged
        meanwhile are in neither list.
        """
        changes = list(changes)
        updated: list[MessageInfo] = []
        modified: list[MessageInfo] = []
        cur = f"{self.path}/cur/"
        with self.locked():
            state = self._recorded_state([info.key for info, _ in changes])
            entries = state.entries
            highest = previous = state.highest_modseq
            journal: list[tuple[str, int, frozenset[str]]] = []  # (key, modseq, flags)
            for info, change in changes:
                entry = entries.get(info.key)
                if entry is None:
                    continue  # expunged by another session or program
                path = self._current_path(info)
                for _ in range(3):
                    if path is None:
                        break
                    name = os.path.basename(path)
                    parsed = parse_name(name)
                    if parsed.flags != entry.flags:
                        # Renamed by another program since the last sync: that change gets
                        # its mod-sequence first, and counts against UNCHANGEDSINCE.
                        highest += 1
                        journal.append((info.key, highest, parsed.flags))
                        entry = entries[info.key] = replace(entry, modseq=highest,
                                                            flags=parsed.flags)
                    current = replace(info, name=name, flags=parsed.flags, modseq=entry.modseq)
                    if unchanged_since is not None and entry.modseq > unchanged_since:
                        modified.append(current)
                        break
                    flags = change(parsed.flags) if callable(change) else change
                    if flags == parsed.flags:
                        updated.append(current)
                        break
                    target = parsed.with_flags(flags)
                    try:
                        os.rename(path, cur + target)
                    except FileNotFoundError:
                        path = self._find(info.key)  # renamed by another client: look again
                        continue
                    highest += 1
                    journal.append((info.key, highest, flags))
                    entry = entries[info.key] = replace(entry, modseq=highest, flags=flags)
                    updated.append(replace(info, name=target, flags=flags, modseq=highest))
                    break
            if highest != state.highest_modseq:
                state.highest_modseq = highest
                self._record_flags(state, journal)
        return FlagResult(tuple(updated), tuple(modified), highest, previous)

    def _recorded_state(self, keys: list[str]) -> UidList:
        """The UID file as written (under the lock), synced first if it is missing, damaged,
        of version 1 or lacks one of ``keys`` (which are then expunged)."""
        try:
            uids = _load_uidlist(self.path)
        except CorruptUidListError:
            uids = None
        if (uids is None or uids.damaged_lines or uids.highest_modseq < 1
                or any(key not in uids.entries for key in keys)):
            self._sync_locked(sizes=False)
            uids = _load_uidlist(self.path)
            assert uids is not None
        # A copy the caller may change: the remembered parse is shared and only ever read.
        return replace(uids, entries=dict(uids.entries))

    def _current_path(self, info: MessageInfo) -> str | None:
        """The message's path now: its last known name, or found again by key; None if gone."""
        path = f"{self.path}/cur/{info.name}"
        return path if os.path.exists(path) else self._find(info.key)

    def delete(self, infos: Iterable[MessageInfo]) -> list[int]:
        """Delete messages (their files and UID lines); returns the UIDs actually deleted."""
        return self.expunge(infos).uids

    def expunge(self, infos: Iterable[MessageInfo]) -> Expunged:
        """Delete messages (their files and UID lines): the UIDs actually deleted, and
        HIGHESTMODSEQ before and after (RFC 7162 §3.1.2.1: an expunge raises it)."""
        deleted: list[int] = []
        cur = f"{self.path}/cur/"
        with self.locked():
            try:
                recorded = _load_uidlist(self.path)
            except CorruptUidListError:
                recorded = None
            previous = recorded.highest_modseq if recorded is not None else 0
            highest = previous
            for info in infos:
                path: str | None = cur + info.name
                for _ in range(3):
                    if path is None:
                        break
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        path = self._find(info.key)
                        continue
                    deleted.append(info.uid)
                    break
            if deleted:
                with contextlib.suppress(OSError):
                    fsync_directory(self.path / "cur")
                # Drops the lines of the deleted messages, and raises HIGHESTMODSEQ.
                highest = self._sync_locked(sizes=False).highest_modseq
        return Expunged(deleted, previous, highest)

    def stamp(self) -> tuple[int, int]:
        """The mtimes of new/ and cur/ (ns): they change whenever a message comes or goes."""
        try:
            new = os.stat(self.path / "new").st_mtime_ns
            cur = os.stat(self.path / "cur").st_mtime_ns
        except FileNotFoundError:
            return (0, 0)
        return (new, cur)
