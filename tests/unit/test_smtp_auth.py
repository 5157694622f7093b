"""SMTP AUTH (RFC 4954) in the session: where it is offered, PLAIN and LOGIN, every error reply,
and login-failure throttling, driven over a StringTransport with a Clock."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from mailsys import replies
from mailsys.auth.checker import UserStoreChecker
from mailsys.auth.portal import MailRealm
from mailsys.auth.throttle import LoginThrottle
from mailsys.auth.users import UserStore
from mailsys.smtp.policy import InboundPolicy, SubmissionPolicy
from mailsys.smtp.server import ListenerRole, SMTPServerFactory
from mailsys.smtp.testing import (
    LOCAL_DOMAIN,
    USERS,
    HeldChecks,
    SessionDriver,
    StaticRouter,
    make_factory,
    memory_portal,
)

USER = "alice@example.test"
PASSWORD = "s3cret"
AUTH_LINE = "250 AUTH PLAIN LOGIN"


class FakeContexts:
    """A TLSContextSource handing out a marker object."""

    context = object()

    def server_context(self) -> object:
        return self.context


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain(user: str = USER, password: str = PASSWORD, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


def factory(
    role: ListenerRole = ListenerRole.SUBMISSIONS,
    *,
    clock: Clock | None = None,
    throttle: LoginThrottle | None = None,
    portal: Portal | None = None,
    **settings: object,
) -> SMTPServerFactory:
    clock = clock if clock is not None else Clock()
    router = StaticRouter({LOCAL_DOMAIN}, set(USERS))
    policy = InboundPolicy(router) if role is ListenerRole.MTA else SubmissionPolicy(router)
    return make_factory(
        role=role,
        policy=policy,
        clock=clock,
        tls=FakeContexts(),  # type: ignore[arg-type]
        portal=portal if portal is not None else memory_portal({USER: PASSWORD}),
        throttle=throttle if throttle is not None else LoginThrottle(clock),
        **settings,  # type: ignore[arg-type]
    )


def connect(made: SMTPServerFactory, client: str = "192.0.2.10") -> SessionDriver:
    driver = SessionDriver(made, client)
    driver.lines()  # the greeting
    return driver


def secure(role: ListenerRole = ListenerRole.SUBMISSIONS, **kwargs: object) -> SessionDriver:
    """A session that has said EHLO inside TLS (STARTTLS first unless on 465)."""
    driver = connect(factory(role, **kwargs))  # type: ignore[arg-type]
    if role is not ListenerRole.SUBMISSIONS:
        driver.send(b"EHLO client.test\r\nSTARTTLS\r\n")
    driver.send(b"EHLO client.test\r\n")
    return driver


def clock_of(driver: SessionDriver) -> Clock:
    clock = driver.factory.clock
    assert isinstance(clock, Clock)
    return clock


# --- where AUTH is offered -----------------------------------------------------------------------


def test_587_offers_auth_only_after_starttls() -> None:
    """On 587 EHLO offers STARTTLS but not AUTH; after STARTTLS it offers AUTH PLAIN LOGIN."""
    driver = connect(factory(ListenerRole.SUBMISSION))
    lines = driver.send(b"EHLO client.test\r\n")
    assert lines[-1] == "250 STARTTLS"
    assert not any("AUTH" in line for line in lines)
    driver.send(b"STARTTLS\r\n")
    lines = driver.send(b"EHLO client.test\r\n")
    assert lines[-1] == AUTH_LINE
    assert not any("STARTTLS" in line for line in lines)


def test_465_offers_auth_at_once() -> None:
    """On 465 (TLS from the first byte) the first EHLO offers AUTH and no STARTTLS."""
    lines = connect(factory()).send(b"EHLO client.test\r\n")
    assert lines[-1] == AUTH_LINE
    assert not any("STARTTLS" in line for line in lines)


def test_port_25_never_offers_auth_by_default() -> None:
    """Port 25 offers no AUTH, before or after STARTTLS, and answers AUTH with 502."""
    driver = connect(factory(ListenerRole.MTA))
    assert not any("AUTH" in line for line in driver.send(b"EHLO client.test\r\n"))
    driver.send(b"STARTTLS\r\n")
    assert not any("AUTH" in line for line in driver.send(b"EHLO client.test\r\n"))
    assert driver.send(f"AUTH PLAIN {plain()}\r\n".encode()) == [str(replies.NOT_IMPLEMENTED)]


def test_port_25_offers_auth_after_starttls_when_configured() -> None:
    """With smtp.offer_auth, port 25 offers AUTH after STARTTLS only, and it works there."""
    driver = connect(factory(ListenerRole.MTA, offer_auth=True))
    assert not any("AUTH" in line for line in driver.send(b"EHLO client.test\r\n"))
    assert driver.send(f"AUTH PLAIN {plain()}\r\n".encode()) == [str(replies.TLS_REQUIRED)]
    driver.send(b"STARTTLS\r\n")
    assert driver.send(b"EHLO client.test\r\n")[-1] == AUTH_LINE
    assert driver.send(f"AUTH PLAIN {plain()}\r\n".encode()) == [str(replies.AUTH_OK)]


def test_authenticated_on_port_25_submits() -> None:
    """After AUTH on port 25 (offer_auth) the session may relay, with its own senders only."""
    driver = secure(ListenerRole.MTA, offer_auth=True)
    assert driver.codes(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\nRSET\r\n") == [
        250, 554, 250]
    driver.send(f"AUTH PLAIN {plain()}\r\n".encode())
    assert driver.send(b"MAIL FROM:<a@b.test>\r\n") == [str(replies.SENDER_NOT_OWNED)]
    assert driver.codes(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.test>\r\n") == [
        250, 250]


def test_offer_auth_read_from_the_config_file() -> None:
    """smtp.offer_auth, as the file says it, turns AUTH on for port 25 only; submission offers
    it regardless."""
    from mailsys.config import from_mapping

    config = from_mapping({"smtp": {"offer_auth": True}}, Path("t.toml"), check_files=False)
    base = factory(ListenerRole.MTA)
    configured = SMTPServerFactory(config, ListenerRole.MTA, base.policy, base.sink, base.clock,
                                   base.tls, portal=base.portal, throttle=base.throttle)
    for made, offered in ((configured, True), (factory(ListenerRole.MTA), False)):
        driver = connect(made)
        driver.send(b"EHLO x\r\n")
        driver.send(b"STARTTLS\r\n")
        assert (driver.send(b"EHLO x\r\n")[-1] == AUTH_LINE) is offered
    driver = connect(factory(ListenerRole.SUBMISSIONS, offer_auth=False))
    assert driver.send(b"EHLO x\r\n")[-1] == AUTH_LINE


def test_no_portal_no_auth() -> None:
    """A submission listener built without a portal neither offers nor accepts AUTH."""
    made = make_factory(role=ListenerRole.SUBMISSIONS)
    driver = connect(made)
    assert not any("AUTH" in line for line in driver.send(b"EHLO client.test\r\n"))
    assert driver.send(b"AUTH PLAIN\r\n") == [str(replies.NOT_IMPLEMENTED)]
    assert made.throttle is None


def test_portal_without_throttle_gets_one() -> None:
    """A factory given a portal but no throttle makes its own, so failures are still slowed."""
    made = make_factory(role=ListenerRole.SUBMISSIONS, portal=memory_portal({}))
    assert isinstance(made.throttle, LoginThrottle)


def test_plaintext_auth_on_587_is_refused() -> None:
    """AUTH sent in plaintext on 587 anyway gets 530 5.7.0: STARTTLS first."""
    driver = connect(factory(ListenerRole.SUBMISSION))
    driver.send(b"EHLO client.test\r\n")
    assert driver.send(f"AUTH PLAIN {plain()}\r\n".encode()) == [str(replies.TLS_REQUIRED)]
    assert driver.session._auth_user is None


# --- PLAIN and LOGIN -----------------------------------------------------------------------------


def test_plain_with_initial_response() -> None:
    """AUTH PLAIN with an initial response logs in: 235 2.7.0."""
    driver = secure()
    lines = driver.send(f"AUTH PLAIN {plain()}\r\n".encode())
    assert lines == ["235 2.7.0 Authentication successful"]
    assert driver.session._auth_user == USER


def test_plain_with_continuation() -> None:
    """AUTH PLAIN alone gets '334 ' and the next line is the response."""
    driver = secure()
    assert driver.send(b"AUTH plain\r\n") == ["334 "]
    assert driver.send(f"{plain()}\r\n".encode()) == [str(replies.AUTH_OK)]


def test_plain_with_authzid_of_the_user() -> None:
    """An authorization identity equal to the user (any case) is accepted (RFC 4616 §2)."""
    driver = secure()
    assert driver.codes(f"AUTH PLAIN {plain(authzid='Alice@Example.test')}\r\n".encode()) == [235]


def test_plain_for_another_user_fails() -> None:
    """Acting for another user is not offered: 535 after the throttle delay."""
    driver = secure()
    assert driver.send(f"AUTH PLAIN {plain(authzid='bob@example.test')}\r\n".encode()) == []
    clock_of(driver).advance(1)
    assert driver.lines() == [str(replies.AUTH_INVALID)]
    assert driver.session._auth_user is None


def test_login_mechanism() -> None:
    """AUTH LOGIN asks for the user name, then the password, both in base64 (334), then 235."""
    driver = secure()
    assert driver.send(b"AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert driver.send(f"{b64(USER)}\r\n".encode()) == ["334 UGFzc3dvcmQ6"]
    assert driver.send(f"{b64(PASSWORD)}\r\n".encode()) == [str(replies.AUTH_OK)]
    assert driver.session._auth_user == USER


def test_login_with_initial_user_name() -> None:
    """AUTH LOGIN with the user name as initial response goes straight to the password."""
    driver = secure()
    assert driver.send(f"AUTH LOGIN {b64(USER)}\r\n".encode()) == ["334 UGFzc3dvcmQ6"]
    assert driver.codes(f"{b64(PASSWORD)}\r\n".encode()) == [235]


def test_authenticated_message_is_esmtpsa() -> None:
    """A message after AUTH records ESMTPSA (RFC 3848) and the user in the envelope."""
    driver = secure()
    driver.send(f"AUTH PLAIN {plain()}\r\n".encode())
    assert driver.codes(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
                        b"DATA\r\n") == [250, 250, 354]
    assert driver.codes(b"Subject: x\r\n\r\nhi\r\n.\r\n") == [250]
    envelope, message = driver.factory.sink.accepted[0]  # type: ignore[attr-defined]
    assert (envelope.protocol, envelope.auth_user) == ("ESMTPSA", USER)
    assert b" with ESMTPSA id " in message


def test_auth_parameter_of_mail_is_accepted() -> None:
    """MAIL FROM with AUTH=<> or AUTH=<xtext mailbox> is accepted where AUTH is offered."""
    driver = secure()
    driver.send(f"AUTH PLAIN {plain()}\r\n".encode())
    assert driver.codes(b"MAIL FROM:<alice@example.test> AUTH=<>\r\n") == [250]
    assert driver.codes(b"RSET\r\nMAIL FROM:<alice@example.test> AUTH=alice+40example.test\r\n"
                        ) == [250, 250]
    assert driver.session._txn is not None
    assert driver.session._txn.mail.auth == "alice@example.test"


def test_auth_parameter_refused_without_auth() -> None:
    """Port 25 without AUTH still refuses the AUTH= parameter as unknown (555)."""
    driver = connect(factory(ListenerRole.MTA))
    driver.send(b"EHLO client.test\r\n")
    assert driver.send(b"MAIL FROM:<a@b.test> AUTH=<>\r\n") == [str(replies.BAD_PARAMETER)]


# --- errors: clear replies, and the session goes on ----------------------------------------------


def test_auth_before_ehlo() -> None:
    """AUTH before EHLO, or after HELO only, gets 503."""
    driver = connect(factory())
    assert driver.send(f"AUTH PLAIN {plain()}\r\n".encode()) == [str(replies.AUTH_NEEDS_EHLO)]
    driver.send(b"HELO client.test\r\n")
    assert driver.send(f"AUTH PLAIN {plain()}\r\n".encode()) == [str(replies.AUTH_NEEDS_EHLO)]


def test_auth_without_mechanism() -> None:
    """A bare AUTH gets 501 5.5.4 naming the mechanisms."""
    assert secure().send(b"AUTH\r\n") == [str(replies.AUTH_NO_MECHANISM)]


def test_unknown_mechanism() -> None:
    """An unknown mechanism gets 504 5.5.4."""
    lines = secure().send(b"AUTH CRAM-MD5\r\n")
    assert lines == ["504 5.5.4 Unrecognized authentication mechanism"]


def test_too_many_arguments() -> None:
    """AUTH with more than a mechanism and an initial response is a syntax error."""
    assert secure().send(b"AUTH PLAIN abc def\r\n") == [str(replies.SYNTAX_ERROR)]


def test_auth_twice() -> None:
    """AUTH after a successful AUTH gets 503 5.5.1 (RFC 4954 §4)."""
    driver = secure()
    driver.send(f"AUTH PLAIN {plain()}\r\n".encode())
    lines = driver.send(f"AUTH PLAIN {plain()}\r\n".encode())
    assert lines == [str(replies.ALREADY_AUTHENTICATED)]


def test_auth_during_transaction() -> None:
    """AUTH inside a mail transaction gets 503 (RFC 4954 §4); the transaction goes on."""
    driver = secure(ListenerRole.MTA, offer_auth=True)
    assert driver.codes(b"MAIL FROM:<a@b.test>\r\n") == [250]
    assert driver.send(f"AUTH PLAIN {plain()}\r\n".encode()) == [str(replies.AUTH_IN_TRANSACTION)]
    assert driver.codes(b"RCPT TO:<alice@example.test>\r\n") == [250]


@pytest.mark.parametrize("start", [b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n",
                                   f"AUTH LOGIN {b64(USER)}\r\n".encode()])
def test_star_cancels(start: bytes) -> None:
    """'*' at any step cancels the exchange with 501 5.0.0, and the session goes on."""
    driver = secure()
    assert driver.codes(start) == [334]
    assert driver.send(b"*\r\n") == ["501 5.0.0 Authentication cancelled"]
    assert driver.codes(b"NOOP\r\n") == [250]
    assert driver.codes(f"AUTH PLAIN {plain()}\r\n".encode()) == [235]


@pytest.mark.parametrize("exchange", [
    [b"AUTH PLAIN !!!notbase64\r\n"],
    [b"AUTH PLAIN\r\n", b"%%%\r\n"],
    [b"AUTH LOGIN\r\n", b"abc\r\n"],
    [b"AUTH LOGIN\r\n", f"{b64(USER)}\r\n".encode(), b"a b\r\n"],
])
def test_bad_base64(exchange: list[bytes]) -> None:
    """A response that is not base64 gets 501 5.5.2 at once; the session goes on."""
    driver = secure()
    for line in exchange:
        lines = driver.send(line)
    assert lines == ["501 5.5.2 Cannot decode the response: not base64"]
    assert driver.codes(b"NOOP\r\n") == [250]


def test_wrong_password_is_535_after_a_delay() -> None:
    """A wrong password is answered 535 5.7.8 only after the throttle's delay."""
    driver = secure()
    assert driver.send(f"AUTH PLAIN {plain(password='wrong')}\r\n".encode()) == []
    clock_of(driver).advance(0.99)
    assert driver.lines() == []
    clock_of(driver).advance(0.01)
    assert driver.lines() == ["535 5.7.8 Authentication credentials invalid"]
    assert driver.codes(f"AUTH PLAIN {plain()}\r\n".encode()) == [235]


