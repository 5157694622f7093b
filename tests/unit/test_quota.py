"""Quotas and the free-space floor: maildirsize accounting, delivery over quota, the warning,
RCPT refusal, IMAP QUOTA (RFC 9208), and StorageFloor at MAIL FROM."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import capturedLogs

from mailsys import replies
from mailsys.address import parse_mailbox
from mailsys.config import ConfigError, from_mapping, parse_size
from mailsys.delivery.maildir import MaildirWriter
from mailsys.delivery.quota import (
    MAILDIRSIZE,
    Limits,
    MailboxFullError,
    MailboxQuota,
    QuotaRules,
    Usage,
    add_usage,
    maildir_of,
    read_maildirsize,
    recalculate,
)
from mailsys.envelope import RecipientStatus, TargetKind
from mailsys.routing import Destination
from mailsys.smtp.policy import InboundPolicy, RecipientRejected, SessionInfo, StorageFloor
from mailsys.smtp.testing import MemorySink, SessionDriver, make_factory
from tests.unit.imap_support import USER, Server, filled
from tests.unit.test_spool import ImmediateDiskPool, local_recipient, make_envelope, result_of

ALICE = "alice@example.test"


def fill(maildir: Path, sizes: list[int], sub: str = "cur") -> None:
    """Messages with Maildir names carrying ,S=<size> (as mailsys writes them)."""
    for directory in ("cur", "new", "tmp"):
        (maildir / directory).mkdir(parents=True, exist_ok=True)
    for index, size in enumerate(sizes):
        (maildir / sub / f"{index}.M{index}.host,S={size}:2,").write_bytes(b"x" * size)


def quota(tmp_path: Path, limits: Limits, warn: int = 90) -> MailboxQuota:
    return MailboxQuota(QuotaRules(Limits(), {ALICE: limits}, warn), tmp_path, "mx.test")


# -- configuration -------------------------------------------------------------------------------


def test_sizes_parse_with_units_and_none() -> None:
    """Sizes are bytes or K/M/G (powers of 1024); "none" means no limit."""
    assert parse_size("500") == 500 and parse_size("100K") == 102400
    assert parse_size("2M") == 2 * 1024**2 and parse_size("1g") == 1024**3
    assert parse_size("none") == 0  # no limit
    with pytest.raises(ValueError):
        parse_size("lots")


def test_config_gives_defaults_and_per_user_overrides() -> None:
    """[quota] sets a default for every mailbox; per-user keys override each resource."""
    config = from_mapping({"quota": {"storage": "10M", "messages_per_user": {ALICE: 5},
                                     "storage_per_user": {"bob@example.test": "none"}}}, "x")
    rules = QuotaRules.from_section(config.quota)
    assert rules.limits_for("carol@example.test") == Limits(10 * 1024**2, None)
    assert rules.limits_for("alice@EXAMPLE.test") == Limits(10 * 1024**2, 5)
    assert rules.limits_for("bob@example.test").unlimited


def test_no_quota_by_default_and_a_floor_of_three_messages() -> None:
    """Without [quota] no mailbox has limits; the floor defaults to 3 x max_message_size."""
    config = from_mapping({}, "x")
    assert not QuotaRules.from_section(config.quota).any
    assert config.storage.spool_floor(config.smtp.max_message_size) == (
        3 * config.smtp.max_message_size)
    floor = from_mapping({"storage": {"spool_min_free": "none"}}, "x").storage
    assert floor.spool_floor(1000) == 0


def test_bad_sizes_are_config_errors() -> None:
    """A size that does not parse names its key."""
    with pytest.raises(ConfigError, match=r"quota\.storage_per_user"):
        from_mapping({"quota": {"storage_per_user": {ALICE: "big"}}}, "x")
    with pytest.raises(ConfigError, match=r"storage\.spool_min_free"):
        from_mapping({"storage": {"spool_min_free": "-1"}}, "x")


# -- maildirsize ---------------------------------------------------------------------------------


def test_recalculate_counts_every_folder_from_the_names(tmp_path: Path) -> None:
    """A recount adds the ,S= sizes of cur/ and new/ of the INBOX and every folder, and writes
    maildirsize with the limits line first."""
    maildir = tmp_path / "m"
    fill(maildir, [100, 200])
    fill(maildir / ".Sent", [50], sub="new")
    usage = recalculate(maildir, Limits(1000, 10))
    assert usage == Usage(350, 3)
    assert (maildir / MAILDIRSIZE).read_text() == "1000S,10C\n350 3\n"
    assert read_maildirsize(maildir)[0] == usage


def test_deltas_add_up_and_a_long_file_is_recounted(tmp_path: Path) -> None:
    """Deltas are appended lines; a maildirsize past 5120 bytes reads as missing (recount)."""
    maildir = tmp_path / "m"
    fill(maildir, [])
    recalculate(maildir, Limits(1000))
    add_usage(maildir, 30, 1)
    add_usage(maildir, -10, -1)
    assert read_maildirsize(maildir)[0] == Usage(20, 0)
    for _ in range(800):
        add_usage(maildir, 1000, 1)
    assert read_maildirsize(maildir)[0] is None


# -- delivery ------------------------------------------------------------------------------------


def copy_writer(maildir: Path, size: int) -> Any:
    def write() -> str:
        name = f"99.Q.host,S={size}"
        (maildir / "new" / name).write_bytes(b"y" * size)
        return name

    return write


def test_delivery_within_quota_is_counted(tmp_path: Path) -> None:
    """A message that fits is written and its stored size appended to maildirsize."""
    keeper = quota(tmp_path, Limits(1000))
    maildir = maildir_of(tmp_path, ALICE)
    fill(maildir, [100])
    keeper.deliver(ALICE, Limits(1000), 300, copy_writer(maildir, 300))
    assert read_maildirsize(maildir)[0] == Usage(400, 2)


def test_delivery_over_quota_raises_and_writes_nothing(tmp_path: Path) -> None:
    """A message that would exceed the storage or the message limit is refused."""
    maildir = maildir_of(tmp_path, ALICE)
    fill(maildir, [600, 100])
    keeper = quota(tmp_path, Limits(1000, 2))
    with pytest.raises(MailboxFullError) as refused:
        keeper.deliver(ALICE, Limits(1000), 500, copy_writer(maildir, 500))
    assert refused.value.describe() == "700/1000 bytes"
    with pytest.raises(MailboxFullError):
        keeper.deliver(ALICE, Limits(None, 2), 1, copy_writer(maildir, 1))
    assert sorted(os.listdir(maildir / "new")) == []


def test_deleted_mail_is_noticed_before_refusing(tmp_path: Path) -> None:
    """A mailbox that looks full by its deltas is recounted when a folder changed since (a
    message deleted over IMAP writes no delta)."""
    maildir = maildir_of(tmp_path, ALICE)
    fill(maildir, [900])
    keeper = quota(tmp_path, Limits(1000))
    assert keeper.usage(ALICE) == Usage(900, 1)
    stamp = os.stat(maildir / MAILDIRSIZE).st_mtime_ns
    (maildir / "cur" / "0.M0.host,S=900:2,").unlink()
    os.utime(maildir / "cur", ns=(stamp + 10**9, stamp + 10**9))
    keeper.deliver(ALICE, Limits(1000), 500, copy_writer(maildir, 500))
    assert read_maildirsize(maildir)[0] == Usage(500, 1)


def notices_in(maildir: Path) -> list[str]:
    return [n for n in os.listdir(maildir / "new")
            if b"Subject: Your mailbox is over" in (maildir / "new" / n).read_bytes()[:1024]]


def test_crossing_the_warning_level_leaves_one_notice(tmp_path: Path) -> None:
    """The delivery that takes the mailbox past warn_percent puts one notice in new/; later
    deliveries above the level add none."""
    maildir = maildir_of(tmp_path, ALICE)
    fill(maildir, [])
    keeper = quota(tmp_path, Limits(10_000), warn=50)
    keeper.deliver(ALICE, Limits(10_000), 4000, copy_writer(maildir, 4000))
    assert len(os.listdir(maildir / "new")) == 1
    with capturedLogs() as events:
        keeper.deliver(ALICE, Limits(10_000), 2000, copy_writer(maildir, 2000))
    notices = notices_in(maildir)
    assert len(notices) == 1
    text = (maildir / "new" / notices[0]).read_bytes()
    assert b"Subject: Your mailbox is over 50% full" in text
    assert b"Auto-Submitted: auto-generated" in text
    assert any("quota warning" in str(e.get("log_format")) for e in events)
    keeper.deliver(ALICE, Limits(10_000), 100, copy_writer(maildir, 100))
    assert len(notices_in(maildir)) == 1


def test_copy_written_before_a_crash_is_delivered_not_deferred(tmp_path: Path) -> None:
    """A recovered message whose copy is already in the (now full) mailbox counts as delivered:
    the copy is found, nothing is written or counted twice."""
    keeper = quota(tmp_path / "maildirs", Limits(100))
    writer = MaildirWriter(tmp_path / "maildirs", ImmediateDiskPool(), "mx.test",  # type: ignore[arg-type]
                           quota=keeper)
    message = tmp_path / "m.msg"
    message.write_bytes(b"Subject: x\r\n\r\n" + b"y" * 300 + b"\r\n")
    envelope = make_envelope("Q2", local_recipient(ALICE))
    envelope.size = 320
    maildir = maildir_of(tmp_path / "maildirs", ALICE)
    fill(maildir, [])
    name = writer.file_name(envelope, envelope.recipients[0])
    (maildir / "cur" / f"{name},S=330:2,S").write_bytes(b"z" * 330)  # read by the user since
    attempt = result_of(writer.deliver(envelope, envelope.recipients[0], message,
                                       recovered=True))
    assert attempt.status is RecipientStatus.DELIVERED
    assert os.listdir(maildir / "new") == []


def test_maildir_writer_defers_with_4_2_2_over_quota(tmp_path: Path) -> None:
    """MaildirWriter with a quota: over it, the attempt is DEFERRED with 452 4.2.2, logged as
    one line without a traceback."""
    keeper = quota(tmp_path / "maildirs", Limits(100))
    writer = MaildirWriter(tmp_path / "maildirs", ImmediateDiskPool(), "mx.test",  # type: ignore[arg-type]
                           quota=keeper)
    message = tmp_path / "m.msg"
    message.write_bytes(b"Subject: x\r\n\r\n" + b"y" * 300 + b"\r\n")
    envelope = make_envelope("Q1", local_recipient(ALICE))
    envelope.size = 320
    with capturedLogs() as events:
        attempt = result_of(writer.deliver(envelope, envelope.recipients[0], message))
    assert attempt.status is RecipientStatus.DEFERRED
    assert str(attempt.reply) == "452 4.2.2 Mailbox full, will retry"
    assert [e for e in events if e.get("log_failure")] == []


# -- RCPT ----------------------------------------------------------------------------------------


class OneUserRouter:
    def is_local_domain(self, domain: str) -> bool:
        return True

    def resolve(self, address: str) -> list[Destination]:
        if address.startswith("team@"):
            return [Destination(ALICE, TargetKind.LOCAL, ALICE),
                    Destination("bob@example.test", TargetKind.LOCAL, "bob@example.test")]
        return [Destination(address, TargetKind.LOCAL, address)]


def test_rcpt_to_a_full_mailbox_gets_452_4_2_2_and_an_alias_does_not() -> None:
    """A recipient whose one mailbox is at its quota is refused with 452 4.2.2; an alias that
    includes it, and other users, are accepted."""
    def full(mailbox: str) -> Deferred[bool]:
        return succeed(mailbox == ALICE)

    policy = InboundPolicy(OneUserRouter(), mailbox_full=full)  # type: ignore[arg-type]
    session = SessionInfo("mx.test", "192.0.2.1")
    failures: list[Any] = []
    policy.check_recipient(session, parse_mailbox(ALICE)).addErrback(failures.append)
    assert isinstance(failures[0].value, RecipientRejected)
    assert failures[0].value.reply == replies.MAILBOX_FULL
    assert str(replies.MAILBOX_FULL).startswith("452 4.2.2")
    bob = result_of(policy.check_recipient(session, parse_mailbox("bob@example.test")))
    assert [d.mailbox for d in bob] == ["bob@example.test"]
    team = result_of(policy.check_recipient(session, parse_mailbox("team@example.test")))
    assert len(team) == 2


# -- the free-space floor ------------------------------------------------------------------------


def test_storage_floor_refuses_below_it_and_for_a_size_that_does_not_fit(tmp_path: Path) -> None:
    """Below the floor every MAIL gets 452 4.3.1; above it a declared SIZE that would take the
    free space below the floor gets it too (RFC 1870 §6.1); unknown free space refuses nothing."""
    floor = StorageFloor(tmp_path, 1000, lambda f, *a: succeed(f(*a)))
    assert floor.refusal(None) is None
    floor.update(5000)
    assert floor.refusal(None) is None and floor.refusal(4000) is None
    assert floor.refusal(4500) == replies.SYSTEM_FULL
    floor.update(999)
    assert floor.refusal(None) == replies.SYSTEM_FULL
    assert str(replies.SYSTEM_FULL).startswith("452 4.3.1")


def test_storage_floor_logs_once_when_the_state_starts_and_ends(tmp_path: Path) -> None:
    """The low state is logged once on entry and once on exit, not at every look."""
    floor = StorageFloor(tmp_path, 1000, lambda f, *a: succeed(f(*a)))
    with capturedLogs() as events:
        for free in (5000, 10, 20, 30, 2000, 3000):
            floor.update(free)
    texts = [str(e["log_format"]) for e in events]
    assert len(texts) == 2
    assert "below its free-space floor" in texts[0] and "has room again" in texts[1]


def test_storage_floor_refresh_reads_statvfs_in_the_pool(tmp_path: Path) -> None:
    """refresh() asks the disk pool for the free space of the spool's file system."""
    calls: list[Any] = []

    def run(func: Any, *args: Any) -> Deferred[Any]:
        calls.append(func)
        return succeed(func(*args))

    floor = StorageFloor(tmp_path, 1, run)
    result_of(floor.refresh())
    stat = os.statvfs(tmp_path)
    assert len(calls) == 1 and floor.free is not None
    assert abs(floor.free - stat.f_bavail * stat.f_frsize) < 64 * 1024 * 1024


