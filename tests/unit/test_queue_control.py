"""Queue tools: the runner's hold/release/flush/delete, the control directory a running server
watches, direct edits of a stopped server's spool under its lock, and `mailsys queue` output."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailsys import cli
from mailsys.envelope import Attempt, Envelope, Recipient, RecipientStatus, TargetKind
from mailsys.ownership import resolve_account
from mailsys.queue import control
from mailsys.queue.control import (
    CONTROL_DIR,
    CONTROL_SOCKET,
    ControlConnection,
    ControlWatcher,
    QueueToolError,
    list_envelopes,
    load_envelope,
    run_command,
    spool_lock,
)
from mailsys.queue.runner import QueueRunner
from mailsys.queue.spool import Spool
from mailsys.replies import Reply
from tests.unit.test_runner import FakeAgent
from tests.unit.test_spool import ImmediateDiskPool

START = 1_700_000_000.0
DEFERRED = RecipientStatus.DEFERRED


def deferred_envelope(queue_id: str) -> Envelope:
    r = Recipient(address="bob@remote.test", original="bob@remote.test", kind=TargetKind.RELAY)
    r.record(Attempt(START, DEFERRED, "mx.remote.test[192.0.2.1]:25",
                     Reply(451, "4.4.1", "refused")),
             START + 600)
    return Envelope(queue_id=queue_id, sender="alice@example.test", recipients=[r],
                    received_at=START, size=11)


@pytest.fixture
def stopped(tmp_path: Path) -> Path:
    """A spool with two deferred messages and no server (the lock released)."""
    spool = Spool(tmp_path / "spool", ImmediateDiskPool())  # type: ignore[arg-type]
    spool.recover()
    for queue_id in ("A1", "B2"):
        spool.commit(deferred_envelope(queue_id), b"Subject: x\r\n\r\nbody\r\n")
    spool.close()
    return tmp_path / "spool"


# --- no server: direct edits under the lock -----------------------------------------------------


def test_offline_hold_release_flush_delete(stopped: Path) -> None:
    """Without a server the tool edits the envelopes itself, atomically."""
    assert run_command(stopped, "hold", "A1").message == "A1: held"
    assert load_envelope(stopped, "A1").held
    assert run_command(stopped, "flush", None).message.startswith("1 message(s): due now")
    assert load_envelope(stopped, "B2").recipients[0].next_attempt is None
    assert load_envelope(stopped, "A1").recipients[0].next_attempt == START + 600  # held
    assert run_command(stopped, "release", "A1").ok
    assert not load_envelope(stopped, "A1").held
    assert run_command(stopped, "delete", "B2").ok
    assert [e.queue_id for e in list_envelopes(stopped)] == ["A1"]
    assert not (stopped / "queue" / "B2.msg").exists()
    assert list((stopped / "tmp").iterdir()) == []


def test_offline_unknown_id(stopped: Path) -> None:
    """An id that is not queued is one clear error; a malformed one too."""
    with pytest.raises(QueueToolError, match="no message NOPE in the queue"):
        run_command(stopped, "hold", "NOPE")
    with pytest.raises(QueueToolError, match="not a queue id"):
        run_command(stopped, "delete", "../x")


def test_offline_edits_hold_the_lock(stopped: Path) -> None:
    """While the tool holds the spool lock a server cannot take the spool."""
    with spool_lock(stopped) as locked:
        assert locked
        spool = Spool(stopped, ImmediateDiskPool())  # type: ignore[arg-type]
        with pytest.raises(Exception, match="in use by another process"):
            spool.recover()


# --- a running server: the control directory ----------------------------------------------------


class Server:
    """A spool owned by a runner (lock held), with a watcher polled by the test's thread."""

    def __init__(self, directory: Path) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.pool = ImmediateDiskPool()
        self.spool = Spool(directory, self.pool)  # type: ignore[arg-type]
        self.agent = FakeAgent(self.clock)
        self.agent.default = DEFERRED
        self.runner = QueueRunner(self.spool, {TargetKind.RELAY: self.agent}, self.clock)
        self.runner.load(self.spool.recover())
        self.runner.startService()
        self.watcher = ControlWatcher(directory, self.runner, self.pool)  # type: ignore[arg-type]

    def command(self, action: str, queue_id: str | None) -> Any:
        """Run the tool in a thread (it blocks waiting for the answer) while we poll."""
        box: list[Any] = []
        tool = threading.Thread(target=lambda: box.append(_outcome(action, queue_id, self)))
        tool.start()
        end = time.monotonic() + 10
        while tool.is_alive() and time.monotonic() < end:
            self.watcher.poll()
            self.clock.advance(0)
            time.sleep(0.01)
        tool.join(5)
        assert box, "the tool did not finish"
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def close(self) -> None:
        self.runner.stopService()
        self.spool.close()


