"""Disk work off the reactor thread: a dedicated thread pool and group-committed directory fsyncs.

The reactor never waits on a disk. Blocking file work runs in ``DiskPool`` threads; many renames
into one directory share a single directory fsync (group commit), because on most file systems one
fsync of a directory makes every rename done before it durable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class DiskPool:
    """A thread pool reserved for blocking disk work, started and stopped with the service."""

    def __init__(self, reactor: IReactorThreads, max_threads: int = 16, name: str = "disk") -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=max_threads, name=name)
        self._dir_syncs: dict[str, _DirectorySync] = {}

    def start(self) -> None:
        if not self._pool.started:
            self._pool.start()

    def stop(self) -> None:
        if self._pool.started:
            self._pool.stop()

    def run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``func`` in a disk thread; the Deferred fires on the reactor thread."""
        return deferToThreadPool(self._reactor, self._pool, func, *args, **kwargs)

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
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    write_file_synced(tmp, data, mode)
    os.replace(tmp, path)
    fsync_directory(path.parent)
