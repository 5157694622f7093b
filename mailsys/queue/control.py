"""Queue tools: list, show, flush, hold, release and delete queued messages, whether a server
runs or not, without ever corrupting the spool.

Two paths, chosen by the spool lock (mailsys.queue.spool holds it while a server runs):

- **A server runs** (the lock is taken): the tool connects to the server's unix socket
  ``control.sock`` in the spool directory and sends one JSON line; the server applies it through
  the QueueRunner, which owns every envelope it holds, and answers with one JSON line. This needs
  no free space at all, so the tools work on a full spool, when they are needed most. Where the
  socket cannot be reached (a server of an older version, a path too long for a socket), the
  tool writes a command file into ``control/`` instead (written aside, then renamed: the server
  never reads half a command); the server's ``ControlWatcher`` looks there once a second and
  answers with a reply file next to it. Only the runner writes envelopes.
- **No server runs**: the tool takes the spool lock itself (so a server cannot start meanwhile)
  and edits the envelope files the way the spool does: a new file in tmp/, fsync, rename over
  the old one, fsync of queue/.

Run as root, the tool gives what it creates (command files, control/, the lock, the spool
directories) to the server's account and keeps the owner of every envelope it rewrites
(mailsys.ownership), so that a server running as that account can use them.

Listing and showing only read committed envelopes, which are always complete files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from typing_extensions import override

from mailsys.diskio import DiskRunner, fsync_directory, is_no_space, write_file_synced
from mailsys.envelope import Envelope
from mailsys.ownership import (
    ServerAccount,
    hand_over,
    make_directory,
    match_owner,
    open_lock_file,
)
from mailsys.queue.spool import ENVELOPE_SUFFIX, MESSAGE_SUFFIX, decode_envelope, encode_envelope

log = Logger(namespace="mailsys.queue.control")

CONTROL_DIR = "control"
CONTROL_SOCKET = "control.sock"
# Linux's sun_path holds 108 bytes with the terminating NUL.
SOCKET_PATH_MAX = 107
COMMAND_SUFFIX = ".cmd"
REPLY_SUFFIX = ".reply"
ACTIONS = ("flush", "hold", "release", "delete")
# Not a queue action: read the configuration again (mailsys.reload), asked by `mailsys reload`.
RELOAD = "reload"
# How long a tool waits for a running server's answer (it looks once a second).
REPLY_DEADLINE = 15.0
# Replies nobody collected (the tool was interrupted) are removed after this long.
STALE_AFTER = 3600.0


class QueueToolError(ValueError):
    """A queue tool failure, one line for the administrator."""


@dataclass(frozen=True)
class Outcome:
    """What a command did: success and a one-line message."""

    ok: bool
    message: str

    def to_json(self) -> bytes:
        return json.dumps({"ok": self.ok, "message": self.message}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Outcome:
        raw = json.loads(data)
        return cls(bool(raw["ok"]), str(raw["message"]))


# -- the spool lock ------------------------------------------------------------------------------


@contextlib.contextmanager
def spool_lock(spool: Path, account: ServerAccount | None = None) -> Iterator[bool]:
    """Yield True holding the spool's lock (no server runs), or False if a server holds it."""
    make_directory(spool, account)
    fd = open_lock_file(spool / "lock", account)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# -- reading (safe at any time) ------------------------------------------------------------------


def queued_ids(spool: Path) -> list[str]:
    try:
        names = os.listdir(spool / "queue")
    except FileNotFoundError:
        return []
    return sorted(n[: -len(ENVELOPE_SUFFIX)] for n in names if n.endswith(ENVELOPE_SUFFIX))


def load_envelope(spool: Path, queue_id: str) -> Envelope:
    """One committed envelope; QueueToolError if there is none."""
    _check_id(queue_id)
    try:
        data = (spool / "queue" / (queue_id + ENVELOPE_SUFFIX)).read_bytes()
    except FileNotFoundError:
        raise QueueToolError(f"no message {queue_id} in the queue") from None
    return decode_envelope(data, queue_id)


def list_envelopes(spool: Path) -> list[Envelope]:
    """Every readable committed envelope, oldest first (gone or unreadable ones skipped)."""
    found = []
    for queue_id in queued_ids(spool):
        try:
            found.append(load_envelope(spool, queue_id))
        except (QueueToolError, OSError, ValueError):
            continue
    found.sort(key=lambda e: (e.received_at, e.queue_id))
    return found


def _check_id(queue_id: str) -> None:
    if not queue_id or not queue_id.isalnum():
        raise QueueToolError(f"not a queue id: {queue_id!r}")


# -- changing: the tool's side -------------------------------------------------------------------