def test_unknown_user_costs_the_same_delay() -> None:
    """An unknown user gets the same 535 after the same delay as a wrong password."""
    driver = secure()
    driver.send(f"AUTH PLAIN {plain(user='nobody@example.test')}\r\n".encode())
    clock_of(driver).advance(0.99)
    assert driver.lines() == []
    clock_of(driver).advance(0.01)
    assert driver.lines() == [str(replies.AUTH_INVALID)]


@pytest.mark.parametrize("response", [b64("no-nul-at-all"), b64("\0user-only"), b64("\0\0"), "="])
def test_malformed_plain_is_a_failed_login(response: str) -> None:
    """A PLAIN response without user name and password is a failed login (535, throttled)."""
    driver = secure()
    assert driver.send(f"AUTH PLAIN {response}\r\n".encode()) == []
    clock_of(driver).advance(1)
    assert driver.lines() == [str(replies.AUTH_INVALID)]


def test_checker_trouble_is_temporary() -> None:
    """A portal failure other than a wrong password gets 454 4.7.0 and counts no failure."""

    class BrokenPortal(Portal):
        def login(  # type: ignore[override]
            self, credentials: object, mind: object, *interfaces: object
        ) -> Deferred[object]:
            return fail(OSError("user store unreadable"))

    clock = Clock()
    throttle = LoginThrottle(clock)
    driver = secure(portal=BrokenPortal(MailRealm()), clock=clock, throttle=throttle)
    lines = driver.send(f"AUTH PLAIN {plain()}\r\n".encode())
    assert lines == [str(replies.AUTH_TEMPORARY_FAILURE)]
    assert len(throttle) == 0


