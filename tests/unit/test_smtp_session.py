"""Tests for the SMTP session: commands and their sequence, parameters, pipelining, limits."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent
from zope.interface.verify import verifyObject

from mailsys import replies
from mailsys.address import Mailbox
from mailsys.envelope import TargetKind
from mailsys.interfaces import IMessageSink, IRouter
from mailsys.replies import Reply
from mailsys.routing import Destination
from mailsys.smtp.policy import InboundPolicy, RecipientRejected, SessionInfo, SubmissionPolicy
from mailsys.smtp.server import ListenerRole, SMTPServerFactory
from mailsys.smtp.testing import (
    LOCAL_DOMAIN,
    USERS,
    MemorySink,
    SessionDriver,
    SinkMode,
    StaticRouter,
    make_factory,
)

REPLY_LINE = re.compile(r"^[2-5]\d\d[ -]")
ENHANCED = re.compile(r"^[2-5]\d\d[ -][245]\.\d{1,3}\.\d{1,3} ")


def session(**kwargs: object) -> SessionDriver:
    driver = SessionDriver(make_factory(**kwargs))  # type: ignore[arg-type]
    driver.lines()  # the greeting
    return driver


def ready(**kwargs: object) -> SessionDriver:
    driver = session(**kwargs)
    driver.send(b"EHLO client.test\r\n")
    return driver


class DelayedPolicy:
    """A policy whose answers the test fires by hand, recording what it was asked."""

    requires_tls_before_mail = False
    requires_auth = False

    def __init__(self) -> None:
        self.senders: list[tuple[Mailbox | None, Deferred[Reply | None]]] = []
        self.recipients: list[tuple[Mailbox, Deferred[list[Destination]]]] = []

    def check_sender(self, session: SessionInfo, sender: Mailbox | None) -> Deferred[Reply | None]:
        d: Deferred[Reply | None] = Deferred()
        self.senders.append((sender, d))
        return d

    def check_recipient(
        self, session: SessionInfo, recipient: Mailbox
    ) -> Deferred[list[Destination]]:
        d: Deferred[list[Destination]] = Deferred()
        self.recipients.append((recipient, d))
        return d


def local(address: str) -> list[Destination]:
    return [Destination(address, TargetKind.LOCAL, address)]


# --- the fakes are held to the real interfaces ---------------------------------------------------


def test_fakes_provide_their_interfaces() -> None:
    """MemorySink is an IMessageSink and StaticRouter an IRouter."""
    assert verifyObject(IMessageSink, MemorySink())
    assert verifyObject(IRouter, StaticRouter({LOCAL_DOMAIN}, set(USERS)))


# --- greeting, EHLO, HELO ------------------------------------------------------------------------


def test_greeting() -> None:
    """The greeting is '220 <hostname> ESMTP mailsys'."""
    driver = SessionDriver(make_factory())
    assert driver.lines() == ["220 mx.example.test ESMTP mailsys"]


def test_ehlo_keywords() -> None:
    """EHLO advertises the extensions we implement, SIZE with the limit, no STARTTLS or AUTH
    without TLS, and no enhanced code (RFC 2034 §3)."""
    driver = session(max_message_size=12345)
    assert driver.send(b"EHLO client.test\r\n") == [
        "250-mx.example.test",
        "250-PIPELINING",
        "250-SIZE 12345",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-ENHANCEDSTATUSCODES",
        "250-CHUNKING",
        "250 DSN",
    ]


def test_helo() -> None:
    """HELO gets a one-line 250 with our host name."""
    assert session().send(b"HELO client.test\r\n") == ["250 mx.example.test"]


@pytest.mark.parametrize("command", [b"EHLO\r\n", b"HELO\r\n", b"EHLO   \r\n"])
def test_helo_needs_argument(command: bytes) -> None:
    """EHLO and HELO without a name are syntax errors."""
    assert session().codes(command) == [501]


def test_commands_are_case_insensitive() -> None:
    """Verbs are matched case-insensitively."""
    driver = session()
    assert driver.codes(b"ehlo x\r\nmail from:<a@b.test>\r\nrcpt to:<alice@example.test>\r\n"
                        b"rset\r\nnoop\r\n") == [250, 250, 250, 250, 250]


# --- sequence --------------------------------------------------------------------------------


def test_mail_before_ehlo() -> None:
    """MAIL before EHLO/HELO gets 503 5.5.1."""
    assert session().send(b"MAIL FROM:<a@b.test>\r\n") == [
        "503 5.5.1 Send EHLO or HELO first"
    ]


def test_rcpt_before_mail() -> None:
    """RCPT before MAIL gets 503."""
    assert ready().send(b"RCPT TO:<alice@example.test>\r\n") == [str(replies.NEED_MAIL)]


def test_data_before_mail_and_before_rcpt() -> None:
    """DATA without MAIL is 503; without an accepted RCPT, 554 no valid recipients."""
    driver = ready()
    assert driver.codes(b"DATA\r\n") == [503]
    assert driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n") == [
        "250 2.1.0 Sender ok",
        "550 5.1.1 No such user here",
        "554 5.5.1 No valid recipients",
    ]


def test_nested_mail() -> None:
    """A second MAIL inside a transaction is 503."""
    driver = ready()
    assert driver.codes(b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<c@d.test>\r\n") == [250, 503]


def test_rset_ends_the_transaction() -> None:
    """After RSET, RCPT needs a new MAIL; RSET takes no argument."""
    driver = ready()
    assert driver.codes(b"MAIL FROM:<a@b.test>\r\nRSET\r\nRCPT TO:<alice@example.test>\r\n"
                        b"RSET now\r\n") == [250, 250, 503, 501]


def test_ehlo_resets_the_transaction() -> None:
    """EHLO in the middle of a transaction resets it (RFC 5321 §4.1.4)."""
    driver = ready()
    driver.send(b"MAIL FROM:<a@b.test>\r\nEHLO again.test\r\n")
    assert driver.codes(b"RCPT TO:<alice@example.test>\r\n") == [503]


def test_data_with_argument() -> None:
    """DATA takes no argument."""
    driver = ready()
    driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n")
    assert driver.codes(b"DATA now\r\n") == [501]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (b"NOOP\r\n", "250 2.0.0 Ok"),
        (b"NOOP anything\r\n", "250 2.0.0 Ok"),
        (b"VRFY alice\r\n", str(replies.VRFY_CANNOT)),
        (b"VRFY\r\n", str(replies.SYNTAX_ERROR)),
        (b"EXPN staff\r\n", str(replies.NOT_IMPLEMENTED)),
        (b"HELP\r\n", str(replies.HELP)),
        (b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", "502 5.5.1 Command not implemented"),
        (b"AUTH\r\n", "502 5.5.1 Command not implemented"),
        (b"FOO bar\r\n", "500 5.5.2 Command not recognized"),
        (b"\r\n", "500 5.5.2 Command not recognized"),
        (b"QUIT now\r\n", str(replies.SYNTAX_ERROR)),
    ],
)
def test_simple_commands(command: bytes, expected: str) -> None:
    """NOOP, VRFY (252), EXPN, HELP, AUTH (not yet), unknown commands get their replies."""
    assert ready().send(command) == [expected]


def test_quit_closes_and_ignores_the_rest() -> None:
    """QUIT answers 221 and closes; anything pipelined after it is not executed."""
    driver = ready()
    assert driver.send(b"QUIT\r\nNOOP\r\n") == ["221 2.0.0 Bye"]
    assert driver.closed
    assert driver.send(b"NOOP\r\n") == []


def test_every_reply_carries_an_enhanced_code() -> None:
    """All replies but the greeting, EHLO/HELO and 354 carry an enhanced status code."""
    driver = session()
    lines = driver.send(
        b"MAIL FROM:<a@b.test>\r\nHELO x\r\nEHLO x\r\nMAIL FROM:<a@b.test> FOO=1\r\n"
        b"MAIL FROM:<a@b.test> SIZE=99999999999\r\nMAIL FROM:<a@b.test>\r\n"
        b"RCPT TO:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nVRFY x\r\nHELP\r\n"
        b"BDAT x\r\nNOOP\r\nRSET\r\nFOO\r\nQUIT\r\n"
    )
    for line in lines:
        if line.startswith("250-") or line == "250 DSN" or line == "250 mx.example.test":
            continue
        assert ENHANCED.match(line), line


# --- MAIL and RCPT parameters --------------------------------------------------------------------


def test_parameters_reach_the_envelope() -> None:
    """BODY, SMTPUTF8, RET, ENVID, NOTIFY and ORCPT are stored in the Envelope."""
    driver = ready()
    sink = driver.factory.sink
    driver.send(
        b"MAIL FROM:<a@b.test> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+2B1 SIZE=100\r\n"
        b"RCPT TO:<alice@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Alice+40example.test\r\n"
        b"RCPT TO:<bob@example.test> NOTIFY=NEVER\r\nDATA\r\n"
    )
    assert driver.codes(b"Subject: x\r\n\r\nbody\r\n.\r\n") == [250]
    envelope, _ = sink.accepted[0]
    assert (envelope.body, envelope.smtputf8, envelope.ret, envelope.envid) == (
        "8BITMIME", True, "HDRS", "id+1")
    alice, bob = envelope.recipients
    assert alice.notify == ("SUCCESS", "FAILURE")
    assert alice.orcpt == "rfc822;Alice@example.test"
    assert bob.notify == ("NEVER",)
    assert bob.orcpt is None


def test_size_over_limit() -> None:
    """MAIL SIZE above the maximum gets 552 5.3.4 (RFC 1870)."""
    driver = ready(max_message_size=1000)
    assert driver.codes(b"MAIL FROM:<a@b.test> SIZE=1000\r\nRSET\r\n") == [250, 250]
    assert driver.send(b"MAIL FROM:<a@b.test> SIZE=1001\r\n") == [str(replies.MESSAGE_TOO_BIG)]


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (b"MAIL FROM:<a@b.test> BOGUS=1\r\n", 555),
        (b"MAIL FROM:<a@b.test> SIZE=1 SIZE=1\r\n", 555),
        (b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n", 555),
        (b"MAIL FROM:<a@b.test> RET=SOME\r\n", 501),
        (b"MAIL FROM:<a@b.test> SIZE=big\r\n", 501),
        (b"MAIL FROM:<a@b.test> ENVID=a+\r\n", 501),
        (b"MAIL FROM:a@b.test\r\n", 501),
        (b"MAIL TO:<a@b.test>\r\n", 501),
        (b"MAIL\r\n", 501),
        (b"MAIL FROM:<a@b.test\xff>\r\n", 501),
    ],
)
def test_bad_mail_commands(command: bytes, code: int) -> None:
    """Malformed MAIL commands and parameters are refused without starting a transaction."""
    driver = ready()
    assert driver.codes(command) == [code]
    assert driver.codes(b"RCPT TO:<alice@example.test>\r\n") == [503]


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (b"RCPT TO:<alice@example.test> NOTIFY=NEVER,DELAY\r\n", 501),
        (b"RCPT TO:<alice@example.test> NOTIFY=SOMETIMES\r\n", 501),
        (b"RCPT TO:<alice@example.test> ORCPT=alice\r\n", 501),
        (b"RCPT TO:<alice@example.test> ORCPT=rfc822;a ORCPT=rfc822;b\r\n", 555),
        (b"RCPT TO:<alice@example.test> RET=FULL\r\n", 555),
        (b"RCPT TO:<>\r\n", 501),
        (b"RCPT TO:alice@example.test\r\n", 501),
        (b"RCPT <alice@example.test>\r\n", 501),
    ],
)
def test_bad_rcpt_commands(command: bytes, code: int) -> None:
    """Malformed RCPT commands and parameters are refused; the transaction goes on."""
    driver = ready()
    driver.send(b"MAIL FROM:<a@b.test>\r\n")
    assert driver.codes(command) == [code]
    assert driver.codes(b"RCPT TO:<alice@example.test>\r\n") == [250]


def test_parameters_refused_after_helo() -> None:
    """After HELO (not EHLO) ESMTP parameters are unknown (555)."""
    driver = session()
    driver.send(b"HELO client.test\r\n")
    assert driver.codes(b"MAIL FROM:<a@b.test> SIZE=10\r\nMAIL FROM:<a@b.test>\r\n") == [555, 250]
    assert driver.codes(b"RCPT TO:<alice@example.test> NOTIFY=NEVER\r\n") == [555]


def test_non_ascii_address_needs_smtputf8() -> None:
    """A UTF-8 address without SMTPUTF8 gets 553 5.6.7; with it, it is accepted."""
    driver = ready()
    sink = driver.factory.sink
    assert driver.send("MAIL FROM:<jörg@b.test>\r\n".encode()) == [str(replies.SMTPUTF8_REQUIRED)]
    assert driver.codes("MAIL FROM:<jörg@b.test> SMTPUTF8\r\n".encode()) == [250]
    assert driver.codes(b"RCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n.\r\n") == [250, 354, 250]
    envelope, message = sink.accepted[0]
    assert envelope.sender == "jörg@b.test"
    assert envelope.protocol == "UTF8SMTP"
    assert b"with UTF8SMTP id" in message


def test_non_ascii_recipient_without_smtputf8_on_mail() -> None:
    """A UTF-8 recipient in a transaction without SMTPUTF8 gets 553 5.6.7."""
    driver = ready()
    driver.send(b"MAIL FROM:<a@b.test>\r\n")
    assert driver.send("RCPT TO:<jörg@example.test>\r\n".encode()) == [
        str(replies.SMTPUTF8_REQUIRED)
    ]


def test_null_sender_accepted() -> None:
    """MAIL FROM:<> is accepted and recorded as the empty sender."""
    driver = ready()
    driver.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert driver.codes(b"bounce\r\n.\r\n") == [250]
    assert driver.factory.sink.accepted[0][0].sender == ""


def test_bare_postmaster() -> None:
    """RCPT TO:<postmaster> without a domain is accepted (RFC 5321 §4.1.1.3)."""
    driver = ready()
    driver.send(b"MAIL FROM:<a@b.test>\r\n")
    assert driver.codes(b"RCPT TO:<Postmaster>\r\nDATA\r\nx\r\n.\r\n") == [250, 354, 250]
    envelope, _ = driver.factory.sink.accepted[0]
    assert [r.mailbox for r in envelope.recipients] == ["postmaster@example.test"]
    assert envelope.recipients[0].original == "postmaster"


def test_duplicate_recipients_delivered_once() -> None:
    """Two RCPTs resolving to the same destination give one Recipient."""
    driver = ready()
    driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n"
                b"RCPT TO:<ALICE@Example.test>\r\nDATA\r\n")
    assert driver.codes(b"x\r\n.\r\n") == [250]
    assert len(driver.factory.sink.accepted[0][0].recipients) == 1


def test_relay_denied_and_unknown_user() -> None:
    """Port 25 refuses other domains (554 5.7.1) and unknown local users (550 5.1.1)."""
    driver = ready()
    assert driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
                       b"RCPT TO:<carol@example.test>\r\n") == [
        "250 2.1.0 Sender ok",
        "554 5.7.1 Relay access denied",
        "550 5.1.1 No such user here",
    ]


# --- pipelining ------------------------------------------------------------------------------


def test_pipelined_group_is_answered_in_one_write() -> None:
    """A pipelined group of commands is answered in order with a single transport write."""
    driver = ready()
    writes: list[bytes] = []
    original = driver.transport.write

    def counting(data: bytes) -> None:
        writes.append(data)
        original(data)

    driver.transport.write = counting  # type: ignore[method-assign]
    lines = driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n"
                        b"RCPT TO:<bob@example.test>\r\nDATA\r\n")
    assert [line[:3] for line in lines] == ["250", "250", "250", "354"]
    assert len(writes) == 1


def test_delayed_policy_keeps_reply_order() -> None:
    """With asynchronous policy answers, later commands wait and replies keep command order."""
    policy = DelayedPolicy()
    driver = ready(policy=policy)
    assert driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n"
                       b"RCPT TO:<bob@example.test>\r\nNOOP\r\n") == []
    # One command at a time: the first RCPT is not even parsed before MAIL is answered.
    assert len(policy.senders) == 1 and policy.recipients == []
    policy.senders[0][1].callback(None)
    assert driver.lines() == ["250 2.1.0 Sender ok"]
    assert len(policy.recipients) == 1
    policy.recipients[0][1].errback(RecipientRejected(replies.MAILBOX_UNKNOWN))
    assert driver.lines() == ["550 5.1.1 No such user here"]
    assert len(policy.recipients) == 2
    policy.recipients[1][1].callback(local("bob@example.test"))
    assert driver.lines() == ["250 2.1.5 Recipient ok", "250 2.0.0 Ok"]


def test_input_arriving_while_waiting_is_processed_later() -> None:
    """Commands that arrive while an answer is pending are processed after it, in order."""
    policy = DelayedPolicy()
    driver = ready(policy=policy)
    driver.send(b"MAIL FROM:<a@b.test>\r\n")
    assert driver.send(b"RCPT TO:<alice@example.test>\r\nRS") == []
    assert driver.send(b"ET\r\n") == []
    policy.senders[0][1].callback(None)
    policy.recipients[0][1].callback(local("alice@example.test"))
    assert driver.lines() == ["250 2.1.0 Sender ok", "250 2.1.5 Recipient ok", "250 2.0.0 Reset ok"]


def test_reading_paused_when_client_runs_far_ahead() -> None:
    """While waiting, a large backlog of input pauses reading; it resumes afterwards."""
    policy = DelayedPolicy()
    driver = ready(policy=policy)
    driver.send(b"MAIL FROM:<a@b.test>\r\n")
    driver.send(b"NOOP\r\n" * 50000)
    assert driver.transport.producerState == "paused"
    policy.senders[0][1].callback(None)
    assert driver.transport.producerState == "producing"
    assert len(driver.lines()) == 50001


def test_policy_failure_is_temporary() -> None:
    """A failing policy lookup is answered 451 4.3.0 without detail."""
    policy = DelayedPolicy()
    driver = ready(policy=policy)
    driver.send(b"MAIL FROM:<a@b.test>\r\n")
    policy.senders[0][1].errback(RuntimeError("database on fire"))
    assert driver.lines() == [str(replies.LOOKUP_FAILED)]
    driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n")
    policy.senders[1][1].callback(None)
    policy.recipients[0][1].errback(RuntimeError("database on fire"))
    assert driver.lines() == ["250 2.1.0 Sender ok", str(replies.LOOKUP_FAILED)]


def test_policy_sender_refusal() -> None:
    """A sender refused by the policy gets the policy's reply and no transaction starts."""
    policy = DelayedPolicy()
    driver = ready(policy=policy)
    driver.send(b"MAIL FROM:<spammer@b.test>\r\nRCPT TO:<alice@example.test>\r\n")
    policy.senders[0][1].callback(replies.RELAY_DENIED)
    assert [line[:3] for line in driver.lines()] == ["554", "503"]


