"""The intake defences read again with the configuration on SIGHUP: the allow and block lists,
DNS lists, limits and policies of ``[defence]`` change without a restart.

The file is read and checked in a disk thread; a file with a problem is one log line (file,
key, reason) and the defences keep what they had. Chained onto whatever SIGHUP did before
(the TLS certificate, the DKIM keys), like mailsys.authn.wiring's reloader.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from mailsys.config import Config, ConfigError, load
from mailsys.defence.intake import IntakeDefence
from mailsys.diskio import DiskRunner

log = Logger(namespace="mailsys.defence")


class DefenceReloader(Service):
    """Reads ``path`` again on SIGHUP and gives its ``[defence]`` to each defence."""

    def __init__(self, path: Path, defences: Sequence[IntakeDefence], disk: DiskRunner,
                 reactor: Any) -> None:
        self.path = path
        self.defences = list(defences)
        self._disk = disk
        self._reactor = reactor

    def reload(self) -> Deferred[None]:
        """Read the file (in a disk thread) and take its ``[defence]``; never fails."""
        d: Deferred[Config] = self._disk.run(load, self.path, check_files=False)
        return d.addCallbacks(self._loaded, self._failed)

    def _loaded(self, config: Config) -> None:
        for defence in self.defences:
            defence.reconfigure(config.defence)
        log.info("intake defences read again from {path}", path=str(self.path))

    def _failed(self, failure: Failure) -> None:
        if isinstance(failure.value, ConfigError):
            log.warn("intake defences unchanged: {error}", error=str(failure.value))
            return
        log.failure("intake defences unchanged: cannot read {path}", failure,
                    path=str(self.path))

    @override
    def startService(self) -> None:
        Service.startService(self)
        reactor = self._reactor
        before = signal.getsignal(signal.SIGHUP)

        def hangup(signum: int, frame: Any) -> None:
            if callable(before):
                before(signum, frame)
            reactor.callFromThread(self.reload)

        signal.signal(signal.SIGHUP, hangup)