def run_command(spool: Path, action: str, queue_id: str | None,
                deadline: float = REPLY_DEADLINE, account: ServerAccount | None = None) -> Outcome:
    """Apply ``action`` (flush, hold, release, delete) to one message (or, for flush, all):
    through the running server, or directly when none runs."""
    if action not in ACTIONS:
        raise QueueToolError(f"unknown action {action!r}")
    if queue_id is not None:
        _check_id(queue_id)
    elif action != "flush":
        raise QueueToolError(f"{action} needs a queue id")
    with spool_lock(spool, account) as locked:
        if locked:
            try:
                return apply_offline(spool, action, queue_id, account)
            except OSError as exc:
                if is_no_space(exc):
                    raise QueueToolError(
                        f"the spool file system is full ({spool}): free some space on it, "
                        f"or start the server (it needs none for {action}), then retry"
                    ) from None
                raise
    command = json.dumps({"action": action, "queue_id": queue_id}).encode()
    answer = _ask_socket(spool, command, deadline)
    if answer is not None:
        return answer
    return _ask_server(spool, action, queue_id, command, deadline, account)


def _ask_socket(spool: Path, command: bytes, deadline: float) -> Outcome | None:
    """The running server's answer through its control socket; None if there is no socket to
    talk to (then the tool falls back to a command file)."""
    path = os.fspath(spool / CONTROL_SOCKET)
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(deadline)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None  # no server listening there (an old socket file, or none)
        except PermissionError:
            raise QueueToolError(
                f"no permission to use {path}: run the queue command as root or as a member "
                "of the mail server's group") from None
        try:
            sock.sendall(command + b"\r\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise QueueToolError(
                f"the server did not answer on {path} within {deadline:g}s") from None
    if not data.strip():
        raise QueueToolError(f"the server closed {path} without an answer (see its log)")
    return Outcome.from_json(data)


def _ask_server(spool: Path, action: str, queue_id: str | None, command: bytes,
                deadline: float, account: ServerAccount | None = None) -> Outcome:
    control = spool / CONTROL_DIR
    name = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
    tmp = control / f".{name}.tmp"
    try:
        make_directory(control, account)
        write_file_synced(tmp, command)
        hand_over(tmp, account)  # the server must read it, and may remove it
        os.rename(tmp, control / (name + COMMAND_SUFFIX))
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_no_space(exc):
            raise QueueToolError(
                f"the spool file system is full ({spool}) and the server's control socket "
                f"{spool / CONTROL_SOCKET} does not answer: free some space on it, or restart "
                "the server (it opens the socket at start-up), then retry") from None
        raise
    reply = control / (name + REPLY_SUFFIX)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            data = reply.read_bytes()
        except FileNotFoundError:
            time.sleep(0.05)
            continue
        with contextlib.suppress(FileNotFoundError):
            reply.unlink()
        return Outcome.from_json(data)
    # Withdraw the command if the server has not taken it; if it has, it will still act.
    try:
        (control / (name + COMMAND_SUFFIX)).unlink()
    except FileNotFoundError:
        raise QueueToolError(
            f"the server took the {action} command but did not answer within {deadline:g}s"
        ) from None
    raise QueueToolError(f"the server did not take the {action} command within {deadline:g}s "
                         "(is it running?); nothing was changed")


# -- changing: no server runs --------------------------------------------------------------------