def _outcome(action: str, queue_id: str | None, server: Server) -> Any:
    try:
        return run_command(server.spool.directory, action, queue_id, deadline=5)
    except Exception as exc:
        return exc


@pytest.fixture
def running(stopped: Path) -> Iterator[Server]:
    server = Server(stopped)
    server.clock.advance(0)
    yield server
    server.close()


def test_running_server_applies_commands(running: Server) -> None:
    """With the lock taken, the tool's command goes through control/ to the runner, which
    writes the envelope; the tool prints the server's answer."""
    assert running.runner.envelope("A1") is not None
    outcome = running.command("hold", "A1")
    assert (outcome.ok, outcome.message) == (True, "A1: held")
    assert load_envelope(running.spool.directory, "A1").held
    assert running.runner.envelope("A1").held  # type: ignore[union-attr]
    calls = len(running.agent.calls)
    assert running.command("flush", None).message == "1 message(s): due now"
    running.clock.advance(0)
    assert [c.queue_id for c in running.agent.calls[calls:]] == ["B2"]  # A1 is held
    assert running.command("release", "A1").ok
    assert running.command("delete", "B2").message == "B2: deleted"
    assert [e.queue_id for e in list_envelopes(running.spool.directory)] == ["A1"]
    assert len(running.runner) == 1
    assert list((running.spool.directory / CONTROL_DIR).iterdir()) == []


def test_running_server_unknown_id(running: Server) -> None:
    """The server answers that it does not know the id."""
    outcome = running.command("hold", "NOPE")
    assert (outcome.ok, outcome.message) == (False, "no message NOPE in the queue")


def test_no_answer_withdraws_the_command(stopped: Path) -> None:
    """A lock held by something that does not answer: the command is withdrawn, nothing
    changes, and the tool says so."""
    with spool_lock(stopped):
        box: list[Any] = []

        def tool() -> None:
            try:
                run_command(stopped, "hold", "A1", deadline=0.3)
            except QueueToolError as exc:
                box.append(exc)

        # flock is per open file: another open of the lock file in this process conflicts.
        thread = threading.Thread(target=tool)
        thread.start()
        thread.join(5)
    assert box and "did not take the hold command" in str(box[0])
    assert list((stopped / CONTROL_DIR).iterdir()) == []
    assert not load_envelope(stopped, "A1").held


def test_malformed_command_is_refused(running: Server) -> None:
    """A command file that is not a command gets a refusal, not a crash."""
    control = running.spool.directory / CONTROL_DIR
    control.mkdir(exist_ok=True)
    (control / "X.cmd").write_text("{not json")
    running.watcher.poll()
    reply = json.loads((control / "X.reply").read_text())
    assert reply["ok"] is False and reply["message"].startswith("refused")


# --- the runner's operations while a round runs -------------------------------------------------


def test_hold_and_delete_during_a_round(running: Server) -> None:
    """hold and delete while a delivery is in flight take effect when the round ends."""
    agent, runner = running.agent, running.runner
    agent.default = None  # answers wait for the test
    runner.flush()
    running.clock.advance(0)
    waiting = {c.queue_id: c for c in agent.waiting}
    assert set(waiting) == {"A1", "B2"}
    assert running.runner.hold("A1").result is True  # type: ignore[attr-defined]
    running.runner.delete("B2")
    agent.answer(waiting["A1"], DEFERRED)
    agent.answer(waiting["B2"], DEFERRED)
    assert load_envelope(running.spool.directory, "A1").held
    assert [e.queue_id for e in list_envelopes(running.spool.directory)] == ["A1"]
    assert len(runner) == 1


