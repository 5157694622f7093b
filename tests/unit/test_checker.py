"""The twisted.cred checker: name and password against the UserStore, hashing off the reactor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.python.failure import Failure
from zope.interface import Interface, implementer
from zope.interface.verify import verifyObject

from mailsys.auth.checker import UserStoreChecker, avatar_mailbox
from mailsys.auth.users import UserStore


class ThreadSpy:
    """A synchronous stand-in for DiskPool.run that records what it was asked to run."""

    def __init__(self) -> None:
        self.calls: list[Callable[..., Any]] = []

    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls.append(func)
        return maybeDeferred(func, *args, **kwargs)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> UserStore:
    store = UserStore(tmp_path_factory.mktemp("checker") / "users")
    store.add("alice@example.test", "wonderland")
    return store


def _result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_provides_icredentialschecker(store: UserStore) -> None:
    """The checker is held to twisted.cred's interface and checks username/password pairs."""
    checker = UserStoreChecker(store, ThreadSpy())
    assert verifyObject(ICredentialsChecker, checker)


def test_right_password_gives_the_canonical_mailbox(store: UserStore) -> None:
    """A right password fires with the canonical mailbox, whatever the case of the name."""
    checker = UserStoreChecker(store, ThreadSpy())
    creds = UsernamePassword(b"Alice@Example.TEST", b"wonderland")
    avatar = _result(checker.requestAvatarId(creds))
    assert avatar == b"alice@example.test"
    assert avatar_mailbox(avatar) == "alice@example.test"


@pytest.mark.parametrize(
    ("username", "password", "check"),
    [
        (b"alice@example.test", b"Wonderland", "matching_hash"),  # wrong password
        (b"nobody@example.test", b"wonderland", "matching_hash"),  # unknown user
        (b"alice", b"wonderland", "verify"),  # not a mailbox name
        (b"alice@example.test\xff", b"wonderland", "verify"),  # not UTF-8
    ],
)
def test_failures_are_unauthorized_login(
    store: UserStore, username: bytes, password: bytes, check: str
) -> None:
    """Wrong passwords, unknown and malformed names all fail with UnauthorizedLogin."""
    spy = ThreadSpy()
    checker = UserStoreChecker(store, spy)
    result = _result(checker.requestAvatarId(UsernamePassword(username, password)))
    assert isinstance(result, Failure)
    assert isinstance(result.value, UnauthorizedLogin)
    # A full check ran in the thread, for unknown names too; names that could be users also
    # looked at the file once more.
    assert spy.calls == [getattr(store, check)]


def test_user_added_since_the_last_reload_logs_in(tmp_path: Path) -> None:
    """A user whose line the server's copy has not seen yet logs in on the first try."""
    server = UserStore(tmp_path / "users", reload_on_lookup=False)
    UserStore(tmp_path / "users").add("new@example.test", "pw")  # the mailsys command, say
    checker = UserStoreChecker(server, ThreadSpy())
    creds = UsernamePassword(b"new@example.test", b"pw")
    assert _result(checker.requestAvatarId(creds)) == b"new@example.test"


def test_str_credentials_are_accepted(store: UserStore) -> None:
    """Credentials given as str (not bytes) are checked the same way."""
    checker = UserStoreChecker(store, ThreadSpy())
    creds = UsernamePassword("alice@example.test", "wonderland")  # type: ignore[arg-type]
    assert _result(checker.requestAvatarId(creds)) == b"alice@example.test"


def test_password_check_runs_only_in_the_given_thread_runner(
    store: UserStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is hashed on the calling (reactor) thread: only run_in_thread calls the store."""
    verified: list[str] = []
    monkeypatch.setattr(store, "matching_hash",
                        lambda mailbox, password: verified.append(mailbox))
    pending: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def deferred_runner(func: Callable[..., Any], *args: Any) -> Deferred[Any]:
        pending.append((func, args))
        return Deferred()

    checker = UserStoreChecker(store, deferred_runner)
    d = checker.requestAvatarId(UsernamePassword(b"alice@example.test", b"wonderland"))
    assert verified == []
    assert not d.called
    assert len(pending) == 1
    assert pending[0][1] == ("alice@example.test", "wonderland")


def test_works_behind_a_portal(store: UserStore) -> None:
    """A Portal with this checker hands the realm the mailbox as the avatar id."""

    class IMailbox(Interface):
        pass

    @implementer(IRealm)
    class Realm:
        def requestAvatar(  # noqa: N802
            self, avatar_id: bytes | tuple[()], mind: object, *interfaces: Any
        ) -> Deferred[Any]:
            assert isinstance(avatar_id, bytes)
            return succeed((IMailbox, avatar_mailbox(avatar_id), lambda: None))

    portal = Portal(Realm(), [UserStoreChecker(store, ThreadSpy())])
    login = portal.login(UsernamePassword(b"alice@example.test", b"wonderland"), None, IMailbox)
    interface, avatar, _logout = _result(login)
    assert (interface, avatar) == (IMailbox, "alice@example.test")
    failed = _result(portal.login(UsernamePassword(b"alice@example.test", b"x"), None, IMailbox))
    assert isinstance(failed, Failure)
    assert isinstance(failed.value, UnauthorizedLogin)


def test_empty_store_refuses_everyone(tmp_path: Path) -> None:
    """An empty store refuses everyone without raising anything but UnauthorizedLogin."""
    checker = UserStoreChecker(UserStore(tmp_path / "none"), ThreadSpy())
    result = _result(checker.requestAvatarId(UsernamePassword(b"a@example.test", b"x")))
    assert isinstance(result, Failure)
    assert isinstance(result.value, UnauthorizedLogin)


def test_unreadable_user_file_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the users file cannot be read, logins are checked against the last good copy: a
    known user gets in, a wrong password is refused, and nothing fails with an error."""
    path = tmp_path / "users"
    server = UserStore(path, reload_on_lookup=False)
    UserStore(path).add("alice@example.test", "wonderland")
    server.reload_if_changed()
    UserStore(path).add("carol@example.test", "pw")

    def denied() -> object:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(server, "_read", denied)
    checker = UserStoreChecker(server, ThreadSpy())
    ok = _result(checker.requestAvatarId(UsernamePassword(b"alice@example.test", b"wonderland")))
    assert ok == b"alice@example.test"
    refused = _result(checker.requestAvatarId(UsernamePassword(b"carol@example.test", b"pw")))
    assert isinstance(refused, Failure) and refused.check(UnauthorizedLogin)
