"""Delivery status notifications: RFC 3464 bounces, delay notices, success reports, RET and
NOTIFY, no bounce for a bounce, and their durability through the queue runner."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from mailsys.envelope import Attempt, Envelope, Recipient, RecipientStatus, TargetKind
from mailsys.queue.dsn import DSNNotifier, status_code
from mailsys.queue.runner import NOTICE_RETRY, QueueRunner
from mailsys.queue.sink import QueueSink
from mailsys.queue.spool import Spool
from mailsys.replies import Reply
from mailsys.smtp.testing import StaticRouter
from tests.unit.test_runner import FakeAgent
from tests.unit.test_spool import ImmediateDiskPool

START = 1_700_000_000.0
HOST = "mail.example.test"
ORIGINAL = (b"Received: from client\r\nFrom: alice@example.test\r\nSubject: hello\r\n\r\n"
            b"Body line.\r\n")


class Collector:
    """A Submitter that keeps the notices (or fails, when told)."""

    def __init__(self) -> None:
        self.sent: list[tuple[Envelope, bytes]] = []
        self.failing = False
        self._next = 0

    def new_queue_id(self) -> str:
        self._next += 1
        return f"DSN{self._next}"

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
        if self.failing:
            return fail(OSError("disk full"))
        self.sent.append((envelope, message))
        return succeed(None)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def original(tmp_path: Path) -> Path:
    path = tmp_path / "Q1.msg"
    path.write_bytes(ORIGINAL)
    return path


@pytest.fixture
def collector() -> Collector:
    return Collector()


def notifier(collector: Collector, clock: Clock, **kwargs: Any) -> DSNNotifier:
    router = StaticRouter({"example.test"}, {"alice@example.test"})
    kwargs.setdefault("max_lifetime", 5 * 86400.0)
    return DSNNotifier(collector, router, ImmediateDiskPool(), HOST, clock,  # type: ignore[arg-type]
                       **kwargs)


def relay_recipient(address: str, *attempts: Attempt, **kwargs: Any) -> Recipient:
    r = Recipient(address=address, original=address, kind=TargetKind.RELAY, **kwargs)
    for attempt in attempts:
        r.record(attempt)
    return r


def envelope(*recipients: Recipient, sender: str = "alice@example.test", **kwargs: Any) -> (
    Envelope
):
    return Envelope(queue_id="Q1", sender=sender, recipients=list(recipients),
                    received_at=START, size=len(ORIGINAL), **kwargs)


NO_USER = Reply(550, "5.1.1", "no")
REFUSED = Reply(451, "4.4.1", "x")
LATER = Reply(451, "4.7.1", "later")


def remote(status: RecipientStatus, reply: Reply, at: float = START) -> Attempt:
    return Attempt(at=at, status=status, host="mx1.remote.test[127.0.0.2]:25", reply=reply,
                   mta="mx1.remote.test")


def run(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box
    return box[0]


def parse(message: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def report_parts(message: bytes) -> tuple[EmailMessage, list[Message], Any]:
    """(the notice, its delivery-status blocks, the returned part)."""
    parsed = parse(message)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    text, status, returned = parsed.get_payload()  # type: ignore[misc]
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    return parsed, status.get_payload(), returned


def test_failure_bounce_has_the_rfc3464_fields(collector: Collector, clock: Clock,
                                               original: Path) -> None:
    """A failed recipient gets a multipart/report with Reporting-MTA, Arrival-Date,
    Final-Recipient, Original-Recipient, Action, Status, Remote-MTA and Diagnostic-Code, and
    the whole small message returned."""
    r = relay_recipient("bob@remote.test", remote(RecipientStatus.FAILED,
                                                  Reply(550, "5.1.1",
                                                        "<bob@remote.test>: no such user")))
    r.original = "team@example.test"
    env = envelope(r, envid="ENV-1")
    assert run(notifier(collector, clock).notify(env, original)) is True
    ((notice_env, message),) = collector.sent
    assert notice_env.sender == ""
    assert [(x.address, x.kind, x.mailbox) for x in notice_env.recipients] == [
        ("alice@example.test", TargetKind.LOCAL, "alice@example.test")]
    parsed, blocks, returned = report_parts(message)
    assert str(parsed["To"]) == "alice@example.test"
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsed["Auto-Submitted"] == "auto-replied"
    per_message, per_recipient = blocks
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert per_message["Original-Envelope-Id"] == "ENV-1"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@remote.test"
    assert per_recipient["Original-Recipient"] == "rfc822; team@example.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx1.remote.test"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.test>: no such user"
    assert returned.get_content_type() == "message/rfc822"
    assert returned.get_payload()[0]["Subject"] == "hello"
    assert b"\r\n" in message and b"\n" not in message.replace(b"\r\n", b"")
    assert r.notices == ("FAILURE",)


def test_local_failure_has_no_diagnostic_code(collector: Collector, clock: Clock,
                                              original: Path) -> None:
    """A failure we decided (null MX) has a Status but no Remote-MTA or Diagnostic-Code."""
    r = relay_recipient("x@nullmx.test", Attempt(
        START, RecipientStatus.FAILED, "", Reply(556, "5.1.10", "Recipient address has null MX")))
    run(notifier(collector, clock).notify(envelope(r), original))
    _, (_, block), _ = report_parts(collector.sent[0][1])
    assert block["Status"] == "5.1.10"
    assert block["Remote-MTA"] is None and block["Diagnostic-Code"] is None


def test_expired_quotes_the_last_remote_reply(collector: Collector, clock: Clock,
                                              original: Path) -> None:
    """After expiry the Status is 5.4.7 and Diagnostic-Code the last remote reply."""
    r = relay_recipient("bob@remote.test",
                        remote(RecipientStatus.DEFERRED, Reply(451, "4.7.1", "greylisted")),
                        Attempt(START + 9, RecipientStatus.DEFERRED, "",
                                Reply(451, "4.4.1", "refused")),
                        Attempt(START + 9, RecipientStatus.FAILED, "",
                                Reply(554, "5.4.7", "Delivery time expired")))
    run(notifier(collector, clock).notify(envelope(r), original))
    parsed, (_, block), _ = report_parts(collector.sent[0][1])
    assert block["Status"] == "5.4.7"
    assert block["Diagnostic-Code"] == "smtp; 451 4.7.1 greylisted"
    assert "Delivery time expired" in parsed.get_payload()[0].get_content()  # type: ignore[index]


def test_ret_hdrs_returns_headers_only(collector: Collector, clock: Clock,
                                       original: Path) -> None:
    """RET=HDRS: only the header section comes back, as text/rfc822-headers."""
    r = relay_recipient("bob@remote.test", remote(RecipientStatus.FAILED, NO_USER))
    run(notifier(collector, clock).notify(envelope(r, ret="HDRS"), original))
    message = collector.sent[0][1]
    _, _, returned = report_parts(message)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: hello" in message and b"Body line." not in message


def test_large_message_without_ret_returns_headers(collector: Collector, clock: Clock,
                                                   tmp_path: Path) -> None:
    """Without RET, a message larger than the return limit comes back as headers only;
    RET=FULL returns it whole."""
    big = tmp_path / "big.msg"
    big.write_bytes(ORIGINAL + b"x" * 998 + b"\r\n" * 1 + (b"y" * 998 + b"\r\n") * 60)
    r = relay_recipient("bob@remote.test", remote(RecipientStatus.FAILED, NO_USER))
    env = envelope(r)
    env.size = big.stat().st_size
    run(notifier(collector, clock).notify(env, big))
    assert report_parts(collector.sent[0][1])[2].get_content_type() == "text/rfc822-headers"
    r.notices = ()
    env.ret = "FULL"
    run(notifier(collector, clock).notify(env, big))
    assert report_parts(collector.sent[1][1])[2].get_content_type() == "message/rfc822"


def test_no_notice_for_the_null_sender(collector: Collector, clock: Clock,
                                       original: Path) -> None:
    """RFC 5321 §6.1: a bounce never causes another bounce."""
    r = relay_recipient("bob@remote.test", remote(RecipientStatus.FAILED, NO_USER))
    n = notifier(collector, clock)
    assert run(n.notify(envelope(r, sender=""), original)) is False
    assert collector.sent == [] and not n.owes(envelope(r, sender=""))


def test_notify_never_and_failure_only(collector: Collector, clock: Clock,
                                       original: Path) -> None:
    """NOTIFY=NEVER sends nothing; NOTIFY=FAILURE sends no delay notice."""
    never = relay_recipient("a@remote.test", remote(RecipientStatus.FAILED, NO_USER),
                            notify=("NEVER",))
    late = relay_recipient("b@remote.test", remote(RecipientStatus.DEFERRED, REFUSED),
                           notify=("FAILURE",))
    clock.advance(5 * 3600)
    n = notifier(collector, clock)
    assert run(n.notify(envelope(never, late), original)) is False
    assert collector.sent == [] and not n.owes(envelope(never))


def test_delay_notice_once_after_delay_warning(collector: Collector, clock: Clock,
                                               original: Path) -> None:
    """A recipient deferred longer than delay_warning gets one delay notice, with
    Will-Retry-Until, and headers only."""
    r = relay_recipient("bob@remote.test", remote(RecipientStatus.DEFERRED, LATER))
    env = envelope(r)
    n = notifier(collector, clock, delay_warning=3600.0)
    clock.advance(3599)
    assert run(n.notify(env, original)) is False
    clock.advance(1)
    assert run(n.notify(env, original)) is True
    assert run(n.notify(env, original)) is False
    assert len(collector.sent) == 1 and r.notices == ("DELAY",)
    parsed, (_, block), returned = report_parts(collector.sent[0][1])
    assert parsed["Subject"] == "Delayed Mail (still being retried)"
    assert block["Action"] == "delayed" and block["Status"] == "4.7.1"
    assert block["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"
    assert returned.get_content_type() == "text/rfc822-headers"
    assert not n.owes(env)  # a delay notice never holds a message back


def test_success_notice_for_local_delivery(collector: Collector, clock: Clock,
                                           original: Path) -> None:
    """NOTIFY=SUCCESS on a local delivery gives an Action: delivered report."""
    r = Recipient(address="carol@example.test", original="carol@example.test",
                  kind=TargetKind.LOCAL, mailbox="carol@example.test", notify=("SUCCESS",))
    r.record(Attempt(START, RecipientStatus.DELIVERED, "maildir", Reply(250, "2.0.0", "delivered")))
    assert run(notifier(collector, clock).notify(envelope(r), original)) is True
    parsed, (_, block), _ = report_parts(collector.sent[0][1])
    assert parsed["Subject"] == "Successful Mail Delivery Report"
    assert block["Action"] == "delivered" and block["Status"] == "2.0.0"


def test_failed_submission_is_owed_not_marked(collector: Collector, clock: Clock,
                                              original: Path) -> None:
    """A notice that could not be queued is not marked sent, and is owed."""
    r = relay_recipient("bob@remote.test", remote(RecipientStatus.FAILED, NO_USER))
    env = envelope(r)
    collector.failing = True
    n = notifier(collector, clock)
    assert run(n.notify(env, original)) is False
    assert r.notices == () and n.owes(env)


def test_unknown_sender_is_logged_and_dropped(collector: Collector, clock: Clock,
                                              original: Path) -> None:
    """A local sender that no longer exists cannot be told; the notice counts as done."""
    r = relay_recipient("bob@remote.test", remote(RecipientStatus.FAILED, NO_USER))
    env = envelope(r, sender="gone@example.test")
    n = notifier(collector, clock)
    assert run(n.notify(env, original)) is True
    assert collector.sent == [] and not n.owes(env)


@pytest.mark.parametrize(("reply", "code"), [(Reply(550, "5.1.1", "x"), "5.1.1"),
                                             (Reply(550, "", "no"), "5.0.0"),
                                             (Reply(451, "4.7.1", "x"), "4.7.1"),
                                             (Reply(0, "", ""), "4.0.0")])
def test_status_codes(reply: Reply, code: str) -> None:
    """The Status comes from the enhanced code, else from the reply's class."""
    assert status_code(reply) == code


