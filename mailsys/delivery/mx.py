"""Where a domain's mail is delivered: MX lookup and host addresses through twisted.names.

This module owns RFC 5321 §5.1 (MX records by preference, equal preferences in random order, the
domain's own address records when it has no MX), RFC 7505 (null MX: no mail at all), CNAME
chains, the choice of address families (``ip_version``) and the meaning of DNS failures: a name
that does not exist is permanent, a server failure or a timeout temporary. The resolver is
injected (an IResolver: twisted.names' client, or mailsys.labdns.Zone in tests).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IResolver
from twisted.names import dns, error
from twisted.python.failure import Failure

from mailsys.replies import Reply
from mailsys.values import IPVersion, NextHop, RouteKind

# RFC 7505 §4.2 (null MX); RFC 3463 X.1.2 (bad destination system), X.4.4 (unable to route),
# X.4.3 (directory server failure).
NULL_MX = Reply(556, "5.1.10", "Recipient address has null MX")
NO_SUCH_DOMAIN = Reply(550, "5.1.2", "Domain not found")
NO_MAIL_HOST = Reply(550, "5.4.4", "No address for the mail host")
DNS_TEMPORARY = Reply(451, "4.4.3", "Temporary DNS failure")

# RFC 1034 §3.6.2: follow CNAME chains, but not forever.
MAX_CNAME_CHAIN = 8
# Seconds twisted.names waits for each try of a query before the next (then gives up).
DNS_TIMEOUT = (1, 3, 11)


class MXLookupError(Exception):
    """Resolution ended without a host to try; ``reply`` says why, with a code that says
    whether it is permanent (5xx) or temporary (4xx)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply

    @property
    def permanent(self) -> bool:
        return self.reply.is_permanent


@dataclass(frozen=True)
class MailHost:
    """One host to try: its name (what TLS verifies and logs name) and MX preference."""

    name: str
    preference: int = 0
    implicit: bool = False  # the domain itself, for lack of MX records (RFC 5321 §5.1)


