"""The batched log writer: twistd's line format, one write per reactor iteration."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.protocol import Factory
from twisted.logger import (
    Logger,
    LogLevel,
    capturedLogs,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.names.dns import DNSDatagramProtocol
from twisted.python import log as legacy
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.scripts.twistd import ServerOptions

from mailsys import logwriter
from mailsys.logwriter import MAX_BATCH_CHARS, BatchedLogWriter


@pytest.fixture(autouse=True)
def io_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's thread plays the reactor thread, as a running reactor registers its own."""
    monkeypatch.setattr(threadable, "ioThread", threadable.getThreadID())


class FakeReactor:
    """Just what the writer uses of a reactor: running, callLater(0), callFromThread."""

    def __init__(self, running: bool = True) -> None:
        self.running = running
        self.later: list[Callable[[], Any]] = []
        self.from_thread: list[Callable[[], Any]] = []

    def callLater(self, delay: float, f: Callable[[], Any]) -> None:  # noqa: N802
        assert delay == 0
        self.later.append(f)

    def callFromThread(self, f: Callable[[], Any]) -> None:  # noqa: N802
        self.from_thread.append(f)

    def iterate(self) -> None:
        calls, self.later = self.later, []
        for f in calls:
            f()


class CountingFile(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def event(text: str, when: float | None = None) -> dict[str, Any]:
    return {
        "log_format": text,
        "log_time": time.time() if when is None else when,
        "log_namespace": "mailsys.test",
        "log_level": None,
    }


def test_lines_of_one_iteration_are_written_together() -> None:
    """Lines logged in one reactor iteration reach the file in one write, after it."""
    out, reactor = CountingFile(), FakeReactor()
    writer = BatchedLogWriter(out, reactor)
    for n in range(3):
        writer(event(f"line {n}"))
    assert out.getvalue() == ""
    assert len(reactor.later) == 1  # one flush scheduled, not one per line
    reactor.iterate()
    assert out.writes == 1
    assert [line.split(" ", 2)[2] for line in out.getvalue().splitlines()] == [
        "line 0", "line 1", "line 2"]


def test_same_text_as_twistd() -> None:
    """A line reads exactly as twistd's own observer writes it (time stamp, system, text)."""
    out, reactor = io.StringIO(), FakeReactor(running=False)
    when = 1_700_000_000.75
    e = event("hello {who}", when) | {"who": "world"}
    BatchedLogWriter(out, reactor)(e)
    expected = formatEventAsClassicLogText(e, formatTime=lambda t: formatTime(t, timeFormatRFC3339))
    assert out.getvalue() == expected


def _failure() -> Failure:
    try:
        raise ValueError("boom")
    except ValueError:
        return Failure()


class _Thing:
    name = "thing"

    def __repr__(self) -> str:
        return "<thing>"

    def call(self) -> str:
        return "called"


@pytest.mark.parametrize("fields", [
    {"log_format": "plain text"},
    {"log_format": "{a} and {b!r} and {c:>5} and {d.name}", "a": 1, "b": "x", "c": 2.5,
     "d": _Thing()},
    {"log_format": "two\nlines {x}", "x": "y\nz"},
    {"log_format": "from {client}", "client": "[192.0.2.1]", "log_system": "smtp,1,::1"},
    {"log_format": "level", "log_level": LogLevel.warn},
    {"log_format": "missing {nothing}"},
    {"log_format": "call {d.call()}", "d": _Thing()},
    {"log_format": "failed {why}", "why": "x", "log_failure": _failure()},
    {"log_format": ""},
    {"log_format": "{a}", "a": ""},
    {"log_format": None},
])
def test_fast_lines_read_as_twisted_formats_them(fields: dict[str, Any]) -> None:
    """Every kind of event gives the same line (or none) as Twisted's classic formatter."""
    out, reactor = io.StringIO(), FakeReactor(running=False)
    e = event("", 1_700_000_000.25) | fields
    BatchedLogWriter(out, reactor)(e)
    expected = formatEventAsClassicLogText(e, formatTime=lambda t: formatTime(t, timeFormatRFC3339))
    assert out.getvalue() == (expected or "")


def test_written_at_once_while_no_reactor_runs() -> None:
    """Before the reactor runs and after it stopped, each line is written at once."""
    out, reactor = io.StringIO(), FakeReactor(running=False)
    BatchedLogWriter(out, reactor)(event("starting"))
    assert out.getvalue().endswith("starting\n")
    assert reactor.later == []


def test_a_large_batch_is_written_without_waiting() -> None:
    """Past MAX_BATCH_CHARS the batch is written at once, so a flood holds little memory."""
    out, reactor = CountingFile(), FakeReactor()
    writer = BatchedLogWriter(out, reactor)
    big = "x" * 1000
    for _ in range(MAX_BATCH_CHARS // 1000 + 1):
        writer(event(big))
    assert out.writes == 1
    assert len(out.getvalue()) >= MAX_BATCH_CHARS


def test_events_from_other_threads_schedule_through_call_from_thread() -> None:
    """An event logged in a disk thread asks the reactor thread to write, never callLater."""
    out, reactor = io.StringIO(), FakeReactor()
    writer = BatchedLogWriter(out, reactor)
    thread = threading.Thread(target=writer, args=(event("from a thread"),))
    thread.start()
    thread.join()
    assert reactor.later == [] and len(reactor.from_thread) == 1
    reactor.from_thread[0]()
    assert out.getvalue().endswith("from a thread\n")


def test_binary_log_file_gets_utf8() -> None:
    """twistd's LogFile takes bytes: the writer encodes, as twistd's observer does."""
    out, reactor = io.BytesIO(), FakeReactor(running=False)
    BatchedLogWriter(out, reactor)(event("grüße"))
    assert out.getvalue().decode("utf-8").endswith("grüße\n")


def test_a_failing_file_does_not_stop_the_server() -> None:
    """A write error (a full disk) is swallowed: logging never breaks mail handling."""

    class Full(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError(28, "No space left on device")

    writer = BatchedLogWriter(Full(), FakeReactor(running=False))
    writer(event("lost"))
    writer.flush()


def parse_twistd(argv: list[str], tmp_path: Path) -> ServerOptions:
    config = tmp_path / "mailsys.toml"
    config.write_text(Path("etc/mailsys.toml").read_text())
    options = ServerOptions()
    options.parseOptions([*argv, "mailsys", "--config", str(config)])
    return options


@pytest.mark.parametrize(
    ("argv", "path"),
    [(["-n"], None), (["-n", "--logfile", "-"], None), (["-n", "--logfile", "mail.log"],
                                                        "mail.log"), ([], "twistd.log")],
)
def test_twistd_mailsys_uses_the_writer(argv: list[str], path: str | None,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`twistd [opts] mailsys` gets the batched writer, aimed where twistd's options say."""
    monkeypatch.setattr(logwriter, "_destination", None)
    options = parse_twistd(argv, tmp_path)
    assert options["logger"] is logwriter.twistd_observer
    assert logwriter._destination == logwriter.Destination(path)


@pytest.mark.parametrize("argv", [["-n", "--syslog"],
                                  ["-n", "--logger", "twisted.logger.textFileLogObserver"],
                                  ["--logfile", "-"]])
def test_an_explicit_choice_wins(argv: list[str], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--syslog, --logger, and a daemon told to log to stdout are left to twistd."""
    monkeypatch.setattr(logwriter, "_destination", None)
    options = parse_twistd(argv, tmp_path)
    assert options["logger"] is not logwriter.twistd_observer
    assert logwriter._destination is None


def test_twisted_chatter_is_left_out() -> None:
    """Twisted's own start/stop lines (factories, datagram protocols, ports) are not written;
    our events, other Twisted lines and errors are."""
    with capturedLogs() as events:
        factory = Factory()
        factory.doStart()  # "Starting factory <...>"
        factory.doStop()
        protocol = DNSDatagramProtocol(None)
        protocol.doStart()  # "Starting protocol <...>"
        protocol.doStop()
        # What twisted.internet.tcp and udp Ports say on listening and on closing.
        legacy.msg("SMTPServerFactory starting on 2525")
        legacy.msg("DNSDatagramProtocol starting on 40123")
        legacy.msg("(UDP Port 40123 Closed)")
        legacy.msg("(TCP Port 2525 Closed)")
        chatter = len(events)
        legacy.msg("Received SIGTERM, shutting down.")
        legacy.err(ValueError("boom"), "starting on 1")
    assert chatter == 8
    out = io.StringIO()
    writer = BatchedLogWriter(out, FakeReactor(running=False))
    for e in [*events, event("listening on tcp:25")]:
        writer(e)
    lines = [line.split(" ", 2)[2] for line in out.getvalue().splitlines() if line[:1] != "\t"]
    assert lines[0] == "Received SIGTERM, shutting down."
    assert "starting on 1" in lines[1] and lines[-1] == "listening on tcp:25"
    assert not any("Starting" in line or "Stopping" in line or "Closed" in line for line in lines)


def test_json_format_is_one_object_per_line() -> None:
    """--log-format json writes each event as one JSON object on one line: time, level,
    namespace, the formatted text, a failure's traceback, the event's own fields and the
    format; a value JSON cannot hold is its repr."""
    out, reactor = io.StringIO(), FakeReactor(running=False)
    writer = BatchedLogWriter(out, reactor, logwriter.JSON)
    logger = Logger(namespace="mailsys.test", observer=writer)
    logger.info("queued {queue_id}\nsecond line", queue_id="Q1")
    try:
        raise ValueError("broken")
    except ValueError:
        logger.failure("delivery {queue_id} failed", queue_id="Q2")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["text"] == "queued Q1\nsecond line" and first["queue_id"] == "Q1"
    assert first["level"] == "info" and first["namespace"] == "mailsys.test"
    assert first["time"].startswith(time.strftime("%Y-"))
    assert first["log_format"] == "queued {queue_id}\nsecond line"
    assert "log_logger" not in first and "log_time" not in first
    assert second["level"] == "critical" and "ValueError: broken" in second["traceback"]


def test_json_values_json_cannot_hold_are_their_repr() -> None:
    """A field holding an object (a Failure's parts, an address) is written as its repr."""
    out = io.StringIO()
    BatchedLogWriter(out, FakeReactor(running=False), logwriter.JSON)(
        {**event("peer {peer}"), "peer": ("127.0.0.1", 25), "thing": object()})
    record = json.loads(out.getvalue())
    assert record["peer"] == ["127.0.0.1", 25] and record["thing"].startswith("<object")


def test_json_keys_of_ours_win_over_event_fields() -> None:
    """An event field named like one of ours (``text``) does not make a duplicate key."""
    out = io.StringIO()
    BatchedLogWriter(out, FakeReactor(running=False), logwriter.JSON)(
        {**event("said {text}"), "text": "hello"})
    line = out.getvalue()
    assert line.count('"text"') == 1 and json.loads(line)["text"] == "said hello"


def test_reopen_after_the_file_was_moved(tmp_path: Path) -> None:
    """reopen() writes what it holds, then continues in a new file of the same name (after
    logrotate moved the old one away)."""
    path = tmp_path / "mailsys.log"
    log_file = LogFile.fromFullPath(str(path))
    writer = BatchedLogWriter(log_file, FakeReactor(running=False))
    writer(event("before"))
    path.rename(tmp_path / "mailsys.log.1")
    writer.reopen()
    writer(event("after"))
    log_file.close()
    assert "before" in (tmp_path / "mailsys.log.1").read_text()
    assert "after" in path.read_text() and "before" not in path.read_text()


def test_log_format_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`twistd mailsys --log-format json` aims the writer's format; another word is refused."""
    monkeypatch.setattr(logwriter, "_destination", None)
    config = tmp_path / "mailsys.toml"
    config.write_text(Path("etc/mailsys.toml").read_text())
    options = ServerOptions()
    options.parseOptions(["-n", "mailsys", "--config", str(config), "--log-format", "json"])
    assert logwriter._destination == logwriter.Destination(None, logwriter.JSON)
    with pytest.raises(SystemExit) as exit_info:
        ServerOptions().parseOptions(["-n", "mailsys", "--config", str(config),
                                      "--log-format", "xml"])
    assert exit_info.value.code == 2


class ReenteringFile(io.StringIO):
    """A log file whose first write is interrupted by a line logged on the same thread, as a
    signal handler's would be."""

    def __init__(self) -> None:
        super().__init__()
        self.writer: BatchedLogWriter | None = None

    def write(self, s: str) -> int:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer(event("Received SIGTERM, shutting down."))
        return super().write(s)


def test_a_line_logged_while_a_batch_is_written_does_not_hang() -> None:
    """A line logged in the middle of a flush, on the same thread (a signal handler), is written
    and does not wait for the flush's own lock."""
    out, reactor = ReenteringFile(), FakeReactor(running=False)
    writer = BatchedLogWriter(out, reactor)
    out.writer = writer
    done = threading.Event()

    def log_one() -> None:
        writer(event("first line"))
        done.set()

    worker = threading.Thread(target=log_one, daemon=True)
    worker.start()
    assert done.wait(timeout=10), "the writer waited for its own lock"
    lines = out.getvalue()
    assert "first line" in lines and "Received SIGTERM" in lines