# --- with the runner ----------------------------------------------------------------------------


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", ImmediateDiskPool())  # type: ignore[arg-type]
    s.recover()
    yield s
    s.close()


def wired(spool: Spool, clock: Clock) -> tuple[QueueRunner, FakeAgent, FakeAgent, QueueSink]:
    relay, local = FakeAgent(clock), FakeAgent(clock)
    runner = QueueRunner(spool, {TargetKind.RELAY: relay, TargetKind.LOCAL: local}, clock)
    sink = QueueSink(spool, runner)
    router = StaticRouter({"example.test"}, {"alice@example.test"})
    runner.notifier = DSNNotifier(sink, router, ImmediateDiskPool(), HOST, clock)  # type: ignore[arg-type]
    runner.startService()
    return runner, relay, local, sink


def test_bounce_is_queued_before_the_message_is_removed(spool: Spool, clock: Clock) -> None:
    """A failed relay recipient: the bounce is committed to the spool and delivered locally
    to the sender; the original leaves the queue only after."""
    runner, relay, local, sink = wired(spool, clock)
    relay.default = RecipientStatus.FAILED
    env = envelope(relay_recipient("bob@remote.test"))
    run(sink.submit(env, ORIGINAL))
    clock.advance(0)
    assert [c.address for c in local.calls] == ["alice@example.test"]
    bounce_id = local.calls[0].queue_id
    assert bounce_id != "Q1"
    assert len(runner) == 0  # both finished and removed
    assert not (spool.queue_dir / "Q1.env").exists()


