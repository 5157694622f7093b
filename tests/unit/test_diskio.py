"""The disk pool: jobs in threads, urgent ones first, batches sharing one directory fsync."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailsys import diskio
from mailsys.diskio import DirectorySyncError, DiskPool, Staged, _DirectorySync, finish

DEADLINE = 10.0


class ThreadCallReactor:
    """Stands in for the reactor: calls from disk threads wait until the test runs them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.wakeups = 0

    def callFromThread(self, func: Callable[..., Any], *args: Any) -> None:  # noqa: N802
        with self._lock:
            self.calls.append((func, args))
            self.wakeups += 1

    def run_calls(self) -> None:
        with self._lock:
            calls, self.calls = self.calls, []
        for func, args in calls:
            func(*args)


class Outcomes:
    """Collects what Deferreds fired with."""

    def __init__(self) -> None:
        self.results: list[Any] = []

    def track(self, d: Deferred[Any]) -> None:
        d.addBoth(self.results.append)


def wait_until(reactor: ThreadCallReactor, done: Callable[[], bool]) -> None:
    """Run the reactor's calls until ``done()`` or the deadline."""
    end = time.monotonic() + DEADLINE
    while not done():
        assert time.monotonic() < end, "disk pool did not finish in time"
        reactor.run_calls()
        time.sleep(0.001)


@pytest.fixture
def reactor() -> ThreadCallReactor:
    return ThreadCallReactor()


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every directory fsync'd, in order (the real fsync still runs)."""
    synced: list[str] = []
    real = diskio.fsync_directory

    def recording(directory: str | Path) -> None:
        synced.append(str(directory))
        real(directory)

    monkeypatch.setattr(diskio, "fsync_directory", recording)
    return synced


@pytest.fixture
def stopped_pool(reactor: ThreadCallReactor) -> Iterator[DiskPool]:
    """A pool with one thread, not started yet: jobs submitted now make one batch."""
    pool = DiskPool(reactor, max_threads=1)  # type: ignore[arg-type]
    yield pool
    pool.stop()


def test_run_fires_with_the_result_on_the_reactor(reactor: ThreadCallReactor) -> None:
    """run() returns the function's result through callFromThread, or its exception."""
    pool = DiskPool(reactor, max_threads=2)  # type: ignore[arg-type]
    pool.start()
    try:
        outcomes = Outcomes()
        outcomes.track(pool.run(lambda a, b: a + b, 2, b=3))
        outcomes.track(pool.run(lambda: 1 / 0))
        wait_until(reactor, lambda: len(outcomes.results) == 2)
    finally:
        pool.stop()
    assert 5 in outcomes.results
    [failure] = [r for r in outcomes.results if isinstance(r, Failure)]
    assert failure.check(ZeroDivisionError)


def test_run_and_sync_fsyncs_the_directory_after_the_work(
    tmp_path: Path, reactor: ThreadCallReactor, syncs: list[str]
) -> None:
    """run_and_sync() fsyncs the directory after the function returned, before firing."""
    order: list[str] = []
    pool = DiskPool(reactor, max_threads=1)  # type: ignore[arg-type]
    pool.start()
    try:
        outcomes = Outcomes()

        def work() -> str:
            order.append(f"work, {len(syncs)} syncs")
            return "done"

        outcomes.track(pool.run_and_sync(tmp_path, work))
        wait_until(reactor, lambda: bool(outcomes.results))
    finally:
        pool.stop()
    assert order == ["work, 0 syncs"] and syncs == [str(tmp_path)]
    assert outcomes.results == ["done"]


