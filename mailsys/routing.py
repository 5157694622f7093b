"""Routing: which domains are ours, and to which mailboxes or remote addresses a recipient goes.

Resolution happens at RCPT time, so an unknown local user is refused in the SMTP dialogue
(RFC 5321 §3.3) and the envelope records exactly where each copy goes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailsys.envelope import TargetKind


@dataclass(frozen=True)
class Destination:
    """One place a recipient resolves to: a local mailbox or a remote address to relay to."""

    address: str
    kind: TargetKind
    mailbox: str | None = None  # canonical "user@domain" for LOCAL, None for RELAY


class UnknownRecipient(Exception):
    """The address is in a local domain but names no user, alias or catch-all."""
