"""The credential cache: a password found right is not hashed again, within its limits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailsys.auth.checker import UserStoreChecker
from mailsys.auth.credcache import CredentialCache
from mailsys.auth.users import UserStore

HASH = "{ARGON2ID}$argon2id$v=19$m=32768,t=3,p=2$c2FsdA$aGFzaA"
OTHER_HASH = "{ARGON2ID}$argon2id$v=19$m=32768,t=3,p=2$c2FsdA$b3RoZXI"


def _cache(clock: Clock, **kwargs: Any) -> CredentialCache:
    return CredentialCache(clock.seconds, **kwargs)


def test_a_remembered_password_is_a_hit() -> None:
    """The same mailbox, password and stored hash after a successful check is a hit."""
    cache = _cache(Clock())
    cache.remember("alice@example.test", "pw", HASH, 1)
    assert cache.matches("alice@example.test", "pw", HASH, 1)
    assert (cache.hits, cache.misses) == (1, 0)


def test_another_password_or_user_is_a_miss() -> None:
    """A different password, or the same password for another user, is not answered."""
    cache = _cache(Clock())
    cache.remember("alice@example.test", "pw", HASH, 1)
    assert not cache.matches("alice@example.test", "Pw", HASH, 1)
    assert not cache.matches("bob@example.test", "pw", HASH, 1)
    assert not cache.matches("alice@example.test", "pw", None, 1)  # user gone
    assert cache.misses == 2


def test_the_password_is_not_kept_in_the_clear() -> None:
    """Entries are keyed by a keyed hash of the password, never the password itself."""
    cache = _cache(Clock())
    cache.remember("alice@example.test", "s3cret-password", HASH, 1)
    assert "s3cret-password" not in repr(cache._entries)
    assert b"s3cret-password" not in b"".join(key[1] for key in cache._entries)


def test_keys_differ_between_processes() -> None:
    """Two caches (two processes) key the same password differently: a random key each."""
    first, second = _cache(Clock()), _cache(Clock())
    assert first.key_of("a@example.test", "pw") != second.key_of("a@example.test", "pw")


def test_an_entry_expires_after_its_ttl() -> None:
    """An entry answers until ttl seconds after the check, not after; hits do not extend it."""
    clock = Clock()
    cache = _cache(clock, ttl=60.0)
    cache.remember("alice@example.test", "pw", HASH, 1)
    clock.advance(59.0)
    assert cache.matches("alice@example.test", "pw", HASH, 1)
    clock.advance(1.0)
    assert not cache.matches("alice@example.test", "pw", HASH, 1)
    assert len(cache) == 0


def test_a_changed_hash_is_a_miss() -> None:
    """When the user's stored hash is no longer the one checked (a new password), no hit."""
    cache = _cache(Clock())
    cache.remember("alice@example.test", "pw", HASH, 1)
    assert not cache.matches("alice@example.test", "pw", OTHER_HASH, 1)
    assert len(cache) == 0


def test_a_reloaded_users_file_drops_every_entry() -> None:
    """A newer copy of the users file (generation) drops the whole cache."""
    cache = _cache(Clock())
    cache.remember("alice@example.test", "pw", HASH, 1)
    cache.remember("bob@example.test", "pw", HASH, 1)
    assert not cache.matches("alice@example.test", "pw", HASH, 2)
    assert len(cache) == 0


def test_a_check_against_an_older_copy_is_not_remembered() -> None:
    """A check that finishes after a newer copy of the users file was seen is not kept."""
    cache = _cache(Clock())
    cache.matches("alice@example.test", "pw", HASH, 5)
    cache.remember("alice@example.test", "pw", HASH, 4)
    assert len(cache) == 0


def test_the_cache_is_bounded_oldest_first() -> None:
    """At most max_entries are kept; the oldest check is dropped to make room."""
    cache = _cache(Clock(), max_entries=3)
    for n in range(5):
        cache.remember(f"u{n}@example.test", "pw", HASH, 1)
    assert len(cache) == 3
    assert not cache.matches("u0@example.test", "pw", HASH, 1)
    assert not cache.matches("u1@example.test", "pw", HASH, 1)
    assert all(cache.matches(f"u{n}@example.test", "pw", HASH, 1) for n in (2, 3, 4))


