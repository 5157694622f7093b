"""Connection limits: open connections counted in total and per client address, and the
shedding of idle connections near the total cap.

Shared by the SMTP, POP3 and IMAP listeners; each protocol turns a refusal into its own
greeting (SMTP 421, POP3 -ERR [SYS/TEMP], IMAP BYE [UNAVAILABLE]) and closes the connection.

A cap alone lets a few addresses that hold idle connections lock everyone else out (25
addresses with 20 connections each fill 500). A counter made with ``shed_idle`` therefore
keeps the sessions that may be shed (an SMTP session that has not yet completed a
transaction): at the cap, the one silent longest is closed to admit the newcomer, and above
``stress_fraction`` of the cap such sessions get a shorter idle time (Postfix's stress mode,
postscreen's pre-handshake limits). A client that has delivered a message is never shed.
Touched on the reactor thread only.
"""

from __future__ import annotations

import enum
from typing import Protocol


class Crowding(enum.Enum):
    """Why a connection was refused."""

    TOTAL = "too many connections"
    CLIENT = "too many connections from the client's address"


class Sheddable(Protocol):
    """A session the counter may close to make room."""

    def idle_since(self) -> float:
        """When the client last sent something (or connected)."""

    def shed(self) -> None:
        """Close now, telling the client why; the counter has already forgotten it."""


class ConnectionCounter:
    """Counts admitted connections; ``admit`` refuses one over ``max_total`` or over
    ``max_per_client`` from one address, and every admitted one is ``release``d once."""

    def __init__(self, max_total: int, max_per_client: int, *, shed_idle: bool = False,
                 stress_fraction: float = 0.8) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.by_client: dict[str, int] = {}
        self.shed_idle = shed_idle
        self.stress_fraction = stress_fraction
        self.shed_count = 0  # sessions closed to make room, for tests and the log
        # The sessions that may be shed, with their client address (insertion order: oldest).
        self._sheddable: dict[Sheddable, str] = {}

    @property
    def stressed(self) -> bool:
        """True when the listener is near its cap: sessions without a completed transaction
        then get the shorter idle time."""
        return self.shed_idle and self.total >= self.max_total * self.stress_fraction

    def admit(self, client_address: str, session: Sheddable | None = None) -> Crowding | None:
        """Count a new connection from ``client_address``, or say why it is refused.

        With ``shed_idle``, ``session`` is kept as sheddable until ``completed`` is called, and
        at the total cap the longest-silent sheddable session is shed to make room.
        """
        count = self.by_client.get(client_address, 0)
        if self.total >= self.max_total and not (count < self.max_per_client
                                                 and self._shed_one()):
            return Crowding.TOTAL
        if count >= self.max_per_client:
            return Crowding.CLIENT
        self.total += 1
        self.by_client[client_address] = count + 1
        if self.shed_idle and session is not None:
            self._sheddable[session] = client_address
        return None

    def completed(self, session: Sheddable) -> None:
        """``session`` completed a transaction: it is a real sender and is never shed."""
        self._sheddable.pop(session, None)

    def release(self, client_address: str, session: Sheddable | None = None) -> None:
        """Forget a connection counted by ``admit``."""
        if session is not None:
            self._sheddable.pop(session, None)
        self.total -= 1
        count = self.by_client.get(client_address, 0) - 1
        if count > 0:
            self.by_client[client_address] = count
        else:
            self.by_client.pop(client_address, None)

    def _shed_one(self) -> bool:
        """Close the sheddable session silent longest; False when there is none."""
        if not self._sheddable:
            return False
        victim = min(self._sheddable, key=lambda s: s.idle_since())
        address = self._sheddable.pop(victim)
        self.release(address)
        self.shed_count += 1
        victim.shed()
        return True
