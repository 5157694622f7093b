"""Login-failure throttling, for every protocol that authenticates: per user at a client address,
and per client address as a whole.

Failures are counted per (client address, login name). Each one makes the next failure of that
pair answer later (a growing delay); after ``max_failures`` the pair is blocked until ``window``
has passed since its last failure. Other users at the same address are not slowed or blocked by
it: a classroom or an office behind one NAT address must not be locked out by one person's typos.

A guesser trying many users from one address (password spraying) is stopped by a second count:
all failures of the address within one ``window`` from the first of them. Once that reaches
``max_address_failures`` (far more than ``max_failures``) the whole address is blocked until
``window`` has passed since its last failure. A fixed window (not one restarted by every failure)
lets a busy address's occasional typos age out.

An unknown user counts exactly like a wrong password (callers report both as ``failed``, for
the name as typed), so neither the delay nor a block tells which users exist. IPv6 clients are
counted per /64, since one host commonly holds a whole /64.

A successful login forgives only the failures made for that same user (a typo before the right
password): were it to clear the address, one valid account would let a guesser try other
users' passwords forever, alternating a good login with each guess.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeVar

from twisted.internet.interfaces import IReactorTime

from mailsys.auth.users import InvalidMailboxError, canonical_mailbox
from mailsys.config import AuthSection

# Defaults, those of [auth]: 1 s after a user's first failure, doubling, at most 15 s; that user
# blocked at that address after 10 failures until 15 minutes have passed since the last one; the
# whole address blocked after 100 failures (any users) within 15 minutes.
BASE_DELAY = AuthSection.throttle_base_delay
MAX_DELAY = AuthSection.throttle_max_delay
MAX_FAILURES = AuthSection.throttle_max_failures
MAX_ADDRESS_FAILURES = AuthSection.throttle_max_address_failures
WINDOW = AuthSection.throttle_window
# Records kept of each kind (pairs, addresses); the one that failed longest ago goes first.
MAX_TRACKED = 100_000

_K = TypeVar("_K", str, tuple[str, str])


@dataclass
class _Record:
    failures: int
    first: float  # start of the address's fixed window (unused for pairs)
    last: float


def user_key(user: str) -> str:
    """How a login name is counted: as the mailbox it logs in to (mailsys.auth.users), so that
    "Alice@Example.test." counts with "alice@example.test"; anything else as typed, without
    surrounding space, case-folded."""
    try:
        return canonical_mailbox(user.strip())
    except InvalidMailboxError:
        return user.strip().casefold()


def address_key(address: str) -> str:
    """The key an address is counted under: an IPv4 address, or an IPv6 /64 network."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LoginThrottle:
    """Counts login failures per (address, user) and per address; says how long to wait and
    when to refuse."""

    def __init__(self, clock: IReactorTime, *, base_delay: float = BASE_DELAY,
                 max_delay: float = MAX_DELAY, max_failures: int = MAX_FAILURES,
                 max_address_failures: int = MAX_ADDRESS_FAILURES,
                 window: float = WINDOW, max_tracked: int = MAX_TRACKED) -> None:
        self._clock = clock
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_failures = max_failures
        self.max_address_failures = max_address_failures
        self.window = window
        self.max_tracked = max_tracked
        # Least recently failed first, so that the oldest is forgotten when there are too many.
        self._pairs: OrderedDict[tuple[str, str], _Record] = OrderedDict()
        self._addresses: OrderedDict[str, _Record] = OrderedDict()

    def _pair(self, address: str, user: str) -> _Record | None:
        key = (address_key(address), user_key(user))
        record = self._pairs.get(key)
        if record is not None and self._clock.seconds() - record.last >= self.window:
            del self._pairs[key]
            return None
        return record

    def _address(self, address: str) -> _Record | None:
        key = address_key(address)
        record = self._addresses.get(key)
        if record is None:
            return None
        now = self._clock.seconds()
        # A blocked address waits out the window after its last failure; one below the limit
        # starts afresh once the window that its first failure opened has passed.
        since = record.last if record.failures >= self.max_address_failures else record.first
        if now - since >= self.window:
            del self._addresses[key]
            return None
        return record

    def delay_for(self, address: str, user: str = "") -> float:
        """Seconds to wait before answering a failed login for ``user`` from ``address``
        (0 if that pair never failed)."""
        record = self._pair(address, user)
        if record is None:
            return 0.0
        return float(min(self.base_delay * 2 ** (record.failures - 1), self.max_delay))

    def failed(self, address: str, user: str = "") -> None:
        """Count a failed login (wrong password, unknown user, malformed credentials) for the
        login name ``user`` ("" when there was none)."""
        now = self._clock.seconds()
        self._count(self._pairs, (address_key(address), user_key(user)),
                    self._pair(address, user), now)
        self._count(self._addresses, address_key(address), self._address(address), now)

    def _count(self, table: OrderedDict[_K, _Record], key: _K, record: _Record | None,
               now: float) -> None:
        if record is None:
            record = table[key] = _Record(0, now, now)
        record.failures += 1
        record.last = now
        table.move_to_end(key)
        while len(table) > self.max_tracked:
            table.popitem(last=False)

    def succeeded(self, address: str, user: str) -> None:
        """``user`` logged in from ``address``: forget the failures made for that user only."""
        pair = self._pair(address, user)
        if pair is None:
            return
        del self._pairs[(address_key(address), user_key(user))]
        record = self._address(address)
        if record is not None:
            record.failures -= min(pair.failures, record.failures)
            if record.failures == 0:
                del self._addresses[address_key(address)]

    def blocked(self, address: str, user: str | None = None) -> bool:
        """True if logins from ``address`` are refused without being checked: the whole address
        (password spraying), or, when ``user`` is given, that user at that address."""
        record = self._address(address)
        if record is not None and record.failures >= self.max_address_failures:
            return True
        if user is None:
            return False
        pair = self._pair(address, user)
        return pair is not None and pair.failures >= self.max_failures

    def __len__(self) -> int:
        """How many (address, user) pairs have failures remembered."""
        return len(self._pairs)
