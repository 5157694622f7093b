"""The plain value types of the configuration, and their parsers: next hops, transport map
entries, TLS policies, IP versions and DNS servers.

config.py parses every such value once, when the file is read, and the rooms that use them
(delivery/nexthop.py, tlspolicy.py, mx.py) take them parsed. This module is on the ground floor:
it imports nothing of mailsys, so config.py can sit at the bottom of the import graph. Every
parser raises ValueError (NextHopError for next hops) with a one-line reason.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import TypeVar

DEFAULT_PORT = 25
# RFC 8314 §3.3: submissions, TLS from the first byte.
DEFAULT_SMTPS_PORT = 465

_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def _choices(kind: type[enum.Enum]) -> str:
    return ", ".join(str(member.value) for member in kind)


E = TypeVar("E", bound=enum.Enum)


def _parse_choice(kind: type[E], text: str) -> E:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"must be one of {_choices(kind)}, got {text!r}") from None


class TLSPolicy(enum.Enum):
    """What outbound TLS a destination gets (mailsys.delivery.tlspolicy says what each means)."""

    OPPORTUNISTIC = "opportunistic"
    VERIFY = "verify"
    NONE = "none"

    @classmethod
    def parse(cls, text: str) -> TLSPolicy:
        return _parse_choice(cls, text)


class IPVersion(enum.Enum):
    """Which address families outbound connections use."""

    ANY = "any"
    IPV4 = "ipv4"
    IPV6 = "ipv6"

    @classmethod
    def parse(cls, text: str) -> IPVersion:
        return _parse_choice(cls, text)


class Transport(enum.Enum):
    """Transport map entries that are not a next hop: MX routing, or the smarthost."""

    MX = "mx"
    SMARTHOST = "smarthost"


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
    """Parse ``[smtp:|smtps:]host[:port]`` with ``[host]`` meaning no MX lookup.

    The syntax is Postfix's transport(5) and relayhost: ``smtp:[mail.example.org]:587`` (that
    host, no MX lookup), ``smtp:mail.example.org:25`` (its MX hosts), ``smtps:[host]:465``
    (TLS from the first byte, RFC 8314), ``[192.0.2.7]`` (port 25).
    """
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


def parse_transport(text: str) -> Transport | NextHop:
    """A transport map entry: "mx", "smarthost" or a next hop."""
    try:
        return Transport(text)
    except ValueError:
        return parse_next_hop(text)


@dataclass(frozen=True)
class DNSServer:
    """A DNS server to ask: an IP address (a name cannot bootstrap DNS) and a port."""

    host: str
    port: int = 53

    @classmethod
    def parse(cls, text: str) -> DNSServer:
        """``"ip"``, ``"ip:port"`` or ``"[ipv6]:port"``; ValueError if not."""
        host, port = text, 53
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise ValueError(f"{text!r}: expected [ipv6]:port")
                port = int(rest[1:])
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
            if not port_text.isdigit():
                raise ValueError(f"{text!r}: the port must be a number")
            port = int(port_text)
        if not _is_ip(host):
            raise ValueError(f"{text!r} is not an IP address (a name cannot bootstrap DNS)")
        if not 0 < port < 65536:
            raise ValueError(f"{text!r}: the port must be 1-65535")
        return cls(host, port)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_hostname(text: str) -> bool:
    labels = text.split(".")
    return 0 < len(text) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


_DNS_LIST_KEY = re.compile(r"^([^=]+?)(?:=127\.(\d{1,3})\.(\d{1,3})\."
                           r"(?:(\d{1,3})|\[(\d{1,3})\.\.(\d{1,3})\]))?$")


@dataclass(frozen=True)
class DNSListKey:
    """A DNS list as configured: "zone", "zone=127.a.b.c" or "zone=127.a.b.[c..d]" (the
    answers that count; postscreen's notation)."""

    zone: str
    prefix: tuple[int, int] | None = None  # (a, b) of 127.a.b.c; None: any answer
    low: int = 0
    high: int = 255

    @classmethod
    def parse(cls, text: str) -> DNSListKey:
        match = _DNS_LIST_KEY.match(text)
        if match is None:
            raise ValueError("must be a zone, zone=127.a.b.c or zone=127.a.b.[c..d]")
        name, a, b, single, low, high = match.groups()
        zone = name.lower().rstrip(".")
        if a is None:
            return cls(zone)
        octets = [int(x) for x in (a, b, single, low, high) if x is not None]
        if any(octet > 255 for octet in octets):
            raise ValueError("an octet is over 255")
        if single is not None:
            return cls(zone, (int(a), int(b)), int(single), int(single))
        if int(low) > int(high):
            raise ValueError("the range is empty")
        return cls(zone, (int(a), int(b)), int(low), int(high))