def test_a_size_or_ttl_of_zero_remembers_nothing() -> None:
    """With no room or no lifetime, nothing is remembered."""
    for cache in (_cache(Clock(), max_entries=0), _cache(Clock(), ttl=0.0)):
        cache.remember("alice@example.test", "pw", HASH, 1)
        assert not cache.matches("alice@example.test", "pw", HASH, 1)


class ThreadSpy:
    """A synchronous stand-in for the hashing pool that counts what it ran."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, func: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls += 1
        return maybeDeferred(func, *args)


def _login(checker: UserStoreChecker, user: str, password: str) -> object:
    results: list[object] = []
    checker.requestAvatarId(UsernamePassword(user.encode(), password.encode())).addBoth(
        results.append)
    assert results
    return results[0]


@pytest.fixture
def users(tmp_path: Path) -> UserStore:
    store = UserStore(tmp_path / "users")
    store.add("alice@example.test", "wonderland")
    return store


def test_checker_hashes_a_right_password_once(users: UserStore) -> None:
    """Logging in again with the same password answers without a password check in a thread."""
    spy = ThreadSpy()
    checker = UserStoreChecker(users, spy, _cache(Clock()))
    for _ in range(5):
        assert _login(checker, "Alice@Example.test", "wonderland") == b"alice@example.test"
    assert spy.calls == 1


def test_checker_never_remembers_a_failure(users: UserStore) -> None:
    """A wrong password costs the full check every time and is refused every time."""
    spy = ThreadSpy()
    checker = UserStoreChecker(users, spy, _cache(Clock()))
    for _ in range(3):
        result = _login(checker, "alice@example.test", "wrong")
        assert isinstance(result, Failure) and isinstance(result.value, UnauthorizedLogin)
    assert spy.calls == 3


def test_checker_sees_a_changed_password_at_once(tmp_path: Path) -> None:
    """After the password changes, the old one is refused and the new one accepted (and hashed)."""
    server = UserStore(tmp_path / "users", reload_on_lookup=False)
    command = UserStore(tmp_path / "users")  # the mailsys command, say
    command.add("alice@example.test", "old")
    server.reload_if_changed()
    spy = ThreadSpy()
    checker = UserStoreChecker(server, spy, _cache(Clock()))
    assert _login(checker, "alice@example.test", "old") == b"alice@example.test"
    command.set_password("alice@example.test", "new")
    server.reload_if_changed()  # the server's reload timer
    result = _login(checker, "alice@example.test", "old")
    assert isinstance(result, Failure) and isinstance(result.value, UnauthorizedLogin)
    assert _login(checker, "alice@example.test", "new") == b"alice@example.test"
    assert _login(checker, "alice@example.test", "new") == b"alice@example.test"
    assert spy.calls == 3  # old, old refused, new; the second "new" was a hit


def test_checker_sees_a_new_password_before_the_reload_timer(tmp_path: Path) -> None:
    """A new password is accepted on the first try even before the server's copy is reloaded,
    and the old one is no longer answered from the cache once it is."""
    server = UserStore(tmp_path / "users", reload_on_lookup=False)
    command = UserStore(tmp_path / "users")
    command.add("alice@example.test", "old")
    server.reload_if_changed()
    checker = UserStoreChecker(server, ThreadSpy(), _cache(Clock()))
    assert _login(checker, "alice@example.test", "old") == b"alice@example.test"
    command.set_password("alice@example.test", "new")
    assert _login(checker, "alice@example.test", "new") == b"alice@example.test"
    result = _login(checker, "alice@example.test", "old")
    assert isinstance(result, Failure)


def test_concurrent_logins_with_one_password_share_one_check(users: UserStore) -> None:
    """Logins arriving while the same credentials are being checked wait for that check."""
    pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def held(func: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append((func, args, d))
        return d

    checker = UserStoreChecker(users, held, _cache(Clock()))
    results: list[object] = []
    for password in ("wonderland", "wonderland", "wonderland", "wrong"):
        checker.requestAvatarId(UsernamePassword(b"alice@example.test", password.encode())
                                ).addBoth(results.append)
    assert len(pending) == 2  # one check per distinct password
    for func, args, d in pending:
        d.callback(func(*args))
    assert results[:3] == [b"alice@example.test"] * 3
    assert isinstance(results[3], Failure) and isinstance(results[3].value, UnauthorizedLogin)
