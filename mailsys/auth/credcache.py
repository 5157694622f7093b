"""The credential cache: successful password checks remembered, so a reconnecting client pays the
password hash once, not at every login.

A mail client logs in again and again with the same password (a POP3 poll every few minutes, an
IMAP client opening a connection per folder); each check costs an Argon2id verification, slow on
purpose (about 50 ms of CPU and 32 MiB). Like Dovecot's auth cache (``auth_cache_size``,
``auth_cache_ttl``), this remembers checks that succeeded:

- the key is the canonical mailbox and an HMAC-SHA256 of the password under a random key made
  when the process starts and never stored, so the cache holds nothing a password could be
  recovered from offline, and the same password gives different keys in every process;
- each entry also holds the stored hash the password was checked against; it answers only while
  the user's hash is still that one, so a changed password is checked afresh at once, and the
  whole cache is dropped whenever the users file is read again (any change to it);
- an entry lives ``ttl`` seconds from the check (not refreshed by hits), and there are at most
  ``max_entries``: the oldest is dropped first;
- failures are never remembered: a wrong password always costs the full check (and the login
  throttle's delay).

Everything here is cheap (one HMAC of a short string) and runs on the reactor thread.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Dovecot's auth_cache_ttl default is one hour; its cache is off by default (auth_cache_size=0).
DEFAULT_TTL = 3600.0
DEFAULT_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class _Entry:
    stored_hash: str  # the {SCHEME}hash the password was checked against
    expires: float


class CredentialCache:
    """Successful (mailbox, password) checks for ``ttl`` seconds, at most ``max_entries``.

    ``clock`` is a clock in seconds (``reactor.seconds`` or ``time.monotonic``); a ``ttl`` or
    ``max_entries`` of 0 remembers nothing.
    """

    def __init__(self, clock: Callable[[], float], *, ttl: float = DEFAULT_TTL,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max_entries = max_entries
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()
        self._generation = -1  # the users file's copy last seen (UserStore.generation)
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        """False when nothing can be remembered (a TTL or size of 0)."""
        return self._ttl > 0 and self._max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def matches(self, mailbox: str, password: str, stored_hash: str | None,
                generation: int) -> bool:
        """True if ``password`` was found right for ``mailbox`` while its hash was
        ``stored_hash`` (the hash the store holds now), within the TTL.

        ``generation`` numbers the copy of the users file the store holds; when it is newer than
        the one last seen, the file was read again and every entry is dropped first.
        """
        self._see(generation)
        if not self.enabled or stored_hash is None:
            return False
        key = self.key_of(mailbox, password)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return False
        if entry.expires <= self._clock() or not hmac.compare_digest(entry.stored_hash,
                                                                     stored_hash):
            del self._entries[key]
            self.misses += 1
            return False
        self.hits += 1
        return True

    def remember(self, mailbox: str, password: str, stored_hash: str, generation: int) -> None:
        """Record that ``password`` is right for ``mailbox`` whose hash is ``stored_hash``.

        ``generation`` is the store's copy now; a record against an older copy than one already
        seen is not kept. (Whether it is used later depends on the hash: ``matches`` compares
        it with the user's hash at that time.)
        """
        if not self.enabled:
            return
        self._see(generation)
        if generation < self._generation:
            return
        key = self.key_of(mailbox, password)
        self._entries.pop(key, None)
        self._entries[key] = _Entry(stored_hash, self._clock() + self._ttl)
        self._drop_expired()
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)  # the oldest check goes first

    def clear(self) -> None:
        """Forget every check."""
        self._entries.clear()

    def _see(self, generation: int) -> None:
        if generation > self._generation:
            self._entries.clear()
            self._generation = generation

    def _drop_expired(self) -> None:
        # Entries are kept in the order they were made and all live ttl seconds, so the expired
        # ones are at the front.
        now = self._clock()
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                return
            del self._entries[key]

    def key_of(self, mailbox: str, password: str) -> tuple[str, bytes]:
        """The key of these credentials here: the mailbox and a keyed hash of the password."""
        digest = hmac.new(self._key, password.encode("utf-8", "surrogateescape"),
                          hashlib.sha256).digest()
        return mailbox, digest
