"""Rate limits per client network and per authenticated user, in bounded memory.

A client is counted by its network: the address cut to ``ipv4_prefix`` bits (32: the address
itself) or ``ipv6_prefix`` bits (64: one customer's subnet; a host given a /64 can otherwise
use a fresh address for every connection). Each limit is a leaky bucket per key: ``limit``
events per ``period`` seconds, the count draining continuously, so there is no window edge to
burst at. The table of buckets is an LRU of at most ``max_entries`` keys: memory is bounded
however many addresses are seen, and the key forgotten first is the one idle longest (whose
bucket has likely drained anyway). Touched on the reactor thread only.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime


@functools.lru_cache(maxsize=4096)
def parse_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``address`` as an IP address (an IPv4-mapped one as IPv4), or None; cached, as the same
    clients come back (parsing costs more than the rest of a connection's checks)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=4096)
def client_network(address: str, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """The network ``address`` is counted in, as text ("192.0.2.7", "2001:db8:1:2::/64");
    anything that is not an IP address (a UNIX socket) is its own key."""
    ip = parse_address(address)
    if ip is None:
        return address
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    if prefix >= ip.max_prefixlen:
        return str(ip)
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class Buckets:
    """Leaky buckets by key: ``hit`` counts an event unless that would go over ``limit``
    events per ``period`` seconds. At most ``max_entries`` keys are kept."""

    __slots__ = ("_clock", "_rate", "_table", "limit", "max_entries", "period")

    def __init__(self, clock: IReactorTime, limit: int, period: float, *,
                 max_entries: int = 50_000) -> None:
        self._clock = clock
        self.limit = limit
        self.period = period
        self.max_entries = max_entries
        self._rate = limit / period  # events drained per second
        # key -> (level, when the level was computed); least recently used first.
        self._table: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def set_limit(self, limit: int, max_entries: int) -> None:
        """New limits (the configuration was read again); the counts so far are kept."""
        self.limit = limit
        self._rate = limit / self.period
        self.max_entries = max_entries
        while len(self._table) > max_entries:
            self._table.popitem(last=False)

    def __len__(self) -> int:
        return len(self._table)

    def level(self, key: str) -> float:
        """The events still counted for ``key`` now."""
        entry = self._table.get(key)
        if entry is None:
            return 0.0
        level, since = entry
        return max(0.0, level - (self._clock.seconds() - since) * self._rate)

    def hit(self, key: str, count: int = 1) -> bool:
        """Count ``count`` events for ``key``; False (nothing counted) when over the limit."""
        now = self._clock.seconds()
        table = self._table
        entry = table.get(key)
        level = 0.0 if entry is None else max(0.0, entry[0] - (now - entry[1]) * self._rate)
        if level + count > self.limit:
            table[key] = (level, now)
            table.move_to_end(key)
            return False
        table[key] = (level + count, now)
        if entry is None:
            if len(table) > self.max_entries:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        return True

    def over(self, key: str) -> bool:
        """True when ``key`` is at its limit (no event counted)."""
        return self.level(key) + 1 > self.limit
