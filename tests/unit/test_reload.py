"""The running configuration's reload (mailsys.reload): a good file reaches every part, a broken
one changes nothing and is one log line, what needs a restart is named."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import provider

from mailsys.config import Config, ConfigError
from mailsys.reload import ReloadResult, RunningConfig, needs_restart
from mailsys.testing import make_config


class Inline:
    """A DiskRunner that runs the work at once, or holds it until ``release`` when told."""

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.held: list[Deferred[None]] = []

    def run(self, fn: Any, *args: Any) -> Deferred[Any]:
        if not self.hold:
            return maybeDeferred(fn, *args)
        gate: Deferred[None] = Deferred()
        self.held.append(gate)
        return gate.addCallback(lambda _: fn(*args))


def _result(d: Deferred[ReloadResult]) -> ReloadResult:
    results: list[ReloadResult] = []
    d.addCallback(results.append)
    assert results, "the reload did not finish"
    return results[0]


def _errors() -> tuple[list[LogEvent], Any]:
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "mailsys.reload":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    return events, observe


def test_good_file_reaches_every_part() -> None:
    """A good file becomes ``current`` and is handed to each part in order."""
    old = make_config("mx.example.test")
    new = make_config("mx.example.test", smtp={"max_recipients": 7})
    running = RunningConfig(old, lambda: new, Inline())
    seen: list[tuple[str, Config]] = []
    running.follow("a", lambda config: seen.append(("a", config)))
    running.follow("b", lambda config: seen.append(("b", config)))
    result = _result(running.reload())
    assert result.ok and result.needs_restart == ()
    assert running.current is new
    assert seen == [("a", new), ("b", new)]


def test_broken_file_changes_nothing_and_logs_one_line() -> None:
    """A file that does not load keeps the running configuration, calls no part but those
    reading files of their own (with the running configuration), and is one error line with
    the file, the key and the reason."""
    old = make_config("mx.example.test")

    def read() -> Config:
        raise ConfigError(Path("/etc/mailsys.toml"), "smtp.max_recipients",
                          "must be a positive integer, got -5")

    running = RunningConfig(old, read, Inline())
    called: list[Config] = []
    files: list[Config] = []
    running.follow("a", called.append)
    running.follow("certificate", files.append, files=True)
    events, observer = _errors()
    try:
        result = _result(running.reload())
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not result.ok
    assert "smtp.max_recipients" in result.message
    assert running.current is old and called == []
    assert files == [old]  # files of its own (a renewed certificate) are still read again
    assert len(events) == 1
    assert events[0]["error"].startswith("/etc/mailsys.toml: smtp.max_recipients: must be")


def test_a_part_that_fails_does_not_stop_the_others() -> None:
    """A part that raises is logged and named in the result; the parts after it still run."""
    old = make_config("mx.example.test")
    new = make_config("mx.example.test", smtp={"max_recipients": 7})
    running = RunningConfig(old, lambda: new, Inline())
    called: list[Config] = []

    def broken(config: Config) -> None:
        raise RuntimeError("no")

    running.follow("broken", broken)
    running.follow("after", called.append)
    result = _result(running.reload())
    assert not result.ok and "broken" in result.message
    assert called == [new]


def test_overlapping_reloads_share_one_read() -> None:
    """A reload asked for while one runs gets the running one's result."""
    old = make_config("mx.example.test")
    reads: list[int] = []

    def read() -> Config:
        reads.append(1)
        return old

    disk = Inline(hold=True)
    running = RunningConfig(old, read, disk)
    first, second = running.reload(), running.reload()
    assert len(disk.held) == 1
    disk.held[0].callback(None)
    assert _result(first) == _result(second)
    assert reads == [1]


def test_listener_and_storage_changes_need_a_restart() -> None:
    """A changed endpoint, storage path or relay switch is named; limits and routing are not."""
    old = make_config("mx.example.test", smtp={"listen": ("tcp:25",)})
    new = make_config("mx.example.test", smtp={"listen": ("tcp:2525",), "max_recipients": 5},
                      routing={"local_domains": ("other.test",)})
    assert needs_restart(old, new) == ["listener smtp.listen (tcp:25 -> tcp:2525)"]
    moved = replace(old, storage=replace(old.storage, spool=Path("/elsewhere")),
                    relay=replace(old.relay, enabled=not old.relay.enabled))
    assert needs_restart(old, moved) == ["[storage]", "relay.enabled"]
    keys = replace(old, authn=replace(old.authn, key_dir=Path("/keys")))
    assert needs_restart(old, keys) == []  # the signing keys are read again
    policies = replace(old, authn=replace(old.authn, dmarc="reject"))
    assert needs_restart(old, policies) == ["[authn] checks and their policies"]
