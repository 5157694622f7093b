"""Allow and block lists from the configuration: client networks and senders.

They live in the configuration, so a reload of the configuration replaces them: the intake
defence builds a new ``AccessLists`` from the new section. Senders are matched as a whole
address ("user@example.org"), a domain ("@example.org": that domain only) or a domain with its
subdomains ("example.org"). A block wins over an allow of the same kind, except that an
allowlisted network skips every other check (it is ours to trust).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable

from mailsys.defence.ratelimit import parse_address

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Access(enum.Enum):
    ALLOW = "allow"
    BLOCK = "block"


def _networks(texts: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


def in_networks(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    """True when ``address`` is in one of ``networks`` (an IPv4-mapped address as IPv4)."""
    if not networks:
        return False
    ip = parse_address(address)
    if ip is None:
        return False
    return any(ip in network for network in networks if network.version == ip.version)


class _Senders:
    def __init__(self, entries: Iterable[str]) -> None:
        self.addresses: set[str] = set()
        self.domains: set[str] = set()  # "@domain": exactly
        self.trees: set[str] = set()  # "domain": with subdomains
        for entry in entries:
            entry = entry.lower()
            if entry.startswith("@"):
                self.domains.add(entry[1:])
            elif "@" in entry:
                self.addresses.add(entry)
            else:
                self.trees.add(entry.lstrip("."))

    def __bool__(self) -> bool:
        return bool(self.addresses or self.domains or self.trees)

    def match(self, sender: str) -> bool:
        sender = sender.lower()
        if sender in self.addresses:
            return True
        domain = sender.rpartition("@")[2]
        if domain in self.domains:
            return True
        while domain:
            if domain in self.trees:
                return True
            domain = domain.partition(".")[2]
        return False


class AccessLists:
    """The configured allow and block lists, ready to ask."""

    def __init__(self, *, allow_networks: Iterable[str] = (), block_networks: Iterable[str] = (),
                 allow_senders: Iterable[str] = (), block_senders: Iterable[str] = ()) -> None:
        self._allow_networks = _networks(allow_networks)
        self._block_networks = _networks(block_networks)
        self._allow_senders = _Senders(allow_senders)
        self._block_senders = _Senders(block_senders)

    def client(self, address: str) -> Access | None:
        """What the lists say about a client address."""
        if in_networks(address, self._block_networks):
            return Access.BLOCK
        if in_networks(address, self._allow_networks):
            return Access.ALLOW
        return None

    def sender(self, sender: str) -> Access | None:
        """What the lists say about a MAIL FROM address ("" for the null sender)."""
        if not sender:
            return None
        if self._block_senders and self._block_senders.match(sender):
            return Access.BLOCK
        if self._allow_senders and self._allow_senders.match(sender):
            return Access.ALLOW
        return None