@pytest.mark.parametrize("line", [
    b"AUTH \r\n", b"AUTH  PLAIN\r\n", b"AUTH PLAIN =\r\n", b"AUTH \xff\xfe\r\n",
    b"AUTH LOGIN =\r\n", b"auth login\r\n", b"AUTH PLAIN " + b"A" * 1500 + b"\r\n",
])
def test_odd_auth_lines_never_crash(line: bytes) -> None:
    """Odd AUTH lines get a reply and leave the session usable."""
    driver = secure()
    lines = driver.send(line + b"*\r\n")
    clock_of(driver).advance(1)
    lines += driver.lines()
    assert lines and all(line[:1] in "2345" for line in lines)
    assert not any(line.startswith("4") and "Internal" in line for line in lines)
    assert driver.codes(b"NOOP\r\n") == [250]
    assert not driver.closed


# --- throttling ----------------------------------------------------------------------------------


def test_failures_slow_down_then_disconnect() -> None:
    """Each failure answers later (1, 2, 4 s); at the limit the answer is 421 4.7.0 and close."""
    clock = Clock()
    throttle = LoginThrottle(clock, max_failures=4)
    driver = secure(clock=clock, throttle=throttle)
    for delay in (1.0, 2.0, 4.0):
        assert driver.send(f"AUTH PLAIN {plain(password='x')}\r\n".encode()) == []
        clock.advance(delay - 0.01)
        assert driver.lines() == []
        clock.advance(0.01)
        assert driver.lines() == [str(replies.AUTH_INVALID)]
    driver.send(f"AUTH PLAIN {plain(password='x')}\r\n".encode())
    clock.advance(8)
    assert driver.lines() == ["421 4.7.0 Too many authentication failures, closing connection"]
    assert driver.closed


