"""The caching resolver: each (name, type) is asked once and its answer kept for as long as its
TTL allows, negative answers included (RFC 2308), and every failure that is not an answer (a
timeout, SERVFAIL, REFUSED, a malformed reply) becomes one exception, DNSTemporaryError.

The upstream resolver (twisted.names' client, or mailsys.labdns.Zone in tests) and the clock are
passed in; nothing here blocks the reactor. An Answer keeps the records it was made of, so a check
that used it can show them (the evidence of SPF, DKIM and DMARC results). The resolver is also an
IResolver, so code written for twisted.names (the relay's MX lookups) can share its cache.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import common, dns, error
from twisted.python.failure import Failure

# RFC 6698 §7.1: the TLSA type, which twisted.names has no record class for.
TLSA = 52
# RFC 1034 §3.6.2: follow CNAME chains, but not forever.
MAX_CNAME_CHAIN = 8
# RFC 1035 §2.3.4: a name is at most 255 octets on the wire (253 as text), a label at most 63.
MAX_NAME = 253
MAX_LABEL = 63
# Seconds twisted.names' client waits for each try, for a 10-second deadline (scaled down for a
# shorter one): the client gives up before our own deadline, so none of its timers outlive a
# question. The deadline (``timeout``) still bounds everything.
UPSTREAM_TRIES = (1, 3, 5)

_TYPE_NAMES = {dns.A: "A", dns.AAAA: "AAAA", dns.MX: "MX", dns.TXT: "TXT", dns.PTR: "PTR",
               dns.CNAME: "CNAME", dns.NS: "NS", dns.SOA: "SOA", dns.SRV: "SRV", TLSA: "TLSA"}

_log = Logger()


def type_name(type: int) -> str:
    """The mnemonic of a record type ("TXT"), or TYPEnnn (RFC 3597 §5)."""
    return _TYPE_NAMES.get(type, f"TYPE{type}")


class DNSTemporaryError(Exception):
    """No answer could be had (timeout, SERVFAIL, REFUSED, garbage): try again later."""

    def __init__(self, name: str, type: int, reason: str) -> None:
        super().__init__(f"{type_name(type)} {name}: {reason}")
        self.name = name
        self.type = type
        self.reason = reason


@dataclass(frozen=True)
class TLSARecord:
    """One TLSA record (RFC 6698 §2.1)."""

    usage: int
    selector: int
    matching_type: int
    data: bytes


@dataclass(frozen=True)
class Answer:
    """What the DNS said about (name, type): records of that type (CNAMEs followed), or none.

    ``exists`` is False for NXDOMAIN; an existing name without records of the type is NODATA.
    Either negative answer is a "void lookup" in RFC 7208 §4.6.4's sense.
    """

    name: str
    type: int
    exists: bool
    records: tuple[Any, ...] = ()
    ttl: int = 0
    chain: tuple[str, ...] = ()  # the CNAME targets followed, in order
    headers: tuple[dns.RRHeader, ...] = field(default=(), repr=False, compare=False)

    @property
    def void(self) -> bool:
        return not self.records

    def addresses(self) -> list[str]:
        """The addresses of A and AAAA records, as text."""
        found: list[str] = []
        for record in self.records:
            if isinstance(record, dns.Record_A):
                found.append(record.dottedQuad())
            elif isinstance(record, dns.Record_AAAA):
                found.append(str(ipaddress.IPv6Address(record.address)))
        return found

    def texts(self) -> list[bytes]:
        """Each TXT record's character-strings joined without a separator (RFC 7208 §3.3,
        RFC 6376 §3.6.2.2)."""
        return [b"".join(record.data) for record in self.records
                if isinstance(record, dns.Record_TXT)]

    def names(self) -> list[str]:
        """The target names of PTR, CNAME or NS records, lower case, without the final dot."""
        found: list[str] = []
        for record in self.records:
            if isinstance(record, (dns.Record_PTR, dns.Record_CNAME, dns.Record_NS)):
                target: Any = record.name
                found.append(_text(target.name))
        return found

    def exchanges(self) -> list[tuple[int, str]]:
        """(preference, exchange) of MX records; the null MX's exchange is ""."""
        return [(record.preference, _text(record.name.name)) for record in self.records
                if isinstance(record, dns.Record_MX)]

    def tlsa(self) -> list[TLSARecord]:
        """TLSA records (RFC 6698); malformed ones (shorter than 3 octets) are left out."""
        found: list[TLSARecord] = []
        for record in self.records:
            data = getattr(record, "data", None)
            if isinstance(data, bytes) and len(data) >= 3:
                found.append(TLSARecord(data[0], data[1], data[2], data[3:]))
        return found

    def describe(self) -> str:
        """One line for a result's evidence: the question and what came back (made once per
        answer: a cached answer is described for every message that uses it)."""
        described: str | None = self.__dict__.get("_described")
        if described is None:
            described = self._describe()
            # Frozen, so not through __setattr__; the text depends only on frozen fields.
            self.__dict__["_described"] = described
        return described

    def _describe(self) -> str:
        question = f"{type_name(self.type)} {self.name}"
        if not self.exists:
            return f"{question}: NXDOMAIN"
        if not self.records:
            return f"{question}: no records"
        if self.type == dns.TXT:
            shown = [repr(t.decode("utf-8", "replace")) for t in self.texts()]
        elif self.type in (dns.A, dns.AAAA):
            shown = self.addresses()
        elif self.type == dns.MX:
            shown = [f"{p} {x or '.'}" for p, x in self.exchanges()]
        elif self.type == TLSA:
            shown = [f"{t.usage} {t.selector} {t.matching_type} {t.data.hex()}"
                     for t in self.tlsa()]
        else:
            shown = self.names()
        return f"{question}: {', '.join(shown)}"