# --- limits ------------------------------------------------------------------------------------


def test_command_line_limit() -> None:
    """A command of max_command_length octets (with CRLF) is fine; one more gets 500 5.5.0."""
    driver = ready(max_command_length=100)
    ok = b"NOOP " + b"x" * 93 + b"\r\n"
    assert len(ok) == 100
    assert driver.codes(ok) == [250]
    assert driver.send(b"NOOP " + b"x" * 94 + b"\r\n") == ["500 5.5.0 Line too long"]


def test_long_command_line_is_swallowed() -> None:
    """Nothing of an over-long command line is executed, even when it arrives in pieces."""
    driver = ready(max_command_length=100)
    assert driver.send(b"RSET " + b"x" * 200) == []
    assert driver.send(b"y" * 300 + b" QUIT") == []
    assert driver.send(b"\r\nNOOP\r\n") == ["500 5.5.0 Line too long", "250 2.0.0 Ok"]
    assert not driver.closed


def test_long_command_line_in_one_segment() -> None:
    """An over-long line followed by more commands in the same segment: only those run."""
    driver = ready(max_command_length=64)
    assert driver.codes(b"MAIL FROM:<" + b"a" * 100 + b"@b.test>\r\nNOOP\r\n") == [500, 250]


def test_too_many_recipients() -> None:
    """Recipients beyond max_recipients get 452 4.5.3; the accepted ones still get the mail."""
    driver = ready(max_recipients=2)
    lines = driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n"
                        b"RCPT TO:<bob@example.test>\r\nRCPT TO:<postmaster@example.test>\r\n")
    assert lines[-1] == "452 4.5.3 Too many recipients"
    assert driver.codes(b"DATA\r\nx\r\n.\r\n") == [354, 250]
    assert len(driver.factory.sink.accepted[0][0].recipients) == 2