def test_delete_while_the_round_rewrites_the_envelope(running: Server,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete that arrives while the end of a round rewrites the envelope removes the
    message once the rewrite is done (it is not rescheduled and kept)."""
    agent, runner, spool = running.agent, running.runner, running.spool
    agent.default = None
    real_update = spool.update
    pending: list[tuple[Deferred[None], Any]] = []

    def slow_update(envelope: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        pending.append((d, envelope))
        return d

    monkeypatch.setattr(spool, "update", slow_update)
    runner.flush()
    running.clock.advance(0)
    waiting = {c.queue_id: c for c in agent.waiting}
    agent.answer(waiting["B2"], DEFERRED)
    assert [envelope.queue_id for _, envelope in pending] == ["B2"]
    assert runner.delete("B2").result is True  # type: ignore[attr-defined]
    written, envelope = pending.pop()
    real_update(envelope).addCallback(written.callback)
    assert [e.queue_id for e in list_envelopes(spool.directory)] == ["A1"]
    assert runner.envelope("B2") is None


# --- mailsys queue ------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdin", io.StringIO(""))
        status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def config(stopped: Path, tmp_path: Path) -> Path:
    path = tmp_path / "mailsys.toml"
    path.write_text(f'[storage]\nspool = "{stopped}"\n')
    return path


def test_queue_list(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """queue list: id, age, size and sender, then each recipient's status, attempts, next
    attempt and last error."""
    status, out, _ = run_cli(capsys, "queue", "list", "--config", str(config))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("A1  ") and lines[0].endswith("<alice@example.test>")
    assert lines[1].strip().startswith("<bob@remote.test>  deferred  attempts=1  next=")
    assert lines[1].endswith("last=451 4.4.1 refused")
    assert lines[-1] == "2 messages in the queue"


def test_queue_show(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """queue show: the envelope, every attempt and the message's header."""
    status, out, _ = run_cli(capsys, "queue", "show", "A1", "--config", str(config))
    assert status == 0
    assert "queue id:     A1" in out and "sender:       <alice@example.test>" in out
    assert "deferred mx.remote.test[192.0.2.1]:25" in out and "451 4.4.1 refused" in out
    assert out.rstrip().endswith("Subject: x")


def test_queue_list_and_show_a_recipient_waiting_for_relay(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A recipient held back because relay is disabled shows its next check and the reason."""
    spool = Spool(tmp_path / "spool", ImmediateDiskPool())  # type: ignore[arg-type]
    spool.recover()
    clock = Clock()
    clock.advance(time.time())
    runner = QueueRunner(spool, {TargetKind.LOCAL: FakeAgent(clock)}, clock)
    runner.startService()
    r = Recipient(address="x@far.test", original="x@far.test", kind=TargetKind.RELAY)
    envelope = Envelope(queue_id="W1", sender="demo@example.test", recipients=[r],
                        received_at=clock.seconds(), size=11)
    spool.commit(envelope, b"Subject: x\r\n\r\nbody\r\n")
    runner.enqueue(envelope)
    runner.stopService()
    spool.close()
    config = tmp_path / "mailsys.toml"
    config.write_text(f'[storage]\nspool = "{tmp_path / "spool"}"\n')
    status, out, _ = run_cli(capsys, "queue", "list", "--config", str(config))
    assert status == 0
    line = out.splitlines()[1].strip()
    assert line.startswith("<x@far.test>  deferred  attempts=1  next=in ")
    assert "last=451 4.3.2 Relay disabled" in line
    status, out, _ = run_cli(capsys, "queue", "show", "W1", "--config", str(config))
    assert status == 0
    assert "  next        " in out and "451 4.3.2 Relay disabled" in out


def test_queue_changes_and_errors(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """hold prints what was done; an unknown id is one line on stderr and status 1."""
    assert run_cli(capsys, "queue", "hold", "A1", "--config", str(config))[:2] == (
        0, "A1: held\n")
    status, out, err = run_cli(capsys, "queue", "delete", "ZZ", "--config", str(config))
    assert (status, out, err) == (1, "", "mailsys: no message ZZ in the queue\n")


# --- the control socket -------------------------------------------------------------------------


def test_tool_talks_to_the_server_over_its_socket_and_writes_nothing(running: Server) -> None:
    """With a server listening on control.sock, the tool's command goes over the socket, is
    applied by the runner and answered; no control file is written (a full disk is no bar)."""
    path = running.spool.directory / CONTROL_SOCKET
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(10)
    box: list[Any] = []
    tool = threading.Thread(target=lambda: box.append(_outcome("hold", "A1", running)))
    tool.start()
    try:
        connection, _ = listener.accept()
        with connection:
            data = b""
            while not data.endswith(b"\n"):
                data += connection.recv(4096)
            protocol = ControlConnection(running.runner)
            transport = StringTransport()
            protocol.makeConnection(transport)
            protocol.dataReceived(data)
            running.clock.advance(0)
            connection.sendall(transport.value())
            assert transport.disconnecting
    finally:
        tool.join(10)
        listener.close()
    assert (box[0].ok, box[0].message) == (True, "A1: held")
    assert running.runner.envelope("A1").held  # type: ignore[union-attr]
    assert not (running.spool.directory / CONTROL_DIR).exists()


def test_full_spool_without_a_socket_fails_with_one_line(
    running: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running server whose socket cannot be reached, on a full spool: the tool says in one
    line what to do, and leaves no file behind."""

    def full(path: Any, data: Any, mode: int = 0o600) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(control, "write_file_synced", full)
    with pytest.raises(QueueToolError) as refused:
        run_command(running.spool.directory, "flush", None, deadline=1)
    message = str(refused.value)
    assert "\n" not in message and "is full" in message and "free some space" in message
    assert list((running.spool.directory / CONTROL_DIR).iterdir()) == []


def test_full_spool_without_a_server_fails_with_one_line(
    stopped: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server and a full spool: the direct edit fails with one line saying what to do."""

    def full(path: Any, data: Any, mode: int = 0o600) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(control, "write_file_synced", full)
    with pytest.raises(QueueToolError, match=r"is full .* free some space"):
        run_command(stopped, "hold", "A1")
    assert not load_envelope(stopped, "A1").held


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving files to another account needs root (CI runs as root)")


def _owner(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, st.st_mode & 0o777


@needs_root
def test_offline_rewrite_as_root_keeps_the_envelope_owner(stopped: Path) -> None:
    """Root editing a stopped server's spool keeps each envelope's owner and mode, and what
    it creates (tmp/, the lock) goes to the server's account."""
    account = resolve_account("nobody")
    assert account is not None
    envelope = stopped / "queue" / "A1.env"
    os.chown(envelope, account.uid, account.gid)
    (stopped / "lock").unlink()
    shutil.rmtree(stopped / "tmp")
    assert run_command(stopped, "hold", "A1", account=account).ok
    assert load_envelope(stopped, "A1").held
    assert _owner(envelope) == (account.uid, account.gid, 0o600)
    assert _owner(stopped / "lock")[:2] == (account.uid, account.gid)
    assert _owner(stopped / "tmp")[:2] == (account.uid, account.gid)


@needs_root
def test_command_files_are_handed_to_the_servers_account(stopped: Path) -> None:
    """Root's command file for a running server belongs to the server's account, which can then
    read it; control/ made by the tool is the account's too."""
    account = resolve_account("nobody")
    assert account is not None
    seen: list[tuple[int, int, int]] = []
    with spool_lock(stopped):

        def tool() -> None:
            with contextlib.suppress(QueueToolError):
                run_command(stopped, "hold", "A1", deadline=2, account=account)

        thread = threading.Thread(target=tool)
        thread.start()
        end = time.monotonic() + 5
        while not seen and time.monotonic() < end:
            for path in (stopped / CONTROL_DIR).glob("*.cmd"):
                with contextlib.suppress(FileNotFoundError):
                    seen.append(_owner(path))
            time.sleep(0.01)
        thread.join(5)
    assert seen and seen[0] == (account.uid, account.gid, 0o600)
    assert _owner(stopped / CONTROL_DIR)[:2] == (account.uid, account.gid)
