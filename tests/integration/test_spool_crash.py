"""The spool under SIGKILL: every commit that was acknowledged is recovered intact, nothing half.

The writer also removes half of its messages once committed, so the files of removed messages are
being overwritten by new commits (the spool's free/ reuse) when the kill comes.
"""

from __future__ import annotations

import inspect
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from mailsys.queue.spool import Spool

ROOT = Path(__file__).resolve().parents[2]
KILL_AFTER = 200  # acknowledged commits before the SIGKILL
MAX_COMMITS = 20_000  # bounds the writer if the test never kills it
MAX_SECONDS = 60.0
CONCURRENCY = 16
DEADLINE = 60.0


def removed_after_commit(queue_id: str) -> bool:
    """Whether the writer removes this message once it is committed (half of them)."""
    return int(queue_id[-1], 16) % 2 == 0


def message_body(queue_id: str) -> bytes:
    """The bytes committed for ``queue_id``: derived from it, of varying size (up to ~20 KiB)."""
    line = f"X-Id: {queue_id}\r\n".encode()
    return b"Subject: crash test\r\n" + line * (1 + int(queue_id[-2:], 16) * 4) + b"\r\nbody\r\n"


WRITER = r'''
import sys
import time
from pathlib import Path

from twisted.internet import reactor

from mailsys.diskio import DiskPool
from mailsys.envelope import Envelope, Recipient, TargetKind
from mailsys.queue.spool import Spool

directory = Path(sys.argv[1])
limit, seconds, concurrency = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
pool = DiskPool(reactor, max_threads=16)
pool.start()
spool = Spool(directory, pool)
spool.recover()
deadline = time.monotonic() + seconds
state = {"started": 0, "active": 0}


def one():
    if state["started"] >= limit or time.monotonic() > deadline:
        if state["active"] == 0:
            pool.stop()
            reactor.stop()
        return
    state["started"] += 1
    state["active"] += 1
    queue_id = spool.new_queue_id()
    body = message_body(queue_id)
    envelope = Envelope(
        queue_id=queue_id,
        sender="load@sender.test",
        recipients=[Recipient("demo@example.test", "demo@example.test", TargetKind.LOCAL,
                              mailbox="demo@example.test")],
        received_at=time.time(),
        size=len(body),
    )

    def acknowledged(_):
        # Printed only now, after the Deferred fired: this is the "250 queued" moment.
        sys.stdout.write(queue_id + "\n")
        sys.stdout.flush()
        if removed_after_commit(queue_id):
            return spool.remove(queue_id).addCallback(next_one)
        next_one(None)

    def next_one(_):
        state["active"] -= 1
        one()

    def failed(failure):
        sys.stderr.write(failure.getTraceback())
        reactor.stop()

    spool.commit(envelope, body).addCallbacks(acknowledged, failed)


for _ in range(concurrency):
    reactor.callWhenRunning(one)
reactor.run()
'''


def read_acknowledged(proc: subprocess.Popen[bytes], wanted: int, deadline: float) -> bytes:
    """Read the writer's stdout until ``wanted`` complete lines arrived, it exited, or timeout."""
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    data = b""
    end = time.monotonic() + deadline
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while data.count(b"\n") < wanted:
            remaining = end - time.monotonic()
            if remaining <= 0:
                lines = data.count(b"\n")
                raise AssertionError(f"only {lines} commits acknowledged in {deadline}s")
            if selector.select(remaining):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break  # the writer exited
                data += chunk
    return data


def test_sigkill_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    """Every acknowledged, unremoved id is recovered with its exact bytes; tmp/ is empty."""
    directory = tmp_path / "spool"
    script = inspect.getsource(message_body) + inspect.getsource(removed_after_commit) + WRITER
    stderr_path = tmp_path / "writer.err"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(directory), str(MAX_COMMITS), str(MAX_SECONDS),
             str(CONCURRENCY)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        output = read_acknowledged(proc, KILL_AFTER, DEADLINE)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), True)
        output += proc.stdout.read()  # acknowledgements still in the pipe count too
        proc.wait(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, stderr_path.read_text()

    # Only complete lines: a line cut by the kill was never fully acknowledged to us.
    acknowledged = output.split(b"\n")[:-1]
    assert len(acknowledged) >= KILL_AFTER
    acknowledged_ids = {line.decode() for line in acknowledged}
    kept_ids = {i for i in acknowledged_ids if not removed_after_commit(i)}
    assert len(kept_ids) >= KILL_AFTER // 4

    spool = Spool(directory, pool=None)  # type: ignore[arg-type]  # recover() is blocking
    recovered = {envelope.queue_id: envelope for envelope in spool.recover()}
    try:
        assert kept_ids <= recovered.keys()
        # Also every removed message the kill brought back: its own bytes, never a reused file's.
        for queue_id, envelope in recovered.items():
            body = spool.message_path(queue_id).read_bytes()
            assert body == message_body(queue_id), queue_id
            assert envelope.size == len(body)
            assert [r.mailbox for r in envelope.recipients] == ["demo@example.test"]
        assert os.listdir(spool.tmp_dir) == [] and os.listdir(spool.free_dir) == []
        assert sorted(os.listdir(spool.queue_dir)) == sorted(
            f"{queue_id}{suffix}" for queue_id in recovered for suffix in (".env", ".msg")
        )
    finally:
        spool.close()