def test_idle_timeout() -> None:
    """After idle_timeout seconds without input the session says 421 4.4.2 and closes."""
    clock = Clock()
    driver = ready(clock=clock, idle_timeout=60.0)
    clock.advance(59)
    driver.send(b"NOOP\r\n")
    clock.advance(59)
    assert not driver.closed
    clock.advance(1)
    assert driver.lines() == ["421 4.4.2 Idle timeout, closing connection"]
    assert driver.closed


def test_idle_timer_waits_for_us() -> None:
    """While the server itself is waiting (policy, spool) the idle timer does not close."""
    clock = Clock()
    policy = DelayedPolicy()
    driver = ready(clock=clock, policy=policy, idle_timeout=60.0)
    driver.send(b"MAIL FROM:<a@b.test>\r\n")
    clock.advance(120)
    assert not driver.closed
    policy.senders[0][1].callback(None)
    assert driver.lines() == ["250 2.1.0 Sender ok"]
    clock.advance(60)
    assert driver.closed


def test_timer_cancelled_on_disconnect() -> None:
    """Losing the connection cancels the idle timer."""
    clock = Clock()
    driver = ready(clock=clock)
    driver.lose()
    assert clock.getDelayedCalls() == []


def test_too_many_bad_commands() -> None:
    """The max_bad_commands-th error is answered, then 421 4.7.0 and the connection closes."""
    driver = ready(max_bad_commands=3)
    lines = driver.send(b"FOO\r\nMAIL FROM:<bad\r\nNOOP\r\nRCPT TO:<a@b.test>\r\nNOOP\r\n")
    assert lines == [
        "500 5.5.2 Command not recognized",
        "501 5.1.7 Bad sender address syntax",
        "250 2.0.0 Ok",
        "503 5.5.1 Need MAIL command first",
        "421 4.7.0 Too many errors, closing connection",
    ]
    assert driver.closed