# -- IMAP QUOTA (RFC 9208) -----------------------------------------------------------------------


@pytest.fixture
def imap(tmp_path: Path) -> Server:
    server = Server(tmp_path / "maildirs", allow_plaintext_auth=True)
    server.factory.quota = MailboxQuota(
        QuotaRules(Limits(), {USER: Limits(4096, 2)}), tmp_path / "maildirs")
    assert maildir_of(tmp_path / "maildirs", USER) == server.inbox
    return server


def test_imap_advertises_quota_and_reports_the_root(imap: Server) -> None:
    """After login CAPABILITY lists QUOTA and its resources; GETQUOTAROOT names the root ""
    with STORAGE in KiB and MESSAGE; GETQUOTA "" gives the same."""
    client = imap.connect()
    client.login()
    assert "QUOTA=RES-MESSAGE" in client.ok("CAPABILITY")
    out = client.ok("GETQUOTAROOT INBOX")
    assert '* QUOTAROOT INBOX ""' in out and '* QUOTA "" (STORAGE 0 4 MESSAGE 0 2)' in out
    assert '* QUOTA "" (STORAGE 0 4 MESSAGE 0 2)' in client.ok('GETQUOTA ""')
    assert client.status('GETQUOTA "other"').startswith("NO [NONEXISTENT]")
    assert client.status("GETQUOTAROOT Nowhere").startswith("NO [NONEXISTENT]")
    assert client.status('SETQUOTA "" (STORAGE 10)').startswith("NO [NOPERM]")


