"""The Maildir writer: layout, trace headers, names, failures, and exactly-once after a crash."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailsys.delivery.maildir import MaildirWriter, delivery_headers
from mailsys.diskio import DiskPool
from mailsys.envelope import Attempt, Envelope, Recipient, RecipientStatus, TargetKind
from mailsys.interfaces import IDeliveryAgent
from mailsys.mailbox.layout import (
    InvalidMailboxNameError,
    delivery_base,
    escape_hostname,
    new_name,
    stored_form,
)
from mailsys.queue.runner import QueueRunner
from mailsys.queue.spool import Spool
from tests.unit.test_spool import (
    ImmediateDiskPool,
    files,
    local_recipient,
    make_envelope,
    make_temp_dir,
    result_of,
)

BODY = b"Subject: hello\r\nFrom: bob@sender.test\r\n\r\nHi.\r\n"
BODY_LF = BODY.replace(b"\r\n", b"\n")
HOST = "mx.example.test"


@pytest.fixture
def pool() -> ImmediateDiskPool:
    return ImmediateDiskPool()


@pytest.fixture
def writer(tmp_path: Path, pool: ImmediateDiskPool) -> MaildirWriter:
    return MaildirWriter(tmp_path / "maildirs", pool, HOST, clock=Clock())  # type: ignore[arg-type]


@pytest.fixture
def message(tmp_path: Path) -> Path:
    path = tmp_path / "spooled.msg"
    path.write_bytes(BODY)
    return path


def deliver(
    writer: MaildirWriter,
    envelope: Envelope,
    message: Path,
    recovered: bool = False,
    index: int = 0,
) -> Attempt:
    attempt = result_of(
        writer.deliver(envelope, envelope.recipients[index], message, recovered=recovered)
    )
    assert isinstance(attempt, Attempt)
    return attempt


def alice() -> Envelope:
    return make_envelope("0189ABCDEF012A1B2C3", local_recipient("alice@example.test"))


def test_provides_the_delivery_agent_interface(writer: MaildirWriter) -> None:
    """MaildirWriter provides IDeliveryAgent."""
    assert verifyObject(IDeliveryAgent, writer)


def test_delivers_into_new_with_trace_headers(
    writer: MaildirWriter, pool: ImmediateDiskPool, message: Path
) -> None:
    """A copy with Return-Path and Delivered-To is written to new/, and new/ is fsync'd."""
    envelope = alice()
    attempt = deliver(writer, envelope, message)
    assert attempt.status is RecipientStatus.DELIVERED
    assert attempt.host == "maildir"
    assert str(attempt.reply) == "250 2.0.0 delivered to maildir"
    maildir = writer.maildir_path("alice@example.test")
    assert maildir == writer.root / "example.test" / "alice"
    (name,) = files(maildir / "new")
    assert (maildir / "new" / name).read_bytes() == (
        b"Return-Path: <bob@sender.test>\nDelivered-To: alice@example.test\n" + BODY_LF
    )
    assert files(maildir / "tmp") == [] and files(maildir / "cur") == []
    assert pool.synced == [maildir / "new"]


def test_null_sender_gets_an_empty_return_path(writer: MaildirWriter, message: Path) -> None:
    """RFC 5321 §4.4: a null reverse-path is recorded as "Return-Path: <>"."""
    envelope = alice()
    envelope.sender = ""
    deliver(writer, envelope, message)
    maildir = writer.maildir_path("alice@example.test")
    (name,) = files(maildir / "new")
    assert (maildir / "new" / name).read_bytes().startswith(b"Return-Path: <>\n")


def test_addresses_cannot_inject_header_lines(writer: MaildirWriter, message: Path) -> None:
    """CR and LF in an address never reach the trace header as a line break."""
    envelope = alice()
    envelope.sender = "evil@x\r\nBcc: victim@y"
    deliver(writer, envelope, message)
    maildir = writer.maildir_path("alice@example.test")
    (name,) = files(maildir / "new")
    head = (maildir / "new" / name).read_bytes().split(b"\n")[0]
    assert head == b"Return-Path: <evil@xBcc: victim@y>"


def test_creates_the_maildir_and_its_parents(writer: MaildirWriter, message: Path) -> None:
    """The first delivery creates root/<domain>/<user>/ with cur/, new/ and tmp/."""
    assert not writer.root.exists()
    deliver(writer, alice(), message)
    maildir = writer.root / "example.test" / "alice"
    assert sorted(os.listdir(maildir)) == ["cur", "new", "tmp"]
    assert (maildir.stat().st_mode & 0o777) == 0o700


