"""The pickup directory: drop files written as mailsys-sendmail writes them, read and queued
by the watcher as the server does, with the local user taken from the file's owner."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mailsys.envelope import Envelope, RecipientStatus, TargetKind
from mailsys.pickup import maildrop
from mailsys.pickup.maildrop import DropRequest, DropWriter
from mailsys.pickup.watcher import PickupWatcher, to_crlf
from mailsys.smtp.testing import StaticRouter
from tests.unit.test_spool import ImmediateDiskPool


class RecordingSink:
    """Takes submitted messages, or fails every commit with ``error``."""

    def __init__(self) -> None:
        self.submitted: list[tuple[Envelope, bytes]] = []
        self.error: Exception | None = None
        self._ids = 0

    def new_queue_id(self) -> str:
        self._ids += 1
        return f"Q{self._ids}"

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
        if self.error is not None:
            d: Deferred[None] = Deferred()
            d.errback(self.error)
            return d
        self.submitted.append((envelope, message))
        return succeed(None)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    path = tmp_path / "pickup"
    maildrop.prepare_directory(path)
    return path


def watcher(directory: Path, sink: RecordingSink, max_size: int = 10_000) -> PickupWatcher:
    router = StaticRouter({"example.test"}, {"demo@example.test", "alice@example.test"})
    return PickupWatcher(directory, sink, router, ImmediateDiskPool(),  # type: ignore[arg-type]
                         Clock(), hostname="mail.example.test", origin="example.test",
                         max_message_size=max_size, user_name=lambda uid: "alice")


def drop(directory: Path, request: DropRequest, message: bytes) -> str:
    writer = DropWriter(directory, request)
    writer.write(message)
    return writer.commit()


def test_directory_is_write_only_for_its_group(directory: Path) -> None:
    """The pickup directory is mode 3730 (setgid, sticky, group -wx) with a private refused/."""
    assert stat.S_IMODE(directory.stat().st_mode) == 0o3730
    assert stat.S_IMODE((directory / "refused").stat().st_mode) == 0o700


def test_drop_is_queued_with_received_naming_the_uid(directory: Path) -> None:
    """A drop becomes one queued message: CRLF lines, a Received field naming the uid and its
    user, Date and Message-ID added, default sender user@origin; the drop is then removed."""
    sink = RecordingSink()
    drop(directory, DropRequest(None, ("demo",)), b"Subject: hi\n\nbody\n")
    watcher(directory, sink).poll()
    [(envelope, message)] = sink.submitted
    assert envelope.sender == "alice@example.test"
    assert [r.address for r in envelope.recipients] == ["demo@example.test"]
    assert envelope.protocol == "local"
    assert message.startswith(b"Received: by mail.example.test (mailsys, from userid "
                              + str(os.getuid()).encode() + b" (alice))\r\n\tid Q1; ")
    assert b"\r\nFrom: alice@example.test\r\n" in message
    assert b"\r\nMessage-ID: <Q1@mail.example.test>\r\n" in message
    assert message.endswith(b"Subject: hi\r\n\r\nbody\r\n")
    assert not list(directory.glob("*.drop"))


def test_full_name_makes_the_missing_from(directory: Path) -> None:
    """-F's full name goes into the From field added to a message without one."""
    sink = RecordingSink()
    drop(directory, DropRequest("demo@example.test", ("demo@example.test",), "Demo User"),
         b"Subject: hi\n\nbody\n")
    watcher(directory, sink).poll()
    assert b"From: Demo User <demo@example.test>\r\n" in sink.submitted[0][1]


def test_unknown_recipient_fails_for_a_bounce(directory: Path) -> None:
    """An unknown local recipient is queued as failed (the sender gets a bounce), the others
    as usual; a relayed one is a relay recipient."""
    sink = RecordingSink()
    drop(directory, DropRequest(None, ("nobody@example.test", "x@remote.test")), b"x\n")
    watcher(directory, sink).poll()
    [(envelope, message)] = sink.submitted
    unknown, remote = envelope.recipients
    assert unknown.status is RecipientStatus.FAILED
    assert unknown.attempts[0].reply.enhanced == "5.1.1"
    assert remote.kind is TargetKind.RELAY and remote.status is RecipientStatus.SCHEDULED
    # A body without header fields gets the empty line after the fields added above it.
    assert message.endswith(b"\r\n\r\nx\r\n")


def test_oversized_drop_is_moved_aside(directory: Path) -> None:
    """A drop larger than the size limit is not queued; it waits in refused/ for a human."""
    sink = RecordingSink()
    name = drop(directory, DropRequest(None, ("demo",)), b"x" * 20_000)
    watcher(directory, sink).poll()
    assert sink.submitted == []
    assert (directory / "refused" / (name + maildrop.DROP_SUFFIX)).exists()


def test_garbage_file_is_moved_aside(directory: Path) -> None:
    """A file that is not a drop is moved to refused/, and later drops are still queued."""
    sink = RecordingSink()
    (directory / "junk.drop").write_bytes(b"hello\n")
    drop(directory, DropRequest(None, ("demo",)), b"Subject: after\n\n")
    watcher(directory, sink).poll()
    assert (directory / "refused" / "junk.drop").exists()
    assert len(sink.submitted) == 1


def test_hard_link_is_refused(directory: Path, tmp_path: Path) -> None:
    """A drop with a second link (someone else's file linked in) is refused."""
    sink = RecordingSink()
    name = drop(directory, DropRequest(None, ("demo",)), b"x\n")
    os.link(directory / (name + ".drop"), tmp_path / "other")
    watcher(directory, sink).poll()
    assert sink.submitted == []


def test_failed_commit_leaves_the_drop_for_the_next_look(directory: Path) -> None:
    """When the spool cannot commit, the drop stays; the next look queues it."""
    sink = RecordingSink()
    sink.error = OSError(28, "No space left on device")
    drop(directory, DropRequest(None, ("demo",)), b"x\n")
    w = watcher(directory, sink)
    w.poll()
    assert list(directory.glob("*.drop"))
    sink.error = None
    w.poll()
    assert len(sink.submitted) == 1 and not list(directory.glob("*.drop"))


def test_unfinished_temporary_file_is_ignored(directory: Path) -> None:
    """A .tmp file being written is not picked up."""
    sink = RecordingSink()
    writer = DropWriter(directory, DropRequest(None, ("demo",)))
    writer.write(b"partial")
    watcher(directory, sink).poll()
    assert sink.submitted == []
    writer.abort()
    assert [p.name for p in directory.iterdir()] == ["refused"]


def test_to_crlf() -> None:
    """LF and CRLF lines both end CRLF, and a last line without an end gets one."""
    assert to_crlf(b"a\nb\r\nc") == b"a\r\nb\r\nc\r\n"
    assert to_crlf(b"") == b""


def test_config_pickup_section() -> None:
    """[pickup] is read with its defaults; a bad origin or an unknown group names its key."""
    from mailsys.config import ConfigError, from_mapping

    config = from_mapping({}, "t.toml")
    assert config.pickup.directory == Path("var/pickup") and config.pickup.group is None
    with pytest.raises(ConfigError, match=r"pickup\.origin"):
        from_mapping({"pickup": {"origin": "not a domain"}}, "t.toml")
    with pytest.raises(ConfigError, match=r"pickup\.group: no such group"):
        from_mapping({"pickup": {"group": "no-such-group-here"}}, "t.toml")