def test_imap_append_over_quota_gets_overquota(imap: Server) -> None:
    """APPEND that fits is stored and counted; one over the limit gets NO [OVERQUOTA]."""
    client = imap.connect()
    client.login()
    message = b"Subject: a\r\n\r\n" + b"x" * 1000 + b"\r\n"
    client.ok(b"APPEND INBOX {%d+}\r\n" % len(message) + message)
    big = b"Subject: b\r\n\r\n" + b"x" * 4000 + b"\r\n"
    answer = client.status(b"APPEND INBOX {%d+}\r\n" % len(big) + big)
    assert answer.startswith("NO [OVERQUOTA]")
    assert "MESSAGE 1 2" in client.ok("GETQUOTAROOT INBOX")


def test_imap_append_of_a_spooled_literal_counts_its_size(imap: Server) -> None:
    """A literal large enough to go to a temporary file is measured by its size there: over
    the limit it gets NO [OVERQUOTA], and nothing is stored."""
    client = imap.connect()
    client.login()
    client.session._framer.spool_threshold = 64
    big = b"Subject: b\r\n\r\n" + b"x" * 5000 + b"\r\n"
    answer = client.status(b"APPEND INBOX {%d+}\r\n" % len(big) + big)
    assert answer.startswith("NO [OVERQUOTA]")
    assert "MESSAGE 0 2" in client.ok("GETQUOTAROOT INBOX")


