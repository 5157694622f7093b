"""Plain data for one queued message: the envelope, its recipients and their attempt history.

An envelope is what SMTP agreed on (sender, recipients, parameters) plus, per recipient, where it
goes and what happened so far. It serialises to JSON for the spool; nothing here does I/O.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mailsys.replies import Reply

FORMAT_VERSION = 1


class RecipientStatus(enum.StrEnum):
    """Where one recipient stands. SCHEDULED and DEFERRED are open; DELIVERED and FAILED final."""

    SCHEDULED = "scheduled"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (RecipientStatus.DELIVERED, RecipientStatus.FAILED)


class TargetKind(enum.StrEnum):
    """How a recipient is delivered: into a local Maildir, or relayed to another server."""

    LOCAL = "local"
    RELAY = "relay"


@dataclass(frozen=True)
class Destination:
    """One place a recipient resolves to: a local mailbox or a remote address to relay to."""

    address: str
    kind: TargetKind
    mailbox: str | None = None  # canonical "user@domain" for LOCAL, None for RELAY


@dataclass
class Attempt:
    """One delivery attempt for one recipient: when, where, with what outcome and reply."""

    at: float
    status: RecipientStatus
    host: str
    # Structured, so the runner and the DSN read codes instead of parsing text; stored in the
    # envelope as {"code", "enhanced", "text"}.
    reply: Reply
    # The remote MTA whose reply ``reply`` is (None: we decided it ourselves), for the DSN's
    # Remote-MTA and Diagnostic-Code (RFC 3464 §2.3.5, §2.3.6).
    mta: str | None = None
    # What TLS the connection used (mailsys.tls.describe_tls), None for plaintext or no connection.
    tls: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attempt:
        return cls(
            at=float(data["at"]),
            status=RecipientStatus(data["status"]),
            host=str(data["host"]),
            reply=_reply_from_dict(data["reply"]),
            mta=data.get("mta"),
            tls=data.get("tls"),
        )


# An envelope written before replies were stored structured holds "451 4.4.1 text".
_LEGACY_REPLY = re.compile(r"^(\d{3})(?:[ -]+([245]\.\d{1,3}\.\d{1,3})\b)?\s*(.*)$", re.DOTALL)


def _reply_from_dict(data: Any) -> Reply:
    if isinstance(data, dict):
        return Reply(int(data["code"]), str(data["enhanced"]), str(data["text"]))
    text = str(data)
    match = _LEGACY_REPLY.match(text)
    if match is None:
        # Unreadable old text: keep it, as an unclassified temporary answer (RFC 3463 §3.1).
        return Reply(400, "", text)
    code, enhanced, rest = match.groups()
    return Reply(int(code), enhanced or "", rest)


@dataclass
class Recipient:
    """One delivery target of a message.

    ``address`` is where it is delivered (after alias expansion); ``original`` is what the client
    named in RCPT TO, which may expand to several recipients. For local targets ``mailbox`` is the
    canonical mailbox name ``user@domain`` whose Maildir receives the copy.
    """

    address: str
    original: str
    kind: TargetKind
    mailbox: str | None = None
    orcpt: str | None = None
    notify: tuple[str, ...] | None = None
    status: RecipientStatus = RecipientStatus.SCHEDULED
    attempts: list[Attempt] = field(default_factory=list)
    next_attempt: float | None = None
    # Delivery status notifications already sent about this recipient (RFC 3461 §4.1 names:
    # "DELAY", "FAILURE", "SUCCESS"), so a restart never sends one twice nor loses one.
    notices: tuple[str, ...] = ()
    # The folder of the recipient's mailbox this copy goes to (a Maildir++ name: "Junk" when
    # mail authentication says so); None is the INBOX.
    folder: str | None = None

    def record(self, attempt: Attempt, next_attempt: float | None = None) -> None:
        """Append an attempt and take its status as the recipient's."""
        self.attempts.append(attempt)
        self.status = attempt.status
        self.next_attempt = next_attempt

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notify"] = list(self.notify) if self.notify is not None else None
        data["notices"] = list(self.notices)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipient:
        notify = data.get("notify")
        return cls(
            address=str(data["address"]),
            original=str(data["original"]),
            kind=TargetKind(data["kind"]),
            mailbox=data.get("mailbox"),
            orcpt=data.get("orcpt"),
            notify=tuple(notify) if notify is not None else None,
            status=RecipientStatus(data["status"]),
            attempts=[Attempt.from_dict(a) for a in data.get("attempts", [])],
            next_attempt=data.get("next_attempt"),
            notices=tuple(data.get("notices", ())),
            folder=data.get("folder"),
        )


@dataclass
class Envelope:
    """The envelope of one queued message, as agreed in the SMTP session."""

    queue_id: str
    sender: str  # "" is the null reverse-path <>
    recipients: list[Recipient]
    received_at: float
    size: int = 0
    body: str | None = None  # MAIL BODY= parameter: "7BIT" or "8BITMIME" (RFC 6152)
    smtputf8: bool = False  # RFC 6531
    ret: str | None = None  # RFC 3461 §4.3: "FULL" or "HDRS"
    envid: str | None = None  # RFC 3461 §4.4, xtext-decoded
    client_address: str = ""
    client_helo: str = ""
    protocol: str = "ESMTP"
    auth_user: str | None = None
    held: bool = False
    # The results of mail authentication at intake with their evidence (DNS answers used, the
    # SPF term that matched, DKIM d= and s=, the DMARC record): plain data, for the journey.
    authentication: dict[str, Any] | None = None

    @property
    def is_finished(self) -> bool:
        """A message leaves the spool only when every recipient is final."""
        return all(r.status.is_final for r in self.recipients)

    def open_recipients(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.status.is_final]

    def to_dict(self) -> dict[str, Any]:
        # Shallow: every field but the recipients is a JSON value already (the authentication
        # evidence too), and asdict's deep copy of it showed in each message's CPU.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["recipients"] = [r.to_dict() for r in self.recipients]
        data["version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Envelope:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported envelope version {data.get('version')!r}")
        return cls(
            queue_id=str(data["queue_id"]),
            sender=str(data["sender"]),
            recipients=[Recipient.from_dict(r) for r in data["recipients"]],
            received_at=float(data["received_at"]),
            size=int(data.get("size", 0)),
            body=data.get("body"),
            smtputf8=bool(data.get("smtputf8", False)),
            ret=data.get("ret"),
            envid=data.get("envid"),
            client_address=str(data.get("client_address", "")),
            client_helo=str(data.get("client_helo", "")),
            protocol=str(data.get("protocol", "ESMTP")),
            auth_user=data.get("auth_user"),
            held=bool(data.get("held", False)),
            authentication=data.get("authentication"),
        )
