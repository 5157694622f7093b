"""Disk work off the reactor thread: a dedicated thread pool and group-committed directory fsyncs.

The reactor never waits on a disk. Blocking file work runs in ``DiskPool`` threads; many renames
into one directory share a single directory fsync (group commit), because on most file systems one
fsync of a directory makes every rename done before it durable.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

T = TypeVar("T")


@dataclass(frozen=True)
class _Job:
    deferred: Deferred[Any]
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class DiskPool:
    """Threads reserved for blocking disk work, started and stopped with the service.

    A plain queue feeding a fixed set of threads, with results handed back through
    ``callFromThread``: Twisted's general ThreadPool (Team, context propagation, a coordinator
    worker) cost several times more reactor time per call, and every queued message makes
    three or four of these calls.
    """

    def __init__(
        self, reactor: IReactorFromThreads, max_threads: int = 8, name: str = "disk"
    ) -> None:
        self._reactor = reactor
        self._max_threads = max_threads
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._dir_syncs: dict[str, _DirectorySync] = {}

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        """Start the threads; work submitted before waits for them."""
        if self._threads:
            return
        for index in range(self._max_threads):
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Let queued work finish, then end the threads (blocking, at shutdown)."""
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join(timeout)

    def run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``func`` in a disk thread; the Deferred fires on the reactor thread."""
        d: Deferred[T] = Deferred()
        self._jobs.put(_Job(d, func, args, kwargs))
        return d

    def _work(self) -> None:
        call_from_thread = self._reactor.callFromThread
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                result = job.func(*job.args, **job.kwargs)
            except BaseException:
                call_from_thread(job.deferred.errback, Failure())
            else:
                call_from_thread(job.deferred.callback, result)

    def sync_directory(self, directory: str | Path) -> Deferred[None]:
        """Make every rename into ``directory`` done before this call durable.

        Calls that arrive while an fsync is running are served together by the next one: the
        fsync in flight may have started before their rename, so it cannot count for them.
        """
        key = os.fspath(directory)
        sync = self._dir_syncs.get(key)
        if sync is None:
            sync = self._dir_syncs[key] = _DirectorySync(self, key)
        return sync.request()


class _DirectorySync:
    """Group commit for one directory: at most one fsync running, one batch waiting."""

    def __init__(self, pool: DiskPool, directory: str) -> None:
        self._pool = pool
        self._directory = directory
        self._running = False
        self._waiting: list[Deferred[None]] = []

    def request(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        if not self._running:
            self._start()
        return d

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        self._running = True

        def done(result: object) -> None:
            self._running = False
            for d in batch:
                if isinstance(result, BaseException):
                    d.errback(result)
                else:
                    d.callback(None)
            if self._waiting:
                self._start()

        def failed(failure: Any) -> None:
            done(failure.value)

        self._pool.run(fsync_directory, self._directory).addCallbacks(done, failed)


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
