"""Where relayed mail goes next: the syntax of next hops and the choice of one per domain.

A next hop is written as in Postfix's transport(5) and relayhost settings:

    smtp:[mail.example.org]:587   that host (no MX lookup), on that port
    smtp:mail.example.org:25      the MX hosts of mail.example.org (its A/AAAA if it has no MX)
    smtps:[smtp.example.org]:465  that host with TLS from the first byte (RFC 8314)
    [192.0.2.7]                   a host or address literal in brackets, port 25

``NextHops`` picks, for a recipient domain, the MX route, a fixed next hop from the transport
map, or the smarthost. Nothing here does I/O; config.py checks the syntax with ``parse_next_hop``.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 25
# RFC 8314 §3.3: submissions, TLS from the first byte.
DEFAULT_SMTPS_PORT = 465

# Values of the transport map that are not next hops.
ROUTE_MX = "mx"
ROUTE_SMARTHOST = "smarthost"

_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


class NextHopError(ValueError):
    """A next hop that cannot be parsed; the text says why, in one line."""


class RouteKind(enum.Enum):
    """How the hosts of a route are found."""

    MX = "mx"  # the MX records of a domain (RFC 5321 §5.1)
    HOST = "host"  # one host name or address, no MX lookup


@dataclass(frozen=True)
class NextHop:
    """One parsed next hop: the name to look up, how, the port and whether TLS is implicit."""

    kind: RouteKind
    name: str  # a domain (MX) or host name / address literal (HOST), lower case
    port: int = DEFAULT_PORT
    implicit_tls: bool = False

    @property
    def is_address(self) -> bool:
        """True if ``name`` is an IP address literal (no DNS needed)."""
        return _is_ip(self.name)

    def __str__(self) -> str:
        scheme = "smtps" if self.implicit_tls else "smtp"
        host = f"[{self.name}]" if self.kind is RouteKind.HOST else self.name
        return f"{scheme}:{host}:{self.port}"


def parse_next_hop(text: str) -> NextHop:
    """Parse ``[smtp:|smtps:]host[:port]`` with ``[host]`` meaning no MX lookup."""
    rest = text.strip()
    implicit_tls = False
    lowered = rest.lower()
    if lowered.startswith("smtps:"):
        implicit_tls = True
        rest = rest[6:]
    elif lowered.startswith("smtp:"):
        rest = rest[5:]
    if not rest:
        raise NextHopError(f"next hop {text!r} names no host")
    port = DEFAULT_SMTPS_PORT if implicit_tls else DEFAULT_PORT
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise NextHopError(f"next hop {text!r}: missing ']'")
        host, tail = rest[1:end], rest[end + 1 :]
        kind = RouteKind.HOST
    else:
        host, _, port_text = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
        tail = f":{port_text}" if port_text else ""
        kind = RouteKind.MX
    if tail:
        if not tail.startswith(":") or not tail[1:].isdigit():
            raise NextHopError(f"next hop {text!r}: port must be a number")
        port = int(tail[1:])
        if not 0 < port < 65536:
            raise NextHopError(f"next hop {text!r}: port must be 1-65535")
    host = host.lower().removesuffix(".")
    if host.startswith("ipv6:"):
        host = host[5:]  # RFC 5321 §4.1.3 spells IPv6 literals [IPv6:...]
    if _is_ip(host):
        kind = RouteKind.HOST  # an address has no MX records
    elif not _is_hostname(host):
        raise NextHopError(f"next hop {text!r}: {host!r} is not a host name or IP address")
    return NextHop(kind, host, port, implicit_tls)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_hostname(text: str) -> bool:
    labels = text.split(".")
    return 0 < len(text) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


@dataclass(frozen=True)
class Route:
    """Where one domain's mail goes: the next hop, and whether the smarthost login applies."""

    hop: NextHop
    smarthost: bool = False

    @property
    def key(self) -> str:
        """Identifies the destination: connections and concurrency limits are per key."""
        return ("smarthost:" if self.smarthost else "") + str(self.hop)


class NextHops:
    """Picks the route of a recipient domain from the transport map and the smarthost.

    Transport keys are a domain (exact), ``.domain`` (its subdomains) or ``*`` (everything
    else). Without a ``*`` entry, a configured smarthost takes all other mail, else MX routing.
    ``port`` is the TCP port used for MX hosts (25; labs and tests use others).
    """

    def __init__(
        self,
        transport: Mapping[str, str],
        smarthost: str | None = None,
        port: int = DEFAULT_PORT,
    ) -> None:
        self._smarthost = parse_next_hop(smarthost) if smarthost else None
        self._port = port
        self._exact: dict[str, str] = {}
        self._suffixes: dict[str, str] = {}
        self._default = ROUTE_SMARTHOST if self._smarthost is not None else ROUTE_MX
        for key, value in transport.items():
            check_transport_value(value, smarthost_configured=self._smarthost is not None)
            name = key.lower().removesuffix(".")
            if name == "*":
                self._default = value
            elif name.startswith("."):
                self._suffixes[name] = value
            else:
                self._exact[name] = value

    @property
    def port(self) -> int:
        """The port of MX hosts (and of address literals)."""
        return self._port

    def route(self, domain: str) -> Route:
        """The route for ``domain`` (lower case, no trailing dot)."""
        domain = domain.lower().removesuffix(".")
        value = self._exact.get(domain)
        if value is None:
            # The longest matching ".parent" entry wins.
            labels = domain.split(".")
            for index in range(1, len(labels)):
                value = self._suffixes.get("." + ".".join(labels[index:]))
                if value is not None:
                    break
        if value is None:
            value = self._default
        if value == ROUTE_SMARTHOST:
            assert self._smarthost is not None  # checked in __init__
            return Route(self._smarthost, smarthost=True)
        if value == ROUTE_MX:
            return Route(NextHop(RouteKind.MX, domain, self._port))
        return Route(parse_next_hop(value))


def check_transport_value(value: str, *, smarthost_configured: bool) -> None:
    """Raise NextHopError unless ``value`` is "mx", "smarthost" (with one set) or a next hop."""
    if value == ROUTE_MX:
        return
    if value == ROUTE_SMARTHOST:
        if not smarthost_configured:
            raise NextHopError('"smarthost" needs relay.smarthost to be set')
        return
    parse_next_hop(value)
