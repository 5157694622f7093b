"""The twisted.cred portal every mail protocol logs in through, and its realm.

The avatar is a ``MailUser``: the canonical mailbox that authenticated. Protocols ask for
``IMailUser`` and take it from there (POP3 and IMAP open the mailbox store, SMTP AUTH records
the submitter). Password checking is UserStoreChecker's, in a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

from mailsys.auth.checker import RunInThread, UserStoreChecker, avatar_mailbox
from mailsys.auth.credcache import CredentialCache
from mailsys.auth.users import UserStore


class IMailUser(Interface):
    """An authenticated user of the mail system."""

    mailbox = Attribute("The canonical mailbox name, local@domain (str).")


@implementer(IMailUser)
@dataclass(frozen=True)
class MailUser:
    """The avatar of a logged-in user."""

    mailbox: str


def _no_logout() -> None:
    """Nothing to undo at logout: sessions release their own resources."""


@implementer(IRealm)
class MailRealm:
    """Gives every authenticated avatar id a MailUser."""

    # A zope interface method, not a base-class override, so no @override (mypy finds no base).
    def requestAvatar(  # noqa: N802 - twisted.cred's method name
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any  # noqa: N803
    ) -> tuple[Any, MailUser, Callable[[], None]]:
        if IMailUser in interfaces and isinstance(avatarId, bytes):
            return IMailUser, MailUser(avatar_mailbox(avatarId)), _no_logout
        raise NotImplementedError("MailRealm only provides IMailUser")


def build_portal(users: UserStore, run_in_thread: RunInThread,
                 cache: CredentialCache | None = None) -> Portal:
    """A portal checking passwords against ``users`` in ``run_in_thread`` (e.g. DiskPool.run),
    answering from ``cache`` a password already found right."""
    return Portal(MailRealm(), [UserStoreChecker(users, run_in_thread, cache)])


def login(portal: Portal, username: str | bytes, password: str | bytes) -> Deferred[MailUser]:
    """Log in by name and password; fails with twisted.cred.error.UnauthorizedLogin."""
    credentials = UsernamePassword(_bytes(username), _bytes(password))
    d: Deferred[tuple[Any, Any, Callable[[], None]]] = portal.login(credentials, None, IMailUser)

    def avatar(result: tuple[Any, Any, Callable[[], None]]) -> MailUser:
        user = result[1]
        assert isinstance(user, MailUser)
        return user

    return d.addCallback(avatar)


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
