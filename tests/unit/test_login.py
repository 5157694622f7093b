"""The throttled login flow every protocol shares (mailsys.auth.login)."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mailsys.auth.login import LoginFlow, LoginOutcome, Refusal
from mailsys.auth.portal import MailUser
from mailsys.auth.sasl import SASLError
from mailsys.auth.throttle import LoginThrottle
from mailsys.smtp.testing import memory_portal

USER = "alice@example.test"
PASSWORD = "s3cret"
CLIENT = "192.0.2.10"


def flow(clock: Clock) -> LoginFlow:
    throttle = LoginThrottle(clock, max_failures=2)
    return LoginFlow(memory_portal({USER: PASSWORD}), throttle, clock, CLIENT, "test")


def outcomes(d: Deferred[LoginOutcome]) -> list[LoginOutcome]:
    got: list[LoginOutcome] = []
    d.addCallback(got.append)
    return got


def test_success_is_the_user() -> None:
    """The right password answers at once with the MailUser."""
    (user,) = outcomes(flow(Clock()).attempt(USER, PASSWORD))
    assert isinstance(user, MailUser) and user.mailbox == USER


def test_failure_answers_after_the_delay_then_blocks() -> None:
    """A wrong password answers FAILED after the throttle's delay; at the limit, BLOCKED."""
    clock = Clock()
    login = flow(clock)
    first = outcomes(login.attempt(USER, "wrong"))
    assert first == []
    clock.advance(1)
    assert first == [Refusal.FAILED]
    second = outcomes(login.attempt(USER, "wrong"))
    clock.advance(2)
    assert second == [Refusal.BLOCKED]
    assert outcomes(login.attempt(USER, PASSWORD)) == [Refusal.BLOCKED]


def test_cancel_drops_the_pending_answer() -> None:
    """cancel (the client left) removes the delayed answer's timer; it never fires."""
    clock = Clock()
    login = flow(clock)
    pending = outcomes(login.attempt(USER, "wrong"))
    assert len(clock.getDelayedCalls()) == 1
    login.cancel()
    assert clock.getDelayedCalls() == []
    clock.advance(60)
    assert pending == []


def test_plain_allows_the_users_own_authzid_only() -> None:
    """PLAIN with the user's own authorization identity (any case) logs in; another's fails."""
    clock = Clock()
    login = flow(clock)
    (user,) = outcomes(login.plain(f"{USER.upper()}\0{USER}\0{PASSWORD}".encode()))
    assert isinstance(user, MailUser)
    other = outcomes(login.plain(f"bob@example.test\0{USER}\0{PASSWORD}".encode()))
    clock.advance(1)
    assert other == [Refusal.FAILED]


def test_malformed_plain_raises() -> None:
    """A PLAIN response without two NULs raises SASLError: the protocol chooses the answer."""
    with pytest.raises(SASLError):
        flow(Clock()).plain(b"no separators")
