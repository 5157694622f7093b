"""Where relayed mail goes next: the choice of a next hop for each recipient domain.

``NextHops`` picks, for a recipient domain, the MX route, a fixed next hop from the transport
map, or the smarthost. The next hops themselves (``smtp:[host]:port`` and the like) are values
parsed once with the configuration (mailsys.values); nothing here parses text or does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mailsys.values import DEFAULT_PORT, NextHop, NextHopError, RouteKind, Transport


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
        transport: Mapping[str, Transport | NextHop],
        smarthost: NextHop | None = None,
        port: int = DEFAULT_PORT,
    ) -> None:
        self._smarthost = smarthost
        self._port = port
        self._exact: dict[str, Transport | NextHop] = {}
        self._suffixes: dict[str, Transport | NextHop] = {}
        self._default: Transport | NextHop = (
            Transport.SMARTHOST if smarthost is not None else Transport.MX
        )
        for key, value in transport.items():
            if value is Transport.SMARTHOST and smarthost is None:
                # config.py refuses this too; the check keeps route() from failing later.
                raise NextHopError('"smarthost" needs relay.smarthost to be set')
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
        if value is Transport.SMARTHOST:
            assert self._smarthost is not None  # checked in __init__
            return Route(self._smarthost, smarthost=True)
        if value is Transport.MX:
            return Route(NextHop(RouteKind.MX, domain, self._port))
        return Route(value)
