"""Greylisting (RFC 6647): the first message of an unknown (client network, sender,
recipient) triplet is told to try again later (450 4.7.1); a real MTA does, a bot rarely.

The client counts by its network (/24 for IPv4, /64 for IPv6): big senders retry from another
address of the same pool. A triplet retried after ``delay`` passes, and its (network, sender)
is remembered as a known good sender for ``retention``: its later mail to any recipient passes
at once (RFC 6647 §4.2 on reducing the delay for known senders). Both tables are LRUs of at most
``max_entries``, and are kept in a JSON file, written in a disk thread (tmp, fsync, rename)
each minute when changed and when the server stops, read when it starts: a restart neither
delays known senders again nor forgets who is waiting. Off unless ``[defence] greylisting``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from typing_extensions import override

from mailsys.defence.ratelimit import client_network
from mailsys.diskio import DiskRunner, replace_file_synced

log = Logger(namespace="mailsys.defence.greylist")

SAVE_INTERVAL = 60.0
# A triplet that never came back is forgotten after this (postgrey keeps them a day or two).
PENDING_LIFETIME = 2 * 86400.0


class Greylist(Service):
    """The triplet gate (mailsys.defence.intake.TripletGate); a service that saves its tables."""

    def __init__(self, path: Path, clock: IReactorTime, disk: DiskRunner, *,
                 delay: float = 300.0, retention: float = 36 * 86400.0,
                 max_entries: int = 100_000) -> None:
        self.path = path
        self._clock = clock
        self._disk = disk
        self.delay = delay
        self.retention = retention
        self.max_entries = max_entries
        self.pending: OrderedDict[str, float] = OrderedDict()  # triplet -> first seen
        self.known: OrderedDict[str, float] = OrderedDict()  # network + sender -> last passed
        self._dirty = False
        self._saver: LoopingCall | None = None

    # --- the gate ------------------------------------------------------------------------------

    def check(self, client: str, sender: str, recipient: str) -> bool:
        """True when the triplet may pass now; False: greylisted (try again after ``delay``)."""
        now = self._clock.seconds()
        network = client_network(client, 24, 64)
        pair = f"{network} {sender.lower()}"
        seen = self.known.get(pair)
        if seen is not None and now - seen < self.retention:
            self._touch(self.known, pair, now)
            return True
        triplet = f"{pair} {recipient.lower()}"
        first = self.pending.get(triplet)
        if first is None or now - first > PENDING_LIFETIME:
            self._touch(self.pending, triplet, now)
            return False
        if now - first < self.delay:
            return False
        del self.pending[triplet]
        self._touch(self.known, pair, now)
        return True

    def _touch(self, table: OrderedDict[str, float], key: str, now: float) -> None:
        table[key] = now
        table.move_to_end(key)
        while len(table) > self.max_entries:
            table.popitem(last=False)
        self._dirty = True

    # --- persistence ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read the tables kept by the last run (blocking: at start-up, before serving)."""
        try:
            data: Any = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warn("greylist {path} not read ({error}); starting empty", path=str(self.path),
                     error=str(exc))
            return
        for name, table in (("pending", self.pending), ("known", self.known)):
            entries = data.get(name, {}) if isinstance(data, dict) else {}
            for key, when in sorted(entries.items(), key=lambda item: item[1])[
                    -self.max_entries:]:
                if isinstance(key, str) and isinstance(when, int | float):
                    table[key] = float(when)

    def save(self) -> Deferred[None]:
        """Write the tables in a disk thread when they changed."""
        if not self._dirty:
            return succeed(None)
        self._dirty = False
        data = json.dumps({"pending": dict(self.pending), "known": dict(self.known)}).encode()
        d: Deferred[None] = self._disk.run(replace_file_synced, self.path, data)

        def failed(failure: Any) -> None:
            self._dirty = True
            log.failure("greylist {path} not saved", failure, path=str(self.path))

        return d.addErrback(failed)

    @override
    def startService(self) -> None:
        Service.startService(self)
        saver = self._saver = LoopingCall(self.save)
        saver.clock = self._clock
        saver.start(SAVE_INTERVAL, now=False)

    @override
    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._saver is not None and self._saver.running:
            self._saver.stop()
        return self.save()
