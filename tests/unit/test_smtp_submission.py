"""Submission (RFC 6409 on 587, RFC 8314 on 465) after AUTH: who may be the sender, where mail may
go, and what the server adds to a message (Received with TLS and user, Date, Message-ID)."""

from __future__ import annotations

import base64
import re

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from mailsys import replies
from mailsys.address import Mailbox
from mailsys.config import RoutingSection
from mailsys.envelope import Envelope, TargetKind
from mailsys.routing import Router
from mailsys.smtp.policy import SessionInfo, SubmissionPolicy
from mailsys.smtp.server import ListenerRole
from mailsys.smtp.testing import (
    HOSTNAME,
    FakeTLSConnection,
    MemorySink,
    SessionDriver,
    make_factory,
    memory_portal,
)

USER = "alice@example.test"
PASSWORD = "pw"


class Users:
    """The user directory the router asks."""

    names = frozenset({"alice@example.test", "bob@example.test"})

    def exists(self, mailbox: str) -> bool:
        return mailbox.lower() in self.names


def router() -> Router:
    return Router(
        RoutingSection(
            local_domains=("example.test",),
            domain_aliases={"alias.test": "example.test"},
            aliases={
                "team@example.test": ("alice@example.test", "bob@example.test"),
                "sales@example.test": ("bob@example.test",),
                "info@example.test": ("team@example.test",),
            },
            catch_all={"example.test": "alice@example.test"},
        ),
        Users(),
    )


class FakeContexts:
    """A TLSContextSource handing out a marker object."""

    def server_context(self) -> object:
        return object()


def submission(
    role: ListenerRole = ListenerRole.SUBMISSION, **settings: object
) -> SessionDriver:
    """A logged-in submission session (STARTTLS first on 587)."""
    routes = router()
    made = make_factory(
        role=role,
        policy=SubmissionPolicy(routes, senders=routes),
        tls=FakeContexts(),  # type: ignore[arg-type]
        portal=memory_portal({USER: PASSWORD}),
        clock=Clock(),
        **settings,  # type: ignore[arg-type]
    )
    driver = SessionDriver(made, "192.0.2.10")
    driver.lines()
    if role is ListenerRole.SUBMISSION:
        driver.send(b"EHLO laptop.test\r\nSTARTTLS\r\n")
    driver.send(b"EHLO laptop.test\r\n")
    response = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    assert driver.codes(b"AUTH PLAIN " + response + b"\r\n") == [235]
    return driver


def send(driver: SessionDriver, content: bytes, sender: str = USER,
         recipients: tuple[str, ...] = ("bob@example.test",)) -> tuple[Envelope, bytes]:
    """Submit ``content``; the envelope and stored bytes."""
    commands = f"MAIL FROM:<{sender}>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in recipients)
    codes = driver.codes(commands.encode() + b"DATA\r\n")
    assert codes == [250] * (1 + len(recipients)) + [354], codes
    assert driver.codes(content + b".\r\n") == [250]
    sink = driver.factory.sink
    assert isinstance(sink, MemorySink)
    return sink.accepted[-1]


def header(message: bytes) -> str:
    return message.split(b"\r\n\r\n", 1)[0].decode()


# --- the sender must be the user's -------------------------------------------------------------


@pytest.mark.parametrize("sender", [
    "alice@example.test", "Alice@Example.Test", "alice+lists@example.test",
    "alice@alias.test", "team@example.test", "team+x@example.test", "info@example.test",
])
def test_own_addresses_and_aliases_may_send(sender: str) -> None:
    """The user's address, its subaddresses, alias domains and aliases that reach it may send."""
    driver = submission()
    assert driver.codes(f"MAIL FROM:<{sender}>\r\n".encode()) == [250]