def test_domain_is_lower_cased(writer: MaildirWriter) -> None:
    """The domain part of a mailbox names its directory in lower case."""
    assert writer.maildir_path("Alice@Example.TEST") == writer.root / "example.test" / "Alice"


def test_name_follows_the_maildir_spec_and_is_deterministic(writer: MaildirWriter) -> None:
    """Names are "time.unique.host", stable for one queue id and recipient, distinct otherwise."""
    envelope = alice()
    first = writer.file_name(envelope, envelope.recipients[0])
    assert first == writer.file_name(alice(), alice().recipients[0])
    assert re.fullmatch(r"1700000000\.Q0189ABCDEF012A1B2C3R[0-9A-F]{10}\.mx\.example\.test", first)
    assert "/" not in first and ":" not in first and not first.startswith(".")
    other = local_recipient("bob@example.test")
    assert writer.file_name(envelope, other) != first
    alias = local_recipient("postmaster@example.test", mailbox="alice@example.test")
    assert writer.file_name(envelope, alias) != first
    assert writer.file_name(make_envelope("OTHER", envelope.recipients[0]), other) != first


def test_host_part_escapes_slash_and_colon(tmp_path: Path, pool: ImmediateDiskPool) -> None:
    """'/' and ':' in the host name become \\057 and \\072, as the Maildir spec says."""
    assert escape_hostname("a/b:c") == "a\\057b\\072c"
    writer = MaildirWriter(tmp_path, pool, "odd/host:name")  # type: ignore[arg-type]
    envelope = alice()
    name = writer.file_name(envelope, envelope.recipients[0])
    assert name.endswith(".odd\\057host\\072name")
    recipient = envelope.recipients[0]
    assert delivery_base(envelope.received_at, envelope.queue_id, recipient.address,
                         recipient.mailbox, "h").endswith(".h")


def test_second_delivery_of_the_same_copy_writes_nothing(
    writer: MaildirWriter, pool: ImmediateDiskPool, message: Path
) -> None:
    """A copy already in new/ is reported delivered without writing another, and synced."""
    deliver(writer, alice(), message)
    pool.synced.clear()
    attempt = deliver(writer, alice(), message)
    assert attempt.status is RecipientStatus.DELIVERED
    assert len(files(writer.maildir_path("alice@example.test") / "new")) == 1
    assert pool.synced == [writer.maildir_path("alice@example.test") / "new"]


def test_recovered_delivery_finds_the_copy_already_read(
    writer: MaildirWriter, message: Path
) -> None:
    """After a crash, a copy the user already moved to cur/ with flags is not written again."""
    deliver(writer, alice(), message)
    maildir = writer.maildir_path("alice@example.test")
    (name,) = files(maildir / "new")
    os.rename(maildir / "new" / name, maildir / "cur" / f"{name}:2,S")
    attempt = deliver(writer, alice(), message, recovered=True)
    assert attempt.status is RecipientStatus.DELIVERED
    assert files(maildir / "new") == [] and files(maildir / "cur") == [f"{name}:2,S"]


def test_recovered_delivery_survives_a_host_rename(
    tmp_path: Path, pool: ImmediateDiskPool, message: Path
) -> None:
    """A copy written under another host name before the crash is still recognised."""
    before = MaildirWriter(tmp_path, pool, "old.example")  # type: ignore[arg-type]
    after = MaildirWriter(tmp_path, pool, "new.example")  # type: ignore[arg-type]
    deliver(before, alice(), message)
    deliver(after, alice(), message, recovered=True)
    assert len(files(after.maildir_path("alice@example.test") / "new")) == 1


def test_recovered_delivery_writes_a_missing_copy(writer: MaildirWriter, message: Path) -> None:
    """A recovered message whose copy was never written is delivered normally."""
    deliver(writer, alice(), message, recovered=True)
    assert len(files(writer.maildir_path("alice@example.test") / "new")) == 1


