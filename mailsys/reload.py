"""The running configuration and its reload without a restart (SIGHUP, `mailsys reload`).

``RunningConfig`` holds the configuration the server runs with. A reload reads the file again
in a disk thread; a file that does not load (syntax, a bad value, a missing certificate) leaves
the running configuration as it is and is logged as one line naming the file, the key and the
reason. A good one replaces the running one in a single step on the reactor thread: each part
of the server that takes part (the router, every listener's factory, the relay, the queue
runner, the TLS certificate, the DKIM keys, the user file) is handed the new configuration by
the function it registered, one after the other, with no reactor turn in between. A session
that is already open keeps the configuration it started with; the next one sees the new one.
Nothing is closed, nothing queued is touched.

What a running process cannot take over (a listener's endpoint, where the spool or the
mailboxes are, the account it runs as) is logged as needing a restart, and the rest applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsys.config import LISTENER_KEYS, Config, ConfigError
from mailsys.diskio import DiskRunner

log = Logger(namespace="mailsys.reload")

# Sections whose every value is taken at start-up only: paths of what the process owns, its
# account, what the journey writes to.
RESTART_SECTIONS = ("server", "storage", "pickup", "journey", "dev", "web")
# Single values taken at start-up only: whether the relay, the TLS certificate or the inbound
# checks exist at all decides which parts are built.
RESTART_KEYS = (("relay", "enabled"), ("authn", "checks"), ("authn", "sign"),
                ("authn", "dns_servers"), ("relay", "dns_servers"), ("relay", "delay_warning"))
# Of [authn], a reload takes the signing keys (key_dir, selectors); the checks' policies, the
# authserv-id and the DNS timeout are built into the checks at start-up.
AUTHN_RELOADED = ("key_dir", "selectors")


@dataclasses.dataclass(frozen=True)
class ReloadResult:
    """What a reload did: whether the new configuration runs, and one line saying so."""

    ok: bool
    message: str
    needs_restart: tuple[str, ...] = ()


Apply = Callable[[Config], object]


class RunningConfig:
    """The configuration the server runs with (``current``) and the parts that follow it.

    ``read`` loads the file (blocking; run in a disk thread by ``disk``).
    """

    def __init__(self, config: Config, read: Callable[[], Config], disk: DiskRunner) -> None:
        self.current = config
        self._read = read
        self._disk = disk
        self._parts: list[tuple[str, Apply]] = []
        # Parts that read files of their own (certificate, keys, users): read again with the
        # running configuration when a new file is refused, so a renewed certificate is still
        # taken up by the SIGHUP its renewal hook sends.
        self._file_parts: list[tuple[str, Apply]] = []
        self._running: list[Deferred[ReloadResult]] | None = None

    def follow(self, name: str, apply: Apply, *, files: bool = False) -> None:
        """Call ``apply(new_config)`` on every successful reload; ``name`` is for the log.
        With ``files``, also ``apply(current)`` when the new file is refused."""
        self._parts.append((name, apply))
        if files:
            self._file_parts.append((name, apply))

    def reload(self) -> Deferred[ReloadResult]:
        """Read the file again and use it if it is good; never fails.

        A reload asked for while one runs waits for it and gets its result: two SIGHUPs in a
        row read the file once more at most, never twice at the same time.
        """
        waiting: Deferred[ReloadResult] = Deferred()
        if self._running is not None:
            self._running.append(waiting)
            return waiting
        self._running = [waiting]
        d: Deferred[Any] = self._disk.run(self._read)
        d.addCallbacks(self._use, self._refused)
        d.addErrback(self._failed)
        d.addCallback(self._answer)
        return waiting

    def _answer(self, result: ReloadResult) -> None:
        waiting, self._running = self._running or [], None
        for each in waiting:
            each.callback(result)

    def _refused(self, failure: Failure) -> ReloadResult:
        failure.trap(ConfigError)
        error = str(failure.value)
        log.error("configuration not reloaded, the running one stays: {error}", error=error)
        self._apply(self._file_parts, self.current)
        return ReloadResult(False, f"not reloaded: {error}")

    def _apply(self, parts: list[tuple[str, Apply]], config: Config) -> list[str]:
        """Hand ``config`` to each part; the names of those that raised (logged)."""
        failed = []
        for name, apply in parts:
            try:
                apply(config)
            except Exception:
                log.failure("configuration reload: {part} could not take the new values",
                            part=name)
                failed.append(name)
        return failed

    def _failed(self, failure: Failure) -> ReloadResult:
        log.failure("configuration reload failed; the running one stays", failure)
        return ReloadResult(False, "not reloaded: internal error (see the server log)")

    def _use(self, new: Config) -> ReloadResult:
        old = self.current
        restart = tuple(needs_restart(old, new))
        for what in restart:
            log.warn("configuration: {what} changed; that takes a restart, the running value "
                     "stays until then", what=what)
        self.current = new
        failed = self._apply(self._parts, new)
        changed = changed_sections(old, new)
        log.info("configuration reloaded from {path}: {changed}", path=str(new.path),
                 changed=", ".join(changed) if changed else "nothing changed")
        message = f"reloaded {new.path}"
        if restart:
            message += f"; needs a restart: {', '.join(restart)}"
        if failed:
            return ReloadResult(False, message + f"; not applied to {', '.join(failed)} "
                                "(see the server log)", restart)
        return ReloadResult(True, message, restart)


def changed_sections(old: Config, new: Config) -> list[str]:
    """The names of the sections whose values differ, in file order."""
    return [field.name for field in dataclasses.fields(Config)
            if field.name != "path" and getattr(old, field.name) != getattr(new, field.name)]


def needs_restart(old: Config, new: Config) -> list[str]:
    """What changed between ``old`` and ``new`` that a running server cannot take over."""
    found: list[str] = []
    for section, key in LISTENER_KEYS:
        before: Any = getattr(getattr(old, section), key)
        after: Any = getattr(getattr(new, section), key)
        if before != after:
            found.append(f"listener {section}.{key} ({_endpoints(before)} -> {_endpoints(after)})")
    for section in RESTART_SECTIONS:
        if getattr(old, section) != getattr(new, section):
            found.append(f"[{section}]")
    for section, key in RESTART_KEYS:
        if getattr(getattr(old, section), key, None) != getattr(getattr(new, section), key, None):
            found.append(f"{section}.{key}")
    if (old.tls.certificate is None) != (new.tls.certificate is None):
        found.append("tls.certificate (TLS on or off)")
    authn_changed = any(
        getattr(old.authn, field.name) != getattr(new.authn, field.name)
        for field in dataclasses.fields(old.authn) if field.name not in AUTHN_RELOADED)
    if authn_changed and not any(key.startswith("authn.") for key in found):
        found.append("[authn] checks and their policies")
    return found


def _endpoints(descriptions: Any) -> str:
    return ", ".join(descriptions) if descriptions else "none"