@pytest.mark.parametrize("sender", [
    "bob@example.test", "sales@example.test", "nobody@example.test", "alice@elsewhere.test",
])
def test_other_senders_are_refused(sender: str) -> None:
    """Another user, an alias not reaching the user, a catch-all address or a foreign domain:
    553 5.7.1."""
    driver = submission()
    assert driver.send(f"MAIL FROM:<{sender}>\r\n".encode()) == [
        "553 5.7.1 Sender address not owned by authenticated user"]


def test_queued_line_names_the_authenticated_user() -> None:
    """The "queued" log line of a submitted message carries sasl_username=, as Postfix's."""
    with capturedLogs() as events:
        send(submission(), b"Subject: s\r\n\r\nhi\r\n")
    queued = [formatEvent(e) for e in events if e.get("log_namespace") == "mailsys.smtp.server"
              and formatEvent(e).endswith(" queued")]
    assert len(queued) == 1
    assert re.fullmatch(r"TEST0001: from=<alice@example\.test> size=\d+ nrcpt=1 "
                        r"client=\[192\.0\.2\.10\] sasl_username=alice@example\.test "
                        r"proto=ESMTPSA queued", queued[0]), queued


def test_null_sender_is_allowed_after_auth() -> None:
    """An authenticated user may submit with the null sender (an MDN, RFC 8098 §3); the message
    still gets the Date and Message-ID submission adds."""
    envelope, message = send(submission(), b"Subject: Read: hello\r\n\r\nread\r\n", sender="")
    assert envelope.sender == ""
    assert envelope.auth_user == USER
    text = header(message)
    assert "\r\nDate: " in text and f"Message-ID: <TEST0001@{HOSTNAME}>" in text


@pytest.mark.parametrize("role", [ListenerRole.SUBMISSION, ListenerRole.SUBMISSIONS])
def test_null_sender_without_auth_is_refused(role: ListenerRole) -> None:
    """Without AUTH, MAIL FROM:<> on submission is refused like any other sender (530 5.7.0)."""
    routes = router()
    made = make_factory(role=role, policy=SubmissionPolicy(routes, senders=routes),
                        tls=FakeContexts(),  # type: ignore[arg-type]
                        portal=memory_portal({USER: PASSWORD}), clock=Clock())
    driver = SessionDriver(made, "192.0.2.10")
    driver.lines()
    if role is ListenerRole.SUBMISSION:
        driver.send(b"EHLO laptop.test\r\nSTARTTLS\r\n")
    driver.send(b"EHLO laptop.test\r\n")
    assert driver.send(b"MAIL FROM:<>\r\n") == [str(replies.AUTH_REQUIRED)]


def test_policy_allows_the_null_sender_only_to_a_user() -> None:
    """The policy itself: <> is fine for an authenticated session, refused without one."""
    policy = SubmissionPolicy(router())
    answers: list[object] = []
    user = SessionInfo("mx.test", "192.0.2.1", tls=True, authenticated_user=USER)
    anonymous = SessionInfo("mx.test", "192.0.2.1", tls=True)
    policy.check_sender(user, None).addCallback(answers.append)
    policy.check_sender(anonymous, None).addCallback(answers.append)
    assert answers == [None, replies.AUTH_REQUIRED]


def test_without_sender_directory_only_the_user_itself() -> None:
    """A SubmissionPolicy without a sender directory accepts the user's own address only."""
    policy = SubmissionPolicy(router())
    info = SessionInfo("mx.test", "192.0.2.1", tls=True, authenticated_user=USER)
    answers: list[object] = []
    policy.check_sender(info, Mailbox("ALICE", "example.test")).addCallback(answers.append)
    policy.check_sender(info, Mailbox("team", "example.test")).addCallback(answers.append)
    assert answers == [None, replies.SENDER_NOT_OWNED]


# --- recipients anywhere ----------------------------------------------------------------------


def test_external_recipients_are_relay_recipients() -> None:
    """An authenticated user may send to other domains; those recipients are RELAY targets."""
    envelope, _ = send(submission(), b"Subject: x\r\n\r\nhi\r\n",
                       recipients=("bob@example.test", "Someone@Far.Test"))
    kinds = {(r.address, r.kind) for r in envelope.recipients}
    assert kinds == {("bob@example.test", TargetKind.LOCAL),
                     ("Someone@far.test", TargetKind.RELAY)}


