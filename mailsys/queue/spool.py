"""The durable spool: a message and its envelope become safe on disk here, before any 250.

Nothing in this module knows SMTP sessions or delivery; the server hands it bytes and an Envelope,
the runner asks it to rewrite or drop envelopes. Layout under the spool directory:

    tmp/      writes in progress; everything here is garbage after a crash
    queue/    committed messages: <id>.msg (the bytes) and <id>.env (the envelope as JSON)
    free/     files of removed messages, kept to be overwritten by the next commits
    corrupt/  envelopes that could not be read at start-up, with their message, for a human
    lock      held (flock) by the one process that owns the spool

The rename of <id>.env into queue/ is the commit point; the fsync of queue/ makes it durable.

Why free/: a spool turns over two files per message. Creating a file right after others were
deleted is expensive (ext4 without a journal scans past every inode freed in the last seconds;
with a journal, freeing and allocating still dirty bitmaps and inode tables), so remove() renames
a finished message's files into free/ and commit() overwrites them in place. A removed message
is therefore gone for good: nothing may read its files after remove() was called.

What free/ keeps is the inode and its data blocks: a commit that overwrites blocks a file
already has needs no block allocation, so the fdatasync of its data is a data write and a cache
flush, with no journal commit (and no blocks freed, so no discard at commit time either). Those
blocks are counted exactly (st_blocks of each file kept, under a lock shared with the disk
threads) and bounded (by FREE_BYTES_LIMIT and the floor); a file that would pass the bound is
truncated and keeps only its inode. The pool gives its space back when space is scarce: when
the free-space figure that refuses MAIL FROM (storage.spool_min_free) falls below twice the
floor, every file kept is unlinked and removed files are truncated until the figure is back
above twice the floor plus the bound (with no floor configured the server never looks at the
free space, so nothing keeps blocks); and a commit that meets a full file system (ENOSPC,
EDQUOT) gives the whole pool back and tries once more. A failed commit removes what it wrote at
once, in the same disk job, so nothing of it stays in tmp/ taking the scarce space.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import itertools
import json
import os
import random
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsys.diskio import (
    DirectorySyncError,
    DiskPool,
    Staged,
    fsync_directory,
    is_no_space,
    write_all,
    write_file_synced,
)
from mailsys.envelope import FORMAT_VERSION, Envelope
from mailsys.interfaces import ISpool

log = Logger(namespace="mailsys.queue.spool")

MESSAGE_SUFFIX = ".msg"
ENVELOPE_SUFFIX = ".env"
# At most this many files wait in free/; beyond it a removed message's files are unlinked.
FREE_FILES_LIMIT = 1024
# At most this many bytes of data blocks are held by files waiting in free/ (st_blocks, counted
# exactly), and never more than the free-space floor (Spool.__init__); a removed file that
# would pass the bound is truncated instead. The pool refills from the messages delivered after
# a burst and is overwritten by the next burst's commits: 64 MiB is 5,000 messages of 4 KiB
# (three blocks a pair), more than the files limit lets wait, so the bound only matters for
# large messages. It is also the margin of the give-back below: blocks are kept again only once
# that much more than the low mark is free.
FREE_BYTES_LIMIT = 64 * 1024 * 1024
# The pool gives its blocks back when the spool's free space falls below this many times the
# free-space floor (storage.spool_min_free): twice the floor still leaves room for every
# message in flight, so the space comes back before a single MAIL FROM is refused for it.
SPACE_LOW_FACTOR = 2
# Indexes into the per-kind free lists: an envelope is reused for an envelope, a message for a
# message, so a reused file usually already has the blocks the new data needs.
_ENVELOPE, _MESSAGE = 0, 1
_SUFFIXES = (ENVELOPE_SUFFIX, MESSAGE_SUFFIX)
# An envelope written over a longer one is padded with up to this many spaces (JSON allows
# whitespace after the document) rather than cut: a file whose length does not change needs
# no inode update, so the fdatasync of overwritten blocks stays free of a journal commit.
# Envelopes of one sender and recipient list differ by a few bytes (the time's digits).
ENVELOPE_SLACK = 256


# A file kept in free/: its name, an upper bound of its size (-1 if unknown), and the bytes of
# data blocks it holds (0 once truncated).
_Kept = tuple[str, int, int]


class SpoolError(Exception):
    """The spool cannot be used (for example another process owns it)."""


class SpoolLockedError(SpoolError):
    """Another live process holds the spool lock; two owners would delete each other's work."""


