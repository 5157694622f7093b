"""Tests for mailsys.smtp.policy, run against the StaticRouter fake and the real Router."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from mailsys import replies
from mailsys.address import Mailbox
from mailsys.config import RoutingSection
from mailsys.envelope import TargetKind
from mailsys.interfaces import IRouter
from mailsys.replies import Reply
from mailsys.routing import Destination, Router, UnknownRecipient
from mailsys.smtp.policy import (
    InboundPolicy,
    RecipientRejected,
    SessionInfo,
    SubmissionPolicy,
)
from mailsys.smtp.testing import LOCAL_DOMAIN, USERS, StaticRouter

SESSION = SessionInfo(hostname="mx.example.test", client_address="192.0.2.10", helo="client")
AUTHENTICATED = SessionInfo(hostname="mx.example.test", client_address="192.0.2.10",
                            helo="client", tls=True, authenticated_user="alice@example.test")


class SetOfUsers:
    def __init__(self, users: frozenset[str]) -> None:
        self.users = users

    def exists(self, mailbox: str) -> bool:
        return mailbox in self.users


def static_router() -> IRouter:
    return StaticRouter({LOCAL_DOMAIN}, set(USERS))


def real_router() -> IRouter:
    return Router(RoutingSection(local_domains=(LOCAL_DOMAIN,)), SetOfUsers(USERS))


@pytest.fixture(params=[static_router, real_router], ids=["fake", "real"])
def router(request: pytest.FixtureRequest) -> IRouter:
    factory: Callable[[], IRouter] = request.param
    return factory()


def result(d: Deferred[object]) -> object:
    """The synchronous result of ``d`` (a Failure if it failed)."""
    box: list[object] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


def rejection(d: Deferred[list[Destination]]) -> Reply:
    outcome = result(d)  # type: ignore[arg-type]
    assert isinstance(outcome, Failure), outcome
    assert isinstance(outcome.value, RecipientRejected)
    return outcome.value.reply


def test_inbound_local_user(router: IRouter) -> None:
    """A user of a local domain resolves to their mailbox."""
    d = InboundPolicy(router).check_recipient(SESSION, Mailbox("Alice", "example.test"))
    (destination,) = result(d)  # type: ignore[misc, arg-type]
    assert destination.kind is TargetKind.LOCAL
    assert destination.mailbox == "alice@example.test"


def test_inbound_unknown_user(router: IRouter) -> None:
    """An unknown user of a local domain is refused 550 5.1.1 at RCPT time."""
    d = InboundPolicy(router).check_recipient(SESSION, Mailbox("carol", "example.test"))
    assert rejection(d) == replies.MAILBOX_UNKNOWN


def test_inbound_refuses_relay(router: IRouter) -> None:
    """Other domains are refused 554 5.7.1 on port 25."""
    d = InboundPolicy(router).check_recipient(SESSION, Mailbox("x", "elsewhere.test"))
    assert rejection(d) == replies.RELAY_DENIED


def test_inbound_address_literal_is_not_local(router: IRouter) -> None:
    """An address literal is not one of our domains."""
    d = InboundPolicy(router).check_recipient(SESSION, Mailbox("x", "[192.0.2.1]"))
    assert rejection(d) == replies.RELAY_DENIED


def test_inbound_bare_postmaster(router: IRouter) -> None:
    """A bare postmaster goes to postmaster of the first local domain."""
    d = InboundPolicy(router).check_recipient(SESSION, Mailbox("postmaster", ""))
    (destination,) = result(d)  # type: ignore[misc, arg-type]
    assert destination.mailbox == "postmaster@example.test"


def test_inbound_bare_postmaster_with_configured_domain(router: IRouter) -> None:
    """postmaster_domain decides where a bare postmaster goes."""
    policy = InboundPolicy(router, postmaster_domain="Example.TEST")
    assert policy.postmaster(SESSION) == "postmaster@example.test"
    (destination,) = result(policy.check_recipient(SESSION, Mailbox("postmaster", "")))  # type: ignore[misc, arg-type]
    assert destination.mailbox == "postmaster@example.test"


def test_inbound_accepts_any_sender() -> None:
    """Port 25 accepts the null sender and any other."""
    policy = InboundPolicy(static_router())
    assert result(policy.check_sender(SESSION, None)) is None  # type: ignore[arg-type]
    assert result(policy.check_sender(SESSION, Mailbox("a", "b.test"))) is None  # type: ignore[arg-type]
    assert not policy.requires_auth and not policy.requires_tls_before_mail


def test_router_failure_is_not_a_rejection() -> None:
    """A router error other than UnknownRecipient stays an error (the session says 451)."""

    class BrokenRouter(StaticRouter):
        def resolve(self, address: str) -> list[object]:
            raise OSError("user store unreadable")

    d = InboundPolicy(BrokenRouter({LOCAL_DOMAIN}, set())).check_recipient(
        SESSION, Mailbox("alice", "example.test"))
    outcome = result(d)  # type: ignore[arg-type]
    assert isinstance(outcome, Failure) and isinstance(outcome.value, OSError)


def test_asynchronous_router() -> None:
    """A router answering with Deferreds works the same."""

    class SlowRouter(StaticRouter):
        def __init__(self) -> None:
            super().__init__({LOCAL_DOMAIN}, set(USERS))
            self.pending: list[Deferred[list[object]]] = []

        def is_local_domain(self, domain: str) -> Deferred[bool]:  # type: ignore[override]
            return succeed(super().is_local_domain(domain))

        def resolve(self, address: str) -> Deferred[list[object]]:  # type: ignore[override]
            d: Deferred[list[object]] = Deferred()
            self.pending.append(d)
            return d

    router = SlowRouter()
    d = InboundPolicy(router).check_recipient(SESSION, Mailbox("bob", "example.test"))
    box: list[object] = []
    d.addBoth(box.append)
    assert box == []
    router.pending[0].errback(UnknownRecipient("bob@example.test"))
    assert isinstance(box[0], Failure) and isinstance(box[0].value, RecipientRejected)


def test_router_returning_nothing_is_unknown() -> None:
    """An empty destination list counts as an unknown recipient."""

    class EmptyRouter(StaticRouter):
        def resolve(self, address: str) -> list[object]:
            return []

    d = InboundPolicy(EmptyRouter({LOCAL_DOMAIN}, set())).check_recipient(
        SESSION, Mailbox("a", "example.test"))
    assert rejection(d) == replies.MAILBOX_UNKNOWN


def test_submission_needs_tls_and_auth(router: IRouter) -> None:
    """Submission requires TLS and AUTH; unauthenticated senders and recipients are refused."""
    policy = SubmissionPolicy(router)
    assert policy.requires_tls_before_mail and policy.requires_auth
    assert result(policy.check_sender(SESSION, Mailbox("a", "b.test"))) == replies.AUTH_REQUIRED  # type: ignore[arg-type]
    d = policy.check_recipient(SESSION, Mailbox("alice", "example.test"))
    assert rejection(d) == replies.AUTH_REQUIRED


def test_submission_authenticated_may_send_anywhere(router: IRouter) -> None:
    """An authenticated user may send to any domain, and to local users that exist."""
    policy = SubmissionPolicy(router)
    assert result(policy.check_sender(AUTHENTICATED, Mailbox("alice", "example.test"))) is None  # type: ignore[arg-type]
    (remote,) = result(policy.check_recipient(AUTHENTICATED, Mailbox("X", "Elsewhere.test")))  # type: ignore[misc, arg-type]
    assert remote == Destination("X@elsewhere.test", TargetKind.RELAY)
    d = policy.check_recipient(AUTHENTICATED, Mailbox("nobody", "example.test"))
    assert rejection(d) == replies.MAILBOX_UNKNOWN


class UserFile:
    """A user store's file and the server's stale copy of it: reload() brings the copy up to
    date, answering like DiskPool.run (a Deferred, fired now or when the test says)."""

    def __init__(self, users: frozenset[str], *, synchronous: bool = True) -> None:
        self.copy = SetOfUsers(users)
        self.file = set(users)
        self.reloads = 0
        self.synchronous = synchronous
        self.pending: list[Deferred[bool]] = []

    def reload(self) -> Deferred[bool]:
        self.reloads += 1
        d: Deferred[bool] = Deferred()
        changed = self.copy.users != frozenset(self.file)

        def install(_: object) -> bool:
            self.copy.users = frozenset(self.file)
            return changed

        d.addCallback(install)
        if self.synchronous:
            d.callback(None)
        else:
            self.pending.append(d)
        return d


@pytest.mark.parametrize("policy_class", [InboundPolicy, SubmissionPolicy])
def test_user_added_since_the_last_reload_is_accepted(
    policy_class: type[InboundPolicy | SubmissionPolicy],
) -> None:
    """A user whose line is in the file but not yet in the server's copy is accepted, not 550."""
    users = UserFile(USERS)
    users.file.add("carol@example.test")
    router = Router(RoutingSection(local_domains=(LOCAL_DOMAIN,)), users.copy)
    policy = policy_class(router, reload_users=users.reload)
    d = policy.check_recipient(AUTHENTICATED, Mailbox("carol", "example.test"))
    (destination,) = result(d)  # type: ignore[misc, arg-type]
    assert destination.mailbox == "carol@example.test"
    assert users.reloads == 1


