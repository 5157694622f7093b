"""The throttled login that SMTP AUTH, POP3 (USER/PASS, AUTH) and IMAP (LOGIN, AUTHENTICATE)
share: the password checked through the twisted.cred portal, a failure counted by the login
throttle and answered only after its delay, and that delayed answer cancelled when the client
goes away.

Each protocol turns the outcome into its own reply; nothing here knows a protocol's words.
"""

from __future__ import annotations

import enum
from typing import Protocol

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsys.auth.portal import MailUser, login
from mailsys.auth.sasl import decode_plain

log = Logger(namespace="mailsys.auth")


class LoginLimiter(Protocol):
    """Throttles failed logins per user and client address
    (mailsys.auth.throttle.LoginThrottle)."""

    def delay_for(self, address: str, user: str = "") -> float:
        """Seconds to wait before answering a failed login for ``user`` from ``address``."""

    def failed(self, address: str, user: str = "") -> None:
        """Count a failed login from ``address`` for the login name ``user``."""

    def succeeded(self, address: str, user: str) -> None:
        """``user`` logged in from ``address``: forget the failures made for that user."""

    def blocked(self, address: str, user: str | None = None) -> bool:
        """True if logins from ``address`` (as a whole, or for ``user`` when given) are refused
        without being checked."""


class Refusal(enum.Enum):
    """Why a login did not succeed."""

    # A wrong password, an unknown user or malformed credentials: the same answer for all,
    # after the same delay, so that the answer does not tell which users exist.
    FAILED = "failed"
    # Too many failures from this address (for this user, or for all users): the session
    # says so and closes.
    BLOCKED = "blocked"


LoginOutcome = MailUser | Refusal


class LoginFlow:
    """The logins of one session, from ``client_address``.

    ``attempt`` and ``failed`` answer with a Deferred; a failure's answer is held back by the
    throttle's delay (a growing one per user and address) and the pending call is tracked so
    that ``cancel`` (the client went away) leaves no timer behind.
    """

    def __init__(self, portal: Portal | None, throttle: LoginLimiter | None,
                 clock: IReactorTime, client_address: str, protocol: str) -> None:
        self._portal = portal
        self._throttle = throttle
        self._clock = clock
        self.client_address = client_address  # set once the connection is made
        self._protocol = protocol  # for the log: "smtp", "pop3" or "imap"
        self._pending: IDelayedCall | None = None  # a failure's delayed answer

    def blocked(self, user: str | None = None) -> bool:
        """True if the client's address (as a whole, or for ``user`` when given) failed too
        often to be let try now."""
        return self._throttle is not None and self._throttle.blocked(self.client_address, user)

    def attempt(self, user: str, password: str) -> Deferred[LoginOutcome]:
        """Check ``password`` for ``user``: the MailUser, or why not.

        A blocked pair is refused without a check (and without counting another failure). A
        checker error other than a wrong password (the user file unreadable) fails the
        Deferred: the protocol answers that as a temporary problem.
        """
        if self.blocked(user):
            log.info("{protocol} login for {user!r} from [{client}] refused: too many failures",
                     protocol=self._protocol, user=user, client=self.client_address)
            return succeed(Refusal.BLOCKED)
        if not user or not password or self._portal is None:
            return self.failed(user)
        d: Deferred[MailUser] = maybeDeferred(login, self._portal, user, password)

        def succeeded(avatar: MailUser) -> LoginOutcome:
            if self._throttle is not None:
                self._throttle.succeeded(self.client_address, user)
            return avatar

        def refused(failure: Failure) -> Failure | Deferred[LoginOutcome]:
            if not isinstance(failure.value, UnauthorizedLogin):
                return failure
            return self.failed(user)

        return d.addCallbacks(succeeded, refused)

    def plain(self, response: bytes) -> Deferred[LoginOutcome]:
        """Log in with a base64-decoded SASL PLAIN response (RFC 4616 §2); SASLError if it is
        malformed (the protocol says how it answers that).

        An authorization identity other than the user's own (acting for another user) is not
        offered: a failed login. Case does not tell two identities apart (mailbox names are
        case-insensitive here, as for RCPT TO).
        """
        credentials = decode_plain(response)
        authzid, authcid = credentials.authzid, credentials.authcid
        if authzid and authzid.casefold() != authcid.casefold():
            return self.failed(authcid)
        return self.attempt(authcid, credentials.password)

    def failed(self, user: str) -> Deferred[LoginOutcome]:
        """Count a failed login for the login name ``user`` ("" when there was none) and
        answer FAILED after the throttle's delay, or BLOCKED if this failure reached a limit."""
        delay = 0.0
        if self._throttle is not None:
            self._throttle.failed(self.client_address, user)
            delay = self._throttle.delay_for(self.client_address, user)
        log.info("{protocol} login failed for {user!r} from [{client}]; answer in {delay}s",
                 protocol=self._protocol, user=user, client=self.client_address, delay=delay)
        d: Deferred[LoginOutcome] = Deferred()

        def answer() -> None:
            self._pending = None
            d.callback(Refusal.BLOCKED if self.blocked(user) else Refusal.FAILED)

        self.cancel()  # one exchange at a time: a session never has two answers pending
        self._pending = self._clock.callLater(delay, answer)
        return d

    def cancel(self) -> None:
        """The client went away: a failure's pending answer is never given (its Deferred
        stays unfired) and its timer goes."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.active():
            pending.cancel()
