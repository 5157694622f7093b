"""Connection limits: open connections counted in total and per client address.

Shared by the SMTP, POP3 and IMAP listeners; each protocol turns a refusal into its own
greeting (SMTP 421, POP3 -ERR [SYS/TEMP], IMAP BYE [UNAVAILABLE]) and closes the connection.
Touched on the reactor thread only.
"""

from __future__ import annotations

import enum


class Crowding(enum.Enum):
    """Why a connection was refused."""

    TOTAL = "too many connections"
    CLIENT = "too many connections from the client's address"


class ConnectionCounter:
    """Counts admitted connections; ``admit`` refuses one over ``max_total`` or over
    ``max_per_client`` from one address, and every admitted one is ``release``d once."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.by_client: dict[str, int] = {}

    def admit(self, client_address: str) -> Crowding | None:
        """Count a new connection from ``client_address``, or say why it is refused."""
        if self.total >= self.max_total:
            return Crowding.TOTAL
        count = self.by_client.get(client_address, 0)
        if count >= self.max_per_client:
            return Crowding.CLIENT
        self.total += 1
        self.by_client[client_address] = count + 1
        return None

    def release(self, client_address: str) -> None:
        """Forget a connection counted by ``admit``."""
        self.total -= 1
        count = self.by_client.get(client_address, 0) - 1
        if count > 0:
            self.by_client[client_address] = count
        else:
            self.by_client.pop(client_address, None)