def test_a_batch_shares_one_fsync_and_one_wakeup(
    tmp_path: Path, reactor: ThreadCallReactor, syncs: list[str], stopped_pool: DiskPool
) -> None:
    """Jobs waiting together are run as one batch: one fsync per directory, one wake-up."""
    other = tmp_path / "other"
    other.mkdir()
    outcomes = Outcomes()
    for n in range(5):
        outcomes.track(stopped_pool.run_and_sync(tmp_path, lambda n=n: n))
    outcomes.track(stopped_pool.run_and_sync(other, lambda: "other"))
    stopped_pool.start()
    wait_until(reactor, lambda: len(outcomes.results) == 6)
    assert outcomes.results == [0, 1, 2, 3, 4, "other"]
    assert sorted(syncs) == sorted([str(tmp_path), str(other)])
    assert reactor.wakeups == 1


def test_batched_jobs_share_the_batch_and_sync_nothing(
    tmp_path: Path, reactor: ThreadCallReactor, syncs: list[str], stopped_pool: DiskPool
) -> None:
    """run_batched() work runs in the batch of the syncing jobs, and no directory is synced
    for it."""
    outcomes = Outcomes()
    outcomes.track(stopped_pool.run_batched(lambda a: a * 2, 21))
    outcomes.track(stopped_pool.run_and_sync(tmp_path, lambda: "synced"))
    outcomes.track(stopped_pool.run_batched(lambda: 1 / 0))
    stopped_pool.start()
    wait_until(reactor, lambda: len(outcomes.results) == 3)
    assert outcomes.results[:2] == [42, "synced"]
    assert isinstance(outcomes.results[2], Failure)
    assert syncs == [str(tmp_path)] and reactor.wakeups == 1


def test_urgent_jobs_go_first(
    tmp_path: Path, reactor: ThreadCallReactor, stopped_pool: DiskPool
) -> None:
    """An urgent job submitted after others runs before them."""
    order: list[str] = []
    outcomes = Outcomes()
    outcomes.track(stopped_pool.run(order.append, "queued"))
    outcomes.track(stopped_pool.run_and_sync(tmp_path, order.append, "urgent", urgent=True))
    stopped_pool.start()
    wait_until(reactor, lambda: len(outcomes.results) == 2)
    assert order == ["urgent", "queued"]


def test_a_failing_job_is_not_synced_and_does_not_fail_the_others(
    tmp_path: Path, reactor: ThreadCallReactor, syncs: list[str], stopped_pool: DiskPool
) -> None:
    """A job that raises fails alone, with its own exception; its batch is still synced."""
    outcomes = Outcomes()

    def broken() -> None:
        raise OSError(28, "No space left on device")

    outcomes.track(stopped_pool.run_and_sync(tmp_path, broken))
    outcomes.track(stopped_pool.run_and_sync(tmp_path, lambda: "fine"))
    stopped_pool.start()
    wait_until(reactor, lambda: len(outcomes.results) == 2)
    failure, fine = outcomes.results
    assert isinstance(failure, Failure) and isinstance(failure.value, OSError)
    assert failure.value.errno == 28
    assert not failure.check(DirectorySyncError)
    assert fine == "fine" and syncs == [str(tmp_path)]