def test_imap_without_quota_advertises_nothing(tmp_path: Path) -> None:
    """Without quotas configured, QUOTA is not advertised and its commands are unknown."""
    client = Server(tmp_path / "maildirs", allow_plaintext_auth=True).connect()
    client.login()
    assert "QUOTA" not in client.ok("CAPABILITY")
    assert client.status("GETQUOTAROOT INBOX").startswith("BAD")


# -- the SMTP session ----------------------------------------------------------------------------


class FullSink(MemorySink):
    """A sink whose spool commit meets a full file system."""

    def submit(self, envelope: object, message: bytes) -> Deferred[None]:
        return fail(OSError(errno.ENOSPC, "No space left on device"))


def test_smtp_mail_below_the_floor_gets_452_4_3_1() -> None:
    """The session asks the listener's StorageFloor at MAIL FROM, with the declared SIZE."""
    floor = StorageFloor(Path("/"), 1000, lambda f, *a: succeed(f(*a)))
    floor.update(5000)
    factory = make_factory()
    factory.storage = floor
    driver = SessionDriver(factory)
    driver.lines()
    driver.send(b"EHLO client.test\r\n")
    assert driver.send(b"MAIL FROM:<a@remote.test> SIZE=4500\r\n") == [
        "452 4.3.1 Insufficient system storage, try again later"]
    assert driver.codes(b"MAIL FROM:<a@remote.test> SIZE=100\r\n") == [250]
    floor.update(10)
    driver.send(b"RSET\r\n")
    assert driver.codes(b"MAIL FROM:<a@remote.test>\r\n") == [452]