def apply_offline(spool: Path, action: str, queue_id: str | None,
                  account: ServerAccount | None = None) -> Outcome:
    """Edit the spool directly; the caller holds the spool lock."""
    queue = spool / "queue"
    if action == "delete":
        assert queue_id is not None
        load_envelope(spool, queue_id)
        # The envelope first: a message without envelope is cleaned up at start-up.
        for suffix in (ENVELOPE_SUFFIX, MESSAGE_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(queue / (queue_id + suffix))
        fsync_directory(queue)
        return Outcome(True, f"{queue_id}: deleted")
    targets = [queue_id] if queue_id is not None else queued_ids(spool)
    changed = 0
    for one in targets:
        envelope = load_envelope(spool, one)
        if action == "hold":
            envelope.held = True
        elif action == "release":
            envelope.held = False
        else:  # flush: due now, for the next start
            if envelope.held:
                continue
            for recipient in envelope.open_recipients():
                recipient.next_attempt = None
        _rewrite(spool, envelope, account)
        changed += 1
    if changed:
        fsync_directory(queue)
    what = queue_id or f"{changed} message(s)"
    done = {"hold": "held", "release": "released",
            "flush": "due now; delivered when the server starts"}[action]
    return Outcome(True, f"{what}: {done}")


def _rewrite(spool: Path, envelope: Envelope, account: ServerAccount | None = None) -> None:
    """Replace one envelope as the spool does: tmp/, fsync, rename (queue/ synced by caller)."""
    tmp = spool / "tmp" / f"{envelope.queue_id}{ENVELOPE_SUFFIX}.tool{os.getpid()}"
    make_directory(spool / "tmp", account)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    write_file_synced(tmp, encode_envelope(envelope))
    target = spool / "queue" / (envelope.queue_id + ENVELOPE_SUFFIX)
    if not target.exists():
        tmp.unlink()
        raise QueueToolError(f"no message {envelope.queue_id} in the queue")
    match_owner(tmp, target)
    os.replace(tmp, target)


# -- the server's side ---------------------------------------------------------------------------


Reload = Callable[[], Deferred[Outcome]]


def request_reload(spool: Path, deadline: float = REPLY_DEADLINE,
                   account: ServerAccount | None = None) -> Outcome:
    """Ask the server running on ``spool`` to read its configuration again; its answer.

    Through the control socket, else a command file: the same way as the queue commands, so
    the same people may (root and the server's group) and it reaches the one process that
    holds the spool, with its answer (reloaded, or why not) coming back to the tool. A signal
    to a process found by a pid file could neither say whether the file was good nor be sure
    the pid is still the server's.
    """
    with spool_lock(spool, account) as locked:
        if locked:
            raise QueueToolError(f"no server is running on the spool {spool}; the configuration "
                                 "is read when it starts")
    command = json.dumps({"action": RELOAD}).encode()
    answer = _ask_socket(spool, command, deadline)
    if answer is not None:
        return answer
    return _ask_server(spool, RELOAD, None, command, deadline, account)


class QueueControl(Protocol):
    """What the watcher asks of the runner (mailsys.queue.runner.QueueRunner)."""

    def flush(self, queue_id: str | None = None) -> int: ...

    def hold(self, queue_id: str) -> Deferred[bool]: ...

    def release(self, queue_id: str) -> Deferred[bool]: ...

    def delete(self, queue_id: str) -> Deferred[bool]: ...


class ControlWatcher:
    """Applies the queue tools' command files to the running queue (``poll`` on a timer)."""

    def __init__(self, spool: Path, runner: QueueControl, disk: DiskRunner,
                 reload: Reload | None = None) -> None:
        self._control = spool / CONTROL_DIR
        self._runner = runner
        self._disk = disk
        self._reload = reload
        self._busy = False

    def poll(self) -> Deferred[None]:
        """Look for commands once; overlapping calls are skipped."""
        if self._busy:
            return succeed(None)
        self._busy = True
        d: Deferred[list[tuple[str, bytes | None]]] = self._disk.run(_take_commands, self._control)
        d.addCallback(self._apply_all)
        d.addErrback(lambda f: log.failure("queue control failed", f))

        def idle(_: object) -> None:
            self._busy = False

        return d.addBoth(idle)

    def _apply_all(self, commands: list[tuple[str, bytes | None]]) -> Deferred[None] | None:
        if not commands:
            return None
        return Deferred.fromCoroutine(self._run_all(commands))

    async def _run_all(self, commands: list[tuple[str, bytes | None]]) -> None:
        for name, data in commands:
            outcome = await self._apply(data)
            log.info("queue control {name}: {message}", name=name, message=outcome.message)
            await self._disk.run(_answer, self._control, name, outcome)

    def _apply(self, data: bytes | None) -> Deferred[Outcome]:
        return apply_command(self._runner, data, self._reload)


def apply_command(runner: QueueControl, data: bytes | None,
                  reload: Reload | None = None) -> Deferred[Outcome]:
    """Apply one command (a JSON document) to the running queue, or reload the configuration;
    never fails.

    One body for the socket and the command files.
    """
    try:
        if data is None:
            raise ValueError("unreadable command")
        raw = json.loads(data)
        action, queue_id = raw["action"], raw.get("queue_id")
        if action == RELOAD:
            if reload is None:
                return succeed(Outcome(False, "this server does not reload its configuration"))
            return reload()
        if action not in ACTIONS or (queue_id is None and action != "flush"):
            raise ValueError(f"bad command {raw!r}")
    except (ValueError, KeyError, TypeError) as exc:
        return succeed(Outcome(False, f"refused: {exc}"))
    if action == "flush":
        count = runner.flush(queue_id)
        if queue_id is not None and count == 0:
            return succeed(Outcome(False, f"no message {queue_id} to flush (held or gone)"))
        return succeed(Outcome(True, f"{queue_id or f'{count} message(s)'}: due now"))
    operation = {"hold": runner.hold, "release": runner.release,
                 "delete": runner.delete}[action]
    done = {"hold": "held", "release": "released", "delete": "deleted"}[action]
    d: Deferred[bool] = maybeDeferred(operation, queue_id)

    def answered(found: bool) -> Outcome:
        if not found:
            return Outcome(False, f"no message {queue_id} in the queue")
        return Outcome(True, f"{queue_id}: {done}")

    def failed(failure: Failure) -> Outcome:
        log.failure("queue control {action} {queue_id}", failure, action=action,
                    queue_id=queue_id)
        return Outcome(False, f"{queue_id}: {action} failed (see the server log)")

    return d.addCallbacks(answered, failed)


def _take_commands(control: Path) -> list[tuple[str, bytes | None]]:
    """Disk thread: read and remove the pending command files, oldest first; drop stale
    replies. Creates control/ on first use."""
    try:
        entries = sorted(os.listdir(control))
    except FileNotFoundError:
        with contextlib.suppress(OSError):  # a full disk: tools use the socket meanwhile
            control.mkdir(mode=0o700, exist_ok=True)
        return []
    now = time.time()
    commands: list[tuple[str, bytes | None]] = []
    for entry in entries:
        path = control / entry
        if entry.endswith(COMMAND_SUFFIX):
            try:
                data: bytes | None = path.read_bytes()
            except OSError:
                data = None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            commands.append((entry[: -len(COMMAND_SUFFIX)], data))
        elif entry.endswith((REPLY_SUFFIX, ".tmp")):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_AFTER:
                    path.unlink()
    return commands


def _answer(control: Path, name: str, outcome: Outcome) -> None:
    """Disk thread: write the reply aside, then rename it into place (read whole or not at all)."""
    tmp = control / f".{name}.reply.tmp"
    try:
        write_file_synced(tmp, outcome.to_json())
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
        tmp.unlink()
        write_file_synced(tmp, outcome.to_json())
    os.rename(tmp, control / (name + REPLY_SUFFIX))


# -- the server's side: the control socket -------------------------------------------------------


class ControlConnection(LineOnlyReceiver):
    """One tool's connection: one JSON command line in, one JSON outcome line out, closed."""

    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, runner: QueueControl, reload: Reload | None = None) -> None:
        self._runner = runner
        self._reload = reload
        self._busy = False

    @override
    def lineReceived(self, line: bytes) -> None:
        if self._busy:
            return
        self._busy = True
        d = apply_command(self._runner, line.strip(), self._reload)

        def answer(outcome: Outcome) -> None:
            log.info("queue control (socket): {message}", message=outcome.message)
            if self.transport is not None:
                self.transport.write(outcome.to_json() + b"\n")
                self.transport.loseConnection()

        d.addCallback(answer)
        d.addErrback(lambda f: log.failure("queue control (socket) failed", f))

    @override
    def lineLengthExceeded(self, line: bytes) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class ControlSocketFactory(Factory):
    """Builds a ControlConnection per tool connection."""

    noisy = False

    def __init__(self, runner: QueueControl, reload: Reload | None = None) -> None:
        self._runner = runner
        self._reload = reload

    @override
    def buildProtocol(self, addr: Any) -> ControlConnection:
        return ControlConnection(self._runner, self._reload)


