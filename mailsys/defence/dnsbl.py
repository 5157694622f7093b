"""DNS block and allow lists (RFC 5782): which configured zones list a client address, the
weights they add up to, and the zones that did not answer in time.

A client is looked up in every zone at once through the shared caching resolver
(mailsys.dns.cache), so a listed bot costs one query per zone and TTL, not per connection. An
answer counts when it is in 127.0.0.0/8 (RFC 5782 §2.1) and matches the zone's filter; Spamhaus
answers 127.255.255.252-255 when it refuses the query (an open resolver, a quota) — an error,
never a listing. A zone that times out or fails lists nothing: the caller lets the mail flow
and marks it. ``check`` never fails and never blocks the reactor.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.names import dns
from twisted.python.failure import Failure

from mailsys.dns.cache import Answer, CachingResolver
from mailsys.values import DNSListKey

# RFC 5782 §2.1: list entries are 127.0.0.0/8; Spamhaus's 127.255.255.0/24 are error codes.
_LISTING = ipaddress.ip_network("127.0.0.0/8")
_ERRORS = ipaddress.ip_network("127.255.255.0/24")


@dataclass(frozen=True)
class Zone:
    """One configured list: its zone and, optionally, the answers that count and their weight."""

    zone: str
    weight: float = 1.0
    # The answer 127.a.b.c counts when (a, b) == prefix and low <= c <= high; None: any.
    prefix: tuple[int, int] | None = None
    low: int = 0
    high: int = 255

    def counts(self, answer: str) -> bool:
        """True when ``answer`` (an A record's address) is a listing this entry weighs."""
        try:
            ip = ipaddress.IPv4Address(answer)
        except ValueError:
            return False
        if ip not in _LISTING or ip in _ERRORS:
            return False
        if self.prefix is None:
            return True
        octets = ip.packed
        return (octets[1], octets[2]) == self.prefix and self.low <= octets[3] <= self.high


def parse_zones(table: Mapping[str, float]) -> list[Zone]:
    """Zones from the configuration's ``dnsbl`` table (checked by mailsys.config)."""
    zones = []
    for text, weight in table.items():
        key = DNSListKey.parse(text)
        zones.append(Zone(key.zone, weight, key.prefix, key.low, key.high))
    return zones


def query_name(address: str, zone: str) -> str | None:
    """The name to ask for ``address`` in ``zone`` (RFC 5782 §2.1 and §2.4): reversed
    octets, or reversed nibbles for IPv6; None for what is not an IP address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.reverse_pointer.rsplit(".", 2)[0] + "." + zone


@dataclass(frozen=True)
class ListResult:
    """What the lists said about one address."""

    score: float = 0.0
    listed_by: tuple[str, ...] = ()  # zones whose answer counted, heaviest first
    allowed_by: str | None = None  # the allowlist zone that lists the client
    failed: tuple[str, ...] = ()  # zones that gave no answer in time

    def listed(self, threshold: float) -> bool:
        return self.allowed_by is None and self.score >= threshold


class DNSLists:
    """Looks client addresses up in block and allow zones through one caching resolver."""

    def __init__(self, resolver: CachingResolver, clock: IReactorTime, zones: Sequence[Zone],
                 allow_zones: Sequence[str] = (), *, timeout: float = 5.0,
                 max_entries: int = 10_000) -> None:
        self._resolver = resolver
        self._clock = clock
        self.zones = list(zones)
        self.allow_zones = [zone.lower().rstrip(".") for zone in allow_zones]
        self.timeout = timeout
        self.max_entries = max_entries
        # address -> (result, when it expires): a client that connects again while every
        # answer's TTL lasts costs one dictionary look-up, not a lookup per zone (the DNS
        # cache holds the answers themselves; this holds what they add up to).
        self._results: OrderedDict[str, tuple[ListResult, float]] = OrderedDict()

    @property
    def active(self) -> bool:
        return bool(self.zones or self.allow_zones)

    def cached(self, address: str) -> ListResult | None:
        """What the lists said about ``address`` while their answers' TTLs last, or None."""
        known = self._results.get(address)
        if known is None:
            return None
        if known[1] > self._clock.seconds():
            self._results.move_to_end(address)
            return known[0]
        del self._results[address]
        return None

    def check(self, address: str) -> Deferred[ListResult]:
        """Every zone asked at once; fires within ``timeout`` seconds, never with a failure."""
        known = self.cached(address)
        if known is not None:
            return succeed(known)
        order = sorted({z.zone for z in self.zones} | set(self.allow_zones))
        names = [query_name(address, zone) for zone in order]
        if not order or None in names:
            return succeed(ListResult())  # nothing configured, or no IP address to ask for
        lookups = [self._ask(name) for name in names if name is not None]
        done: Deferred[list[tuple[bool, Answer | None]]] = DeferredList(
            lookups, consumeErrors=True)
        return done.addCallback(
            lambda outcomes: self._keep(address, dict(zip(order, outcomes, strict=True))))

    def _keep(self, address: str, outcomes: dict[str, tuple[bool, Answer | None]]) -> ListResult:
        result = self._result(outcomes)
        answers = [answer for _, answer in outcomes.values() if answer is not None]
        if not result.failed and answers:
            ttl = min(answer.ttl for answer in answers)
            if ttl > 0:
                self._results[address] = (result, self._clock.seconds() + ttl)
                if len(self._results) > self.max_entries:
                    self._results.popitem(last=False)
        return result

    def _ask(self, name: str) -> Deferred[Answer | None]:
        """The A answer for ``name``, or None when none came within the timeout."""
        out: Deferred[Answer | None] = Deferred()

        def answered(answer: Answer) -> None:
            if not out.called:
                timer.cancel()
                out.callback(answer)

        def failed(reason: Failure) -> None:
            if not out.called:
                timer.cancel()
                out.callback(None)

        def expired() -> None:
            if not out.called:
                out.callback(None)

        timer = self._clock.callLater(self.timeout, expired)
        self._resolver.query_answer(name, dns.A).addCallbacks(answered, failed)
        return out

    def _result(self, outcomes: dict[str, tuple[bool, Answer | None]]) -> ListResult:
        failed = tuple(zone for zone, (_, answer) in outcomes.items() if answer is None)
        allowed = None
        for zone in self.allow_zones:
            answer = outcomes[zone][1]
            if answer is not None and any(ipaddress.IPv4Address(a) in _LISTING
                                          and ipaddress.IPv4Address(a) not in _ERRORS
                                          for a in answer.addresses()):
                allowed = zone
                break
        score = 0.0
        listed: dict[str, float] = {}
        for entry in self.zones:
            answer = outcomes[entry.zone][1]
            if answer is None:
                continue
            if any(entry.counts(a) for a in answer.addresses()):
                score += entry.weight
                listed[entry.zone] = listed.get(entry.zone, 0.0) + entry.weight
        ranked = tuple(sorted(listed, key=lambda zone: -listed[zone]))
        return ListResult(score=score, listed_by=ranked, allowed_by=allowed, failed=failed)