def test_connection_limits() -> None:
    """Beyond max_connections_per_client the greeting is 421 4.7.0; at max_connections, with
    every session a sender that completed a transaction, so is the newcomer's."""
    factory = make_factory(max_connections=3, max_connections_per_client=2)
    first = SessionDriver(factory, "192.0.2.1")
    second = SessionDriver(factory, "192.0.2.1")
    third = SessionDriver(factory, "192.0.2.1")
    assert third.lines() == [str(replies.TOO_MANY_FROM_CLIENT)]
    assert third.closed
    third.lose()
    other = SessionDriver(factory, "192.0.2.2")
    assert other.lines()[0].startswith("220 ")
    for sender in (first, second, other):  # real senders now: never shed
        assert sender.codes(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n"
                            b"DATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")[-1] == 250
    fourth = SessionDriver(factory, "192.0.2.3")
    assert fourth.lines() == [str(replies.TOO_MANY_CONNECTIONS)]
    first.lose()
    assert factory.connections.total == 2
    again = SessionDriver(factory, "192.0.2.1")
    assert again.lines()[0].startswith("220 ")
    assert factory.connections.by_client == {"192.0.2.1": 2, "192.0.2.2": 1}


def test_idle_connection_shed_at_the_cap() -> None:
    """At max_connections the session silent longest that has not completed a transaction is
    closed with 421 4.7.0 so that a newcomer gets in; one that delivered a message is kept."""
    clock = Clock()
    factory = make_factory(max_connections=3, max_connections_per_client=3, clock=clock)
    sender = SessionDriver(factory, "192.0.2.9")
    sender.lines()
    sender.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                b"Subject: x\r\n\r\nx\r\n.\r\n")
    clock.advance(1)
    idle_old = SessionDriver(factory, "192.0.2.1")
    clock.advance(1)
    idle_new = SessionDriver(factory, "192.0.2.1")
    clock.advance(1)
    idle_new.send(b"NOOP\r\n")
    newcomer = SessionDriver(factory, "192.0.2.2")
    assert newcomer.lines()[0].startswith("220 ")
    assert idle_old.lines()[-1] == str(replies.SHED_IDLE)
    assert idle_old.closed
    assert not idle_new.closed and not sender.closed
    assert factory.connections.total == 3
    idle_old.lose()  # the close completes: nothing is released twice
    assert factory.connections.total == 3


