"""The durable spool: commit, update, remove and start-up recovery."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailsys.diskio import DirectorySyncError, DiskPool, Staged, finish
from mailsys.envelope import Attempt, Envelope, Recipient, RecipientStatus, TargetKind
from mailsys.interfaces import ISpool
from mailsys.queue import spool as spool_module
from mailsys.queue.spool import Spool, SpoolLockedError, encode_envelope
from mailsys.replies import Reply


class ImmediateDiskPool:
    """A DiskPool that runs disk work at once on the calling thread: logic tests need no reactor.

    Directory syncs are recorded; with ``hold_syncs`` they wait until ``release_syncs()``, so a
    test can see what happens before and after the group commit. ``fail_syncs`` makes them fail.
    ``run_and_sync`` is work then sync, as in the real pool; ``urgent`` records its flag.
    """

    def __init__(self) -> None:
        self.synced: list[Path] = []
        self.hold_syncs = False
        self.fail_syncs: Exception | None = None
        self.urgent: list[bool] = []
        self._held: list[Deferred[None]] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            result = func(*args, **kwargs)
            if isinstance(result, Staged):  # what the real pool does with a batch of one
                result = finish(result)
            return succeed(result)
        except BaseException:
            return fail(Failure())

    def run_batched(self, func: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self.run(func, *args)

    def run_and_sync(
        self, directory: str | Path, func: Callable[..., Any], *args: Any, urgent: bool = False
    ) -> Deferred[Any]:
        """The work at once, then the directory sync as sync_directory() does it."""
        self.urgent.append(urgent)
        d = self.run(func, *args)

        def sync(result: Any) -> Deferred[Any]:
            synced = self.sync_directory(directory)

            def failed(failure: Failure) -> Failure:
                cause = failure.value
                assert isinstance(cause, OSError)
                error = DirectorySyncError(cause.errno, cause.strerror, directory)
                error.result = result
                return Failure(error)

            return synced.addCallbacks(lambda _: result, failed)

        return d.addCallback(sync)

    def sync_directory(self, directory: str | Path) -> Deferred[None]:
        self.synced.append(Path(directory))
        if self.fail_syncs is not None:
            return fail(self.fail_syncs)
        if self.hold_syncs:
            d: Deferred[None] = Deferred()
            self._held.append(d)
            return d
        return succeed(None)

    def release_syncs(self) -> None:
        held, self._held = self._held, []
        for d in held:
            d.callback(None)


def make_envelope(
    queue_id: str, *recipients: Recipient, received_at: float = 1_700_000_000.0
) -> Envelope:
    if not recipients:
        recipients = (local_recipient("alice@example.test"),)
    return Envelope(
        queue_id=queue_id,
        sender="bob@sender.test",
        recipients=list(recipients),
        received_at=received_at,
        size=10,
    )


def local_recipient(address: str, mailbox: str | None = None) -> Recipient:
    return Recipient(
        address=address, original=address, kind=TargetKind.LOCAL, mailbox=mailbox or address
    )


def relay_recipient(address: str) -> Recipient:
    return Recipient(address=address, original=address, kind=TargetKind.RELAY)


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must already have fired successfully."""
    results: list[Any] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "Deferred has not fired"
    return results[0]


def failure_of(d: Deferred[Any]) -> Failure:
    """The Failure of a Deferred that must already have failed."""
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "Deferred did not fail"
    return failures[0]


