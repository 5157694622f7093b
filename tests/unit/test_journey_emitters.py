"""The rooms emit their journey steps: the SMTP session (each command with its reply), the sink
(spool commit and routes), the runner, the Maildir writer and the DSN notifier (the link)."""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailsys import replies
from mailsys.delivery.maildir import MaildirWriter
from mailsys.delivery.mx import MXResolver
from mailsys.delivery.nexthop import NextHops
from mailsys.delivery.relay import RelayAgent, RelaySettings
from mailsys.delivery.tlspolicy import ClientTLS, TLSPolicies
from mailsys.envelope import Envelope, Recipient, RecipientStatus, TargetKind
from mailsys.journey.events import JourneyEvent, MemoryRecorder
from mailsys.journey.steps import describe
from mailsys.labdns import Zone
from mailsys.mailbox.layout import delivered_queue_id, delivery_base
from mailsys.queue.dsn import DSNNotifier
from mailsys.queue.runner import QueueRunner
from mailsys.queue.sink import QueueSink
from mailsys.queue.spool import Spool
from mailsys.smtp.message import field_value, message_id_of
from mailsys.smtp.policy import SubmissionPolicy
from mailsys.smtp.server import ListenerRole
from mailsys.smtp.testing import (
    HOSTNAME,
    LOCAL_DOMAIN,
    USERS,
    FakeTLSConnection,
    MemorySink,
    SessionDriver,
    StaticRouter,
    make_factory,
    memory_portal,
)
from mailsys.values import TLSPolicy
from tests.unit.imap_support import Server as ImapServer
from tests.unit.imap_support import selected
from tests.unit.mailbox_support import deliver
from tests.unit.mailbox_support import message as imap_message
from tests.unit.relay_support import FakeDialer, FakeMTA
from tests.unit.test_relay import MESSAGE, ZONE
from tests.unit.test_runner import FakeAgent
from tests.unit.test_spool import ImmediateDiskPool

START = 1_700_000_000.0
USER = "alice@example.test"
PASSWORD = "s3cret-Pw"


class FakeContexts:
    """A TLSContextSource handing out a marker object."""

    context = object()

    def server_context(self) -> object:
        return self.context


def by_kind(recorder: MemoryRecorder, kind: str) -> list[JourneyEvent]:
    return [event for event in recorder.events if event.kind == kind]


def mta(recorder: MemoryRecorder) -> SessionDriver:
    driver = SessionDriver(make_factory(journey=recorder, sink=MemorySink()))
    driver.lines()
    return driver