def test_unknown_user_is_refused_after_one_reload() -> None:
    """A user in neither the copy nor the file is refused 550 after one reload, and a known user
    costs no reload at all."""
    users = UserFile(USERS)
    router = Router(RoutingSection(local_domains=(LOCAL_DOMAIN,)), users.copy)
    policy = InboundPolicy(router, reload_users=users.reload)
    assert result(policy.check_recipient(SESSION, Mailbox("alice", "example.test")))
    assert users.reloads == 0
    d = policy.check_recipient(SESSION, Mailbox("carol", "example.test"))
    assert rejection(d) == replies.MAILBOX_UNKNOWN
    assert users.reloads == 1


def test_refusal_waits_for_the_reload() -> None:
    """No answer is given for an unknown user until the reload in the disk thread has ended."""
    users = UserFile(USERS, synchronous=False)
    router = Router(RoutingSection(local_domains=(LOCAL_DOMAIN,)), users.copy)
    d = InboundPolicy(router, reload_users=users.reload).check_recipient(
        SESSION, Mailbox("carol", "example.test"))
    box: list[object] = []
    d.addBoth(box.append)
    assert box == []
    users.file.add("carol@example.test")  # written while the reload was queued
    users.pending[0].callback(None)
    (destination,) = box[0]  # type: ignore[misc]
    assert destination.mailbox == "carol@example.test"


def test_failed_reload_is_not_a_rejection() -> None:
    """If the user file cannot be looked at, an unknown recipient is a temporary error (451),
    never a permanent 550."""

    def broken_reload() -> Deferred[bool]:
        failed: Deferred[bool] = Deferred()
        failed.errback(OSError("users file unreadable"))
        return failed

    router = Router(RoutingSection(local_domains=(LOCAL_DOMAIN,)), SetOfUsers(USERS))
    d = InboundPolicy(router, reload_users=broken_reload).check_recipient(
        SESSION, Mailbox("carol", "example.test"))
    outcome = result(d)  # type: ignore[arg-type]
    assert isinstance(outcome, Failure) and isinstance(outcome.value, OSError)


def test_relay_refusal_needs_no_reload() -> None:
    """A refused relay is not a missing user: it does not look at the user file."""
    users = UserFile(USERS)
    router = Router(RoutingSection(local_domains=(LOCAL_DOMAIN,)), users.copy)
    d = InboundPolicy(router, reload_users=users.reload).check_recipient(
        SESSION, Mailbox("someone", "elsewhere.test"))
    assert rejection(d) == replies.RELAY_DENIED
    assert users.reloads == 0
