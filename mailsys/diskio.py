"""Disk work off the reactor thread: a dedicated thread pool, group-committed data and directory
fsyncs.

The reactor never waits on a disk. Blocking file work runs in ``DiskPool`` threads; many renames
into one directory share a single directory fsync (group commit), because on most file systems one
fsync of a directory makes every rename done before it durable. Files written by the jobs of one
batch are made durable together too (``Staged``): their writeback is started for all of them at
once, so that the journal commit the first fdatasync waits for carries the others' blocks as well,
and the fdatasyncs after it find nothing left to commit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, overload

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

T = TypeVar("T")

# At most this many queued jobs that sync a directory make one batch (urgent jobs: all waiting).
MAX_BATCH = 32
# Threads that may run such batches at the same time. The jobs are short and mostly wait for the
# disk or the GIL: a third thread only adds contention for the GIL (measured: 2 threads commit
# and deliver as fast as 1 and faster than 4 or 8, with a quarter less CPU than 8).
BATCH_THREADS = 2


class DiskRunner(Protocol):
    """Runs blocking work off the reactor thread: what the rooms that read files ask of a
    ``DiskPool`` (tests pass a runner that works at once on the calling thread)."""

    def run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``func(*args, **kwargs)`` in a disk thread; fire on the reactor thread."""
        ...


class DirectorySyncError(OSError):
    """The fsync of a directory failed after the work before it had succeeded.

    ``result`` is what that work returned. Renames it made are in place but not durable, so
    the caller must neither acknowledge nor reuse what they stand for.
    """

    result: Any = None


@dataclass(slots=True)
class Staged(Generic[T]):
    """Files written but not yet durable, and the step that publishes them once they are.

    A job run by ``DiskPool.run_and_sync`` may return one instead of its result: the pool then
    makes the data of ``fds`` durable together with the other staged jobs of its batch, closes
    the descriptors, and calls ``publish`` (typically renames) whose result is the job's; if the
    data cannot be made durable, it calls ``discard`` (remove what was written) and the job fails
    with that error. ``finish`` does the same for one job, on the calling thread.
    """

    fds: list[int]
    publish: Callable[[], T]
    discard: Callable[[], None]


def finish(staged: Staged[T]) -> T:
    """Blocking: make one staged job's files durable, close them, publish (or discard)."""
    (error,) = _sync_staged([staged])
    if error is not None:
        raise error
    return staged.publish()