def test_blocked_user_is_refused_at_once_other_address_is_not() -> None:
    """Once a user is blocked at an address, their AUTH from it gets 421 at once; from another
    address they log in."""
    clock = Clock()
    throttle = LoginThrottle(clock, max_failures=1)
    made = factory(clock=clock, throttle=throttle)
    first = connect(made, "192.0.2.10")
    first.send(f"EHLO x\r\nAUTH PLAIN {plain(password='x')}\r\n".encode())
    clock.advance(1)
    assert first.lines()[-1] == str(replies.TOO_MANY_AUTH_FAILURES)
    again = connect(made, "192.0.2.10")
    again.lines()
    assert again.send(f"EHLO x\r\nAUTH PLAIN {plain()}\r\n".encode())[-1] == str(
        replies.TOO_MANY_AUTH_FAILURES)
    assert again.closed
    other = connect(made, "192.0.2.20")
    assert other.send(f"EHLO x\r\nAUTH PLAIN {plain()}\r\n".encode())[-1] == str(replies.AUTH_OK)


def test_success_forgets_failures() -> None:
    """A successful login resets the user's failures at its address."""
    clock = Clock()
    throttle = LoginThrottle(clock)
    driver = secure(clock=clock, throttle=throttle)
    driver.send(f"AUTH PLAIN {plain(password='x')}\r\n".encode())
    clock.advance(1)
    assert throttle.delay_for("192.0.2.10", USER) == 1.0
    driver.send(f"AUTH PLAIN {plain()}\r\n".encode())
    assert driver.session._auth_user == USER
    assert throttle.delay_for("192.0.2.10", USER) == 0.0