def test_bounce_retried_when_it_could_not_be_queued(spool: Spool, clock: Clock,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """If the bounce cannot be committed the failed message stays queued (its failure on disk)
    and the bounce is tried again later."""
    runner, relay, local, sink = wired(spool, clock)
    relay.default = RecipientStatus.FAILED
    env = envelope(relay_recipient("bob@remote.test"))
    original_commit = spool.commit
    commits: list[str] = []

    def commit(e: Envelope, m: bytes) -> Deferred[None]:
        commits.append(e.queue_id)
        # The original goes in; the bounce finds the disk full.
        return original_commit(e, m) if len(commits) == 1 else fail(OSError("disk full"))

    monkeypatch.setattr(spool, "commit", commit)
    run(sink.submit(env, ORIGINAL))
    clock.advance(0)
    assert len(commits) == 2
    assert len(runner) == 1 and local.calls == []
    on_disk = spool.load("Q1").recipients[0]
    assert on_disk.status is RecipientStatus.FAILED and on_disk.notices == ()
    monkeypatch.setattr(spool, "commit", original_commit)
    clock.advance(NOTICE_RETRY)
    clock.advance(0)
    assert len(local.calls) == 1 and len(runner) == 0
    assert len(relay.calls) == 1  # the failed recipient is not tried again


# --- relay disabled: the waiting recipient ages like a deferred one -----------------------------


class ReadingAgent(FakeAgent):
    """A local agent that keeps the bytes of each message it delivers (notices are read here)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.messages: list[bytes] = []

    def deliver(self, envelope: Envelope, recipient: Any, message_path: Path, *,
                recovered: bool = False) -> Deferred[Attempt]:
        self.messages.append(Path(message_path).read_bytes())
        return super().deliver(envelope, recipient, message_path, recovered=recovered)


def advance_to(clock: Clock, offset: float) -> None:
    """Move the clock to START + offset one timer at a time, as a reactor would."""
    target = START + offset
    while True:
        times = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= target]
        if not times:
            break
        clock.advance(max(0.0, min(times) - clock.seconds()))
    clock.advance(target - clock.seconds())


def without_relay(spool: Spool, clock: Clock, local: ReadingAgent) -> QueueRunner:
    """A started runner with a local agent only (``[relay] enabled = false``) and notices."""
    runner = QueueRunner(spool, {TargetKind.LOCAL: local}, clock, retry_schedule=(60.0,),
                         max_lifetime=900.0)
    router = StaticRouter({"example.test"}, {"alice@example.test"})
    runner.notifier = DSNNotifier(QueueSink(spool, runner), router, ImmediateDiskPool(), HOST,  # type: ignore[arg-type]
                                  clock, delay_warning=300.0, max_lifetime=900.0)
    runner.load(spool.recover())
    runner.startService()
    return runner


def test_relay_disabled_delay_notice_then_bounce_once_across_a_restart(
        tmp_path: Path, clock: Clock) -> None:
    """With no relay agent, the sender gets one delay notice (4.3.2) at delay_warning and one
    bounce (5.4.7, "relaying is disabled") at max_lifetime, even with a restart in between."""
    spool = Spool(tmp_path / "spool", ImmediateDiskPool())  # type: ignore[arg-type]
    local = ReadingAgent(clock)
    runner = without_relay(spool, clock, local)
    run(QueueSink(spool, runner).submit(envelope(relay_recipient("bob@far.test")), ORIGINAL))
    advance_to(clock, 299)
    assert local.messages == []
    advance_to(clock, 300)
    assert len(local.messages) == 1
    parsed, (_, block), _ = report_parts(local.messages[0])
    assert parsed["Subject"] == "Delayed Mail (still being retried)"
    assert block["Action"] == "delayed" and block["Status"] == "4.3.2"
    assert "Relay disabled" in parsed.get_payload()[0].get_content()  # type: ignore[index]
    advance_to(clock, 420)
    assert len(local.messages) == 1  # once
    # A restart: a new spool object and runner over the same directory.
    assert run(runner.stopService()) is None
    spool.close()
    spool = Spool(tmp_path / "spool", ImmediateDiskPool())  # type: ignore[arg-type]
    local = ReadingAgent(clock)
    runner = without_relay(spool, clock, local)
    assert len(runner) == 1
    advance_to(clock, 899)
    assert local.messages == []  # no second delay notice after the restart
    assert len(runner) == 1
    advance_to(clock, 900)
    assert len(local.messages) == 1
    parsed, (_, block), returned = report_parts(local.messages[0])
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
    assert block["Action"] == "failed" and block["Status"] == "5.4.7"
    text = parsed.get_payload()[0].get_content()  # type: ignore[index]
    assert "relaying is disabled on this server" in text
    assert returned.get_content_type() == "message/rfc822"
    assert len(runner) == 0 and not (spool.queue_dir / "Q1.env").exists()
    advance_to(clock, 86400)
    assert len(local.messages) == 1  # once
    assert clock.getDelayedCalls() == []
    spool.close()