def test_an_mta_session_records_each_command_with_its_reply() -> None:
    """Connect, EHLO, MAIL, a refused and an accepted RCPT, DATA and QUIT are steps, in order,
    MAIL to DATA under one transaction number and DATA with the queue id and Message-ID."""
    recorder = MemoryRecorder()
    driver = mta(recorder)
    driver.send(b"EHLO client.test\r\nMAIL FROM:<x@sender.test> SIZE=100\r\n"
                b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    driver.send(b"Subject: hi\r\nMessage-ID:\r\n <m1@sender.test>\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    driver.lose()
    assert recorder.kinds() == ["smtp.connect", "smtp.ehlo", "smtp.mail", "smtp.rcpt",
                                "smtp.rcpt", "smtp.data"]
    connect, ehlo, mail, refused, accepted, data = recorder.events
    assert connect.fields == {"client": "192.0.2.10", "listener": "mta"}
    assert ehlo.fields == {"command": "EHLO", "name": "client.test", "reply": "250"}
    assert mail.fields == {"sender": "x@sender.test", "reply": "250 2.1.0 Sender ok", "txn": 1}
    assert refused.fields["recipient"] == "nobody@example.test"
    assert refused.fields["reply"].startswith("550 5.1.1")
    assert accepted.fields["reply"].startswith("250")
    assert data.queue_id is not None and data.message_id == "m1@sender.test"
    assert data.fields["reply"] == f"250 2.0.0 Ok: queued as {data.queue_id}"
    assert data.fields["command"] == "DATA" and data.fields["size"] > 0
    assert {e.session for e in recorder.events} == {connect.session}
    assert [e.txn for e in recorder.events] == [None, None, 1, 1, 1, 1]


def test_a_session_broken_off_inside_data_is_a_step() -> None:
    """A client that leaves inside DATA: the close says what was lost (a QUIT is no step)."""
    recorder = MemoryRecorder()
    driver = mta(recorder)
    driver.send(b"EHLO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.test>\r\n"
                b"DATA\r\nSubject: half\r\n")
    driver.lose()
    [close] = by_kind(recorder, "smtp.close")
    assert close.fields["reason"].startswith("lost connection after DATA")
    assert close.txn == 1 and close.fields["messages"] == 0


def test_rset_and_a_second_mail_start_a_new_transaction() -> None:
    """After RSET the next MAIL is transaction 2; a refused MAIL is recorded with its reply."""
    recorder = MemoryRecorder()
    driver = mta(recorder)
    driver.send(b"EHLO c.test\r\nMAIL FROM:<a@sender.test>\r\nRSET\r\n"
                b"MAIL FROM:<b@sender.test>\r\nMAIL FROM:<c@sender.test>\r\n")
    mails = by_kind(recorder, "smtp.mail")
    assert [(m.fields["sender"], m.txn) for m in mails] == [
        ("a@sender.test", 1), ("b@sender.test", 2), ("c@sender.test", 2)]
    assert mails[2].fields["reply"].startswith("503")  # nested MAIL: the open one goes on


def test_a_refused_message_is_recorded_without_a_queue_id() -> None:
    """DATA refused (here: a bare LF) is a step with its reply and no queue id."""
    recorder = MemoryRecorder()
    driver = mta(recorder)
    driver.send(b"EHLO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.test>\r\n"
                b"DATA\r\nSubject: x\nbare\r\n.\r\n")
    [data] = by_kind(recorder, "smtp.data")
    assert data.queue_id is None and data.fields["reply"].startswith("5")


def submission(recorder: MemoryRecorder, clock: Clock) -> SessionDriver:
    router = StaticRouter({LOCAL_DOMAIN}, set(USERS))
    factory = make_factory(role=ListenerRole.SUBMISSIONS, policy=SubmissionPolicy(router),
                           clock=clock, tls=FakeContexts(),  # type: ignore[arg-type]
                           portal=memory_portal({USER: PASSWORD}), journey=recorder)
    driver = SessionDriver(factory)
    driver.lines()
    return driver


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def test_submission_records_tls_and_the_user_never_the_password() -> None:
    """On 465 the TLS in use and the authenticated user are steps; the SASL response, the
    password and a failed login's user name are in no event."""
    recorder = MemoryRecorder()
    clock = Clock()
    driver = submission(recorder, clock)
    driver.send(b"EHLO c.test\r\nAUTH PLAIN " + plain("mallory@example.test", "guess") + b"\r\n")
    clock.advance(60)  # a failed login answers after the throttle's delay
    driver.send(b"AUTH PLAIN " + plain(USER, PASSWORD) + b"\r\n")
    clock.advance(60)
    tls = by_kind(recorder, "smtp.tls")
    assert len(tls) == 1 and tls[0].fields["implicit"] is True
    handle = FakeTLSConnection()
    assert tls[0].fields["tls"] == (
        f"using {handle.get_protocol_version_name()} with cipher {handle.get_cipher_name()} "
        f"({handle.get_cipher_bits()}/{handle.get_cipher_bits()} bits)")
    failed, ok = by_kind(recorder, "smtp.auth")
    assert failed.fields == {"mechanism": "PLAIN", "reply": str(replies.AUTH_INVALID)}
    assert ok.fields == {"user": USER, "mechanism": "PLAIN",
                         "reply": "235 2.7.0 Authentication successful"}
    everything = repr([e.fields for e in recorder.events])
    for secret in (PASSWORD, "guess", "mallory", plain(USER, PASSWORD).decode()):
        assert secret not in everything


def test_message_id_is_read_from_a_folded_header() -> None:
    """The Message-ID comes without brackets, also folded or after other fields."""
    header = b"From: a@b\r\nMessage-Id: \r\n\t<x.1@host>  (comment)\r\nTo: c@d\r\n\r\n"
    assert message_id_of(header) == "x.1@host"
    assert field_value(header, b"To") == b"c@d"
    assert message_id_of(b"Subject: none\r\n\r\n") is None


# --- the queue: sink, runner, Maildir writer and notices, with one recorder ----------------------


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", ImmediateDiskPool())  # type: ignore[arg-type]
    s.recover()
    yield s
    s.close()


def test_the_queue_records_commit_routes_deliveries_and_the_bounce_link(
        spool: Spool, clock: Clock, tmp_path: Path) -> None:
    """A message to a local and a failing remote recipient: its commit with both routes, the
    Maildir file, the failed relay attempt, then the bounce linked to it and delivered."""
    recorder = MemoryRecorder(now=clock.seconds)
    relay = FakeAgent(clock)
    relay.default = RecipientStatus.FAILED
    maildir = MaildirWriter(tmp_path / "maildirs", ImmediateDiskPool(),  # type: ignore[arg-type]
                            "mx.example.test", clock=clock, journey=recorder)
    runner = QueueRunner(spool, {TargetKind.RELAY: relay, TargetKind.LOCAL: maildir}, clock,
                         journey=recorder)
    sink = QueueSink(spool, runner, recorder)
    router = StaticRouter({"example.test"}, {USER})
    runner.notifier = DSNNotifier(sink, router, ImmediateDiskPool(),  # type: ignore[arg-type]
                                  "mx.example.test", clock, journey=recorder)
    runner.startService()
    envelope = Envelope(
        queue_id=spool.new_queue_id(), sender=USER, received_at=START, size=30,
        recipients=[Recipient(USER, "team@example.test", TargetKind.LOCAL, mailbox=USER),
                    Recipient("bob@remote.test", "bob@remote.test", TargetKind.RELAY)])
    sink.submit(envelope, b"Subject: t\r\nMessage-ID: <o@x>\r\n\r\nbody\r\n")
    clock.advance(0)
    queue_id = envelope.queue_id
    kinds = [(e.kind, e.queue_id == queue_id) for e in recorder.events]
    assert kinds[:3] == [("spool.commit", True), ("delivery.maildir", True),
                         ("delivery.attempt", True)]
    commit, local, remote = recorder.events[:3]
    assert commit.fields["routes"] == [
        {"recipient": USER, "original": "team@example.test", "target": "local", "mailbox": USER},
        {"recipient": "bob@remote.test", "original": "bob@remote.test", "target": "relay",
         "mailbox": None}]
    assert local.fields["folder"] == "INBOX" and local.fields["written"] is True
    written = list((tmp_path / "maildirs" / "example.test" / "alice" / "new").iterdir())
    assert local.fields["file"] in [p.name for p in written]
    assert remote.fields["status"] == "failed" and remote.fields["agent"] == "relay"
    dsn = by_kind(recorder, "dsn.created")
    assert len(dsn) == 1
    bounce_id = dsn[0].queue_id
    assert dsn[0].fields["parent"] == queue_id and dsn[0].fields["relation"] == "bounce"
    assert dsn[0].message_id == f"{bounce_id}.dsn@mx.example.test"
    assert dsn[0].fields["recipients"] == ["bob@remote.test"]
    later = [(e.kind, e.queue_id) for e in recorder.events[3:]]
    assert ("spool.commit", bounce_id) in later and ("delivery.maildir", bounce_id) in later
    # A local delivery that worked is the writer's step only: no runner attempt repeats it.
    assert not [e for e in by_kind(recorder, "delivery.attempt")
                if e.fields["agent"] == "local"]


# --- relay: MX answers, hosts tried in order, TLS ------------------------------------------------


def test_relay_records_mx_answers_the_hosts_tried_and_tls(tmp_path: Path) -> None:
    """MX answers, a refused first host, the second host tried after it, and the TLS result
    are steps of the message; the second host's line says why it was tried."""
    recorder = MemoryRecorder()
    clock = Clock()
    clock.advance(START)
    dialer = FakeDialer(clock)
    agent = RelayAgent(RelaySettings(helo_name="mail.example.test"), NextHops({}, None),
                       TLSPolicies(TLSPolicy.OPPORTUNISTIC, {}), ClientTLS(),
                       MXResolver(Zone(ZONE), rng=random.Random(1)), dialer,
                       ImmediateDiskPool(), clock, recorder)  # type: ignore[arg-type]
    agent.startService()
    dialer.add("127.0.0.2", FakeMTA("mx1.remote.test"))
    dialer.add("127.0.0.3", FakeMTA("mx2.remote.test"))
    dialer.refuse("127.0.0.2")
    path = tmp_path / "message.msg"
    path.write_bytes(MESSAGE)
    recipient = Recipient("one@remote.test", "one@remote.test", TargetKind.RELAY)
    envelope = Envelope(queue_id="Q1", sender=USER, recipients=[recipient], received_at=START,
                        size=len(MESSAGE))
    agent.deliver(envelope, recipient, path)
    clock.advance(0)
    agent.stopService()
    assert recorder.kinds() == ["relay.mx", "relay.connect", "relay.connect", "relay.tls"]
    assert {e.queue_id for e in recorder.events} == {"Q1"}
    mx, refused, connected, tls = recorder.events
    assert mx.fields == {"domain": "remote.test", "implicit": False,
                         "answers": ["10 mx1.remote.test", "20 mx2.remote.test"]}
    assert refused.fields["host"] == "mx1.remote.test" and refused.fields["error"]
    assert connected.fields["host"] == "mx2.remote.test" and connected.fields["after"]
    assert tls.fields["tls"].startswith("using TLSv1.3") and tls.fields["verified"] is False
    assert describe(connected).text.startswith(
        "tried mx2.remote.test [127.0.0.3] (preference 20) after the one before failed")
    assert describe(connected).rule == "next MX host, RFC 5321 §5.1"
    assert describe(tls).rule == "RFC 3207 §4.1; opportunistic, RFC 7435 §3"


def test_a_delivered_file_name_gives_back_its_queue_id() -> None:
    """POP3 and IMAP find the journey of a message by the queue id in its Maildir name; a file
    this server did not deliver has none."""
    name = delivery_base(START, "18C5F0A2B3D4E5A1B2C", USER, USER, "mx.example.test")
    assert delivered_queue_id(name + ",S=10,W=12:2,S") == "18C5F0A2B3D4E5A1B2C"
    assert delivered_queue_id("1700000000.M123P45Q6.host,S=10:2,") is None


# --- IMAP: the first read, flag changes, MOVE and EXPUNGE ----------------------------------------


def test_imap_records_first_read_flags_move_and_expunge(tmp_path: Path) -> None:
    """Of a message this server delivered, the first body FETCH (not the second), a flag
    change, a MOVE and an EXPUNGE are steps with the user and folder; others are not."""
    recorder = MemoryRecorder()
    server = ImapServer(tmp_path / "maildirs", allow_plaintext_auth=True)
    server.factory.journey = recorder
    first = deliver(server.inbox, imap_message(1), name=f"1700000000.Q{'A' * 19}R{'B' * 10}.host")
    deliver(server.inbox, imap_message(2), name=f"1700000001.Q{'C' * 19}R{'D' * 10}.host")
    deliver(server.inbox, imap_message(3))  # APPENDed or another program's: no journey
    client = selected(server)
    client.ok("FETCH 1:3 (BODY[])")
    client.ok("FETCH 1 (BODY[])")
    client.ok("STORE 1 +FLAGS.SILENT (\\Flagged)")
    client.ok("STORE 2 +FLAGS (\\Deleted)")
    client.ok("EXPUNGE")
    client.ok("CREATE Archive")
    client.ok("MOVE 1 Archive")
    assert first.startswith("1700000000.Q")
    steps = [(e.kind, e.queue_id) for e in recorder.events]
    assert steps == [("imap.fetch", "A" * 19), ("imap.fetch", "C" * 19),
                     ("imap.flags", "A" * 19), ("imap.flags", "C" * 19),
                     ("imap.expunge", "C" * 19), ("imap.move", "A" * 19)]
    fetch, _, flags, _, expunge, move = recorder.events
    assert fetch.fields == {"user": "demo@example.test", "folder": "INBOX", "uid": 1,
                            "item": "BODY[]"}
    assert flags.fields["operation"] == "+FLAGS" and flags.fields["flags"] == ["\\Flagged"]
    assert expunge.fields["uid"] == 2
    assert move.fields["to"] == "Archive"
    assert describe(move).text == "demo@example.test moved it from INBOX to Archive"


def test_a_submitted_message_without_message_id_is_found_by_the_one_added() -> None:
    """Submission adds a Message-ID a message lacks (RFC 6409 §8.3); the journey has it."""
    recorder = MemoryRecorder()
    clock = Clock()
    driver = submission(recorder, clock)
    driver.send(b"EHLO c.test\r\nAUTH PLAIN " + plain(USER, PASSWORD) + b"\r\n")
    clock.advance(60)
    driver.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    driver.send(b"Subject: no id\r\n\r\nbody\r\n.\r\n")
    [data] = by_kind(recorder, "smtp.data")
    assert data.queue_id is not None
    assert data.message_id == f"{data.queue_id}@{HOSTNAME}"