def test_short_idle_time_near_the_cap() -> None:
    """Above smtp.stress_percent of the cap, a session without a completed transaction may
    stay silent only smtp.stress_idle_timeout seconds."""
    clock = Clock()
    factory = make_factory(max_connections=4, max_connections_per_client=4, clock=clock,
                           stress_percent=50, stress_idle_timeout=5.0)
    first = SessionDriver(factory, "192.0.2.1")
    SessionDriver(factory, "192.0.2.1")
    first.send(b"NOOP\r\n")  # the idle timer is set again, now with the short time
    clock.advance(6)
    assert first.lines()[-1] == str(replies.IDLE_TIMEOUT)


def test_refused_connection_ignores_input() -> None:
    """A connection refused at the greeting executes nothing."""
    factory = make_factory(max_connections=0)
    driver = SessionDriver(factory)
    driver.lines()
    assert driver.send(b"EHLO x\r\n") == []


# --- bare CR and LF in commands --------------------------------------------------------------


@pytest.mark.parametrize(
    "data", [b"NOOP\n", b"RSET\rQUIT\r\n", b"NOOP\r\rQUIT\r\n", b"QUIT\n\r\n"]
)
def test_bare_cr_or_lf_in_commands(data: bytes) -> None:
    """A command line with a bare CR or LF is refused (500 5.5.2), never executed."""
    driver = ready()
    codes = driver.codes(data)
    assert codes and set(codes) == {500}
    assert not driver.closed
    assert driver.codes(b"NOOP\r\n") == [250]