def test_smtp_full_spool_at_commit_gets_452_4_3_1_without_a_traceback() -> None:
    """A commit failing with ENOSPC answers 452 4.3.1 and logs no traceback."""
    driver = SessionDriver(make_factory(sink=FullSink()))
    driver.lines()
    driver.send(b"EHLO client.test\r\n")
    driver.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    with capturedLogs() as events:
        assert driver.send(b"DATA\r\n") == ["354 End data with <CR><LF>.<CR><LF>"]
        answer = driver.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert answer == ["452 4.3.1 Insufficient system storage, try again later"]
    assert [e for e in events if e.get("log_failure")] == []


def test_imap_copy_over_quota_gets_overquota_and_move_does_not(imap: Server) -> None:
    """COPY adds to the mailbox and is refused over the quota; MOVE within it takes no room."""
    client = filled(imap, 2)
    client.ok("CREATE Archive")
    assert client.status("COPY 1:2 Archive").startswith("NO [OVERQUOTA]")
    assert client.status("MOVE 1 Archive").startswith("OK")


def test_imap_append_on_a_full_disk_gets_overquota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """APPEND meeting ENOSPC is answered NO [OVERQUOTA] "Not enough disk space" (as Dovecot)."""
    from mailsys.imap import transfers

    def full(folder: Any, messages: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transfers, "_append", full)
    client = Server(tmp_path / "maildirs", allow_plaintext_auth=True).connect()
    client.login()
    message = b"Subject: a\r\n\r\nhi\r\n"
    answer = client.status(b"APPEND INBOX {%d+}\r\n" % len(message) + message)
    assert answer == "NO [OVERQUOTA] Not enough disk space"
