"""Login-failure throttling per client address, for every protocol that authenticates.

Each failed login from an address makes the next failure answer later (a growing delay); after
too many failures within the window the address is blocked until the window has passed since
its last failure. An unknown user counts exactly like a wrong password: callers report both as
``failed``. IPv6 clients are counted per /64, since one host commonly holds a whole /64.

A successful login forgives only the failures made for that same user (a typo before the right
password): were it to clear the address, one valid account would let a guesser try other
users' passwords forever, alternating a good login with each guess.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

# Defaults: 1 s after the first failure, doubling, at most 15 s; blocked after 10 failures
# until 15 minutes have passed since the last one.
BASE_DELAY = 1.0
MAX_DELAY = 15.0
MAX_FAILURES = 10
WINDOW = 15 * 60.0
MAX_TRACKED = 100_000
# Users remembered per address for forgiveness; failures for further users are never forgiven.
MAX_USERS_PER_ADDRESS = 32


@dataclass
class _Record:
    failures: int
    last: float
    by_user: dict[str, int] = field(default_factory=dict)


def user_key(user: str) -> str:
    """How a login name is compared for forgiveness: as typed, case-folded."""
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
    """Counts login failures per client address and says how long to wait and when to refuse."""

    def __init__(self, clock: IReactorTime, *, base_delay: float = BASE_DELAY,
                 max_delay: float = MAX_DELAY, max_failures: int = MAX_FAILURES,
                 window: float = WINDOW, max_tracked: int = MAX_TRACKED) -> None:
        self._clock = clock
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_failures = max_failures
        self.window = window
        self.max_tracked = max_tracked
        self._records: OrderedDict[str, _Record] = OrderedDict()  # least recently failed first

    def _current(self, address: str) -> _Record | None:
        key = address_key(address)
        record = self._records.get(key)
        if record is not None and self._clock.seconds() - record.last >= self.window:
            del self._records[key]
            return None
        return record

    def delay_for(self, address: str) -> float:
        """Seconds to wait before answering a failed login from ``address`` (0 if none failed)."""
        record = self._current(address)
        if record is None:
            return 0.0
        return float(min(self.base_delay * 2 ** (record.failures - 1), self.max_delay))

    def failed(self, address: str, user: str = "") -> None:
        """Count a failed login (wrong password, unknown user, malformed credentials) for the
        login name ``user`` ("" when there was none)."""
        key = address_key(address)
        record = self._current(address)
        now = self._clock.seconds()
        if record is None:
            record = self._records[key] = _Record(0, now)
        record.failures += 1
        record.last = now
        name = user_key(user)
        if name and (name in record.by_user or len(record.by_user) < MAX_USERS_PER_ADDRESS):
            record.by_user[name] = record.by_user.get(name, 0) + 1
        self._records.move_to_end(key)
        while len(self._records) > self.max_tracked:
            self._records.popitem(last=False)  # forget the address that failed longest ago

    def succeeded(self, address: str, user: str) -> None:
        """``user`` logged in from ``address``: forget the failures made for that user only."""
        record = self._current(address)
        if record is None:
            return
        record.failures -= record.by_user.pop(user_key(user), 0)
        if record.failures <= 0:
            del self._records[address_key(address)]

    def blocked(self, address: str) -> bool:
        """True if ``address`` has failed too often: refuse logins without checking them."""
        record = self._current(address)
        return record is not None and record.failures >= self.max_failures

    def __len__(self) -> int:
        return len(self._records)