def test_recovered_deliveries_list_each_maildir_once(
    writer: MaildirWriter, message: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many recovered messages for one Maildir list its new/ and cur/ once, not per message."""
    deliver(writer, make_envelope("Q100", local_recipient("alice@example.test")), message)
    listed: list[str] = []
    real = os.scandir

    def spy(path: Any) -> Any:
        listed.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", spy)
    for i in range(100, 110):
        envelope = make_envelope(f"Q{i}", local_recipient("alice@example.test"))
        deliver(writer, envelope, message, recovered=True)
    assert len(listed) == 2
    assert len(files(writer.maildir_path("alice@example.test") / "new")) == 10


def test_recovered_copy_written_now_is_found_after_it_is_read(
    writer: MaildirWriter, message: Path
) -> None:
    """A copy written during recovery and moved to cur/ is still found by a recovered retry."""
    deliver(writer, make_envelope("Q200", local_recipient("alice@example.test")), message,
            recovered=True)
    envelope = make_envelope("Q201", local_recipient("alice@example.test"))
    deliver(writer, envelope, message, recovered=True)
    maildir = writer.maildir_path("alice@example.test")
    base = writer.file_name(envelope, envelope.recipients[0])
    (name,) = [n for n in files(maildir / "new") if n.startswith(base + ",")]
    os.rename(maildir / "new" / name, maildir / "cur" / f"{name}:2,S")
    deliver(writer, envelope, message, recovered=True)
    assert len(files(maildir / "new")) + len(files(maildir / "cur")) == 2


def test_leftover_temp_file_is_overwritten(writer: MaildirWriter, message: Path) -> None:
    """A tmp/ file of the same name from an interrupted try is replaced, not appended to."""
    envelope = alice()
    maildir = writer.maildir_path("alice@example.test")
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    base = writer.file_name(envelope, envelope.recipients[0])
    header = delivery_headers(envelope, envelope.recipients[0])
    name = new_name(base, stored_form(BODY, header))
    (maildir / "tmp" / name).write_bytes(b"x" * 10_000)
    deliver(writer, envelope, message)
    assert (maildir / "new" / name).read_bytes().endswith(BODY_LF)
    assert len((maildir / "new" / name).read_bytes()) < 10_000
    assert files(maildir / "tmp") == []


def test_each_recipient_of_a_message_gets_its_own_copy(
    writer: MaildirWriter, message: Path
) -> None:
    """Two recipients in one mailbox (aliases) get two copies with their own Delivered-To."""
    envelope = make_envelope(
        "Q1",
        local_recipient("alice@example.test"),
        local_recipient("postmaster@example.test", mailbox="alice@example.test"),
    )
    deliver(writer, envelope, message, index=0)
    deliver(writer, envelope, message, index=1)
    new = writer.maildir_path("alice@example.test") / "new"
    heads = sorted((new / n).read_bytes().split(b"\n")[1] for n in files(new))
    assert heads == [b"Delivered-To: alice@example.test", b"Delivered-To: postmaster@example.test"]


@pytest.mark.parametrize(
    "mailbox",
    [None, "noat", "@example.test", "alice@", "../x@example.test", "a/b@example.test",
     "alice@..", ".folder@example.test", "alice@ex/ample"],
)
def test_unusable_mailbox_fails_permanently(
    writer: MaildirWriter, message: Path, mailbox: str | None
) -> None:
    """A missing or unsafe mailbox name fails with 550 5.1.1 and writes nothing."""
    recipient = Recipient("x@example.test", "x@example.test", TargetKind.LOCAL, mailbox=mailbox)
    envelope = make_envelope("Q2", recipient)
    attempt = deliver(writer, envelope, message)
    assert attempt.status is RecipientStatus.FAILED
    assert str(attempt.reply).startswith("550 5.1.1")
    assert not writer.root.exists()
    if mailbox is not None:
        with pytest.raises(InvalidMailboxNameError):
            writer.maildir_path(mailbox)


def test_disk_errors_are_temporary(
    writer: MaildirWriter, message: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk defers the recipient with 452 4.3.1 (RFC 3463: mail system full), logs one
    line with the queue id, the path and the error, and leaves no temp file behind."""

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device", "/the/maildir")

    monkeypatch.setattr(os, "fsync", full)
    with capturedLogs() as events:
        attempt = deliver(writer, alice(), message)
    monkeypatch.undo()
    assert attempt.status is RecipientStatus.DEFERRED
    assert str(attempt.reply).startswith("452 4.3.1")
    lines = [formatEvent(e) for e in events]
    assert len(lines) == 1 and all(e.get("log_failure") is None for e in events)
    assert "0189ABCDEF012A1B2C3" in lines[0] and "/the/maildir" in lines[0]
    assert "No space left on device" in lines[0]
    maildir = writer.maildir_path("alice@example.test")
    assert files(maildir / "tmp") == [] and files(maildir / "new") == []


def test_missing_spool_message_is_temporary(writer: MaildirWriter, tmp_path: Path) -> None:
    """If the spooled bytes cannot be read, the recipient is deferred, not failed."""
    attempt = deliver(writer, alice(), tmp_path / "gone.msg")
    assert attempt.status is RecipientStatus.DEFERRED


def test_failed_directory_sync_is_temporary(
    writer: MaildirWriter, pool: ImmediateDiskPool, message: Path
) -> None:
    """If new/ cannot be fsync'd the copy is not counted; the retry finds it and syncs again."""
    pool.fail_syncs = OSError(5, "Input/output error")
    assert deliver(writer, alice(), message).status is RecipientStatus.DEFERRED
    pool.fail_syncs = None
    assert deliver(writer, alice(), message).status is RecipientStatus.DELIVERED
    assert len(files(writer.maildir_path("alice@example.test") / "new")) == 1


@pytest.fixture
def spool(tmp_path: Path, pool: ImmediateDiskPool) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", pool)  # type: ignore[arg-type]
    s.recover()
    yield s
    s.close()


def test_crash_after_delivery_does_not_duplicate(
    tmp_path: Path, pool: ImmediateDiskPool, spool: Spool, writer: MaildirWriter
) -> None:
    """A message delivered (and read) before a crash, still in the spool, is not delivered twice."""
    clock = Clock()
    envelope = make_envelope(spool.new_queue_id(), local_recipient("alice@example.test"))
    result_of(spool.commit(envelope, BODY))
    # The first life: the copy is written, then the process dies before the spool learns of it.
    deliver(writer, envelope, spool.message_path(envelope.queue_id))
    maildir = writer.maildir_path("alice@example.test")
    (name,) = files(maildir / "new")
    os.rename(maildir / "new" / name, maildir / "cur" / f"{name}:2,RS")
    spool.close()

    restarted = Spool(spool.directory, pool)  # type: ignore[arg-type]
    runner = QueueRunner(restarted, {TargetKind.LOCAL: writer}, clock)
    runner.load(restarted.recover())
    runner.startService()
    clock.advance(0)
    assert files(maildir / "new") == [] and files(maildir / "cur") == [f"{name}:2,RS"]
    assert files(restarted.queue_dir) == []
    restarted.close()


class RealDiskPoolTests(unittest.TestCase):
    """Delivery with the real DiskPool threads and reactor."""

    def test_deliver_in_threads(self) -> Deferred[None]:
        """Concurrent deliveries to one Maildir all land in new/, each once."""
        from twisted.internet import reactor

        pool = DiskPool(reactor, max_threads=8)
        pool.start()
        self.addCleanup(pool.stop)
        root = make_temp_dir(self)
        message = root.parent / "m.msg"
        message.write_bytes(BODY)
        writer = MaildirWriter(root, pool, HOST)
        envelopes = [
            make_envelope(f"ID{i}", local_recipient("alice@example.test")) for i in range(50)
        ]
        ds = [writer.deliver(e, e.recipients[0], message) for e in envelopes]

        def check(attempts: list[Any]) -> None:
            assert {a.status for a in attempts} == {RecipientStatus.DELIVERED}
            assert len(files(writer.maildir_path("alice@example.test") / "new")) == 50

        return gatherResults(ds).addCallback(check)


def test_copies_have_lf_line_ends_and_size_fields(writer: MaildirWriter, message: Path) -> None:
    """A copy is stored with LF line ends, its name carrying ,S=<file size>,W=<CRLF size>."""
    deliver(writer, alice(), message)
    maildir = writer.maildir_path("alice@example.test")
    (name,) = files(maildir / "new")
    stored = (maildir / "new" / name).read_bytes()
    assert b"\r" not in stored
    wire = stored.replace(b"\n", b"\r\n")
    assert name.endswith(f",S={len(stored)},W={len(wire)}")


def test_large_and_empty_messages_are_copied_whole(writer: MaildirWriter, tmp_path: Path) -> None:
    """The spooled bytes are read whole, however large, and an empty message gives headers only."""
    large = tmp_path / "large.msg"
    body = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    large.write_bytes(body * 3000)
    empty = tmp_path / "empty.msg"
    empty.write_bytes(b"")
    envelope = make_envelope(
        "0189ABCDEF012A1B2C4",
        local_recipient("alice@example.test"),
        local_recipient("bob@example.test"),
    )
    deliver(writer, envelope, large, index=0)
    deliver(writer, envelope, empty, index=1)
    for recipient, spooled in zip(envelope.recipients, (body * 3000, b""), strict=True):
        new = writer.maildir_path(recipient.address) / "new"
        (name,) = files(new)
        stored = (new / name).read_bytes()
        assert stored == stored_form(spooled, delivery_headers(envelope, recipient))