def encode_envelope(envelope: Envelope) -> bytes:
    """The on-disk form of an envelope: compact JSON, UTF-8, the same document as to_dict().

    Built without dataclasses.asdict, which deep-copies every value and converts recipients
    twice: this runs on the reactor thread once per message and per attempt.
    """
    data = _plain(envelope)
    data["version"] = FORMAT_VERSION
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _plain(value: Any) -> Any:
    """A dataclass as nested dicts and lists (what asdict gives, minus the copies)."""
    kind = type(value)
    names = _FIELD_NAMES.get(kind)
    if names is None:
        # Remember non-dataclasses too (as an empty tuple): most values are plain strings.
        fields = dataclasses.fields(value) if dataclasses.is_dataclass(value) else ()
        names = _FIELD_NAMES[kind] = tuple(f.name for f in fields)
    if names:
        return {name: _plain(getattr(value, name)) for name in names}
    if kind is list or kind is tuple:
        return [_plain(item) for item in value]
    return value


def decode_envelope(data: bytes, queue_id: str | None = None) -> Envelope:
    """Parse an envelope file; raises ValueError (or a subclass) if it is not a valid envelope.

    With ``queue_id`` the envelope must name the id its file is named after, so a file copied or
    renamed by hand cannot make the runner deliver another message's bytes.
    """
    try:
        raw = json.loads(data.decode("utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("envelope is not a JSON object")
        envelope = Envelope.from_dict(raw)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed envelope: {e!r}") from e
    if queue_id is not None and envelope.queue_id != queue_id:
        raise ValueError(f"envelope names queue id {envelope.queue_id!r}")
    return envelope


@implementer(ISpool)
class Spool:
    """Durable store of queued messages; all file work runs in the DiskPool, never the reactor.

    ``recover()`` must be called once, before anything else, by the process that owns the spool.
    """

    def __init__(self, directory: Path, pool: DiskPool, *, floor: int = 0) -> None:
        self.directory = Path(directory)
        # The free-space floor of the spool's file system (storage.spool_min_free; 0: none).
        self._floor = floor
        # Bytes of data blocks free/ may hold: never more than the floor, the headroom the
        # administrator asked the file system to keep, so that a pool full at the moment the
        # disk fills holds no more than that. Without a floor the server never looks at the
        # free space, cannot tell when it is scarce, and so keeps no blocks at all.
        self._bound = min(FREE_BYTES_LIMIT, floor)
        self.tmp_dir = self.directory / "tmp"
        self.queue_dir = self.directory / "queue"
        self.corrupt_dir = self.directory / "corrupt"
        self.free_dir = self.directory / "free"
        # Plain string prefixes for the per-message paths: pathlib joins cost more than the
        # rest of a commit's bookkeeping on the reactor thread.
        self._tmp = os.path.join(self.tmp_dir, "")
        self._queue = os.path.join(self.queue_dir, "")
        self._free_prefix = os.path.join(self.free_dir, "")
        self._pool = pool
        # Files in free/ ready to be overwritten, envelopes and messages apart (_ENVELOPE,
        # _MESSAGE): each a _Kept. Touched on the reactor thread only, so a file is handed to at
        # most one disk thread at a time.
        self._free: tuple[list[_Kept], list[_Kept]] = ([], [])
        # Moved to free/ by remove() but not reusable before an fsync of queue/ begun after the
        # move: the next commit's makes them so. (kind, file) pairs.
        self._removed: list[tuple[int, _Kept]] = []
        # Bytes of data blocks held by the files kept in free/ (in _free, in _removed, and those
        # a disk thread is moving there): the disk threads add, the reactor thread subtracts.
        self._held_lock = threading.Lock()
        self._held = 0
        # True only while the free space is known and not scarce (free_space_seen): otherwise
        # removed files are truncated, none keeps its blocks.
        self._keep_blocks = False
        self._free_serial = itertools.count()
        self._id_lock = threading.Lock()
        self._last_micros = 0
        self._random = random.Random(secrets.randbits(64))
        self._update_serial = itertools.count()
        self._lock_fd: int | None = None

    # -- ids and paths -------------------------------------------------------------------------

    def new_queue_id(self) -> str:
        """13 hex digits of microseconds since the epoch, then 6 random hex digits, uppercase.

        Fixed width, so ids sort by time as strings. The time part is kept strictly increasing
        within the process, so two ids made in the same microsecond still differ; the random part
        separates processes (13 digits last until the year 2112).
        """
        with self._id_lock:
            micros = max(time.time_ns() // 1000, self._last_micros + 1)
            self._last_micros = micros
            # Not secrets.token_hex: a getrandom() call per id costs ~1 ms under a busy disk
            # pool; uniqueness, not unpredictability, is what an id needs.
            noise = self._random.getrandbits(24)
        return f"{micros:013X}{noise:06X}"

    def message_path(self, queue_id: str) -> Path:
        """Where the committed bytes of ``queue_id`` live (read by delivery agents)."""
        return self.queue_dir / (queue_id + MESSAGE_SUFFIX)

    def envelope_path(self, queue_id: str) -> Path:
        return self.queue_dir / (queue_id + ENVELOPE_SUFFIX)

    # -- commit --------------------------------------------------------------------------------

    def commit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
        """Write, fsync and atomically commit ``message`` and ``envelope``.

        Fires only after both files are fsync'd, renamed into queue/ and queue/ is fsync'd. On
        failure nothing of the message remains and the Deferred fails.
        """
        queue_id = envelope.queue_id
        # Serialise here, on the caller's thread: the envelope is not ours to read from a thread.
        env_bytes = encode_envelope(envelope)
        return self._commit(queue_id, env_bytes, message, retry=True)

    def _commit(
        self, queue_id: str, env_bytes: bytes, message: bytes, *, retry: bool
    ) -> Deferred[None]:
        # Files whose move out of queue/ is done: this commit's fsync of queue/ makes it durable.
        removed, self._removed = self._removed, []
        d = self._pool.run_and_sync(
            self.queue_dir,
            self._write_and_rename,
            queue_id,
            env_bytes,
            message,
            self._take_free(_MESSAGE),
            self._take_free(_ENVELOPE),
            urgent=True,
        )

        def committed(_: None) -> None:
            for kind, kept in removed:
                self._free[kind].append(kept)

        def failed(failure: Failure) -> Failure | Deferred[None]:
            if not failure.check(DirectorySyncError):
                self._removed.extend(removed)  # nothing was synced: the next commit will
                if retry and is_no_space(failure.value):
                    # The files kept for reuse are the only space the spool can give back
                    # itself: give all of it, then try this message once more.
                    log.warn("{queue_id}: spool full ({error}); dropping {count} file(s) kept "
                             "for reuse and trying again", queue_id=queue_id,
                             error=_error_text(failure.value),
                             count=self.free_files)
                    dropped = self.drop_free()
                    return dropped.addCallback(
                        lambda _: self._commit(queue_id, env_bytes, message, retry=False))
                _log_commit_failure(queue_id, self._queue, failure)
                return failure
            _log_commit_failure(queue_id, self._queue, failure)
            # The files are in queue/ but not durable: the message is not acknowledged, so it
            # must not be delivered either (the client will send it again). The removed files
            # are not reused, their moves may not be durable either: they are unlinked.
            return self._unrename(failure, queue_id, self._forget(removed))

        d.addCallbacks(committed, failed)
        return d

    def _unrename(self, failure: Failure, queue_id: str, dropped: list[str]) -> Deferred[None]:
        def unlink_all() -> None:
            self._unlink_pair(queue_id)
            for path in dropped:
                _unlink_quietly(path)

        cleanup = self._pool.run(unlink_all)
        cleanup.addErrback(
            lambda f: log.failure("{queue_id}: cleanup after failed commit", f, queue_id=queue_id)
        )
        cleanup.addCallback(lambda _: failure)
        return cleanup

    def _take_free(self, kind: int) -> tuple[str, int] | None:
        """A file of ``kind`` kept for reuse, as (path, upper bound of its size); it leaves the
        pool and its count now (the commit overwrites it, or unlinks it if the commit fails)."""
        free = self._free[kind]
        if not free:
            return None
        name, size, held = free.pop()
        if held:
            with self._held_lock:
                self._held -= held
        return self._free_prefix + name, size

    def _forget(self, entries: list[tuple[int, _Kept]]) -> list[str]:
        """Take ``entries`` out of the pool's count; their paths, for the caller to unlink."""
        held = sum(kept[2] for _, kept in entries)
        if held:
            with self._held_lock:
                self._held -= held
        return [self._free_prefix + kept[0] for _, kept in entries]

    def drop_free(self) -> Deferred[None]:
        """Unlink every file kept for reuse (free/ and the moves not yet synced), in a disk thread.

        Unlinking is always safe, whether or not the move into free/ is durable yet: the message
        was finished, and recover() empties free/ anyway.
        """
        entries = [(kind, kept) for kind in (_ENVELOPE, _MESSAGE) for kept in self._free[kind]]
        entries += self._removed
        for free in self._free:
            free.clear()
        self._removed = []
        paths = self._forget(entries)

        def unlink_all() -> None:
            for path in paths:
                _unlink_quietly(path)

        d: Deferred[None] = self._pool.run(unlink_all)
        return d

    def free_space_seen(self, free: int) -> Deferred[None] | None:
        """Take the spool file system's free bytes (the cached figure checked at MAIL FROM):
        below SPACE_LOW_FACTOR times the floor the pool gives its blocks back (unlinks what it
        keeps, and truncates what it is given until space returns); it keeps blocks (again)
        once the bound more than that is free, so that filling the pool cannot take the space
        straight back below the mark. The unlinking job, if any."""
        if not self._bound:
            return None
        low_mark = SPACE_LOW_FACTOR * self._floor
        if free < low_mark:
            if self._keep_blocks:
                log.warn("spool free space low ({free} < {mark} bytes): files kept for reuse "
                         "give their space back", free=free, mark=low_mark)
                with self._held_lock:
                    self._keep_blocks = False
            if self.held_bytes:
                return self.drop_free()
        elif not self._keep_blocks and free >= low_mark + self._bound:
            with self._held_lock:
                self._keep_blocks = True
        return None

    @property
    def free_files(self) -> int:
        """How many files wait in free/ for reuse (for tests and metrics)."""
        return len(self._free[_ENVELOPE]) + len(self._free[_MESSAGE]) + len(self._removed)

    @property
    def held_bytes(self) -> int:
        """Bytes of data blocks the files kept in free/ hold (for tests and metrics)."""
        with self._held_lock:
            return self._held

    def _write_and_rename(
        self,
        queue_id: str,
        env_bytes: bytes,
        message: bytes,
        free_msg: tuple[str, int] | None,
        free_env: tuple[str, int] | None,
    ) -> Staged[None]:
        """Disk thread: write both files (over free/ files handed to this call, each with an
        upper bound of its size, or new in tmp/); once the pool has made them durable, together
        with the other commits of its batch, rename them into queue/, message first and envelope
        last, so that a committed envelope always has its message.

        On failure, removes exactly what this call owns (never another writer's files).
        """
        owned: list[str] = []
        fds: list[int] = []
        committed_msg = self._queue + queue_id + MESSAGE_SUFFIX
        committed_env = self._queue + queue_id + ENVELOPE_SUFFIX

        def discard() -> None:
            for path in reversed(owned):
                _unlink_quietly(path)

        try:
            msg = _place(message, free_msg, self._tmp + queue_id + MESSAGE_SUFFIX, owned, fds)
            env = _place(env_bytes, free_env, self._tmp + queue_id + ENVELOPE_SUFFIX, owned, fds,
                         slack=ENVELOPE_SLACK)
        except BaseException:
            for fd in fds:
                os.close(fd)
            discard()
            raise

        def publish() -> None:
            try:
                os.rename(msg, committed_msg)
                owned[0] = committed_msg
                os.rename(env, committed_env)
                owned[1] = committed_env
            except BaseException:
                discard()
                raise

        return Staged(fds, publish, discard)

    # -- update and remove ---------------------------------------------------------------------

    def update(self, envelope: Envelope) -> Deferred[None]:
        """Atomically replace the committed envelope (temp file, fsync, rename, queue/ fsync).

        The caller serialises updates of one message (the runner has one round per message).
        """
        queue_id = envelope.queue_id
        env_bytes = encode_envelope(envelope)
        # The temp file lives in tmp/ so that a crash between write and rename leaves garbage only
        # where recover() clears it; the serial keeps two updates in flight from colliding.
        tmp = self.tmp_dir / f"{queue_id}{ENVELOPE_SUFFIX}.u{next(self._update_serial)}"
        return self._pool.run_and_sync(
            self.queue_dir, self._replace, tmp, self.envelope_path(queue_id), env_bytes
        )

    @staticmethod
    def _replace(tmp: Path, target: Path, data: bytes) -> None:
        """Disk thread: write ``data`` to ``tmp``, fsync, and rename it over ``target``."""
        if not target.exists():
            # Never resurrect an envelope whose message is gone (removed, or moved aside).
            raise FileNotFoundError(errno.ENOENT, "no committed envelope", str(target))
        try:
            write_file_synced(tmp, data)
            os.replace(tmp, target)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def remove(self, queue_id: str) -> Deferred[None]:
        """Drop a finished message: the envelope first, then the bytes.

        Both leave queue/ by a rename into free/ (or an unlink once free/ holds enough). Removal
        itself needs no fsync: if a crash undoes it, the message is delivered again and the
        Maildir writer recognises the copy it already wrote; a message left without its envelope
        is deleted by recover(). But a file is reused only once queue/ has been fsync'd after its
        rename, otherwise a power loss could bring back the old name over new bytes, and deliver
        one message's bytes as another's: the next commit's fsync of queue/ does it.
        """
        if self.free_files + 2 > FREE_FILES_LIMIT:
            return self._pool.run_batched(self._unlink_pair, queue_id)
        env_name, msg_name = f"{next(self._free_serial)}", f"{next(self._free_serial)}"
        d = self._pool.run_batched(self._recycle_pair, queue_id, [env_name, msg_name])

        def moved(kept: list[tuple[int, _Kept]]) -> None:
            self._removed.extend(kept)
            if not self._keep_blocks and any(entry[2] for _, entry in kept):
                # Space became scarce while they moved: give their blocks back too.
                self.drop_free()

        return d.addCallback(moved)

    def _unlink_pair(self, queue_id: str) -> None:
        _unlink_quietly(self._queue + queue_id + ENVELOPE_SUFFIX)
        _unlink_quietly(self._queue + queue_id + MESSAGE_SUFFIX)

    def _recycle_pair(self, queue_id: str, names: list[str]) -> list[tuple[int, _Kept]]:
        """Disk thread: move the envelope, then the message, into free/; each file moved, by
        kind, with its size and the bytes of data blocks it keeps.

        A file keeps its blocks while space is not scarce and they fit the bound, else it is
        truncated (or, failing that, unlinked) and keeps only its inode. The truncation follows
        the rename in the same thread, so on a journalling file system it cannot become durable
        without the rename (metadata changes commit in order): a crash never brings back a
        queue/ name over an emptied file.
        """
        moved = []
        for kind, name in enumerate(names):
            path = self._free_prefix + name
            try:
                os.rename(self._queue + queue_id + _SUFFIXES[kind], path)
            except FileNotFoundError:
                continue
            try:
                stat = os.stat(path)
            except OSError:
                _unlink_quietly(path)
                continue
            held = stat.st_blocks * 512
            with self._held_lock:
                keep = self._keep_blocks and self._held + held <= self._bound
                if keep:
                    self._held += held
            if keep:
                moved.append((kind, (name, stat.st_size, held)))
                continue
            try:
                os.truncate(path, 0)
            except OSError:
                _unlink_quietly(path)
                continue
            moved.append((kind, (name, 0, 0)))
        return moved

    # -- reading (CLI and start-up) ------------------------------------------------------------

    def load(self, queue_id: str) -> Envelope:
        """Blocking: read one committed envelope (for the queue CLI, or from a disk thread).

        Raises FileNotFoundError if there is none, ValueError if it cannot be parsed.
        """
        return decode_envelope(self.envelope_path(queue_id).read_bytes(), queue_id)

    def list_envelopes(self) -> list[Envelope]:
        """Blocking and read-only: every readable committed envelope, oldest first.

        Safe while a server runs (it changes nothing); unreadable envelopes are logged and skipped.
        """
        envelopes = []
        for queue_id in self._committed_ids():
            try:
                envelopes.append(self.load(queue_id))
            except FileNotFoundError:
                continue  # removed while we were listing
            except (OSError, ValueError) as e:
                log.warn("{queue_id}: unreadable envelope: {error}", queue_id=queue_id, error=e)
        return envelopes

    def _committed_ids(self) -> list[str]:
        try:
            names = os.listdir(self.queue_dir)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(ENVELOPE_SUFFIX)] for n in names if n.endswith(ENVELOPE_SUFFIX))

    # -- start-up ------------------------------------------------------------------------------

    def recover(self) -> list[Envelope]:
        """Blocking, once at start-up before serving: clean up after a crash and load the queue.

        Creates the directories, deletes everything in tmp/, deletes half-committed pairs (a
        message without envelope or an envelope without message), moves unreadable envelopes and
        their message to corrupt/, and returns the committed envelopes, oldest first. Takes the
        spool lock first: a second process clearing tmp/ would destroy messages being written.
        """
        for directory in (self.directory, self.tmp_dir, self.queue_dir, self.free_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._acquire_lock()

        for entry in os.scandir(self.tmp_dir):
            log.info("recover: deleting uncommitted {name}", name=entry.name)
            _remove_entry(entry)
        # Deleted, not reused: after a crash a name in free/ may share its file with a name in
        # queue/ (a rename half done), and overwriting it would destroy a committed message.
        for free in self._free:
            free.clear()
        self._removed = []
        with self._held_lock:
            self._held = 0
        for entry in os.scandir(self.free_dir):
            _remove_entry(entry)

        messages: set[str] = set()
        envelopes: set[str] = set()
        for entry in os.scandir(self.queue_dir):
            name = entry.name
            if name.endswith(MESSAGE_SUFFIX) and entry.is_file(follow_symlinks=False):
                messages.add(name[: -len(MESSAGE_SUFFIX)])
            elif name.endswith(ENVELOPE_SUFFIX) and entry.is_file(follow_symlinks=False):
                envelopes.add(name[: -len(ENVELOPE_SUFFIX)])
            else:
                log.warn("recover: leaving unexpected {name} in the queue", name=name)

        for queue_id in sorted(messages - envelopes):
            log.warn("{queue_id}: recover: deleting message without envelope", queue_id=queue_id)
            _unlink_quietly(self.message_path(queue_id))
        for queue_id in sorted(envelopes - messages):
            log.warn("{queue_id}: recover: deleting envelope without message", queue_id=queue_id)
            _unlink_quietly(self.envelope_path(queue_id))

        loaded: list[Envelope] = []
        moved = False
        for queue_id in sorted(envelopes & messages):
            try:
                loaded.append(self.load(queue_id))
            except (OSError, ValueError) as e:
                log.error(
                    "{queue_id}: recover: unreadable envelope moved to {corrupt}: {error}",
                    queue_id=queue_id,
                    corrupt=str(self.corrupt_dir),
                    error=e,
                )
                self._move_aside(queue_id)
                moved = True
        if moved:
            # A move is two directory changes; make both durable so a crash cannot bring the
            # corrupt envelope back into the queue, nor lose it.
            fsync_directory(self.corrupt_dir)
            fsync_directory(self.queue_dir)
        loaded.sort(key=lambda e: (e.received_at, e.queue_id))
        log.info("recover: {count} message(s) in the queue", count=len(loaded))
        return loaded

    def _move_aside(self, queue_id: str) -> None:
        self.corrupt_dir.mkdir(mode=0o700, exist_ok=True)
        for path in (self.envelope_path(queue_id), self.message_path(queue_id)):
            target = self.corrupt_dir / path.name
            if target.exists():
                # Never overwrite an earlier casualty; keep both for the administrator.
                target = self.corrupt_dir / f"{path.name}.{time.time_ns()}"
            os.rename(path, target)

    def _acquire_lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLockedError(f"spool {self.directory} is in use by another process") from None
        self._lock_fd = fd

    def close(self) -> None:
        """Release the spool lock (process exit does it too); for tests and orderly shutdown."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _place(data: bytes, free: tuple[str, int] | None, new: str, owned: list[str],
           fds: list[int], *, slack: int = 0) -> str:
    """Disk thread: ``data`` written over the free file, or else in a new file; not yet durable.

    The path written is appended to ``owned`` once it belongs to this commit, its open
    descriptor to ``fds`` (for the pool to fdatasync and close). Data that may end in
    whitespace (``slack``: an envelope's JSON) is padded with spaces to the free file's length
    when it is at most that much shorter.
    """
    if free is not None:
        path, size = free
        if 0 < size - len(data) <= slack:
            data += b" " * (size - len(data))
        owned.append(path)
        try:
            fds.append(_overwrite(path, data, size))
            return path
        except FileNotFoundError:
            owned.pop()  # gone (a queue tool?): fall back to a new file
    try:
        fd = _write_new(new, data)  # O_EXCL: a FileExistsError here means the file is not ours
    except FileExistsError:
        raise
    except BaseException:
        # Created but not written (ENOSPC half-way): ours, and garbage now.
        _unlink_quietly(new)
        raise
    owned.append(new)
    fds.append(fd)
    return new


def _write_new(path: str, data: bytes) -> int:
    """Create ``path`` exclusively and write ``data``; the open descriptor (not yet synced)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _overwrite(path: str, data: bytes, size: int) -> int:
    """Replace the contents of an existing file in place (no new inode); the open descriptor,
    not yet synced.

    ``size`` is an upper bound of the file's length (-1 if unknown): when ``data`` is at least
    that long, writing it sets the length and no truncation is needed.
    """
    fd = os.open(path, os.O_WRONLY)
    try:
        if not 0 <= size <= len(data):
            os.ftruncate(fd, len(data))
        write_all(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd



def _error_text(error: BaseException | None) -> str:
    """An OSError as one short line: its strerror (no path, the caller names that)."""
    if isinstance(error, OSError) and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return repr(error)


def _log_commit_failure(queue_id: str, path: str, failure: Failure) -> None:
    """A storage error is one line (queue id, path, error); anything else keeps its traceback."""
    if failure.check(OSError):
        error = failure.value
        where = getattr(error, "filename", None) or path
        log.error("{queue_id}: commit failed: {path}: {error}", queue_id=queue_id,
                  path=str(where), error=_error_text(error))
    else:
        log.failure("{queue_id}: commit failed", failure, queue_id=queue_id)


def _unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_entry(entry: os.DirEntry[str]) -> None:
    """Remove a tmp/ leftover; a directory there is not ours, but tmp/ is ours to empty."""
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path)
    else:
        os.unlink(entry.path)