def make_temp_dir(case: unittest.TestCase) -> Path:
    """A fresh directory removed after the test (trial's mktemp() would write under the cwd)."""
    path = Path(tempfile.mkdtemp(prefix="mailsys-test-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path / "d"


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


@pytest.fixture
def pool() -> ImmediateDiskPool:
    return ImmediateDiskPool()


@pytest.fixture
def spool(tmp_path: Path, pool: ImmediateDiskPool) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", pool)  # type: ignore[arg-type]
    s.recover()
    yield s
    s.close()


def test_provides_ispool(spool: Spool) -> None:
    """Spool provides ISpool."""
    assert verifyObject(ISpool, spool)


def test_queue_ids_are_unique_safe_and_time_sorted(spool: Spool) -> None:
    """Queue ids are unique, upper-case hex of fixed width, and sort in the order they were made."""
    ids = [spool.new_queue_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9A-F]{19}", i) for i in ids)
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)


def test_commit_writes_both_files_and_fires_only_after_directory_sync(
    spool: Spool, pool: ImmediateDiskPool
) -> None:
    """commit() puts <id>.msg and <id>.env in queue/ and fires only after queue/ is fsync'd."""
    pool.hold_syncs = True
    envelope = make_envelope("A1")
    d = spool.commit(envelope, b"Subject: hi\r\n\r\nbody\r\n")
    fired: list[object] = []
    d.addCallback(fired.append)
    assert files(spool.queue_dir) == ["A1.env", "A1.msg"]
    assert fired == []
    assert pool.synced == [spool.queue_dir]
    pool.release_syncs()
    assert fired == [None]
    assert files(spool.tmp_dir) == []
    assert spool.message_path("A1").read_bytes() == b"Subject: hi\r\n\r\nbody\r\n"
    assert spool.load("A1") == envelope


def test_envelope_json_round_trips_every_field(spool: Spool) -> None:
    """A committed envelope reads back equal, recipients, attempts and parameters included."""
    recipient = local_recipient("alice@example.test")
    recipient.notify = ("SUCCESS", "FAILURE")
    recipient.record(
        Attempt(at=5.0, status=RecipientStatus.DEFERRED, host="maildir",
                reply=Reply(451, "", "x")),
        65.0,
    )
    envelope = make_envelope("B1", recipient, relay_recipient("x@remote.test"))
    envelope.smtputf8 = True
    envelope.envid = "xyz"
    envelope.sender = "bøb@sender.test"
    result_of(spool.commit(envelope, b"x"))
    assert spool.load("B1") == envelope


def test_failure_writing_the_envelope_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If writing the envelope fails, the message file is removed too and commit fails."""
    real = spool_module._write_new

    def failing(path: str, data: bytes) -> int:
        if str(path).endswith(".env"):
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(spool_module, "_write_new", failing)
    f = failure_of(spool.commit(make_envelope("C1"), b"data"))
    assert isinstance(f.value, OSError)
    assert files(spool.tmp_dir) == [] and files(spool.queue_dir) == []


def test_failure_renaming_the_envelope_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the commit rename fails after the message was renamed, both files are removed."""
    real = os.rename

    def failing(src: Any, dst: Any) -> None:
        if str(dst).endswith(".env"):
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    failure_of(spool.commit(make_envelope("C2"), b"data"))
    assert files(spool.tmp_dir) == [] and files(spool.queue_dir) == []


def test_failed_directory_sync_removes_the_committed_files(
    spool: Spool, pool: ImmediateDiskPool
) -> None:
    """If the queue/ fsync fails, the message is not acknowledged and not left to be delivered."""
    pool.fail_syncs = OSError(5, "Input/output error")
    failure_of(spool.commit(make_envelope("C3"), b"data"))
    assert files(spool.tmp_dir) == [] and files(spool.queue_dir) == []


def test_only_the_commit_is_urgent(spool: Spool, pool: ImmediateDiskPool) -> None:
    """A commit goes before queued disk work (a client waits for its 250); an update does not,
    and a removal syncs nothing."""
    envelope = make_envelope("C5")
    result_of(spool.commit(envelope, b"data"))
    result_of(spool.update(envelope))
    result_of(spool.remove("C5"))
    assert pool.urgent == [True, False]
    assert pool.synced == [spool.queue_dir, spool.queue_dir]


def test_failed_write_is_not_mistaken_for_a_failed_sync(
    spool: Spool, pool: ImmediateDiskPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit whose write fails is not synced, and fails with the write's own error."""

    def failing(path: str, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module, "_write_new", failing)
    f = failure_of(spool.commit(make_envelope("C6"), b"data"))
    assert isinstance(f.value, OSError) and f.value.errno == 28
    assert pool.synced == [] and files(spool.queue_dir) == []


def test_commit_never_touches_another_writers_temp_file(spool: Spool) -> None:
    """A colliding temp file (same id) makes commit fail without deleting the other file."""
    (spool.tmp_dir / "C4.msg").write_bytes(b"someone else's")
    failure_of(spool.commit(make_envelope("C4"), b"data"))
    assert (spool.tmp_dir / "C4.msg").read_bytes() == b"someone else's"
    assert files(spool.queue_dir) == []


def test_update_replaces_the_envelope_atomically(spool: Spool, pool: ImmediateDiskPool) -> None:
    """update() rewrites <id>.env through a synced temp file and a rename, then syncs queue/."""
    envelope = make_envelope("D1")
    result_of(spool.commit(envelope, b"data"))
    inode = spool.envelope_path("D1").stat().st_ino
    envelope.recipients[0].record(
        Attempt(at=1.0, status=RecipientStatus.DEFERRED, host="h", reply=Reply(451, "", "")), 61.0
    )
    pool.synced.clear()
    result_of(spool.update(envelope))
    assert spool.load("D1") == envelope
    assert spool.envelope_path("D1").stat().st_ino != inode  # a new file, renamed in
    assert pool.synced == [spool.queue_dir]
    assert files(spool.tmp_dir) == []


def test_failed_update_keeps_the_old_envelope(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while writing the new envelope leaves the old one intact and no temp file."""
    envelope = make_envelope("D2")
    result_of(spool.commit(envelope, b"data"))
    before = spool.envelope_path("D2").read_bytes()

    def failing(path: Path, data: Any, mode: int = 0o600) -> None:
        Path(path).write_bytes(data[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module, "write_file_synced", failing)
    envelope.held = True
    failure_of(spool.update(envelope))
    assert spool.envelope_path("D2").read_bytes() == before
    assert files(spool.tmp_dir) == []


def test_update_does_not_resurrect_a_removed_message(spool: Spool) -> None:
    """update() of a message no longer in the spool fails instead of writing a lone envelope."""
    envelope = make_envelope("D3")
    result_of(spool.commit(envelope, b"data"))
    result_of(spool.remove("D3"))
    assert isinstance(failure_of(spool.update(envelope)).value, FileNotFoundError)
    assert files(spool.queue_dir) == []


def test_remove_takes_the_envelope_before_the_message(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """remove() moves <id>.env out first, so an interrupted removal never leaves a lone envelope."""
    result_of(spool.commit(make_envelope("E1"), b"data"))
    order: list[str] = []
    real = os.rename

    def spy(src: Any, dst: Any) -> None:
        order.append(os.path.basename(src))
        real(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    result_of(spool.remove("E1"))
    assert order == ["E1.env", "E1.msg"]
    assert files(spool.queue_dir) == []
    result_of(spool.remove("E1"))  # removing twice is harmless


def test_removed_files_are_overwritten_by_a_later_commit(spool: Spool) -> None:
    """A removed message's files are reused in place (no new inodes), with the new bytes only,
    once the next commit's fsync of queue/ has made their removal durable."""
    result_of(spool.commit(make_envelope("E2"), b"a much longer first message" * 100))
    inodes = {spool.message_path("E2").stat().st_ino, spool.envelope_path("E2").stat().st_ino}
    result_of(spool.remove("E2"))
    assert len(files(spool.free_dir)) == 2
    result_of(spool.commit(make_envelope("E1"), b"x"))
    assert len(files(spool.free_dir)) == 2  # the commit that synced their move used new files
    envelope = make_envelope("E3")
    result_of(spool.commit(envelope, b"short"))
    assert files(spool.free_dir) == [] and files(spool.tmp_dir) == []
    assert spool.message_path("E3").read_bytes() == b"short"
    assert spool.load("E3") == envelope
    assert {spool.message_path("E3").stat().st_ino, spool.envelope_path("E3").stat().st_ino} == (
        inodes
    )


FLOOR = 1024 * 1024  # the free-space floor of the spools that keep blocks: bound 1 MiB
PLENTY = 3 * FLOOR  # free space at which they keep blocks (twice the floor, plus the bound)


@pytest.fixture
def keeping(tmp_path: Path, pool: ImmediateDiskPool) -> Iterator[Spool]:
    """A spool with a free-space floor that has seen plenty of free space: it keeps blocks."""
    s = Spool(tmp_path / "spool", pool, floor=FLOOR)  # type: ignore[arg-type]
    s.recover()
    s.free_space_seen(PLENTY)
    yield s
    s.close()


def spy_on_ftruncate(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths every os.ftruncate from now on is asked for (the call still happens)."""
    truncated: list[int] = []
    real = os.ftruncate

    def spy(fd: int, length: int) -> None:
        truncated.append(length)
        real(fd, length)

    monkeypatch.setattr(os, "ftruncate", spy)
    return truncated


def held_on_disk(spool: Spool) -> int:
    """Bytes of data blocks the files in free/ hold, as the file system counts them."""
    return sum(os.stat(spool.free_dir / n).st_blocks * 512 for n in files(spool.free_dir))


def test_files_kept_for_reuse_hold_no_data_without_a_floor(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a free-space floor, remove() truncates the files it keeps in free/ (the server
    cannot tell when space is scarce), so a commit over them needs no ftruncate."""
    truncated = spy_on_ftruncate(monkeypatch)
    spool.free_space_seen(1 << 40)
    result_of(spool.commit(make_envelope("E4"), b"x" * 100_000))
    result_of(spool.remove("E4"))
    assert [os.stat(spool.free_dir / n).st_size for n in files(spool.free_dir)] == [0, 0]
    assert held_on_disk(spool) == 0 and spool.held_bytes == 0
    result_of(spool.commit(make_envelope("E1"), b"s" * 100))  # its sync frees E4's files
    result_of(spool.commit(make_envelope("E6"), b"z" * 50))
    assert truncated == []
    assert spool.message_path("E6").read_bytes() == b"z" * 50


def test_files_kept_for_reuse_keep_their_blocks(
    keeping: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With space to spare, remove() keeps each file's data blocks, counted exactly; a commit of
    the same sizes overwrites them in place (same inodes, no ftruncate, no new blocks), the
    envelope over the envelope and the message over the message."""
    spool = keeping
    truncated = spy_on_ftruncate(monkeypatch)
    result_of(spool.commit(make_envelope("E4"), b"x" * 100_000))
    inodes = {spool.message_path("E4").stat().st_ino: "msg",
              spool.envelope_path("E4").stat().st_ino: "env"}
    result_of(spool.remove("E4"))
    assert sorted(os.stat(spool.free_dir / n).st_size for n in files(spool.free_dir))[1] == (
        100_000)
    assert spool.held_bytes == held_on_disk(spool) >= 100_000
    result_of(spool.commit(make_envelope("E1"), b"s" * 100))  # its sync frees E4's files
    result_of(spool.commit(make_envelope("E6"), b"z" * 100_000))
    assert truncated == [] and spool.held_bytes == 0
    assert spool.message_path("E6").read_bytes() == b"z" * 100_000
    assert spool.load("E6") == make_envelope("E6")
    assert inodes == {spool.message_path("E6").stat().st_ino: "msg",
                      spool.envelope_path("E6").stat().st_ino: "env"}


def test_kept_blocks_are_bounded_in_bytes(keeping: Spool) -> None:
    """The blocks kept never pass the bound (the floor here): a removed file that would pass it
    is truncated and keeps only its inode."""
    spool = keeping
    for queue_id in ("E4", "E5", "E6"):
        result_of(spool.commit(make_envelope(queue_id), b"x" * 400_000))
    for queue_id in ("E4", "E5", "E6"):
        result_of(spool.remove(queue_id))
    assert spool.free_files == 6
    assert spool.held_bytes == held_on_disk(spool) <= FLOOR
    sizes = sorted(os.stat(spool.free_dir / n).st_size for n in files(spool.free_dir))
    assert sizes.count(400_000) == 2  # the third message's file did not fit
    assert spool.held_bytes > 800_000


def test_a_file_that_cannot_be_truncated_is_unlinked(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removed file that may not keep its blocks and cannot be truncated is unlinked, so free/
    never holds data it does not count."""

    def cannot(path: Any, length: int) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "truncate", cannot)
    result_of(spool.commit(make_envelope("E4"), b"x" * 2000))
    result_of(spool.remove("E4"))
    assert files(spool.free_dir) == [] and files(spool.queue_dir) == []
    assert spool.free_files == 0 and spool.held_bytes == 0


def test_low_free_space_gives_the_blocks_back(keeping: Spool) -> None:
    """Below twice the floor the pool unlinks every file that holds blocks and truncates what
    it is given next; it keeps blocks again only once the bound more than that is free."""
    spool = keeping
    for queue_id in ("E1", "E2", "E3"):
        result_of(spool.commit(make_envelope(queue_id), b"x" * 10_000))
    result_of(spool.remove("E1"))
    result_of(spool.commit(make_envelope("E4"), b"y"))  # its sync makes E1's files reusable
    result_of(spool.remove("E2"))  # moved, not yet reusable
    assert spool.held_bytes == held_on_disk(spool) > 0
    spool.free_space_seen(2 * FLOOR - 1)
    assert files(spool.free_dir) == [] and spool.held_bytes == 0 and spool.free_files == 0
    result_of(spool.remove("E3"))
    assert spool.free_files == 2 and held_on_disk(spool) == 0
    spool.free_space_seen(PLENTY - 1)  # above the mark, not above it plus the bound
    result_of(spool.remove("E4"))
    assert held_on_disk(spool) == 0 and spool.held_bytes == 0
    result_of(spool.commit(make_envelope("E5"), b"z" * 10_000))
    spool.free_space_seen(PLENTY)
    result_of(spool.remove("E5"))
    assert spool.held_bytes == held_on_disk(spool) >= 10_000


def test_low_free_space_while_files_move_gives_theirs_back(
    keeping: Spool, pool: ImmediateDiskPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files whose move into free/ was under way when space became scarce give their blocks
    back as soon as the move is reported."""
    spool = keeping
    result_of(spool.commit(make_envelope("E1"), b"x" * 10_000))
    later: list[Callable[[], Any]] = []
    real = pool.run_batched

    def reported_later(func: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        done = real(func, *args)  # the disk thread moves the files, keeping their blocks...
        later.append(lambda: done.chainDeferred(d))  # ...and reports after the look below
        return d

    monkeypatch.setattr(pool, "run_batched", reported_later)
    removed = spool.remove("E1")
    spool.free_space_seen(FLOOR)
    assert len(files(spool.free_dir)) == 2 and spool.held_bytes > 0
    later.pop()()
    result_of(removed)
    assert files(spool.free_dir) == [] and spool.held_bytes == 0


def test_a_shorter_envelope_is_padded_to_the_file_it_overwrites(keeping: Spool) -> None:
    """An envelope a little shorter than the free file it overwrites is padded with spaces
    (the file keeps its length, so no inode update), and reads back the same; one much
    shorter is cut to its own length."""
    spool = keeping

    def envelope(queue_id: str, address: str) -> Envelope:
        return make_envelope(queue_id, local_recipient(address))

    for queue_id in ("E1", "E2"):
        result_of(spool.commit(envelope(queue_id, "a" * 300 + "@example.test"), b"m"))
    longer = spool.envelope_path("E1").stat().st_size
    result_of(spool.remove("E1"))
    result_of(spool.remove("E2"))
    result_of(spool.commit(envelope("E3", "x@example.test"), b"m"))  # its sync frees both
    shorter = envelope("E4", "a" * 290 + "@example.test")
    result_of(spool.commit(shorter, b"m"))
    assert spool.envelope_path("E4").stat().st_size == longer
    padding = longer - len(encode_envelope(shorter))
    assert padding > 0 and spool.envelope_path("E4").read_bytes().endswith(b"}" + b" " * padding)
    assert spool.load("E4") == shorter
    tiny = envelope("E5", "b@example.test")
    result_of(spool.commit(tiny, b"m"))
    assert spool.envelope_path("E5").stat().st_size == len(encode_envelope(tiny))
    assert spool.load("E5") == tiny


def test_no_floor_never_keeps_blocks(spool: Spool) -> None:
    """A spool without a free-space floor ignores free-space figures and keeps no blocks."""
    assert spool.free_space_seen(1 << 40) is None
    result_of(spool.commit(make_envelope("E1"), b"x" * 10_000))
    result_of(spool.remove("E1"))
    assert held_on_disk(spool) == 0 and spool.held_bytes == 0


def test_full_file_system_drops_the_pool_and_retries_once(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit meeting ENOSPC unlinks every file kept for reuse and is tried once more."""
    for queue_id in ("E1", "E2"):
        result_of(spool.commit(make_envelope(queue_id), b"x"))
    result_of(spool.remove("E1"))
    result_of(spool.remove("E2"))
    assert spool.free_files == 4
    real = spool_module._write_new
    calls: list[str] = []

    def full_once(path: str, data: bytes) -> int:
        calls.append(str(path))
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(spool_module, "_write_new", full_once)
    monkeypatch.setattr(spool_module, "_overwrite",
                        lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    result_of(spool.commit(make_envelope("E3"), b"y"))
    assert spool.message_path("E3").read_bytes() == b"y"
    assert files(spool.free_dir) == [] and files(spool.tmp_dir) == [] and spool.free_files == 0


def test_full_file_system_twice_fails_and_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the retry meets ENOSPC too, the commit fails; a half-written file is removed at once."""

    def half_written(path: str, data: bytes) -> int:
        Path(path).write_bytes(b"part")  # created, then the disk filled
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module, "_write_new", half_written)
    failure = failure_of(spool.commit(make_envelope("C9"), b"data" * 1000))
    assert failure.check(OSError) and failure.value.errno == 28
    assert files(spool.tmp_dir) == [] and files(spool.queue_dir) == []


def test_reused_envelope_file_is_cut_to_an_update_that_may_have_grown_it(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an update made the envelope longer, a shorter envelope over that file is cut."""
    envelope = make_envelope("E7")
    result_of(spool.commit(envelope, b"m"))
    envelope.recipients[0].record(
        Attempt(at=1.0, status=RecipientStatus.DEFERRED, host="h", reply=Reply(451, "", "x" * 300)),
        61.0,
    )
    result_of(spool.update(envelope))
    result_of(spool.remove("E7"))
    result_of(spool.commit(make_envelope("E1"), b"m"))  # its sync frees E7's files
    fresh = make_envelope("E8")
    result_of(spool.commit(fresh, b"m"))
    assert spool.load("E8") == fresh
    assert spool.envelope_path("E8").stat().st_size == len(encode_envelope(fresh))


def test_removed_files_are_reused_only_after_queue_is_synced(
    spool: Spool, pool: ImmediateDiskPool
) -> None:
    """A removed message's files are not overwritten before an fsync of queue/ begun after
    their move: the removal fires at once, the first commit after it syncs the move."""
    result_of(spool.commit(make_envelope("E12"), b"old bytes"))
    old = spool.message_path("E12").stat().st_ino
    pool.synced.clear()
    assert result_of(spool.remove("E12")) is None
    assert pool.synced == []
    pool.hold_syncs = True
    syncing: list[object] = []
    spool.commit(make_envelope("E13"), b"new bytes").addCallback(syncing.append)
    spool.commit(make_envelope("E14"), b"new bytes")
    for queue_id in ("E13", "E14"):  # new files while the sync is not done
        assert spool.message_path(queue_id).stat().st_ino != old
    pool.release_syncs()
    assert syncing == [None]
    pool.hold_syncs = False
    result_of(spool.commit(make_envelope("E15"), b"new bytes"))
    assert spool.message_path("E15").stat().st_ino == old


def test_removed_files_are_not_reused_when_the_sync_fails(
    spool: Spool, pool: ImmediateDiskPool
) -> None:
    """If queue/ cannot be fsync'd after a removal, the message is gone but its files are not
    reused: a crash could bring their old names back over new bytes."""
    result_of(spool.commit(make_envelope("E14"), b"old bytes"))
    assert result_of(spool.remove("E14")) is None
    pool.fail_syncs = OSError(5, "Input/output error")
    failure_of(spool.commit(make_envelope("E15"), b"new bytes"))
    assert files(spool.free_dir) == [] and spool.free_files == 0  # unlinked, not kept
    pool.fail_syncs = None
    for queue_id in ("E16", "E17"):
        result_of(spool.commit(make_envelope(queue_id), b"new bytes"))
        assert spool.message_path(queue_id).read_bytes() == b"new bytes"
    assert files(spool.queue_dir) == ["E16.env", "E16.msg", "E17.env", "E17.msg"]


def test_a_commit_failing_before_its_sync_leaves_removed_files_to_the_next(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that fails before syncing anything hands the files it was to free to the next
    commit, whose sync frees them."""
    result_of(spool.commit(make_envelope("E18"), b"old bytes"))
    old = spool.message_path("E18").stat().st_ino
    result_of(spool.remove("E18"))

    def failing(path: str, data: bytes) -> int:
        raise OSError(5, "Input/output error")  # not ENOSPC, which drops the pool

    with monkeypatch.context() as patch:
        patch.setattr(spool_module, "_write_new", failing)
        failure_of(spool.commit(make_envelope("E19"), b"x"))
    result_of(spool.commit(make_envelope("E20"), b"x"))
    result_of(spool.commit(make_envelope("E21"), b"x"))
    assert spool.message_path("E21").stat().st_ino == old


def test_free_files_are_bounded(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once free/ holds enough files, remove() unlinks instead of keeping more."""
    monkeypatch.setattr(spool_module, "FREE_FILES_LIMIT", 2)
    for queue_id in ("E4", "E5"):
        result_of(spool.commit(make_envelope(queue_id), b"x"))
    result_of(spool.remove("E4"))
    result_of(spool.remove("E5"))
    assert len(files(spool.free_dir)) == 2 and files(spool.queue_dir) == []


def test_vanished_free_file_falls_back_to_a_new_file(spool: Spool) -> None:
    """If a free file disappeared, commit writes a new file instead of failing."""
    result_of(spool.commit(make_envelope("E6"), b"x"))
    result_of(spool.remove("E6"))
    result_of(spool.commit(make_envelope("E5"), b"x"))  # its sync frees E6's files
    for name in files(spool.free_dir):
        os.unlink(spool.free_dir / name)
    result_of(spool.commit(make_envelope("E7"), b"y"))
    assert spool.message_path("E7").read_bytes() == b"y"


def test_failed_commit_over_free_files_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that fails after taking free files removes them with the rest."""
    result_of(spool.commit(make_envelope("E8"), b"x"))
    result_of(spool.remove("E8"))
    result_of(spool.commit(make_envelope("E7"), b"x"))  # its sync frees E8's files
    real = os.rename

    def failing(src: Any, dst: Any) -> None:
        if str(dst).endswith(".env"):
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    failure_of(spool.commit(make_envelope("E9"), b"y"))
    assert files(spool.queue_dir) == ["E7.env", "E7.msg"] and files(spool.free_dir) == []


def test_recover_empties_free(spool: Spool) -> None:
    """Files waiting in free/ are deleted at start-up, never reused across a crash."""
    result_of(spool.commit(make_envelope("E10"), b"x"))
    result_of(spool.remove("E10"))
    assert spool.recover() == []
    assert files(spool.free_dir) == []
    result_of(spool.commit(make_envelope("E11"), b"y"))  # nothing stale handed out
    assert spool.message_path("E11").read_bytes() == b"y"


def test_recover_creates_the_directories(tmp_path: Path, pool: ImmediateDiskPool) -> None:
    """recover() on a new spool creates tmp/ and queue/ and finds nothing."""
    spool = Spool(tmp_path / "new" / "spool", pool)  # type: ignore[arg-type]
    assert spool.recover() == []
    assert spool.tmp_dir.is_dir() and spool.queue_dir.is_dir()
    spool.close()


def test_recover_cleans_leftovers_and_keeps_committed(spool: Spool) -> None:
    """recover() empties tmp/, deletes half pairs and returns committed envelopes oldest first."""
    newer = make_envelope("F2", received_at=200.0)
    older = make_envelope("F1", received_at=100.0)
    result_of(spool.commit(newer, b"two"))
    result_of(spool.commit(older, b"one"))
    (spool.tmp_dir / "G1.msg").write_bytes(b"half written")
    (spool.tmp_dir / "G1.env.u3").write_bytes(b"{")
    (spool.tmp_dir / "junkdir").mkdir()
    (spool.queue_dir / "H1.msg").write_bytes(b"message without envelope")
    (spool.queue_dir / "H2.env").write_bytes(spool.envelope_path("F1").read_bytes())
    assert spool.recover() == [older, newer]
    assert files(spool.tmp_dir) == []
    assert files(spool.queue_dir) == ["F1.env", "F1.msg", "F2.env", "F2.msg"]
    assert spool.free_dir.is_dir()


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[]", b'{"version": 99}', b'{"version": 1, "queue_id": "X"}'],
)
def test_recover_moves_a_corrupt_envelope_aside(spool: Spool, content: bytes) -> None:
    """An unreadable envelope and its message go to corrupt/, never deleted; start-up goes on."""
    result_of(spool.commit(make_envelope("K1"), b"good"))
    (spool.queue_dir / "K2.env").write_bytes(content)
    (spool.queue_dir / "K2.msg").write_bytes(b"keep me")
    assert [e.queue_id for e in spool.recover()] == ["K1"]
    assert files(spool.corrupt_dir) == ["K2.env", "K2.msg"]
    assert (spool.corrupt_dir / "K2.msg").read_bytes() == b"keep me"
    assert files(spool.queue_dir) == ["K1.env", "K1.msg"]


def test_recover_refuses_an_envelope_naming_another_id(spool: Spool) -> None:
    """An envelope whose queue id differs from its file name is treated as corrupt."""
    result_of(spool.commit(make_envelope("L1"), b"one"))
    os.rename(spool.envelope_path("L1"), spool.envelope_path("L2"))
    os.rename(spool.message_path("L1"), spool.message_path("L2"))
    assert spool.recover() == []
    assert files(spool.corrupt_dir) == ["L2.env", "L2.msg"]


def test_recover_keeps_earlier_corrupt_files(spool: Spool) -> None:
    """A second corrupt envelope of the same name does not overwrite the first one set aside."""
    for _ in range(2):
        (spool.queue_dir / "M1.env").write_bytes(b"{")
        (spool.queue_dir / "M1.msg").write_bytes(b"m")
        spool.recover()
    assert len(files(spool.corrupt_dir)) == 4


def test_recover_leaves_unexpected_files_alone(spool: Spool) -> None:
    """A file recover() does not understand stays where it is for a human to look at."""
    (spool.queue_dir / "README").write_text("hello")
    assert spool.recover() == []
    assert files(spool.queue_dir) == ["README"]


def test_second_owner_is_refused(tmp_path: Path, pool: ImmediateDiskPool) -> None:
    """Only one Spool may own a directory; another recover() fails until the first closes."""
    first = Spool(tmp_path / "s", pool)  # type: ignore[arg-type]
    first.recover()
    second = Spool(tmp_path / "s", pool)  # type: ignore[arg-type]
    with pytest.raises(SpoolLockedError):
        second.recover()
    first.close()
    assert second.recover() == []
    second.close()


def test_list_envelopes_reads_without_changing_anything(spool: Spool) -> None:
    """list_envelopes() returns readable envelopes and leaves corrupt ones in place."""
    result_of(spool.commit(make_envelope("N1"), b"one"))
    (spool.queue_dir / "N2.env").write_bytes(b"{")
    (spool.queue_dir / "N2.msg").write_bytes(b"two")
    assert [e.queue_id for e in spool.list_envelopes()] == ["N1"]
    assert files(spool.queue_dir) == ["N1.env", "N1.msg", "N2.env", "N2.msg"]


def test_encoding_is_the_same_document_as_to_dict() -> None:
    """encode_envelope() writes exactly the JSON of Envelope.to_dict(), every field included."""
    recipient = local_recipient("alice@example.test")
    recipient.notify = ("SUCCESS",)
    recipient.orcpt = "rfc822;alice@example.test"
    recipient.record(Attempt(1.0, RecipientStatus.DEFERRED, "maildir", Reply(451, "4.3.0", "x")),
                     61.0)
    envelope = make_envelope("S1", recipient, relay_recipient("x@remote.test"))
    envelope.body, envelope.ret, envelope.envid, envelope.auth_user = "8BITMIME", "HDRS", "e", "u"
    envelope.sender = "snød@example.test"
    expected = json.dumps(envelope.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()
    assert encode_envelope(envelope) == expected


def test_envelope_file_is_json_with_version(spool: Spool) -> None:
    """The envelope file is plain JSON carrying the format version, readable by other tools."""
    result_of(spool.commit(make_envelope("P1"), b"one"))
    data = json.loads(spool.envelope_path("P1").read_bytes())
    assert data["version"] == 1 and data["queue_id"] == "P1"
    assert data["recipients"][0]["status"] == "scheduled"


class RealDiskPoolTests(unittest.TestCase):
    """The same spool operations with the real DiskPool threads and reactor."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.pool = DiskPool(reactor, max_threads=8)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.spool = Spool(make_temp_dir(self), self.pool)
        self.spool.recover()
        self.addCleanup(self.spool.close)

    def test_commit_update_remove(self) -> Deferred[None]:
        """A message is committed, its envelope updated and the message removed, in threads."""
        envelope = make_envelope(self.spool.new_queue_id())
        queue_id = envelope.queue_id

        def committed(_: None) -> Deferred[None]:
            assert self.spool.message_path(queue_id).read_bytes() == b"body"
            envelope.held = True
            return self.spool.update(envelope)

        def updated(_: None) -> Deferred[None]:
            assert self.spool.load(queue_id).held
            return self.spool.remove(queue_id)

        def removed(_: None) -> None:
            assert files(self.spool.queue_dir) == []

        d = self.spool.commit(envelope, b"body")
        d.addCallback(committed).addCallback(updated).addCallback(removed)
        return d

    def test_concurrent_commits_all_land(self) -> Deferred[None]:
        """Many concurrent commits sharing directory syncs are all committed and intact."""
        envelopes = [make_envelope(self.spool.new_queue_id()) for _ in range(100)]
        ds = [self.spool.commit(e, e.queue_id.encode() * 50) for e in envelopes]

        def check(_: object) -> None:
            for e in envelopes:
                assert self.spool.message_path(e.queue_id).read_bytes() == e.queue_id.encode() * 50
            assert sorted(x.queue_id for x in self.spool.recover()) == sorted(
                e.queue_id for e in envelopes
            )

        return DeferredList(ds, fireOnOneErrback=True, consumeErrors=True).addCallback(check)


def test_attempt_replies_are_stored_structured_and_old_texts_still_read() -> None:
    """An attempt's reply is stored as code, enhanced code and text; an envelope written before
    that, with the reply as one line of text, reads back as the same structured reply."""
    recipient = local_recipient("alice@example.test")
    reply = Reply(451, "4.4.1", "No connection to the mail server")
    recipient.record(Attempt(1.0, RecipientStatus.DEFERRED, "h", reply), 61.0)
    envelope = make_envelope("R1", recipient)
    data = json.loads(encode_envelope(envelope))
    stored = data["recipients"][0]["attempts"][0]["reply"]
    assert stored == {"code": 451, "enhanced": "4.4.1", "text": "No connection to the mail server"}
    data["recipients"][0]["attempts"][0]["reply"] = str(reply)
    old = Envelope.from_dict(data)
    assert old.recipients[0].attempts[0].reply == reply
    data["recipients"][0]["attempts"][0]["reply"] = "250 delivered"
    assert Envelope.from_dict(data).recipients[0].attempts[0].reply == Reply(250, "", "delivered")
