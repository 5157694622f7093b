"""The log file writer: twistd's classic text lines, written in batches off the hot path.

twistd's own observer formats every event with a fresh time-zone computation and then writes
and flushes the file, one system call per line, on the reactor thread; at three lines per
message that was a third of the reactor's busy time under SMTP load. This observer writes the
same lines, but collects those of one reactor iteration and writes them with one call at the
end of it (or at once while no reactor runs, and at exit), and formats each second's time stamp
once. A line is therefore on disk at most one reactor iteration after its event.

It also leaves out Twisted's own life-cycle chatter (``is_twisted_chatter``): factories and
protocols starting and stopping, "... starting on N" and "(UDP Port N Closed)" for every port,
one pair per DNS query. They say nothing about a session, a message or the service that the
service's own lines ("listening on ...") do not say better.

``Options.postOptions`` (mailsys.tap) makes it twistd's default observer for ``twistd mailsys``
through twistd's own ``--logger`` option; an explicit ``--logger`` or ``--syslog`` wins.

With ``--log-format json`` each event is one JSON object on one line (``time``, ``level``,
``namespace``, the formatted ``text``, the event's own fields and ``log_format``) for log
shippers. A log file is rotated by twistd's way on SIGUSR1 (renamed to ``.1`` and so on), and
reopened on SIGHUP after an outside tool (logrotate) moved it (``reopen_log_file``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast

from twisted.logger import (
    ILogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    timeFormatRFC3339,
)
from twisted.python import threadable
from twisted.python.compat import ioType
from twisted.python.logfile import LogFile
from twisted.python.util import untilConcludes
from zope.interface import implementer

# A batch is written at once when it grows past this, so a flood of events between two
# reactor iterations cannot hold much memory.
MAX_BATCH_CHARS = 64 * 1024

# One encoder for every JSON line (json.dumps with an argument builds a new one each call); a
# value JSON cannot hold is written as its repr.
_JSON = json.JSONEncoder(default=repr)

# The log formats of `twistd mailsys --log-format`.
TEXT = "text"
JSON = "json"
LOG_FORMATS = (TEXT, JSON)


# Twisted's chatter, by its format (new-style events) or its text (legacy log.msg events):
# twisted.internet.protocol's Factory.doStart/doStop and AbstractDatagramProtocol.doStart/doStop,
# and the ports of twisted.internet.tcp, udp and unix on listening and on closing.
_CHATTER_FORMATS = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})
_CHATTER_TEXT = re.compile(
    r"(?:\S[^\n]* starting on \S+"  # "SMTPServerFactory starting on 25"
    r"|\((?:\w+ )?Port \S+ Closed\)"  # "(UDP Port 40123 Closed)"
    r"|(?:Starting|Stopping) protocol <.*>)\Z"  # a DNS query's datagram protocol
)


def is_twisted_chatter(event: LogEvent) -> bool:
    """Whether the event is Twisted's life-cycle chatter, which the log file leaves out.

    Our own events (namespace ``mailsys.``) and anything carrying a failure never are.
    """
    namespace = event.get("log_namespace")
    if type(namespace) is str and namespace.startswith("mailsys."):
        return False
    if "log_failure" in event:
        return False
    if event.get("log_format") in _CHATTER_FORMATS:
        return True
    text = event.get("log_text")
    return type(text) is str and _CHATTER_TEXT.match(text) is not None


class _LogOutput(Protocol):
    """A text file (stdout) or a binary one (twistd's LogFile)."""

    def write(self, data: Any, /) -> Any: ...

    def flush(self) -> Any: ...


class _Scheduler(Protocol):
    """What the writer needs of the reactor (IReactorCore running, IReactorTime, threads)."""

    running: bool

    def callLater(self, delay: float, f: Callable[..., Any], /) -> Any: ...  # noqa: N802

    def callFromThread(self, f: Callable[..., Any], /) -> Any: ...  # noqa: N802


class _SecondStamps:
    """RFC 3339 time stamps as twistd writes them, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            # astimezone(): the local offset at that moment, as twistd's formatTime gives it.
            self._text = datetime.fromtimestamp(second).astimezone().strftime(timeFormatRFC3339)
            self._second = second
        return self._text


@implementer(ILogObserver)
class BatchedLogWriter:
    """An ILogObserver writing classic log lines to ``out`` once per reactor iteration.

    Safe to call from any thread: lines are appended under a lock, and the write is scheduled
    on the reactor thread.
    """

    def __init__(self, out: _LogOutput, reactor: _Scheduler, log_format: str = TEXT) -> None:
        self._out = out
        self._json = log_format == JSON
        self._json_second = -1
        self._json_parts = ("", "")
        # twistd's LogFile takes bytes, stdout text: as twistd's own FileLogObserver decides.
        self._encoding = None if ioType(out) is str else "utf-8"
        self._reactor = reactor
        self._stamps = _SecondStamps()
        # Re-entrant: a signal handler runs on the main thread between any two bytecodes, also
        # inside flush() while it holds the lock, and Twisted's SIGTERM/SIGINT handlers log
        # ("Received SIGTERM"); with a plain Lock that line would wait for itself forever and
        # the server would never stop.
        self._lock = threading.RLock()
        self._lines: list[str] = []
        self._chars = 0
        self._scheduled = False

    def __call__(self, event: LogEvent) -> None:
        if is_twisted_chatter(event):
            return
        with self._lock:
            # Formatted under the lock: the time stamp cache is shared.
            text = self._line(event)
            if not text:
                return
            self._lines.append(text)
            self._chars += len(text)
            now = self._chars >= MAX_BATCH_CHARS or not self._reactor.running
            schedule = not now and not self._scheduled
            self._scheduled = self._scheduled or schedule
        if now:
            self.flush()
        elif schedule:
            if threadable.isInIOThread():
                self._reactor.callLater(0, self.flush)
            else:
                self._reactor.callFromThread(self.flush)

    def _line(self, event: LogEvent) -> str | None:
        return self._json_line(event) if self._json else self._text_line(event)

    def _json_line(self, event: LogEvent) -> str | None:
        """The event as one JSON object on one line: ``time`` (RFC 3339, milliseconds),
        ``level``, ``namespace``, ``text`` (the formatted message), ``traceback`` for a failure,
        the event's own fields (a value JSON cannot hold is written as its repr), and
        ``log_format``.

        Built directly rather than through twisted.logger's eventAsJSON, which flattens every
        event with string.Formatter and costs about thirty times as much per line.
        """
        level = event.get("log_level")
        when = event.get("log_time")
        record: dict[str, Any] = {
            "time": self._json_stamp(when) if isinstance(when, (int, float)) else None,
            "level": level.name if level is not None else None,
            "namespace": event.get("log_namespace"),
            "text": self._message(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            try:
                record["traceback"] = failure.getTraceback()
            except Exception:
                record["traceback"] = repr(failure)
        for key, value in event.items():
            # Ours win over an event field of the same name; Twisted's log_* keys are left out
            # but for the format, which says which kind of line this is.
            if not key.startswith("log_") and key not in record:
                record[key] = value
        fmt = event.get("log_format")
        if fmt is not None:
            record["log_format"] = fmt
        try:
            return _JSON.encode(record) + "\n"
        except (TypeError, ValueError):  # keys that are not strings, a value whose repr fails
            return _JSON.encode({k: record[k] for k in ("time", "level", "namespace", "text")}
                                ) + "\n"

    def _json_stamp(self, when: float) -> str:
        """RFC 3339 with milliseconds; the date, time and offset are made once per second."""
        second = int(when)
        if second != self._json_second:
            moment = datetime.fromtimestamp(second).astimezone()
            offset = moment.strftime("%z")
            self._json_parts = (moment.strftime("%Y-%m-%dT%H:%M:%S"),
                                f"{offset[:3]}:{offset[3:]}" if offset else "")
            self._json_second = second
        head, offset = self._json_parts
        return f"{head}.{int((when - second) * 1000):03d}{offset}"

    def _message(self, event: LogEvent) -> str:
        """The formatted message: str.format_map for a plain format (as in _text_line), else
        twisted.logger's formatEvent."""
        fmt = event.get("log_format")
        if type(fmt) is str and "()" not in fmt:
            try:
                return fmt.format_map(event)
            except Exception:
                pass
        return formatEvent(event)

    def _text_line(self, event: LogEvent) -> str | None:
        """The event's classic log line, as formatEventAsClassicLogText writes it.

        Twisted formats with string.Formatter in Python (~14 us a line, for its "{f()}" call
        syntax); an event of ours with a plain format and no traceback gets the same line from
        str.format_map (~1.3 us). Anything else, or any error, takes Twisted's way.
        """
        fmt = event.get("log_format")
        if (type(fmt) is not str or "()" in fmt or "log_failure" in event
                or "log_flattened" in event):
            return formatEventAsClassicLogText(event, formatTime=self._stamps)
        try:
            text = fmt.format_map(event)
        except Exception:
            return formatEventAsClassicLogText(event, formatTime=self._stamps)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        stamp = self._stamps(event.get("log_time"))
        return f"{stamp} [{system}] {text}".replace("\n", "\n\t") + "\n"

    def flush(self) -> None:
        """Write every line collected so far, in one write."""
        with self._lock:
            lines, self._lines = self._lines, []
            self._chars = 0
            self._scheduled = False
            if not lines:
                return
            try:
                text = "".join(lines)
                untilConcludes(
                    self._out.write, text if self._encoding is None else text.encode(self._encoding)
                )
                untilConcludes(self._out.flush)
            except (OSError, ValueError):
                # A full disk or a closed file: there is nowhere left to say so, and the mail
                # must go on.
                pass

    def reopen(self) -> None:
        """Write what is collected, then reopen the log file by its name (after logrotate moved
        it away); for stdout, only the write."""
        self.flush()
        reopen = getattr(self._out, "reopen", None)
        if reopen is None:
            return
        # On failure the old file stays open: lines still go somewhere.
        with self._lock, contextlib.suppress(OSError):
            reopen()


@dataclass(frozen=True)
class Destination:
    """Where twistd's options say the log goes: ``None`` for stdout, else a file path; and in
    which format."""

    path: str | None
    log_format: str = TEXT


_destination: Destination | None = None
# The writer twistd made, for reopen_log_file.
_writer: BatchedLogWriter | None = None


def use_for_twistd(server_options: Any, log_format: str = TEXT) -> None:
    """Make BatchedLogWriter twistd's observer, unless the command line chose another.

    Called from the subcommand's postOptions, which twistd runs before it builds its logger
    from ``--logger``; twistd then calls ``twistd_observer`` without arguments, so the
    destination read here from its options waits in this module until then.
    """
    global _destination
    if server_options.get("logger") or server_options.get("syslog"):
        return
    name = server_options.get("logfile") or ""
    nodaemon = bool(server_options.get("nodaemon"))
    if name == "-" and not nodaemon:
        return  # twistd refuses a daemon logging to stdout; let it say so
    if name == "-" or (nodaemon and not name):
        _destination = Destination(None, log_format)
    else:
        _destination = Destination(name or "twistd.log", log_format)
    server_options["logger"] = f"{__name__}.twistd_observer"


def twistd_observer() -> BatchedLogWriter:
    """twistd's ``--logger`` factory: the writer for the destination use_for_twistd read."""
    from twisted.internet import reactor as installed

    # twistd installed the reactor before asking for its logger; the module stands for it.
    reactor = cast(_Scheduler, installed)
    destination = _destination or Destination(None)
    out: _LogOutput
    if destination.path is None:
        out = sys.stdout
    else:
        log_file = LogFile.fromFullPath(destination.path)
        out = log_file
        _rotate_on_sigusr1(log_file, reactor)
    global _writer
    writer = _writer = BatchedLogWriter(out, reactor, destination.log_format)
    atexit.register(writer.flush)
    return writer


def reopen_log_file() -> None:
    """Reopen the log file twistd writes to (SIGHUP, with the configuration's reload), so that
    after logrotate moved it the lines go to a new file of the same name."""
    if _writer is not None:
        _writer.reopen()


def _rotate_on_sigusr1(log_file: LogFile, reactor: Any) -> None:
    """SIGUSR1 rotates the log file, as twistd does for its own log file."""
    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum: int, frame: object) -> None:
        reactor.callFromThread(log_file.rotate)

    signal.signal(signal.SIGUSR1, rotate)