def test_a_failed_directory_fsync_fails_every_job_it_served(
    tmp_path: Path,
    reactor: ThreadCallReactor,
    stopped_pool: DiskPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the fsync fails, each job fails with DirectorySyncError carrying its own result."""

    def failing(directory: str | Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(diskio, "fsync_directory", failing)
    outcomes = Outcomes()
    outcomes.track(stopped_pool.run_and_sync(tmp_path, lambda: "first"))
    outcomes.track(stopped_pool.run_and_sync(tmp_path, lambda: "second"))
    stopped_pool.start()
    wait_until(reactor, lambda: len(outcomes.results) == 2)
    errors = [f.value for f in outcomes.results]
    assert all(isinstance(e, DirectorySyncError) and e.errno == 5 for e in errors)
    assert [e.result for e in errors] == ["first", "second"]
    assert errors[0].filename == str(tmp_path)


def test_sync_directory_alone(
    tmp_path: Path, reactor: ThreadCallReactor, syncs: list[str]
) -> None:
    """sync_directory() fsyncs the directory in a disk thread and fires with None."""
    pool = DiskPool(reactor, max_threads=1)  # type: ignore[arg-type]
    pool.start()
    try:
        outcomes = Outcomes()
        outcomes.track(pool.sync_directory(tmp_path))
        wait_until(reactor, lambda: bool(outcomes.results))
    finally:
        pool.stop()
    assert outcomes.results == [None] and syncs == [str(tmp_path)]


def test_long_jobs_run_side_by_side(reactor: ThreadCallReactor) -> None:
    """Jobs from run() each get a thread: two that wait for each other both finish."""
    pool = DiskPool(reactor, max_threads=2, name="auth")  # type: ignore[arg-type]
    pool.start()
    try:
        both = threading.Barrier(2, timeout=DEADLINE)
        outcomes = Outcomes()
        outcomes.track(pool.run(both.wait))
        outcomes.track(pool.run(both.wait))
        wait_until(reactor, lambda: len(outcomes.results) == 2)
    finally:
        pool.stop()
    assert sorted(outcomes.results) == [0, 1]


def test_a_commit_does_not_wait_behind_long_jobs(
    tmp_path: Path, reactor: ThreadCallReactor
) -> None:
    """Once the pool syncs directories, long jobs leave a thread free for urgent work."""
    pool = DiskPool(reactor, max_threads=2)  # type: ignore[arg-type]
    pool.start()
    release = threading.Event()
    try:
        outcomes = Outcomes()
        outcomes.track(pool.run_and_sync(tmp_path, lambda: "first"))
        wait_until(reactor, lambda: outcomes.results == ["first"])
        blocked = Outcomes()
        for _ in range(2):
            blocked.track(pool.run(release.wait, DEADLINE))
        outcomes.track(pool.run_and_sync(tmp_path, lambda: "commit", urgent=True))
        wait_until(reactor, lambda: len(outcomes.results) == 2)
        assert outcomes.results == ["first", "commit"] and blocked.results == []
    finally:
        release.set()
        pool.stop()


def test_at_most_two_threads_run_batches(tmp_path: Path, reactor: ThreadCallReactor) -> None:
    """However many threads the pool has, jobs that sync directories run in at most two."""
    pool = DiskPool(reactor, max_threads=8)  # type: ignore[arg-type]
    lock = threading.Lock()
    running = [0]
    most = [0]

    def job() -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1

    pool.start()
    try:
        outcomes = Outcomes()
        for n in range(60):
            outcomes.track(pool.run_and_sync(tmp_path, job, urgent=n % 3 == 0))
        wait_until(reactor, lambda: len(outcomes.results) == 60)
    finally:
        pool.stop()
    assert outcomes.results == [None] * 60
    assert 1 <= most[0] <= 2


def test_stop_lets_queued_work_finish(reactor: ThreadCallReactor) -> None:
    """stop() returns after the jobs submitted before it have run."""
    pool = DiskPool(reactor, max_threads=2)  # type: ignore[arg-type]
    ran: list[int] = []
    for n in range(20):
        pool.run(ran.append, n)
    pool.start()
    pool.stop()
    assert sorted(ran) == list(range(20))
    assert not pool.started


def test_a_sync_arriving_during_an_fsync_waits_for_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fsync running may predate a caller's rename: the caller waits for a new one, and
    callers arriving meanwhile share that one."""
    started = threading.Event()
    release = threading.Event()
    calls: list[str] = []

    def slow(directory: str | Path) -> None:
        calls.append("fsync")
        if len(calls) == 1:
            started.set()
            assert release.wait(DEADLINE)

    monkeypatch.setattr(diskio, "fsync_directory", slow)
    sync = _DirectorySync(str(tmp_path))
    first = threading.Thread(target=sync.sync)
    first.start()
    assert started.wait(DEADLINE)
    late = [threading.Thread(target=sync.sync) for _ in range(3)]
    for thread in late:
        thread.start()
    time.sleep(0.05)  # let them queue behind the fsync in flight
    assert calls == ["fsync"]
    release.set()
    for thread in [first, *late]:
        thread.join(DEADLINE)
    assert calls == ["fsync", "fsync"]


def test_directory_sync_reports_its_failure_to_each_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed group fsync raises OSError, naming the directory, in every caller it served."""

    def failing(directory: str | Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(diskio, "fsync_directory", failing)
    with pytest.raises(OSError) as info:
        _DirectorySync(str(tmp_path)).sync()
    assert info.value.errno == 5 and info.value.filename == str(tmp_path)


def _staged_writer(path: Path, events: list[str]) -> Callable[[], Staged[str]]:
    """A job writing ``path`` and staging it, recording each step in ``events``."""

    def job() -> Staged[str]:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, b"data")
        events.append(f"write {path.name}")

        def publish() -> str:
            events.append(f"publish {path.name}")
            return path.name

        return Staged([fd], publish, lambda: events.append(f"discard {path.name}"))

    return job


def test_staged_jobs_of_a_batch_sync_their_data_together_then_publish(
    tmp_path: Path, reactor: ThreadCallReactor, syncs: list[str], stopped_pool: DiskPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every staged job of a batch writes first; then each file is fdatasync'd (writeback
    started for all before the first); then each is published; then the directory is synced
    once, and each Deferred fires with what publishing returned."""
    events: list[str] = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(diskio, "_start_writeback", lambda fd: events.append("writeback"))

    def fdatasync(fd: int) -> None:
        events.append(f"fdatasync, {len(syncs)} dir syncs")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    outcomes = Outcomes()
    for name in ("a", "b", "c"):
        outcomes.track(stopped_pool.run_and_sync(tmp_path, _staged_writer(tmp_path / name, events),
                                                 urgent=True))
    stopped_pool.start()
    wait_until(reactor, lambda: len(outcomes.results) == 3)
    assert outcomes.results == ["a", "b", "c"]
    assert events == (["write a", "write b", "write c"] + ["writeback"] * 3
                      + ["fdatasync, 0 dir syncs"] * 3 + ["publish a", "publish b", "publish c"])
    assert syncs == [str(tmp_path)]


def test_a_staged_job_whose_data_cannot_be_synced_fails_alone_and_is_discarded(
    tmp_path: Path, reactor: ThreadCallReactor, stopped_pool: DiskPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If one file's fdatasync fails, that job is discarded (never published) and fails with
    the error; the others of the batch are published."""
    events: list[str] = []
    real_fdatasync = os.fdatasync
    bad: list[int] = []

    def fdatasync(fd: int) -> None:
        if fd in bad:
            raise OSError(5, "Input/output error")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    good_job = _staged_writer(tmp_path / "good", events)
    bad_job = _staged_writer(tmp_path / "bad", events)

    def failing_job() -> Staged[str]:
        staged = bad_job()
        bad.extend(staged.fds)
        return staged

    outcomes = Outcomes()
    outcomes.track(stopped_pool.run_and_sync(tmp_path, failing_job))
    outcomes.track(stopped_pool.run_and_sync(tmp_path, good_job))
    stopped_pool.start()
    wait_until(reactor, lambda: len(outcomes.results) == 2)
    failure, good = outcomes.results
    assert isinstance(failure, Failure) and failure.check(OSError)
    assert good == "good"
    assert "discard bad" in events and "publish bad" not in events
    assert "publish good" in events


def test_finish_syncs_closes_and_publishes_one_staged_job(tmp_path: Path) -> None:
    """finish() does for one job, on the calling thread, what the pool does for a batch."""
    events: list[str] = []
    staged = _staged_writer(tmp_path / "one", events)()
    fd = staged.fds[0]
    assert finish(staged) == "one"
    assert events == ["write one", "publish one"]
    with pytest.raises(OSError):
        os.fstat(fd)  # closed