# --- never a traceback ---------------------------------------------------------------------------


class ExplodingPolicy(DelayedPolicy):
    def check_recipient(
        self, session: SessionInfo, recipient: Mailbox
    ) -> Deferred[list[Destination]]:
        raise ZeroDivisionError("bug in policy")

    def check_sender(self, session: SessionInfo, sender: Mailbox | None) -> Deferred[Reply | None]:
        return succeed(None)


def test_internal_error_in_a_command() -> None:
    """An exception while handling a command is logged; the client gets 451 4.3.0, no detail."""
    with capturedLogs() as events:
        driver = ready(policy=ExplodingPolicy())
        lines = driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nNOOP\r\n")
    assert lines == ["250 2.1.0 Sender ok", "451 4.3.0 Internal error", "250 2.0.0 Ok"]
    assert not any("ZeroDivision" in line for line in lines)
    assert any(e.get("log_failure") is not None for e in events)
    # The transaction was dropped: a clean state.
    assert driver.codes(b"RCPT TO:<alice@example.test>\r\n") == [503]


def test_internal_error_in_input_processing(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in the input loop itself gives 421 4.3.0 and a close, not a traceback."""
    from mailsys.smtp import message

    def broken(self: object, data: bytes) -> bytes | None:
        raise RuntimeError("bug")

    monkeypatch.setattr(message.MessageBuffer, "feed_data", broken)
    with capturedLogs() as events:
        driver = ready()
        lines = driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                            b"x\r\n.\r\n")
    assert lines[-1] == "421 4.3.0 Internal error, closing connection"
    assert driver.closed
    assert any(e.get("log_failure") is not None for e in events)


def test_failing_deferred_callback_is_contained() -> None:
    """A Deferred answer that fails unexpectedly becomes 451, and the session goes on."""

    class BadDestinations(DelayedPolicy):
        def check_sender(
            self, session: SessionInfo, sender: Mailbox | None
        ) -> Deferred[Reply | None]:
            return succeed(None)

        def check_recipient(
            self, session: SessionInfo, recipient: Mailbox
        ) -> Deferred[list[Destination]]:
            return fail(KeyError("x"))

    driver = ready(policy=BadDestinations())
    lines = driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nNOOP\r\n")
    assert lines == ["250 2.1.0 Sender ok", str(replies.LOOKUP_FAILED), "250 2.0.0 Ok"]


# --- logs ------------------------------------------------------------------------------------


def server_lines(events: Sequence[LogEvent]) -> list[str]:
    """The SMTP server's log lines among ``events``."""
    return [formatEvent(e) for e in events if e.get("log_namespace") == "mailsys.smtp.server"]


def test_log_lines_name_the_queue_id() -> None:
    """Every log line about a message names its queue id; the session is logged too."""
    with capturedLogs() as events:
        driver = ready()
        driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                    b"hello\r\n.\r\nQUIT\r\n")
        driver.lose()
    text = server_lines(events)
    assert any(re.fullmatch(r"TEST0001: from=<a@b\.test> size=\d+ nrcpt=1 "
                            r"client=\[192\.0\.2\.10\] proto=ESMTP queued", line)
               for line in text), text
    # One line for the session, at its end (none at connect: a log event per message counts).
    assert any(re.fullmatch(r"disconnect from \[192\.0\.2\.10\] helo=<client\.test> "
                            r"messages=1 errors=0 duration=[\d.]+s", line)
               for line in text), text
    assert not any(line.startswith("connect from") for line in text)


