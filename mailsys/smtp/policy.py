"""What one SMTP listener accepts: the rules for senders and recipients on 25, 587 and 465.

A policy answers two questions for the session, with Deferreds: may this sender start a
transaction, and where does this recipient go (or why is it refused). ``InboundPolicy`` is the MTA
on port 25 (RFC 5321: mail for our domains only, no relaying); ``SubmissionPolicy`` is message
submission (RFC 6409 on 587, RFC 8314 on 465: TLS and authentication first, then any domain).
The session itself (sequence, syntax, limits) is mailsys.smtp.server's business.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsys import replies
from mailsys.address import Mailbox
from mailsys.interfaces import IRouter
from mailsys.replies import Reply
from mailsys.routing import Destination, UnknownRecipient

log = Logger(namespace="mailsys.smtp.policy")


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What a policy may know about the session asking: a snapshot, safe to keep."""

    hostname: str  # our own host name
    client_address: str  # the peer's IP address ("" when unknown, e.g. a UNIX socket)
    helo: str | None = None
    tls: bool = False
    authenticated_user: str | None = None


class RecipientRejected(Exception):  # noqa: N818 - the name the design uses
    """A recipient the policy refuses; ``reply`` is what the client is told."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class Policy(Protocol):
    """The policy a listener applies; the SMTP session asks it at MAIL and RCPT."""

    @property
    def requires_tls_before_mail(self) -> bool:
        """MAIL before the session is secure gets 530 5.7.0 (RFC 3207 §4)."""

    @property
    def requires_auth(self) -> bool:
        """MAIL before authentication gets 530 5.7.0 (RFC 4954 §6)."""

    def check_sender(self, session: SessionInfo, sender: Mailbox | None) -> Deferred[Reply | None]:
        """None if ``sender`` (None is the null path) may send, else the refusal to send."""

    def check_recipient(
        self, session: SessionInfo, recipient: Mailbox
    ) -> Deferred[list[Destination]]:
        """The destinations of ``recipient``; fails with RecipientRejected for a refusal.

        Any other failure is a temporary problem (the session answers 451 4.3.0).
        """


class SenderOwnership(Protocol):
    """Who may use which envelope sender (mailsys.routing.Router implements it)."""

    def may_send_as(self, mailbox: str, address: str) -> bool:
        """True if the authenticated user ``mailbox`` may send as ``address``."""


class RouterPolicy:
    """What both listener kinds share: recipients resolved by the router at RCPT time, and the
    rule for the sender of an authenticated session.

    Subclasses decide who may relay (``may_relay``) and what MAIL needs first. The sender of an
    authenticated session must be the user's (RFC 6409 §6.1): their own address or one of their
    aliases, as ``senders`` decides; without ``senders`` only the user's own address (any case).
    The null sender is allowed there: mail clients submit read receipts with it (RFC 8098 §3).

    ``mailbox_full``, when given, says (with a Deferred) whether a local mailbox has reached its
    quota: a recipient that resolves to that one mailbox is then refused at RCPT with 452 4.2.2
    (RFC 3463 X.2.2). Refusing there, for mail from outside and submissions alike, keeps the
    message with its sender's server, which retries and in the end tells its own user: we
    accept no mail we would only bounce later to a sender that may be forged (backscatter). A
    recipient that expands to several mailboxes (an alias) is accepted; each full mailbox then
    defers in the queue with 4.2.2 and bounces with 5.2.2 if it stays full.

    ``reload_users``, when given, brings the router's user store up to date with its file (in a
    disk thread, never on the reactor) and is called before an unknown local recipient is
    refused: a 550 is permanent (RFC 5321 §4.2.1), so it must not be said of a user just added
    whose line the server's copy has not caught up with yet.
    """

    requires_tls_before_mail = False
    requires_auth = False

    def __init__(
        self,
        router: IRouter,
        *,
        postmaster_domain: str | None = None,
        senders: SenderOwnership | None = None,
        reload_users: Callable[[], Deferred[Any]] | None = None,
        mailbox_full: Callable[[str], Deferred[bool]] | None = None,
    ) -> None:
        self._router = router
        self._mailbox_full = mailbox_full
        self._postmaster_domain = postmaster_domain
        self._senders = senders
        self._reload_users = reload_users

    def postmaster(self, session: SessionInfo) -> str:
        """Where a bare ``RCPT TO:<postmaster>`` goes (RFC 5321 §4.1.1.3 and §4.5.1).

        With ``postmaster_domain`` it is ``postmaster@<that domain>``; without, the bare name is
        given to the router, which maps it to its first local domain.
        """
        if self._postmaster_domain:
            return f"postmaster@{self._postmaster_domain.lower()}"
        return "postmaster"

    def may_relay(self, session: SessionInfo) -> bool:
        """True if this session may send to domains that are not ours."""
        return False

    def check_sender(self, session: SessionInfo, sender: Mailbox | None) -> Deferred[Reply | None]:
        if session.authenticated_user is not None:
            return self.check_owned_sender(session.authenticated_user, sender)
        # RFC 5321 §4.5.5: the null reverse-path <> must be accepted (bounces use it).
        return succeed(None)

    def check_owned_sender(self, user: str, sender: Mailbox | None) -> Deferred[Reply | None]:
        """None if the authenticated ``user`` may send as ``sender``, else the refusal."""
        if sender is None:
            # RFC 8098 §3: an MDN (read receipt) SHOULD have the null return path, and clients
            # send MDNs through submission. Only an authenticated user gets here.
            return succeed(None)
        address = str(sender)
        try:
            if self._senders is not None:
                owned = self._senders.may_send_as(user, address)
            else:
                owned = address.lower() == user.lower()
        except Exception:
            return fail()
        # RFC 6409 §6.1: the sender must be one the authentication allows.
        return succeed(None if owned else replies.SENDER_NOT_OWNED)

    def check_recipient(
        self, session: SessionInfo, recipient: Mailbox
    ) -> Deferred[list[Destination]]:
        # The router may answer synchronously (the usual case) or with Deferreds; the
        # synchronous path creates a single, already fired Deferred.
        try:
            if recipient.is_bare_postmaster:
                # RFC 5321 §4.5.1: postmaster must be accepted, whatever the relay rules.
                return self._resolve(True, session, self.postmaster(session))
            address = str(recipient)
            local = self._router.is_local_domain(recipient.domain)
            if isinstance(local, Deferred):
                return local.addCallback(self._resolve, session, address)
            return self._resolve(local, session, address)
        except Exception:
            return fail()

    def _resolve(
        self, local: bool, session: SessionInfo, address: str
    ) -> Deferred[list[Destination]]:
        if not local and not self.may_relay(session):
            return fail(RecipientRejected(replies.RELAY_DENIED))
        d = self._route_reloading(address)
        if self._mailbox_full is None:
            return d
        return d.addCallback(self._refuse_full)

    def _refuse_full(self, destinations: list[Destination]) -> Any:
        """The destinations, or RecipientRejected(452 4.2.2) for one local mailbox at quota."""
        assert self._mailbox_full is not None
        if len(destinations) != 1 or destinations[0].mailbox is None:
            return destinations
        full = self._mailbox_full(destinations[0].mailbox)

        def decided(is_full: bool) -> list[Destination]:
            if is_full:
                raise RecipientRejected(replies.MAILBOX_FULL)
            return destinations

        return full.addCallback(decided)

    def _route_reloading(self, address: str) -> Deferred[list[Destination]]:
        d = self._route(address)
        if self._reload_users is None:
            return d
        reload_users = self._reload_users

        def again(failure: Failure) -> Deferred[list[Destination]]:
            refusal = failure.value
            if not isinstance(refusal, RecipientRejected) or (
                refusal.reply != replies.MAILBOX_UNKNOWN
            ):
                return fail(failure)
            # Only a miss pays for this: one stat() in a disk thread while the file is unchanged.
            reloaded: Deferred[Any] = reload_users()
            routed: Deferred[list[Destination]] = reloaded.addCallback(
                lambda _: self._route(address))
            return routed

        return d.addErrback(again)

    def _route(self, address: str) -> Deferred[list[Destination]]:
        try:
            found = self._router.resolve(address)
        except UnknownRecipient:
            # RFC 5321 §3.3: an unknown local user is refused at RCPT time.
            return fail(RecipientRejected(replies.MAILBOX_UNKNOWN))
        except Exception:
            return fail()
        if isinstance(found, Deferred):
            return found.addCallbacks(_destinations, _unknown)
        try:
            return succeed(_destinations(found))
        except Exception:
            return fail()


def _unknown(failure: Failure) -> Failure:
    if isinstance(failure.value, UnknownRecipient):
        raise RecipientRejected(replies.MAILBOX_UNKNOWN)
    return failure


def _destinations(found: Sequence[object]) -> list[Destination]:
    result = []
    for item in found:
        if not isinstance(item, Destination):
            raise TypeError(f"router returned {item!r}, not a Destination")
        result.append(item)
    if not result:
        raise RecipientRejected(replies.MAILBOX_UNKNOWN)
    return result


class InboundPolicy(RouterPolicy):
    """Port 25 (RFC 5321): anyone may send, but only to our own domains; no relaying.

    Only where the administrator turned AUTH on for port 25 (``smtp.offer_auth``) can a session
    be authenticated; such a session submits like one on 587: its own senders, any recipient.
    """

    def may_relay(self, session: SessionInfo) -> bool:
        return session.authenticated_user is not None


class SubmissionPolicy(RouterPolicy):
    """Ports 587 and 465 (RFC 6409, RFC 8314): TLS, then authentication, then any recipient.

    MAIL needs an authenticated user (RFC 6409 §4.3) and a sender that is theirs (see
    RouterPolicy); an authenticated user may send to any domain.
    """

    requires_tls_before_mail = True
    requires_auth = True

    def may_relay(self, session: SessionInfo) -> bool:
        return session.authenticated_user is not None

    def check_sender(self, session: SessionInfo, sender: Mailbox | None) -> Deferred[Reply | None]:
        user = session.authenticated_user
        if user is None:
            return succeed(replies.AUTH_REQUIRED)
        return self.check_owned_sender(user, sender)

    def check_recipient(
        self, session: SessionInfo, recipient: Mailbox
    ) -> Deferred[list[Destination]]:
        if session.authenticated_user is None:
            return fail(RecipientRejected(replies.AUTH_REQUIRED))
        return super().check_recipient(session, recipient)


class StorageGate(Protocol):
    """What an SMTP listener asks at MAIL FROM before a transaction starts: is there room?"""

    def refusal(self, size: int | None) -> Reply | None:
        """None if a message (of the declared ``size``, when given) may come, else the reply."""


class StorageFloor:
    """Refuses new mail early while the spool's file system is below its free-space floor.

    Postfix's queue_minfree, for every listener alike: below the floor MAIL FROM gets
    452 4.3.1, and a declared SIZE that would take the free space below it gets the same at
    once (RFC 1870 §6.1), instead of reading a whole message only to fail its commit.

    The free space is a cached number, refreshed by ``refresh()`` (a timer calls it) with
    statvfs in a disk thread. statvfs does no I/O on a local file system (it reads the
    superblock's counters, about a microsecond), but on NFS or FUSE it is a round trip that
    can hang, so it never runs on the reactor; MAIL FROM only reads the last answer. The state
    is logged once when it starts and once when it ends.
    """

    def __init__(
        self, directory: Path, floor: int, run: Callable[..., Deferred[Any]]
    ) -> None:
        self.directory = Path(directory)
        self.floor = floor
        self._run = run
        self.free: int | None = None  # bytes available to us; None before the first look
        self.below_floor = False

    def refresh(self) -> Deferred[None]:
        """Look at the free space once (in a disk thread); never fails (errors are logged)."""
        d: Deferred[int] = self._run(available_bytes, self.directory)

        def failed(failure: Failure) -> None:
            log.warn("cannot see the free space of {path}: {error}", path=str(self.directory),
                     error=failure.getErrorMessage())

        return d.addCallbacks(self.update, failed)

    def update(self, free: int) -> None:
        """Take a new free-space figure; log when the low state starts or ends."""
        self.free = free
        low = free < self.floor
        if low and not self.below_floor:
            log.warn("spool file system {path} below its free-space floor ({free} < {floor} "
                     "bytes): refusing new mail with 452 4.3.1 until space returns",
                     path=str(self.directory), free=free, floor=self.floor)
        elif self.below_floor and not low:
            log.info("spool file system {path} has room again ({free} >= {floor} bytes): "
                     "accepting mail", path=str(self.directory), free=free, floor=self.floor)
        self.below_floor = low

    def refusal(self, size: int | None) -> Reply | None:
        free = self.free
        if free is None:
            return None
        if self.below_floor:
            return replies.SYSTEM_FULL  # RFC 3463 §3.4 X.3.1: mail system full
        if size is not None and free - size < self.floor:
            return replies.SYSTEM_FULL  # RFC 1870 §6.1: the declared size does not fit now
        return None


def available_bytes(directory: Path) -> int:
    """Blocking: the bytes an unprivileged writer may still use on ``directory``'s file system."""
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize
