"""The hurried clock of the lab: the queue's time, moved forward or run faster by the teacher, so
that retries, the delay notice and the bounce at max_lifetime happen within a class hour.

`mailsys lab clock advance 2h` and `mailsys lab clock rate 60` write ``DIR/clock.json``; every lab
server reads it each second ([lab] clock) and its ``HurriedClock`` (the ``clock`` the queue
runner and the notices take, mailsys.service) follows. Only the queue's view of time changes:
sessions, TLS and the journey keep real time, and nothing in ``time`` is patched.

The file holds ``offset`` (seconds added), ``rate`` (how many seconds pass per real second) and
``since`` (the real time the rate was set), so every server computes the same time:

    queue time = real + offset + (real - since) * (rate - 1)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from mailsys.diskio import DiskRunner

# How often a lab server reads the clock file, in seconds.
CLOCK_POLL_INTERVAL = 1.0
MAX_RATE = 3600.0


@dataclass(frozen=True)
class ClockSetting:
    """What ``clock.json`` says: see the module's formula."""

    offset: float = 0.0
    rate: float = 1.0
    since: float = 0.0

    def at(self, real: float) -> float:
        """The queue's time when the real time is ``real``."""
        return real + self.offset + max(0.0, real - self.since) * (self.rate - 1.0)

    def advanced(self, seconds: float) -> ClockSetting:
        return ClockSetting(self.offset + seconds, self.rate, self.since)

    def with_rate(self, rate: float, now: float) -> ClockSetting:
        """The same queue time now, running at ``rate`` from now on."""
        folded = self.offset + max(0.0, now - self.since) * (self.rate - 1.0)
        return ClockSetting(folded, rate, now)


def read_setting(path: Path) -> ClockSetting:
    """The setting in ``path``; the real clock when the file is missing or unreadable (a lab
    server must not stop because a teacher's file is half-written: it is replaced atomically)."""
    try:
        data = json.loads(path.read_text())
        return ClockSetting(float(data["offset"]), float(data["rate"]), float(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return ClockSetting()


def write_setting(path: Path, setting: ClockSetting) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offset": setting.offset, "rate": setting.rate,
                               "since": setting.since}) + "\n")
    os.replace(tmp, path)


def describe(setting: ClockSetting, now: float | None = None) -> str:
    """One line for `lab clock show`: how far ahead the queue's clock is and how fast it runs."""
    real = time.time() if now is None else now
    ahead = setting.at(real) - real
    return (f"queue clock {format_duration(ahead)} ahead of real time, running {setting.rate:g}x "
            f"(queue time {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(real + ahead))})")


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    if seconds or not parts:
        parts.append(f"{seconds}s")
    return "".join(parts)


@implementer(IDelayedCall)
class _HurriedCall:
    """A call due at a queue time; re-armed on the real reactor whenever the setting moves."""

    def __init__(self, clock: HurriedClock, due: float, func: Callable[..., Any],
                 args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        self._clock = clock
        self.due = due
        self._func, self._args, self._kw = func, args, kw
        self._real: IDelayedCall | None = None
        self.done = False

    def arm(self) -> None:
        if self._real is not None and self._real.active():
            self._real.cancel()
        self._real = self._clock.real.callLater(self._clock.real_delay(self.due), self._fire)

    def _fire(self) -> None:
        self._real = None
        self.done = True
        self._clock.forget(self)
        self._func(*self._args, **self._kw)

    def getTime(self) -> float:  # noqa: N802 - IDelayedCall
        return self.due

    def cancel(self) -> None:
        if self._real is not None and self._real.active():
            self._real.cancel()
        self._real = None
        self.done = True
        self._clock.forget(self)

    def delay(self, secondsLater: float) -> None:  # noqa: N803 - IDelayedCall
        self.due += secondsLater
        self.arm()

    def reset(self, secondsFromNow: float) -> None:  # noqa: N803 - IDelayedCall
        self.due = self._clock.seconds() + secondsFromNow
        self.arm()

    def active(self) -> bool:
        return not self.done


@implementer(IReactorTime)
class HurriedClock:
    """``IReactorTime`` for the queue: the real reactor's time under a ``ClockSetting``."""

    def __init__(self, real: IReactorTime, setting: ClockSetting | None = None) -> None:
        self.real = real
        self.setting = setting or ClockSetting()
        self._calls: list[_HurriedCall] = []

    def seconds(self) -> float:
        return self.setting.at(self.real.seconds())

    def real_delay(self, due: float) -> float:
        """Real seconds until the queue's clock shows ``due``."""
        return max(0.0, (due - self.seconds()) / max(self.setting.rate, 1e-9))

    def callLater(self, delay: float, callable: Callable[..., Any],  # noqa: N802
                  *args: Any, **kw: Any) -> IDelayedCall:
        call = _HurriedCall(self, self.seconds() + delay, callable, args, kw)
        self._calls.append(call)
        call.arm()
        return call

    def getDelayedCalls(self) -> list[IDelayedCall]:  # noqa: N802 - IReactorTime
        return list(self._calls)

    def forget(self, call: _HurriedCall) -> None:
        if call in self._calls:
            self._calls.remove(call)

    def set(self, setting: ClockSetting) -> None:
        """Follow a new setting: every waiting call is re-armed for its queue time (a call now
        past due runs on the next reactor turn)."""
        if setting == self.setting:
            return
        self.setting = setting
        for call in list(self._calls):
            call.arm()


class ClockFollower:
    """Reads the clock file in a disk thread (``refresh``, run each CLOCK_POLL_INTERVAL) and
    sets the clock on the reactor thread."""

    def __init__(self, clock: HurriedClock, path: Path, disk: DiskRunner) -> None:
        self.clock = clock
        self.path = path
        self._disk = disk

    def refresh(self) -> Any:
        return self._disk.run(read_setting, self.path).addCallback(self.clock.set)