def _sync_staged(batch: list[Staged[Any]]) -> list[OSError | None]:
    """Disk thread: make the data of every staged job durable; close every descriptor.

    Writeback is started for every file first, then each is fdatasync'd: the first waits for a
    journal commit that holds every file's new blocks, the others for no more commits. The
    jobs whose files could not be made durable are discarded and their error returned.
    """
    for staged in batch:
        for fd in staged.fds:
            _start_writeback(fd)
    errors: list[OSError | None] = []
    for staged in batch:
        error: OSError | None = None
        for fd in staged.fds:
            try:
                if error is None:
                    os.fdatasync(fd)
            except OSError as e:
                error = e
            finally:
                os.close(fd)
        staged.fds = []
        if error is not None:
            with contextlib.suppress(OSError):
                staged.discard()
        errors.append(error)
    return errors


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def _load_sync_file_range() -> Callable[[int], None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    call.restype = ctypes.c_int

    def start(fd: int) -> None:
        call(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a hint: fdatasync still decides durability

    return start


_writeback = _load_sync_file_range()


def _start_writeback(fd: int) -> None:
    if _writeback is not None:
        _writeback(fd)


@dataclass(slots=True)
class _Job:
    deferred: Deferred[Any]
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    sync: _DirectorySync | None = None
    ok: bool = False
    result: Any = None


class DiskPool:
    """Threads reserved for blocking disk work, started and stopped with the service.

    Every hand-over between the reactor and a disk thread costs thread wake-ups and GIL
    transfers, and under load these cost more than the file work itself (a spool commit that
    takes 0.6 ms alone took 4 ms among eight disk threads contending for the GIL). So short
    jobs (``run_and_sync``: commits, Maildir copies; ``run_batched``: removals) are done in
    batches, by at most BATCH_THREADS threads at a time: a thread takes every such job waiting,
    urgent ones first (a client waits for those), runs them, fsyncs each directory they changed
    once (shared with the other threads: group commit), and hands the batch back to the reactor
    with one wake-up.

    Other jobs (``run``) may be long, a password hash or the listing of a large mailbox: each
    gets a thread of its own, so they run side by side. Once the pool has synced a directory,
    they leave one thread free, so that a commit never waits behind them.
    """

    def __init__(
        self, reactor: IReactorFromThreads, max_threads: int = 8, name: str = "disk"
    ) -> None:
        self._reactor = reactor
        self._max_threads = max_threads
        self._name = name
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)
        # Guarded by the lock: the jobs waiting, by kind, and the threads busy with each kind.
        self._urgent: deque[_Job] = deque()
        self._batched: deque[_Job] = deque()
        self._plain: deque[_Job] = deque()
        self._batch_threads = min(BATCH_THREADS, max_threads)
        self._plain_threads = max_threads
        self._batching = 0
        self._running_plain = 0
        self._stopping = False
        self._dir_syncs: dict[str, _DirectorySync] = {}
        self._done_lock = threading.Lock()
        self._done: list[_Job] = []

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        """Start the threads; work submitted before waits for them."""
        if self._threads:
            return
        with self._lock:
            self._stopping = False
        for index in range(self._max_threads):
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Let queued work finish, then end the threads (blocking, at shutdown)."""
        threads, self._threads = self._threads, []
        with self._lock:
            self._stopping = True
            self._work_ready.notify_all()
        for thread in threads:
            thread.join(timeout)

    def run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``func`` in a disk thread; the Deferred fires on the reactor thread."""
        d: Deferred[T] = Deferred()
        job = _Job(d, func, args, kwargs)
        with self._lock:
            self._plain.append(job)
            self._work_ready.notify()
        return d

    @overload
    def run_and_sync(self, directory: str | Path, func: Callable[..., Staged[T]], *args: Any,
                     urgent: bool = False) -> Deferred[T]: ...

    @overload
    def run_and_sync(self, directory: str | Path, func: Callable[..., Staged[T] | None],
                     *args: Any, urgent: bool = False) -> Deferred[T | None]: ...

    @overload
    def run_and_sync(self, directory: str | Path, func: Callable[..., T], *args: Any,
                     urgent: bool = False) -> Deferred[T]: ...

    def run_and_sync(
        self,
        directory: str | Path,
        func: Callable[..., Any],
        *args: Any,
        urgent: bool = False,
    ) -> Deferred[Any]:
        """Run ``func(*args)`` in a disk thread, then make what it did in ``directory`` durable.

        Fires with ``func``'s result once an fsync of ``directory`` begun after ``func``
        returned has ended; jobs of one batch, and threads syncing the same directory at the
        same time, share that fsync. If ``func`` raises, nothing is synced and the Deferred
        fails with its exception; if the fsync fails, with DirectorySyncError. ``urgent`` jobs
        (a client waits for them) go before all others. When ``func`` returns a ``Staged``,
        its files are made durable with those of the other jobs of the batch, then published,
        before the directory is synced; the Deferred fires with what publishing returned.
        """
        d: Deferred[Any] = Deferred()
        self._submit_batched(_Job(d, func, args, {}, self._directory_sync(directory)), urgent)
        return d

    def run_batched(self, func: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run a short ``func(*args)`` in a disk thread, in a batch with the jobs that sync
        directories, but sync nothing (work whose durability rides on a later sync)."""
        d: Deferred[T] = Deferred()
        self._submit_batched(_Job(d, func, args, {}), urgent=False)
        return d

    def _submit_batched(self, job: _Job, urgent: bool) -> None:
        with self._lock:
            # Wake a thread only when such work appears: the thread woken takes what comes
            # meanwhile as one batch, and a thread that ends a batch looks for more first.
            if not self._urgent and not self._batched:
                self._work_ready.notify()
            (self._urgent if urgent else self._batched).append(job)
            self._plain_threads = max(1, self._max_threads - 1)

    def sync_directory(self, directory: str | Path) -> Deferred[None]:
        """Make every rename into ``directory`` done before this call durable.

        Calls that arrive while an fsync is running are served together by the next one: the
        fsync in flight may have started before their rename, so it cannot count for them.
        """
        return self.run_and_sync(directory, _nothing)

    def _directory_sync(self, directory: str | Path) -> _DirectorySync:
        key = os.fspath(directory)
        sync = self._dir_syncs.get(key)
        if sync is None:
            sync = self._dir_syncs[key] = _DirectorySync(key)
        return sync

    def _work(self) -> None:
        while True:
            with self._lock:
                while True:
                    if (self._urgent or self._batched) and self._batching < self._batch_threads:
                        self._batching += 1
                        urgent = list(self._urgent)
                        self._urgent.clear()
                        count = min(len(self._batched), MAX_BATCH)
                        batch = [self._batched.popleft() for _ in range(count)]
                        job = None
                        break
                    if self._plain and self._running_plain < self._plain_threads:
                        self._running_plain += 1
                        job = self._plain.popleft()
                        break
                    if self._stopping and not (self._urgent or self._batched or self._plain):
                        # Wake the next thread: it may have waited for this one's work.
                        self._work_ready.notify()
                        return
                    self._work_ready.wait()
            if job is None:
                if urgent:
                    self._run_batch(urgent)
                if batch:
                    self._run_batch(batch)
                with self._lock:
                    self._batching -= 1
            else:
                self._run_batch([job])
                with self._lock:
                    self._running_plain -= 1

    def _run_batch(self, jobs: list[_Job]) -> None:
        """Disk thread: run ``jobs``, make the files they staged durable together and publish
        them, then sync the directories they changed, then report."""
        staged: list[_Job] = []
        for job in jobs:
            try:
                job.result = job.func(*job.args, **job.kwargs)
                job.ok = True
            except BaseException:
                job.result = Failure()
                continue
            if isinstance(job.result, Staged):
                staged.append(job)
        if staged:
            errors = _sync_staged([job.result for job in staged])
            for job, error in zip(staged, errors, strict=True):
                if error is not None:
                    job.ok, job.result = False, Failure(error)
                    continue
                try:
                    job.result = job.result.publish()
                except BaseException:
                    job.ok, job.result = False, Failure()
        syncs: dict[_DirectorySync, list[_Job]] = {}
        for job in jobs:
            if job.ok and job.sync is not None:
                syncs.setdefault(job.sync, []).append(job)
        for sync, synced in syncs.items():
            try:
                sync.sync()
            except OSError as e:
                for job in synced:
                    error = DirectorySyncError(e.errno, e.strerror, sync.directory)
                    error.result = job.result
                    job.ok, job.result = False, Failure(error)
        self._finished(jobs)

    def _finished(self, jobs: list[_Job]) -> None:
        """Disk thread: queue results; wake the reactor only if none are waiting for it yet."""
        with self._done_lock:
            done = self._done
            waiting = bool(done)
            done.extend(jobs)
        if not waiting:
            self._reactor.callFromThread(self._fire)

    def _fire(self) -> None:
        """Reactor thread: fire the Deferreds of every job finished since the last call."""
        with self._done_lock:
            done, self._done = self._done, []
        for job in done:
            if job.ok:
                job.deferred.callback(job.result)
            else:
                job.deferred.errback(job.result)


def _nothing() -> None:
    return None


class _Round:
    """One directory fsync and the callers it serves."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: OSError | None = None


class _DirectorySync:
    """Group commit for one directory, among disk threads: at most one fsync running, and one
    round forming that every caller arriving meanwhile joins; its first waiter runs it."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._cond = threading.Condition(threading.Lock())
        self._running: _Round | None = None
        self._next: _Round | None = None

    def sync(self) -> None:
        """Disk thread: return once an fsync of the directory begun after this call has ended."""
        this: _Round
        with self._cond:
            if self._running is None:
                this = self._running = _Round()
            else:
                # The fsync running may have begun before the caller's rename: join the next.
                if self._next is None:
                    self._next = _Round()
                this = self._next
                while not this.done and self._running is not None:
                    self._cond.wait()
                if not this.done:
                    # The fsync before has ended and nobody runs this one yet: run it.
                    self._running, self._next = this, None
        if not this.done:
            try:
                fsync_directory(self.directory)
            except OSError as e:
                this.error = e
            with self._cond:
                this.done = True
                self._running = None
                self._cond.notify_all()
        if this.error is not None:
            raise OSError(this.error.errno, this.error.strerror, self.directory)


# The errors that mean "no space": the file system is full, or the writer's disk quota is.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_no_space(error: BaseException | None) -> bool:
    """True if ``error`` says the file system (or the owner's disk quota) has no room left."""
    return isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS


def write_all(fd: int, data: bytes) -> None:
    """Disk thread: write all of ``data`` to ``fd`` (os.write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_directory(directory: str | Path) -> None:
    """fsync a directory so that renames and creations inside it survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_synced(path: str | Path, chunks: list[bytes] | bytes, mode: int = 0o600) -> None:
    """Create ``path`` exclusively, write ``chunks`` and fsync it (blocking: call in a thread)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        data = [chunks] if isinstance(chunks, bytes) else chunks
        for chunk in data:
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file_synced(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    write_file_synced(tmp, data, mode)
    os.replace(tmp, path)
    fsync_directory(path.parent)