def test_another_users_block_does_not_refuse_auth() -> None:
    """A user blocked at an address leaves another user's AUTH from it alone."""
    clock = Clock()
    throttle = LoginThrottle(clock, max_failures=1)
    made = factory(clock=clock, throttle=throttle)
    throttle.failed("192.0.2.10", "student@example.test")
    assert throttle.blocked("192.0.2.10", "student@example.test")
    session = connect(made, "192.0.2.10")
    assert session.send(f"EHLO x\r\nAUTH PLAIN {plain()}\r\n".encode())[-1] == str(
        replies.AUTH_OK)


def test_blocked_address_is_refused_at_auth() -> None:
    """An address blocked for failures across users gets 421 at the AUTH command itself."""
    clock = Clock()
    throttle = LoginThrottle(clock, max_address_failures=10)
    made = factory(clock=clock, throttle=throttle)
    for n in range(10):
        throttle.failed("192.0.2.10", f"user{n}@example.test")
    session = connect(made, "192.0.2.10")
    assert session.send(b"EHLO x\r\nAUTH PLAIN\r\n")[-1] == str(replies.TOO_MANY_AUTH_FAILURES)
    assert session.closed


def test_pipelined_commands_wait_for_the_auth_answer() -> None:
    """Commands sent behind a failing AUTH are answered after its 535, in order."""
    driver = secure()
    assert driver.send(f"AUTH PLAIN {plain(password='x')}\r\nNOOP\r\n".encode()) == []
    clock_of(driver).advance(1)
    assert driver.codes(b"") == [535, 250]