@functools.lru_cache(maxsize=4096)
def ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``ipaddress.ip_address(text)``, remembered: the checks of one message parse the
    client's address and the addresses of its names half a dozen times (raises ValueError)."""
    return ipaddress.ip_address(text)


@functools.lru_cache(maxsize=4096)
def reverse_name(address: str) -> str:
    """The in-addr.arpa or ip6.arpa name of an address (RFC 1035 §3.5, RFC 3596 §2.5)."""
    return ip_address(address).reverse_pointer


def valid_name(name: str) -> bool:
    """Whether ``name`` (without the final dot) can be asked at all: RFC 1035 §2.3.4 lengths,
    no empty label."""
    if not name or len(name) > MAX_NAME:
        return False
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        return False
    return all(0 < len(label) <= MAX_LABEL for label in name.split("."))


def _text(name: bytes | str) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.lower().removesuffix(".")


@dataclass
class _Entry:
    answer: Answer | None
    failure: DNSTemporaryError | None
    expires: float


class CachingResolver(common.ResolverBase):
    """Answers (name, type) from the cache while fresh, else asks ``upstream`` once.

    Positive answers live for their smallest TTL; negative ones for the SOA's negative TTL
    (RFC 2308 §5) and are not kept without one; failures for ``failure_ttl`` seconds (RFC 2308
    §7.1 allows up to five minutes), so a dead server is not asked for every message. Concurrent
    questions for the same key share one upstream query.
    """

    def __init__(
        self,
        upstream: IResolver,
        clock: IReactorTime,
        *,
        timeout: float = 10.0,
        max_entries: int = 10_000,
        max_ttl: int = 86_400,
        max_negative_ttl: int = 3_600,
        failure_ttl: float = 30.0,
    ) -> None:
        common.ResolverBase.__init__(self)
        self._upstream = upstream
        self._clock = clock
        self.timeout = timeout
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self.failure_ttl = failure_ttl
        scale = min(1.0, timeout / 10.0)
        self._tries: Any = tuple(t * scale for t in UPSTREAM_TRIES)
        self._cache: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self._pending: dict[tuple[str, int], list[Deferred[Answer]]] = {}
        self.upstream_queries = 0  # for tests and metrics: how often the cache missed

    # -- the typed API ---------------------------------------------------------------------------

    async def answer(self, name: str, type: int) -> Answer:
        """As :meth:`query_answer`, for coroutines: a fresh cached answer is returned at once,
        without a Deferred (the checks of one message ask some fifteen questions, nearly all
        answered from the cache; each Deferred awaited costs the reactor more than the lookup)."""
        key = (_text(name), type)
        entry = self._cache.get(key)
        if (entry is not None and entry.answer is not None
                and entry.expires > self._clock.seconds()):
            self._cache.move_to_end(key)
            return entry.answer
        answer: Answer = await self.query_answer(name, type)
        return answer

    def query_answer(self, name: str, type: int) -> Deferred[Answer]:
        """The answer for (name, type); fails with DNSTemporaryError only."""
        key = (_text(name), type)
        entry = self._cache.get(key)  # only names that could be asked are in the cache
        if entry is not None:
            if entry.expires > self._clock.seconds():
                self._cache.move_to_end(key)
                if entry.failure is not None:
                    return fail(entry.failure)
                assert entry.answer is not None
                return succeed(entry.answer)
            del self._cache[key]
        if not valid_name(key[0]):
            # A name that cannot be asked cannot exist: NXDOMAIN, never a wire query.
            return succeed(Answer(key[0], type, exists=False))
        waiter: Deferred[Answer] = Deferred()
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._pending[key] = [waiter]
        self._ask(key)
        return waiter

    def _ask(self, key: tuple[str, int]) -> None:
        name, type = key
        self.upstream_queries += 1
        try:
            asked: Deferred[Any] = self._upstream.query(dns.Query(name, type, dns.IN),
                                                        self._tries)
        except Exception:
            asked = fail(Failure())
        asked.addTimeout(self.timeout, self._clock)
        asked.addCallbacks(lambda result: self._answered(key, result),
                           lambda reason: self._failed(key, reason))

    def _answered(self, key: tuple[str, int], result: Any) -> None:
        try:
            answers, authority, _ = result
            answer, ttl = self._positive(key, list(answers), list(authority))
        except Exception as exc:
            _log.failure("DNS answer for {key} not understood", key=key)
            self._fail(key, DNSTemporaryError(key[0], key[1], f"malformed answer: {exc}"))
            return
        self._finish(key, answer, None, ttl)

    def _failed(self, key: tuple[str, int], reason: Failure) -> None:
        name, type = key
        exc = reason.value
        if isinstance(exc, error.DNSNameError):
            message = exc.args[0] if exc.args else None
            authority = list(getattr(message, "authority", []) or [])
            ttl = self._negative_ttl(authority)
            self._finish(key, Answer(name, type, exists=False, ttl=ttl or 0), None, ttl)
            return
        if isinstance(exc, (error.DNSQueryTimeoutError, TimeoutError)):
            why = "timed out"
        elif isinstance(exc, error.DNSServerError):
            why = "server failure (SERVFAIL)"
        elif isinstance(exc, error.DNSQueryRefusedError):
            why = "refused"
        elif isinstance(exc, error.DNSFormatError):
            why = "format error"
        else:
            why = exc.__class__.__name__
        self._fail(key, DNSTemporaryError(name, type, why))

    def _fail(self, key: tuple[str, int], failure: DNSTemporaryError) -> None:
        self._finish(key, None, failure, self.failure_ttl or None)

    def _finish(self, key: tuple[str, int], answer: Answer | None,
                failure: DNSTemporaryError | None, ttl: float | None) -> None:
        if ttl:
            self._cache[key] = _Entry(answer, failure, self._clock.seconds() + ttl)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        for waiter in self._pending.pop(key, []):
            if failure is not None:
                waiter.errback(failure)
            else:
                assert answer is not None
                waiter.callback(answer)

    def _positive(self, key: tuple[str, int], answers: Sequence[dns.RRHeader],
                  authority: Sequence[dns.RRHeader]) -> tuple[Answer, int | None]:
        name, type = key
        current = name
        chain: list[str] = []
        used: list[dns.RRHeader] = []
        for _ in range(MAX_CNAME_CHAIN + 1):
            matching = [rr for rr in answers if _text(rr.name.name) == current]
            records = [rr for rr in matching if rr.type == type]
            if records or type == dns.CNAME:
                used.extend(records)
                break
            cname = next((rr for rr in matching if rr.type == dns.CNAME), None)
            if cname is None:
                break
            used.append(cname)
            target: Any = cname.payload
            current = _text(target.name.name)
            chain.append(current)
        payloads = tuple(rr.payload for rr in used if rr.type == type)
        if payloads:
            ttl: int | None = min(self.max_ttl, *(rr.ttl for rr in used))
        else:
            ttl = self._negative_ttl(authority)
        answer = Answer(name, type, exists=True, records=payloads, ttl=ttl or 0,
                        chain=tuple(chain), headers=tuple(used))
        return answer, ttl

    def _negative_ttl(self, authority: Sequence[dns.RRHeader]) -> int | None:
        # RFC 2308 §5: min(SOA TTL, SOA MINIMUM); without an SOA a negative answer SHOULD NOT
        # be cached.
        for rr in authority:
            if rr.type == dns.SOA:
                soa: Any = rr.payload
                return min(int(rr.ttl), int(soa.minimum), self.max_negative_ttl)
        return None

    def clear(self) -> None:
        """Forget every answer (a test changing the world, or an operator's flush)."""
        self._cache.clear()

    # -- IResolver, for code written against twisted.names -----------------------------------

    def _lookup(self, name: bytes | str, cls: int, type: int,
                timeout: object = None) -> Deferred[Any]:
        text = _text(name)

        def sections(answer: Answer) -> Any:
            if not answer.exists:
                raise error.DNSNameError(f"{text}: no such domain")
            return list(answer.headers), [], []

        def temporary(reason: Failure) -> Failure:
            if reason.check(DNSTemporaryError):
                exc = reason.value
                if "timed out" in str(exc):
                    return Failure(error.DNSQueryTimeoutError(str(exc)))
                return Failure(error.DNSServerError(str(exc)))
            return reason

        return self.query_answer(text, type).addCallbacks(sections, temporary)
