"""The MTA-STS policy file (RFC 8461 §3.2) served at
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` for each local domain."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MTASTSPolicy:
    """What senders are told: the mode, the MX host patterns and how long to cache it."""

    mode: str  # "enforce", "testing" or "none"
    mx: tuple[str, ...]
    max_age: int

    def text(self) -> bytes:
        """The policy body: key/value lines, CRLF-terminated (RFC 8461 §3.2)."""
        lines = ["version: STSv1", f"mode: {self.mode}"]
        lines += [f"mx: {host}" for host in self.mx]
        lines.append(f"max_age: {self.max_age}")
        return "".join(line + "\r\n" for line in lines).encode("ascii")
