"""The twisted.cred credentials checker that checks a user name and password against the UserStore.

Password hashing is slow on purpose, so it runs in a thread handed in by the caller (the service's
DiskPool.run or a deferToThread wrapper), never on the reactor thread. A credential cache
(mailsys.auth.credcache), when given, answers a password already found right without hashing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsys.auth.credcache import CredentialCache
from mailsys.auth.users import InvalidMailboxError, UserStore, canonical_mailbox

RunInThread = Callable[..., Deferred[Any]]


@implementer(ICredentialsChecker)
class UserStoreChecker:
    """Checks IUsernamePassword credentials against a UserStore.

    The avatar id is the canonical mailbox ``local@domain`` as UTF-8 bytes: twisted.cred types
    avatar ids as bytes, and a realm decodes it with ``avatar_mailbox()``.
    """

    credentialInterfaces = (IUsernamePassword,)  # noqa: N815 - twisted.cred's attribute name

    def __init__(self, store: UserStore, run_in_thread: RunInThread,
                 cache: CredentialCache | None = None) -> None:
        self._store = store
        self._run_in_thread = run_in_thread
        self._cache = cache
        # Checks running now, by cache key, with the logins waiting for the same answer: many
        # connections a client opens at once with one password pay one hash between them.
        self._in_flight: dict[tuple[str, bytes], list[Deferred[str | None]]] = {}

    def requestAvatarId(  # noqa: N802 - twisted.cred's method name
        self, credentials: IUsernamePassword
    ) -> Deferred[bytes | tuple[()]]:
        """Fire with ``local@domain`` (UTF-8) if the password is right, else UnauthorizedLogin.

        Unknown and malformed user names cost a full password check too (in the store), so the
        time to answer does not reveal which users exist. A failure looks at the user file once
        more before it is final (``UserStore.verify_fresh``), so a user added or given a new
        password a moment ago is not refused while the server's copy catches up.
        """
        username = _text(credentials.username)
        password = _text(credentials.password)
        try:
            mailbox = canonical_mailbox(username)
        except InvalidMailboxError:
            mailbox = None
        if mailbox is None:
            # Not a name the store can hold: no reload could make it a user.
            d = self._run_in_thread(self._store.verify, username, password)
            return d.addCallback(_refuse)
        cache = self._cache
        if cache is None:
            matched = self._run_in_thread(self._store.matching_hash, mailbox, password)
        elif cache.matches(mailbox, password, self._store.get_hash(mailbox),
                           self._store.generation):
            return succeed(mailbox.encode("utf-8"))
        else:
            matched = self._shared_check(cache.key_of(mailbox, password), mailbox, password)

        def checked(stored: str | None) -> bytes | tuple[()]:
            if stored is None:
                raise UnauthorizedLogin("invalid user name or password")
            if cache is not None:
                cache.remember(mailbox, password, stored, self._store.generation)
            return mailbox.encode("utf-8")

        return matched.addCallback(checked)

    def _shared_check(self, key: tuple[str, bytes], mailbox: str,
                      password: str) -> Deferred[str | None]:
        """The stored hash ``password`` matches (or None), from the check of the same
        credentials already running if there is one, else from a new one."""
        waiting: Deferred[str | None] = Deferred()
        others = self._in_flight.get(key)
        if others is not None:
            others.append(waiting)
            return waiting
        self._in_flight[key] = [waiting]
        check: Deferred[str | None] = self._run_in_thread(self._store.matching_hash, mailbox,
                                                          password)

        def answer(result: str | Failure | None) -> None:
            for d in self._in_flight.pop(key, []):
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

        check.addBoth(answer)
        return waiting


def _refuse(ok: bool) -> bytes | tuple[()]:
    raise UnauthorizedLogin("invalid user name or password")


def avatar_mailbox(avatar_id: bytes) -> str:
    """The canonical mailbox named by an avatar id that UserStoreChecker produced."""
    return avatar_id.decode("utf-8")


def _text(value: str | bytes) -> str:
    # SASL (RFC 4616) sends UTF-8; surrogateescape keeps any other bytes distinct rather than
    # failing here, and such a name is simply not found.
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value