def test_disconnect_during_the_delay() -> None:
    """A client that leaves while its failure is delayed leaves no timer behind."""
    driver = secure()
    driver.send(f"AUTH PLAIN {plain(password='x')}\r\n".encode())
    driver.lose()
    assert clock_of(driver).getDelayedCalls() == []


def test_password_checks_happen_off_the_session(tmp_path: Path) -> None:
    """With the real checker, the session waits for the (threaded) check; input stays queued."""
    store = UserStore(tmp_path / "users")
    store.add(USER, PASSWORD)
    held = HeldChecks()
    portal = Portal(MailRealm(), [UserStoreChecker(store, held)])
    driver = secure(portal=portal)
    assert driver.send(f"AUTH PLAIN {plain()}\r\nNOOP\r\n".encode()) == []
    assert len(held.pending) == 1
    held.release()
    assert driver.codes(b"") == [235, 250]
    driver.send(b"QUIT\r\n")
    other = secure(portal=portal)
    other.send(f"AUTH PLAIN {plain(user='ghost@example.test')}\r\n".encode())
    held.release()  # the store checks the unknown user against its dummy hash
    clock_of(other).advance(1)
    assert other.lines() == [str(replies.AUTH_INVALID)]


# --- an exchange in progress ends cleanly on a line error ----------------------------------------


@pytest.mark.parametrize("start", [b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n",
                                   b"AUTH LOGIN " + b64("alice@example.test").encode() + b"\r\n"])
@pytest.mark.parametrize("bad", [b"A" * 5000 + b"\r\n", b"A" * 5000, b"dGVzdA==\n"])
def test_line_error_ends_the_exchange(start: bytes, bad: bytes) -> None:
    """An over-long line or a bare LF inside AUTH ends the exchange: the next line is a command,
    not credentials, and no failed login is counted."""
    throttle = LoginThrottle(Clock())
    driver = secure(throttle=throttle)
    assert driver.codes(start) == [334]
    codes = driver.codes(bad + (b"\r\n" if not bad.endswith(b"\n") else b""))
    assert codes == [500]
    assert driver.codes(b"NOOP\r\n") == [250]
    assert len(throttle) == 0
    assert driver.codes(f"AUTH PLAIN {plain()}\r\n".encode()) == [235]
