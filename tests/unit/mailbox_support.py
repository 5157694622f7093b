"""Helpers for the mailbox store and POP3 tests: a synchronous disk pool and Maildir fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

E = TypeVar("E", bound=BaseException)


def forget_folder_caches() -> None:
    """Drop what this process remembers of folders (sync results, UID files, scanned names),
    as a restarted server starts."""
    from mailsys.mailbox import folder

    folder._sync_cache.clear()
    folder._uidlist_cache.clear()
    folder._scan_memo.clear()


class WallClock:
    """A settable wall clock for a Folder (UIDVALIDITY and mod-sequence floors come from it)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ImmediatePool:
    """A DiskRunner that runs the work at once on the calling thread (no reactor needed)."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        try:
            return succeed(func(*args, **kwargs))
        except BaseException:
            return fail()


class BatchPool:
    """A disk pool that runs work at once, or, while ``held``, keeps it until ``drain``."""

    def __init__(self) -> None:
        self.held = False
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any], str]] = []
        self.ran: list[str] = []

    def run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        if not self.held:
            try:
                return succeed(func(*args, **kwargs))
            except Exception:
                return fail()
        d: Deferred[Any] = Deferred()
        self.jobs.append((lambda: func(*args, **kwargs), d, getattr(func, "__name__", "?")))
        return d

    def step(self) -> str:
        """Run the first kept job (the others stay kept); its name."""
        job, d, name = self.jobs.pop(0)
        self.ran.append(name)
        try:
            value = job()
        except Exception:
            d.errback(Failure())
        else:
            d.callback(value)
        return name

    def drain(self) -> list[str]:
        """Run the kept jobs in order (and those they start); their names, in order."""
        self.ran = []
        while self.jobs:
            self.step()
        self.held = False
        return self.ran


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired; re-raises its failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_of(d: Deferred[Any], kind: type[E]) -> E:
    """The exception of a Deferred that has failed with ``kind``."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results and isinstance(results[0], Failure), f"expected a failure, got {results}"
    assert isinstance(results[0].value, kind), results[0].value
    return results[0].value


_counter = 0


def deliver(maildir: Path, data: bytes, *, name: str | None = None,
            mtime: float | None = None) -> str:
    """Put a message into ``maildir``/new as a delivery agent would; returns its file name."""
    global _counter
    _counter += 1
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    name = name or f"{1700000000 + _counter}.M{_counter}P{os.getpid()}.test.host"
    path = maildir / "new" / name
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return name


def message(number: int, body: bytes = b"Hello.\r\n") -> bytes:
    """A small CRLF message."""
    return (f"From: sender@example.test\r\nTo: demo@example.test\r\nSubject: message {number}"
            f"\r\n\r\n").encode() + body