@pytest.mark.parametrize(("commands", "lost"), [
    (b"DATA\r\nSubject: x\r\n\r\nhalf a bo", "lost connection after DATA (23 bytes)"),
    (b"DATA\r\n", "lost connection after DATA (0 bytes)"),
    (b"BDAT 10\r\n0123456789BDAT 100\r\nabc", "lost connection after BDAT (13 bytes)"),
])
def test_disconnect_in_the_middle_of_a_message_is_logged(commands: bytes, lost: str) -> None:
    """A client going away inside DATA or BDAT: the disconnect line says what was lost."""
    with capturedLogs() as events:
        driver = ready()
        driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n" + commands)
        driver.lose()
    (line,) = [t for t in server_lines(events) if t.startswith("disconnect from")]
    assert re.fullmatch(r"disconnect from \[192\.0\.2\.10\] helo=<client\.test> messages=0 "
                        r"errors=0 duration=[\d.]+s " + re.escape(lost), line), line


def test_disconnect_after_a_complete_message_loses_nothing() -> None:
    """A message complete (or a transaction without one) is not reported lost at disconnect."""
    with capturedLogs() as events:
        driver = ready()
        driver.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                    b"hello\r\n.\r\nMAIL FROM:<a@b.test>\r\n")
        driver.lose()
    (line,) = [t for t in server_lines(events) if t.startswith("disconnect from")]
    assert "lost" not in line and "messages=1" in line


