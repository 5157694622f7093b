"""Outbound MTA-STS (RFC 8461): a destination domain's policy found, fetched, cached and read.

- Discovery (§3.1): the TXT record at ``_mta-sts.<domain>``, asked through the shared caching
  resolver (mailsys.dns.cache); exactly one record starting ``v=STSv1`` with an ``id``.
- Fetch (§3.3): ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` over HTTPS whose
  certificate must verify for that name (the relay's trust: ``relay.tls_ca_file`` or the
  system's); the host's address comes from the same resolver; no redirect is followed; only a
  200 with ``text/plain`` counts; the body may not exceed 64 KiB (§3.2's bound is ours too:
  a larger one is refused while it is read); the whole fetch has a deadline.
- Cache (§5.1): a policy is kept for its ``max_age`` in memory and in one JSON file per domain
  under ``<spool>/mta-sts/`` (written in a disk thread, read once at the first use of a domain),
  so a restart does not forget it. It is fetched again when the TXT id differs from the cached
  one; while the TXT record or the fetch fails, an unexpired cached policy is still used. A
  failure with no cached policy means no policy: the mail goes as without MTA-STS.
- Reading (§3.2, §4.1): ``version``, ``mode`` (enforce, testing, none), ``max_age`` and the
  ``mx`` patterns (``*.example.net`` matches exactly one label in the leftmost place).

The relay (mailsys.delivery.relay) enforces: with ``enforce`` only the MX hosts matching a
pattern are tried, each with a verified certificate (§4.2, §5), and the mail is deferred when
none is left; with ``testing`` it only logs what enforce would have refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.protocol import Protocol as WireProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.names import dns
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from mailsys.diskio import DiskRunner
from mailsys.dns.cache import Answer, DNSTemporaryError

log = Logger(namespace="mailsys.delivery.mtasts")

# §3.2: "max_age ... up to 31557600".
MAX_AGE_LIMIT = 31557600
# §3.3 leaves the size to the sender; 64 KiB is what the policy's few lines never need.
MAX_POLICY_BYTES = 64 * 1024
# §3.1: id is 1 to 32 letters and digits.
_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_TXT_FIELD = re.compile(r"\s*([A-Za-z0-9_.-]+)=([^;]*)\s*\Z")
MODES = ("enforce", "testing", "none")
CACHE_DIR = "mta-sts"
# After a failed fetch, the same TXT id is not fetched again for this long: a policy host that
# is down or hangs costs one attempt per interval, not one per message.
RETRY_AFTER = 300.0


class PolicyError(Exception):
    """A policy that cannot be used (text, fetch, size, TLS); one line for the log."""


@dataclass(frozen=True)
class Policy:
    """A parsed policy (§3.2)."""

    mode: str
    max_age: int
    mx: tuple[str, ...]

    def allows(self, host: str) -> bool:
        """Whether the MX host name matches one of the ``mx`` patterns (§4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


@dataclass(frozen=True)
class CachedPolicy:
    """A policy as fetched: its TXT id, when, and its text (what the cache file holds)."""

    record_id: str
    fetched_at: float
    policy: Policy

    def fresh(self, now: float) -> bool:
        return now < self.fetched_at + self.policy.max_age


def parse_policy(text: str) -> Policy:
    """The policy file's fields (§3.2): "key: value" lines, CRLF or LF; unknown keys ignored."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"not a key: value line: {line[:60]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().removesuffix("."))
        elif key not in fields:  # §3.2: a repeated field: the first counts
            fields[key] = value
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version is {fields.get('version')!r}, not STSv1")
    mode = fields.get("mode")
    if mode not in MODES:
        raise PolicyError(f"mode is {mode!r}, not one of {', '.join(MODES)}")
    age = fields.get("max_age", "")
    if not age.isdigit() or int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {age!r} is not a number of seconds up to {MAX_AGE_LIMIT}")
    if mode != "none" and not mx:
        raise PolicyError(f"mode {mode} without any mx line")
    return Policy(mode, int(age), tuple(mx))


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: the host name equals the pattern, or the pattern is ``*.`` plus the host name
    without its leftmost label (the wildcard stands for exactly one label)."""
    pattern = pattern.lower().removesuffix(".")
    host = host.lower().removesuffix(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


def record_id(texts: Sequence[bytes]) -> str | None:
    """The id of the one ``v=STSv1`` TXT record (§3.1); None when there is none, more than one,
    or it has no valid id."""
    records = [text.decode("ascii", "replace") for text in texts]
    ours = [text for text in records if text.startswith("v=STSv1")]
    if len(ours) != 1:
        return None
    found = None
    for part in ours[0].split(";"):
        if not part.strip():
            continue
        match = _TXT_FIELD.match(part)
        if match is None:
            return None
        if match.group(1) == "id":
            found = match.group(2).strip()
    return found if found is not None and _ID.match(found) else None


class TXTResolver(Protocol):
    """What the cache needs of mailsys.dns.cache.CachingResolver."""

    def query_answer(self, name: str, type: int) -> Deferred[Answer]: ...


Fetch = Callable[[str], Deferred[str]]


class PolicyCache:
    """The policies of destination domains, found, fetched and kept as the module says.

    ``fetch(domain)`` gives the policy file's text (``PolicyFetcher.fetch``); ``directory`` is
    where cached policies are kept on disk (None: memory only).
    """

    def __init__(self, resolver: TXTResolver, fetch: Fetch, disk: DiskRunner,
                 directory: Path | None, clock: Any) -> None:
        self._resolver = resolver
        self._fetch = fetch
        self._disk = disk
        self._directory = directory
        self._clock = clock
        self._policies: dict[str, CachedPolicy | None] = {}
        # domain -> (TXT id, time before which a failed fetch is not tried again)
        self._failed: dict[str, tuple[str, float]] = {}
        self._pending: dict[str, list[Deferred[Policy | None]]] = {}

    def policy_for(self, domain: str) -> Deferred[Policy | None]:
        """The policy to apply to mail for ``domain`` now, or None; never fails. Concurrent
        asks for one domain share one look."""
        domain = domain.lower().removesuffix(".")
        waiter: Deferred[Policy | None] = Deferred()
        waiting = self._pending.get(domain)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._pending[domain] = [waiter]
        d = defer.ensureDeferred(self._look(domain))

        def done(result: Policy | Failure | None) -> None:
            if isinstance(result, Failure):
                log.failure("MTA-STS for {domain}: unexpected error; no policy applied",
                            result, domain=domain)
                result = None
            for each in self._pending.pop(domain, []):
                each.callback(result)

        d.addBoth(done)
        return waiter

    async def _look(self, domain: str) -> Policy | None:
        cached = await self._cached(domain)
        now = self._clock.seconds()
        usable = cached.policy if cached is not None and cached.fresh(now) else None
        try:
            answer = await self._resolver.query_answer(f"_mta-sts.{domain}", dns.TXT)
            current = record_id(answer.texts())
        except DNSTemporaryError as exc:
            log.info("MTA-STS for {domain}: TXT lookup failed ({error}); {what}",
                     domain=domain, error=str(exc), what=_fallback(usable))
            return usable
        if current is None:
            # §5.1: no valid record, but a cached unexpired policy still applies.
            return usable
        if cached is not None and usable is not None and cached.record_id == current:
            return usable
        failed = self._failed.get(domain)
        if failed is not None and failed[0] == current and now < failed[1]:
            return usable
        try:
            text = await self._fetch(domain)
            policy = parse_policy(text)
        except PolicyError as exc:
            self._failed[domain] = (current, self._clock.seconds() + RETRY_AFTER)
            log.warn("MTA-STS policy of {domain} not used: {error}; {what}", domain=domain,
                     error=str(exc), what=_fallback(usable))
            return usable
        self._failed.pop(domain, None)
        entry = CachedPolicy(current, now, policy)
        self._policies[domain] = entry
        log.info("MTA-STS policy of {domain} fetched: id {id}, mode {mode}, mx {mx}, "
                 "max_age {max_age}", domain=domain, id=current, mode=policy.mode,
                 mx=" ".join(policy.mx) or "-", max_age=policy.max_age)
        if self._directory is not None:
            d = self._disk.run(_store, self._directory, domain, entry)
            d.addErrback(lambda f: log.warn("MTA-STS policy of {domain} not saved: {error}",
                                            domain=domain, error=f.getErrorMessage()))
        return policy

    async def _cached(self, domain: str) -> CachedPolicy | None:
        if domain in self._policies or self._directory is None:
            return self._policies.get(domain)
        entry: CachedPolicy | None = await self._disk.run(_load, self._directory, domain)
        if domain not in self._policies:  # a fetch may have finished meanwhile
            self._policies[domain] = entry
        return self._policies[domain]


def _fallback(policy: Policy | None) -> str:
    return ("the cached policy stays" if policy is not None
            else "no policy applied (as without MTA-STS)")


def _cache_path(directory: Path, domain: str) -> Path:
    # Domain names are letters, digits, hyphens and dots: safe as file names, never "..".
    safe = re.sub(r"[^a-z0-9.-]", "_", domain).strip(".") or "_"
    return directory / f"{safe}.json"


def _store(directory: Path, domain: str, entry: CachedPolicy) -> None:
    """Disk thread: the cache file written aside, then renamed into place."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = _cache_path(directory, domain)
    tmp = path.with_suffix(".tmp")
    policy = entry.policy
    tmp.write_text(json.dumps({
        "domain": domain, "id": entry.record_id, "fetched_at": entry.fetched_at,
        "mode": policy.mode, "max_age": policy.max_age, "mx": list(policy.mx)}))
    os.replace(tmp, path)


def _load(directory: Path, domain: str) -> CachedPolicy | None:
    """Disk thread: the cached policy of ``domain``, or None (none, or unreadable)."""
    try:
        raw = json.loads(_cache_path(directory, domain).read_text())
        policy = Policy(str(raw["mode"]), int(raw["max_age"]), tuple(str(m) for m in raw["mx"]))
        if policy.mode not in MODES or raw.get("domain") != domain:
            return None
        return CachedPolicy(str(raw["id"]), float(raw["fetched_at"]), policy)
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- the HTTPS fetch -----------------------------------------------------------------------------


class _LimitedBody(WireProtocol):
    """Collects a response body up to ``limit`` bytes; more stops the transfer."""

    def __init__(self, limit: int, finished: Deferred[bytes]) -> None:
        self._limit = limit
        self._finished = finished
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Protocol
        if self._finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._finished.errback(PolicyError(f"policy larger than {self._limit} bytes"))
            self.stop()
            return
        self._parts.append(data)

    def stop(self) -> None:
        """Stop the transfer (the response body's transport is a push producer)."""
        stop = getattr(self.transport, "stopProducing", None)
        if stop is not None:
            stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802 - Protocol
        if self._finished.called:
            return
        if reason.check(ResponseDone):
            self._finished.callback(b"".join(self._parts))
        else:
            self._finished.errback(PolicyError(
                f"policy transfer broken off: {reason.getErrorMessage()}"))


@implementer(IStreamClientEndpoint)
class _ResolvedTLSEndpoint:
    """TLS to ``host``:``port`` at an address the caching resolver gives (A, then AAAA)."""

    def __init__(self, reactor: Any, resolver: TXTResolver, host: str, port: int,
                 creator: IOpenSSLClientConnectionCreator, timeout: float) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._host = host
        self._port = port
        self._creator = creator
        self._timeout = timeout

    def connect(self, factory: Any) -> Deferred[Any]:
        return defer.ensureDeferred(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        for record_type, endpoint_type in ((dns.A, TCP4ClientEndpoint),
                                           (dns.AAAA, TCP6ClientEndpoint)):
            try:
                answer = await self._resolver.query_answer(self._host, record_type)
            except DNSTemporaryError as exc:
                raise PolicyError(f"{self._host}: {exc}") from None
            addresses = answer.addresses()
            if addresses:
                tcp = endpoint_type(self._reactor, addresses[0], self._port,
                                    timeout=self._timeout)
                return await wrapClientTLS(self._creator, tcp).connect(factory)
        raise PolicyError(f"{self._host} has no address")


@implementer(IAgentEndpointFactory)
class _Endpoints:
    def __init__(self, reactor: Any, resolver: TXTResolver,
                 creator: Callable[[str], IOpenSSLClientConnectionCreator],
                 timeout: float) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._creator = creator
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:  # noqa: N802 - interface
        host = uri.host.decode("ascii")
        return _ResolvedTLSEndpoint(self._reactor, self._resolver, host, uri.port,
                                    self._creator(host), self._timeout)


class PolicyFetcher:
    """Fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (§3.3).

    ``creator(hostname)`` makes the verifying TLS client connection (the relay's ClientTLS);
    ``port`` is 443 except in labs and tests (``relay.mta_sts_lab_https_port``).
    """

    def __init__(self, reactor: Any, resolver: TXTResolver,
                 creator: Callable[[str], IOpenSSLClientConnectionCreator],
                 timeout: float = 30.0, port: int = 443) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._port = port
        self._agent = Agent.usingEndpointFactory(
            reactor, _Endpoints(reactor, resolver, creator, timeout))

    def fetch(self, domain: str) -> Deferred[str]:
        """The policy's text; fails with PolicyError (HTTP status, type, size, TLS, time)."""
        d = defer.ensureDeferred(self._fetch(domain))

        def timed_out(result: object, timeout: float) -> Failure:
            return Failure(PolicyError(f"no policy from mta-sts.{domain} within {timeout:g}s"))

        d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=timed_out)

        def failed(failure: Failure) -> Failure:
            if failure.check(PolicyError):
                return failure
            return Failure(PolicyError(f"fetch from mta-sts.{domain} failed: "
                                       f"{_reason(failure)}"))

        return d.addErrback(failed)

    async def _fetch(self, domain: str) -> str:
        port = "" if self._port == 443 else f":{self._port}"
        url = f"https://mta-sts.{domain}{port}/.well-known/mta-sts.txt"
        response: IResponse = await self._agent.request(
            b"GET", url.encode("ascii"), Headers({b"User-Agent": [b"mailsys MTA-STS"]}))
        if response.code != 200:
            # §3.3: redirects are not followed; only 200 is a policy.
            discard: Deferred[bytes] = Deferred()
            discard.addErrback(lambda _: None)
            response.deliverBody(_LimitedBody(0, discard))  # read nothing, close
            raise PolicyError(f"HTTP {response.code} from {url}")
        types = response.headers.getRawHeaders(b"content-type") or [b""]
        if types[0].split(b";")[0].strip().lower() != b"text/plain":
            raise PolicyError(f"{url} is {types[0].decode('latin-1')!r}, not text/plain")
        if isinstance(response.length, int) and response.length > MAX_POLICY_BYTES:
            raise PolicyError(f"policy larger than {MAX_POLICY_BYTES} bytes")
        # Cancelled by the deadline (a server that sends slowly or not at all): stop reading.
        finished: Deferred[bytes] = Deferred(lambda _: body.stop())
        body = _LimitedBody(MAX_POLICY_BYTES, finished)
        response.deliverBody(body)
        data = await finished
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"{url} is not UTF-8 text") from None


def _reason(failure: Failure) -> str:
    """One line for a failed fetch: TLS errors say which check failed."""
    value = failure.value
    inner = getattr(value, "reasons", None)  # twisted.web's ResponseNeverReceived and friends
    if inner:
        return "; ".join(_reason(each) for each in inner)
    return f"{type(value).__name__}: {value}"[:300]

