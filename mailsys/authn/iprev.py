"""iprev (RFC 8601 §3): does the client's address have a name whose addresses include it
(forward-confirmed reverse DNS)?"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from twisted.internet.defer import Deferred
from twisted.names import dns

from mailsys.dns import CachingResolver, DNSTemporaryError, ip_address, reverse_name

IprevResultName = Literal["pass", "fail", "temperror", "permerror"]
# Like RFC 7208 §4.6.4's PTR limit: a reverse zone listing hundreds of names costs 10 lookups.
MAX_NAMES = 10


@dataclass
class IprevResult:
    """The outcome for one client address: the confirmed name, or why none."""

    result: IprevResultName
    ip: str
    name: str = ""
    problem: str = ""
    evidence: list[str] = field(default_factory=list)


class IprevChecker:
    """Forward-confirmed reverse DNS through the caching resolver."""

    def __init__(self, resolver: CachingResolver) -> None:
        self._resolver = resolver

    def check(self, ip: str) -> Deferred[IprevResult]:
        return Deferred.fromCoroutine(self._check(ip))

    async def _check(self, ip_text: str) -> IprevResult:
        try:
            ip = ip_address(ip_text.strip("[]"))
        except ValueError:
            return IprevResult("permerror", ip_text, problem="not an IP address")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        outcome = IprevResult("fail", str(ip))
        try:
            answer = await self._resolver.answer(reverse_name(str(ip)), dns.PTR)
        except DNSTemporaryError as exc:
            outcome.evidence.append(str(exc))
            outcome.result, outcome.problem = "temperror", f"PTR lookup: {exc.reason}"
            return outcome
        outcome.evidence.append(answer.describe())
        names = answer.names()
        if not names:
            # RFC 8601 §2.7.3: no PTR data published is a permerror.
            outcome.result, outcome.problem = "permerror", "no PTR records"
            return outcome
        temporary = ""
        kind = dns.A if ip.version == 4 else dns.AAAA
        for name in names[:MAX_NAMES]:
            try:
                addresses = await self._resolver.answer(name, kind)
            except DNSTemporaryError as exc:
                outcome.evidence.append(str(exc))
                temporary = f"address lookup: {exc.reason}"
                continue
            outcome.evidence.append(addresses.describe())
            if any(ip_address(a) == ip for a in addresses.addresses()):
                outcome.result, outcome.name = "pass", name
                return outcome
        if temporary:
            outcome.result, outcome.problem = "temperror", temporary
        else:
            outcome.problem = "no PTR name leads back to the address"
        return outcome