# --- submission ------------------------------------------------------------------------------


def test_submission_requires_tls_then_auth() -> None:
    """On 587 MAIL before STARTTLS gets 530 5.7.0; on 465 (TLS from the start) it needs AUTH."""
    router = StaticRouter({LOCAL_DOMAIN}, set(USERS))
    plain = ready(role=ListenerRole.SUBMISSION, policy=SubmissionPolicy(router))
    assert plain.send(b"MAIL FROM:<alice@example.test>\r\n") == [str(replies.TLS_REQUIRED)]
    implicit = ready(role=ListenerRole.SUBMISSIONS, policy=SubmissionPolicy(router))
    assert implicit.send(b"MAIL FROM:<alice@example.test>\r\n") == [str(replies.AUTH_REQUIRED)]


def test_factory_reads_its_config() -> None:
    """The factory takes the host name, the [smtp] limits and [submission] privacy from the
    config: no copy of the settings."""
    from pathlib import Path

    from mailsys.config import from_mapping

    config = from_mapping(
        {"server": {"hostname": "mail.example.test"},
         "smtp": {"max_recipients": 7, "idle_timeout": 30},
         "submission": {"hide_client_address": True}},
        Path("test.toml"), check_files=False,
    )
    base = make_factory()
    mta = SMTPServerFactory(config, ListenerRole.MTA, base.policy, base.sink, Clock())
    assert (mta.hostname, mta.role, mta.config.smtp.max_recipients) == (
        "mail.example.test", ListenerRole.MTA, 7)
    assert mta.greeting.startswith(b"220 mail.example.test ")
    assert not mta.hide_client_address
    submission = SMTPServerFactory(config, ListenerRole.SUBMISSION, base.policy, base.sink,
                                   Clock())
    assert submission.hide_client_address
    clock = Clock()
    driver = SessionDriver(SMTPServerFactory(config, ListenerRole.MTA, base.policy, base.sink,
                                             clock))
    clock.advance(30)
    assert driver.closed


def test_inbound_policy_is_the_default() -> None:
    """The test factory's default policy is the port 25 InboundPolicy."""
    assert isinstance(make_factory().policy, InboundPolicy)


def test_reply_lines_are_well_formed() -> None:
    """Every line written in a busy session looks like 'ddd[ -]...'."""
    driver = session()
    lines = driver.send(b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n"
                        b"DATA\r\nhi\r\n.\r\nBDAT 2\r\nxxFOO\r\nQUIT\r\n")
    assert lines and all(REPLY_LINE.match(line) for line in lines)


def test_sink_mode_hold_exists() -> None:
    """MemorySink can hold its answer (used by the DATA tests)."""
    assert MemorySink(SinkMode.HOLD).mode is SinkMode.HOLD


def test_line_handler_reads_continuation_lines() -> None:
    """A command can take the next line itself (how AUTH will read SASL responses)."""
    driver = ready()
    seen: list[bytes] = []

    def handler(line: bytes) -> Reply:
        seen.append(line)
        return replies.OK

    driver.session._line_handler = handler
    assert driver.codes(b"QUIT\r\nNOOP\r\n") == [250, 250]
    assert seen == [b"QUIT"]
    assert not driver.closed