# --- what the server adds ------------------------------------------------------------------------


def test_received_names_tls_and_user_after_starttls() -> None:
    """After STARTTLS the Received field names the TLS version and cipher and the user."""
    _, message = send(submission(), b"Date: x\r\nMessage-ID: <a@b>\r\n\r\nhi\r\n")
    received = message.split(b"\r\nDate:", 1)[0].decode()
    assert received.startswith("Received: from laptop.test ([192.0.2.10])\r\n\t"
                               "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))"
                               "\r\n\t(Authenticated sender: alice@example.test)\r\n\t"
                               f"by {HOSTNAME} (mailsys) with ESMTPSA id TEST0001\r\n\t"
                               "for <bob@example.test>; ")


def test_received_on_implicit_tls() -> None:
    """On 465 the Received field names the TLS connection as well."""
    driver = submission(ListenerRole.SUBMISSIONS)
    driver.transport.tls_handle = FakeTLSConnection()
    driver.transport.tls_handle.version = "TLSv1.2"
    driver.transport.tls_handle.cipher = "ECDHE-RSA-AES128-GCM-SHA256"
    driver.transport.tls_handle.bits = 128
    _, message = send(driver, b"Subject: x\r\n\r\nhi\r\n")
    assert ("(using TLSv1.2 with cipher ECDHE-RSA-AES128-GCM-SHA256 (128/128 bits))"
            in header(message))


def test_hidden_client_address() -> None:
    """With hide_client_address, Received names neither the client's name nor its address."""
    _, message = send(submission(hide_client_address=True), b"Subject: x\r\n\r\nhi\r\n")
    text = header(message)
    assert text.startswith("Received: (using TLSv1.3 ")
    assert "192.0.2.10" not in text and "laptop.test" not in text
    assert "(Authenticated sender: alice@example.test)" in text


def test_date_and_message_id_added_when_missing() -> None:
    """A submitted message without Date and Message-ID gets both (RFC 6409 §8.2, §8.3)."""
    _, message = send(submission(), b"Subject: no date\r\n\r\nbody\r\n")
    fields = header(message).split("\r\n")
    assert fields[5].startswith("Date: ")
    assert re.fullmatch(r"Date: \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000", fields[5])
    assert fields[6] == f"Message-ID: <TEST0001@{HOSTNAME}>"
    assert fields[7] == "Subject: no date"
    assert message.endswith(b"\r\n\r\nbody\r\n")


def test_existing_date_and_message_id_are_kept() -> None:
    """Date and Message-ID already present (any case, space before the colon) are not added."""
    _, message = send(submission(), b"date : Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                                     b"Message-Id: <x@y>\r\n\r\nbody\r\n")
    text = header(message)
    assert text.count("Date") + text.count("date") == 1
    assert text.lower().count("message-id") == 1


def test_fields_in_the_body_do_not_count() -> None:
    """A 'Date:' line in the body does not stand for a missing Date field."""
    _, message = send(submission(), b"Subject: s\r\n\r\nDate: in the body\r\n"
                                     b"Message-ID: <also@body>\r\n")
    assert "Date: " in header(message) and "Message-ID: <TEST0001@" in header(message)


def test_port_25_adds_nothing() -> None:
    """Mail arriving on port 25 is not altered beyond the Received field."""
    driver = SessionDriver(make_factory())
    driver.lines()
    driver.send(b"EHLO mx.far.test\r\n")
    envelope, message = send(driver, b"Subject: s\r\n\r\nhi\r\n", sender="a@far.test",
                             recipients=("alice@example.test",))
    assert header(message).count("\r\n") == 3  # Received (3 lines) and Subject
    assert envelope.auth_user is None
    assert b"Authenticated" not in message and b"using TLS" not in message