class MXResolver:
    """Finds the hosts of a next hop and their addresses, in the order to try them."""

    def __init__(
        self,
        resolver: IResolver,
        ip_version: IPVersion | str = IPVersion.ANY,
        rng: random.Random | None = None,
        timeout: Sequence[int] = DNS_TIMEOUT,
    ) -> None:
        self._resolver = resolver
        self.ip_version = IPVersion(ip_version)
        self._random = rng or random.Random()
        self._timeout = tuple(timeout)

    # -- hosts -----------------------------------------------------------------------------------

    def hosts(self, hop: NextHop) -> Deferred[list[MailHost]]:
        """The hosts of ``hop`` in the order to try; fails with MXLookupError."""
        return Deferred.fromCoroutine(self._hosts(hop))

    async def _hosts(self, hop: NextHop) -> list[MailHost]:
        if hop.kind is RouteKind.HOST:
            return [MailHost(hop.name)]
        domain = hop.name
        records = await self._records(domain, dns.MX)
        exchanges = [(r.preference, _text(r.name.name)) for r in records]
        if not exchanges:
            # RFC 5321 §5.1: no MX records: the domain itself is the implicit MX.
            return [MailHost(domain, 0, implicit=True)]
        real = [(pref, name) for pref, name in exchanges if name not in ("", ".")]
        if not real:
            # RFC 7505 §3: a single MX with the root as exchange: the domain takes no mail.
            raise MXLookupError(NULL_MX.with_text(f"{NULL_MX.text}: {domain} accepts no mail"))
        # RFC 5321 §5.1: lowest preference first; equal preferences in random order, to
        # spread the load. Shuffle, then a stable sort keeps the random order within a tie.
        self._random.shuffle(real)
        real.sort(key=lambda item: item[0])
        hosts: list[MailHost] = []
        seen: set[str] = set()
        for preference, name in real:
            if name not in seen:
                seen.add(name)
                hosts.append(MailHost(name, preference))
        return hosts

    # -- addresses -------------------------------------------------------------------------------

    def addresses(self, host: MailHost) -> Deferred[list[str]]:
        """The addresses of ``host``: AAAA then A (as ``ip_version`` allows); fails with
        MXLookupError when there is none."""
        return Deferred.fromCoroutine(self._addresses(host))

    async def _addresses(self, host: MailHost) -> list[str]:
        literal = _literal(host.name)
        if literal is not None:
            if not self._allowed(literal):
                raise MXLookupError(NO_MAIL_HOST.with_text(
                    f"{NO_MAIL_HOST.text}: {host.name} is not an {self.ip_version.value} address"
                ))
            return [str(literal)]
        types = {
            IPVersion.ANY: (dns.AAAA, dns.A),
            IPVersion.IPV4: (dns.A,),
            IPVersion.IPV6: (dns.AAAA,),
        }[self.ip_version]
        lookups = [Deferred.fromCoroutine(self._records(host.name, t)) for t in types]
        results = await DeferredList(lookups, consumeErrors=True)
        found: list[str] = []
        failures: list[MXLookupError] = []
        for ok, value in results:
            if ok:
                found.extend(_address(record) for record in value)
            elif isinstance(value, Failure) and isinstance(value.value, MXLookupError):
                failures.append(value.value)
            else:
                failures.append(MXLookupError(DNS_TEMPORARY))
        found = [a for a in dict.fromkeys(found) if self._allowed(ipaddress.ip_address(a))]
        if found:
            return found
        temporary = [f for f in failures if not f.permanent]
        if temporary:
            raise temporary[0]
        if failures and not host.implicit:
            raise failures[0]  # says which name does not exist
        what = "" if self.ip_version is IPVersion.ANY else f" ({self.ip_version.value})"
        if host.implicit:
            # RFC 5321 §5.1: neither MX nor address records: undeliverable.
            raise MXLookupError(NO_SUCH_DOMAIN.with_text(
                f"{NO_SUCH_DOMAIN.text}: {host.name} has no MX and no address records{what}"
            ))
        raise MXLookupError(NO_MAIL_HOST.with_text(
            f"{NO_MAIL_HOST.text}: {host.name} has no address records{what}"
        ))

    def _allowed(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if self.ip_version is IPVersion.IPV4:
            return address.version == 4
        if self.ip_version is IPVersion.IPV6:
            return address.version == 6
        return True

    # -- queries ---------------------------------------------------------------------------------

    async def _records(self, name: str, rtype: int) -> list[Any]:
        """The payloads of ``rtype`` records of ``name``, CNAME chains followed; [] for NODATA.

        A recursive server puts the chain and its end's records in one answer; when it stops at
        a CNAME (or an authority answers only for its own zone), the target is asked again.
        """
        lookup: Callable[..., Deferred[Any]] = {
            dns.MX: self._resolver.lookupMailExchange,
            dns.A: self._resolver.lookupAddress,
            dns.AAAA: self._resolver.lookupIPV6Address,
        }[rtype]
        current = name
        hops = 0
        while True:
            asked = current
            try:
                answers, _, _ = await lookup(asked, self._timeout)
            except error.DNSNameError:
                if rtype == dns.MX or asked != name:
                    raise MXLookupError(
                        NO_SUCH_DOMAIN.with_text(f"{NO_SUCH_DOMAIN.text}: {asked} (NXDOMAIN)")
                    ) from None
                raise MXLookupError(NO_MAIL_HOST.with_text(
                    f"{NO_MAIL_HOST.text}: {asked} does not exist (NXDOMAIN)"
                )) from None
            except Exception as exc:
                raise MXLookupError(DNS_TEMPORARY.with_text(
                    f"{DNS_TEMPORARY.text} looking up {asked}: {_describe(exc)}"
                )) from None
            # Walk the chain as far as this answer covers it.
            while True:
                matching = [rr for rr in answers if _text(rr.name.name) == current]
                found = [rr.payload for rr in matching if rr.type == rtype]
                if found:
                    return found
                cnames = [rr.payload for rr in matching if rr.type == dns.CNAME]
                if not cnames:
                    break
                hops += 1
                if hops > MAX_CNAME_CHAIN:
                    raise MXLookupError(DNS_TEMPORARY.with_text(
                        f"{DNS_TEMPORARY.text}: CNAME chain from {name} too long"
                    ))
                current = _text(cnames[0].name.name)
            if current == asked or any(_text(rr.name.name) == current for rr in answers):
                return []  # NODATA: the name exists without records of this type
            # The chain leads to a name this answer did not cover: ask for that name.


def _text(name: bytes | str) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.lower().removesuffix(".")


def _address(record: Any) -> str:
    if isinstance(record, dns.Record_A):
        return str(record.dottedQuad())
    return str(ipaddress.ip_address(record.address))


def _literal(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, error.DNSServerError):
        return "server failure (SERVFAIL)"
    if isinstance(exc, error.DNSQueryRefusedError):
        return "query refused (REFUSED)"
    if isinstance(exc, error.DNSQueryTimeoutError | TimeoutError):
        return "timed out"
    return type(exc).__name__


def make_resolver(servers: Sequence[tuple[str, int]], reactor: Any) -> IResolver:
    """twisted.names' client: asking exactly ``servers``, or those of /etc/resolv.conf."""
    from twisted.names import client

    if servers:
        resolver: IResolver = client.Resolver(servers=list(servers), reactor=reactor)
    else:
        resolver = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    return resolver
