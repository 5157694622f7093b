"""Readiness: may this server be sent traffic? Each check answers with a Deferred bool and
never blocks the reactor (the spool is looked at in a disk thread, DNS asked asynchronously).

Liveness needs no check: answering HTTP at all shows the reactor turns.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

from mailsys.diskio import DiskRunner

# A readiness check that has not answered by then counts as failed (seconds).
CHECK_TIMEOUT = 5.0


@dataclass(frozen=True)
class Check:
    """One named readiness check."""

    name: str
    run: Callable[[], Deferred[bool]]


def spool_writable(spool: Path, disk: DiskRunner) -> Check:
    """The spool's directories exist and this process may write in them."""

    def writable() -> bool:
        return all(os.access(path, os.W_OK | os.X_OK) for path in (spool, spool / "queue",
                                                                   spool / "tmp"))

    return Check("spool", lambda: disk.run(writable))


def files_usable(wanted: Sequence[tuple[Path, int]], disk: DiskRunner) -> Check:
    """Every file and directory the server needs is there and this process may use it as it
    must (the users file, certificate and key readable; the Maildirs writable): after twistd
    drops privileges, this process is the server's account, so an admin command that left a
    file it cannot read shows here before a user meets it."""

    def usable() -> bool:
        # A directory to write in that is not there yet is made on first use (the Maildirs).
        return all(os.access(path, mode) for path, mode in wanted
                   if mode == os.R_OK or os.path.exists(path))

    return Check("files", lambda: disk.run(usable))


def listeners_bound(bound: Callable[[], bool]) -> Check:
    """Every configured listener is bound."""
    return Check("listeners", lambda: succeed(bound()))


def dns_answering(lookup: Callable[[], Deferred[object]]) -> Check:
    """The resolver answers (an answer, or "no such name", both show it works)."""

    def check() -> Deferred[bool]:
        def failed(failure: Failure) -> bool:
            return failure.check(DNSNameError) is not None

        return lookup().addCallbacks(lambda _: True, failed)

    return Check("dns", check)


class Readiness:
    """Runs every check side by side; ready when all say yes within CHECK_TIMEOUT."""

    def __init__(self, checks: Sequence[Check], clock: IReactorTime) -> None:
        self.checks = list(checks)
        self._clock = clock

    def evaluate(self) -> Deferred[dict[str, bool]]:
        """Fire with each check's result, by name."""
        runs: list[Deferred[bool]] = []
        for check in self.checks:
            try:
                d = check.run()
            except Exception:
                d = succeed(False)
            d.addErrback(lambda _: False)
            d.addTimeout(CHECK_TIMEOUT, self._clock, onTimeoutCancel=lambda *_: False)
            runs.append(d)
        everything: Deferred[list[tuple[bool, bool]]] = DeferredList(runs)
        names = [check.name for check in self.checks]
        return everything.addCallback(
            lambda results: {name: bool(ok and value)
                             for name, (ok, value) in zip(names, results, strict=True)})