class ControlSocketService(Service):
    """Listens on ``<spool>/control.sock`` while the server runs.

    Started after the spool is recovered (so this process holds the spool lock, and a socket
    file left there is a dead server's, safe to replace). The socket is mode 0660: root and,
    with ``group`` (a gid), the members of the mail server's group may use the queue tools.
    ``group`` is the hook for a configured server group: pass its gid here.
    """

    def __init__(self, spool: Path, runner: QueueControl, reactor: Any,
                 group: int | None = None, reload: Reload | None = None) -> None:
        self.path = Path(spool) / CONTROL_SOCKET
        self._factory = ControlSocketFactory(runner, reload)
        self._reactor = reactor
        self._group = group
        self._port: IListeningPort | None = None

    @override
    def startService(self) -> None:
        Service.startService(self)
        path = os.fspath(self.path)
        if len(os.fsencode(path)) > SOCKET_PATH_MAX:
            log.warn("control socket path {path} is too long for a unix socket; queue tools "
                     "will use command files", path=path)
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._port = self._reactor.listenUNIX(path, self._factory, mode=0o660,
                                                  wantPID=False)
            if self._group is not None:
                os.chown(path, -1, self._group)
        except Exception as exc:  # the server runs on without it: tools fall back to files
            log.error("cannot open the control socket {path}: {error}; queue tools will use "
                      "command files", path=path, error=exc)

    @override
    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        stopping: Deferred[object] = maybeDeferred(port.stopListening)

        def remove(result: object) -> None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

        return stopping.addBoth(remove)
