"""Delivery status notifications (RFC 3461, RFC 3464): bounces, delay notices, success reports.

At the end of every delivery round the runner asks ``DSNNotifier.notify`` what the sender must
be told: recipients that failed for good (a bounce, Action: failed), recipients still deferred
after ``delay_warning`` (once, Action: delayed) and, when NOTIFY=SUCCESS asked for it, local
deliveries (Action: delivered). Each notice is a new message with the null sender, built as a
multipart/report (RFC 6522) with a message/delivery-status part, routed like any other mail
(local senders get it in their Maildir) and committed through the queue sink before the
envelope records that it was sent, so that neither a crash nor a full disk loses one. A message
with the null sender never causes a notice (RFC 5321 §6.1: no bounce for a bounce).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsys.diskio import DiskRunner
from mailsys.envelope import Attempt, Destination, Envelope, Recipient, RecipientStatus, TargetKind
from mailsys.replies import Reply
from mailsys.routing import UnknownRecipient

log = Logger(namespace="mailsys.queue.dsn")

# RFC 3461 §4.1 keywords, as recorded in Recipient.notices.
FAILURE = "FAILURE"
DELAY = "DELAY"
SUCCESS = "SUCCESS"
NEVER = "NEVER"

# Without RET, the whole message is returned only up to this size (Postfix's
# bounce_size_limit); larger ones get their header section only.
RETURN_SIZE_LIMIT = 50_000
# Never more than this is read to find a header section.
HEADER_READ_LIMIT = 256 * 1024


class Submitter(Protocol):
    """Where a notice goes: the queue sink (commit, fsync, then schedule)."""

    def new_queue_id(self) -> str: ...

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]: ...


class Resolver(Protocol):
    """Routes the notice's recipient (mailsys.routing.Router.resolve)."""

    def resolve(self, address: str) -> list[Destination]: ...


@dataclass(frozen=True)
class _Report:
    kind: str  # FAILURE, DELAY or SUCCESS
    recipients: tuple[Recipient, ...]


def wants(recipient: Recipient, kind: str) -> bool:
    """RFC 3461 §4.1: NOTIFY=NEVER, or a list; absent means FAILURE and DELAY (our choice)."""
    notify = recipient.notify
    if notify is None:
        return kind in (FAILURE, DELAY)
    return kind in notify


def status_code(reply: Reply) -> str:
    """The enhanced status of a reply, or one derived from its basic code (RFC 3463 §3.1)."""
    if reply.enhanced:
        return reply.enhanced
    if reply.code // 100 in (2, 4, 5):
        return f"{reply.code // 100}.0.0"
    return "4.0.0"


class DSNNotifier:
    """Builds and queues delivery status notifications; the runner's Notifier."""

    def __init__(
        self,
        submitter: Submitter,
        router: Resolver,
        disk: DiskRunner,
        hostname: str,
        clock: IReactorTime,
        *,
        delay_warning: float | None = 4 * 3600.0,
        max_lifetime: float | None = None,
        max_returned_size: int = 25 * 1024 * 1024,
    ) -> None:
        self._submitter = submitter
        self._router = router
        self._disk = disk
        self._hostname = hostname
        self._clock = clock
        self._delay_warning = delay_warning
        self._max_lifetime = max_lifetime
        self._max_returned = max_returned_size

    # -- what is due -----------------------------------------------------------------------------

    def _due(self, envelope: Envelope) -> list[_Report]:
        if not envelope.sender:
            return []  # RFC 5321 §6.1: never a notice about a notice (or any null-sender mail)
        failed, delayed, delivered = [], [], []
        now = self._clock.seconds()
        for r in envelope.recipients:
            if r.status is RecipientStatus.FAILED:
                if FAILURE not in r.notices and wants(r, FAILURE):
                    failed.append(r)
            elif r.status is RecipientStatus.DEFERRED:
                if (self._delay_warning is not None and DELAY not in r.notices
                        and wants(r, DELAY)
                        and now - envelope.received_at >= self._delay_warning):
                    delayed.append(r)
            elif (r.status is RecipientStatus.DELIVERED and r.kind is TargetKind.LOCAL
                  and SUCCESS not in r.notices and wants(r, SUCCESS)):
                # RFC 3461 §4.1: a SUCCESS notice at final delivery. Relayed recipients had
                # NOTIFY passed on to the next hop when it offers DSN.
                delivered.append(r)
        reports = []
        for kind, recipients in ((FAILURE, failed), (DELAY, delayed), (SUCCESS, delivered)):
            if recipients:
                reports.append(_Report(kind, tuple(recipients)))
        return reports

    def owes(self, envelope: Envelope) -> bool:
        """A failure or success notice is due (it must be queued before the message goes)."""
        return any(report.kind != DELAY for report in self._due(envelope))

    def notify(self, envelope: Envelope, message_path: Path) -> Deferred[bool]:
        """Queue every notice now due; fires True if the envelope's notices changed."""
        reports = self._due(envelope)
        if not reports:
            return succeed(False)
        return Deferred.fromCoroutine(self._send_all(envelope, Path(message_path), reports))

    async def _send_all(self, envelope: Envelope, path: Path, reports: list[_Report]) -> bool:
        changed = False
        for report in reports:
            try:
                await self._send(envelope, path, report)
            except Exception:
                # Not marked as sent: owes() keeps the message, and the next round tries again.
                log.failure("{queue_id}: could not queue the {kind} notice to <{sender}>",
                            Failure(), queue_id=envelope.queue_id, kind=report.kind.lower(),
                            sender=envelope.sender)
                continue
            for recipient in report.recipients:
                recipient.notices = (*recipient.notices, report.kind)
            changed = True
        return changed

    async def _send(self, envelope: Envelope, path: Path, report: _Report) -> None:
        try:
            destinations = self._router.resolve(envelope.sender)
        except UnknownRecipient:
            log.warn("{queue_id}: {kind} notice not sent: the sender <{sender}> is unknown",
                     queue_id=envelope.queue_id, kind=report.kind.lower(), sender=envelope.sender)
            return  # nobody to tell; counted as done, or the message would never leave
        queue_id = self._submitter.new_queue_id()
        returned = await self._returned(envelope, path, report)
        message = self.compose(envelope, report, queue_id, returned)
        recipients = [
            Recipient(address=d.address, original=envelope.sender, kind=d.kind,
                      mailbox=d.mailbox, notify=(NEVER,))
            for d in destinations
        ]
        notice = Envelope(
            queue_id=queue_id,
            sender="",  # RFC 3461 §6.2 / RFC 5321 §4.5.5: notices use the null reverse-path
            recipients=recipients,
            received_at=self._clock.seconds(),
            size=len(message),
            body="8BITMIME" if any(b > 0x7F for b in returned[1]) else None,
            smtputf8=envelope.smtputf8 and bool(returned[1]),
            client_address="",
            client_helo=self._hostname,
            protocol="local",
        )
        await self._submitter.submit(notice, message)
        log.info("{queue_id}: {kind} notice {notice_id} queued for <{sender}> about {count} "
                 "recipient(s)", queue_id=envelope.queue_id, kind=report.kind.lower(),
                 notice_id=queue_id, sender=envelope.sender, count=len(report.recipients))

    # -- the returned content --------------------------------------------------------------------

    async def _returned(self, envelope: Envelope, path: Path, report: _Report) -> (
        tuple[str, bytes]
    ):
        """(content type, bytes) of the original to attach: RFC 3461 §4.3 RET."""
        if report.kind != FAILURE:
            headers_only = True  # RET is about failures; other notices need no copy of the body
        elif envelope.ret == "HDRS":
            headers_only = True
        elif envelope.ret == "FULL":
            headers_only = envelope.size > self._max_returned
        else:
            headers_only = envelope.size > RETURN_SIZE_LIMIT
        data: bytes = await self._disk.run(_read_original, path, headers_only)
        if headers_only:
            return "text/rfc822-headers", data  # RFC 6522 §4 (was RFC 3462)
        # RFC 6533 §3: an SMTPUTF8 message is returned as message/global.
        return ("message/global" if envelope.smtputf8 else "message/rfc822"), data

    # -- composition -----------------------------------------------------------------------------

    def compose(self, envelope: Envelope, report: _Report, queue_id: str,
                returned: tuple[str, bytes]) -> bytes:
        """The notice as CRLF bytes: RFC 6522 multipart/report with RFC 3464 fields."""
        now = self._clock.seconds()
        boundary = f"{queue_id}.{secrets.token_hex(8)}/{self._hostname}"
        subject = {
            FAILURE: "Undelivered Mail Returned to Sender",
            DELAY: "Delayed Mail (still being retried)",
            SUCCESS: "Successful Mail Delivery Report",
        }[report.kind]
        headers = [
            f"Received: by {self._hostname} (mailsys) id {queue_id}; {_date(now)}",
            f"From: Mail Delivery System <MAILER-DAEMON@{self._hostname}>",
            f"To: <{envelope.sender}>",
            f"Subject: {subject}",
            f"Date: {_date(now)}",
            f"Message-ID: <{queue_id}.dsn@{self._hostname}>",
            "Auto-Submitted: auto-replied",  # RFC 3834 §5
            "MIME-Version: 1.0",
            "Content-Type: multipart/report; report-type=delivery-status;",
            f'\tboundary="{boundary}"',
        ]
        text = self._human(envelope, report)
        status = self._machine(envelope, report)
        content_type, original = returned
        parts = [
            "\r\n".join(headers).encode(),
            b"\r\n\r\nThis is a MIME-encapsulated message.\r\n",
            f"\r\n--{boundary}\r\n".encode(),
            b"Content-Description: Notification\r\n",
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Transfer-Encoding: 8bit\r\n\r\n",
            text.encode("utf-8"),
            f"\r\n--{boundary}\r\n".encode(),
            b"Content-Description: Delivery report\r\n",
            # RFC 6533 §6: message/global-delivery-status when addresses are UTF-8.
            (b"Content-Type: message/global-delivery-status\r\n" if envelope.smtputf8
             else b"Content-Type: message/delivery-status\r\n"),
            b"\r\n",
            status.encode("utf-8"),
            f"\r\n--{boundary}\r\n".encode(),
            b"Content-Description: " + (
                b"Undelivered message" if report.kind == FAILURE else b"Message headers"
            ) + b"\r\n",
            f"Content-Type: {content_type}\r\n".encode(),
        ]
        if any(b > 0x7F for b in original):
            parts.append(b"Content-Transfer-Encoding: 8bit\r\n")
        parts += [b"\r\n", original]
        if original and not original.endswith(b"\r\n"):
            parts.append(b"\r\n")
        parts.append(f"\r\n--{boundary}--\r\n".encode())
        return b"".join(parts)

    def _human(self, envelope: Envelope, report: _Report) -> str:
        lines = [f"This is the mail system at {self._hostname}.", ""]
        if report.kind == FAILURE:
            lines += ["Your message could not be delivered to one or more recipients.",
                      "It is attached below.", ""]
        elif report.kind == DELAY:
            lines += ["Your message has not been delivered yet to one or more recipients.",
                      "The mail system will keep trying; you need not send it again."]
            until = self._retry_until(envelope)
            if until is not None:
                lines.append(f"It gives up on {_date(until)}.")
            lines.append("")
        else:
            lines += ["Your message was delivered to the recipients below.", ""]
        for r in report.recipients:
            if not r.attempts:
                lines.append(f"<{r.address}>")
                continue
            last = r.attempts[-1]
            remote = _remote_attempt(r)
            if remote is last and report.kind != SUCCESS:
                lines.append(f"<{r.address}>: host {remote.host} said:")
                lines.append(f"    {remote.reply}")
                continue
            lines.append(f"<{r.address}>: {last.reply}")
            if status_code(last.reply) == "5.4.7" and len(r.attempts) > 1:
                lines.append(f"    last error: {r.attempts[-2].reply}")
            if remote is not None and report.kind != SUCCESS:
                lines.append(f"    last reply of {remote.host}: {remote.reply}")
        return "\r\n".join(lines) + "\r\n"

    def _machine(self, envelope: Envelope, report: _Report) -> str:
        """The message/delivery-status body: per-message fields, then per-recipient blocks."""
        blocks = [[f"Reporting-MTA: dns; {self._hostname}"]]
        if envelope.envid:
            blocks[0].append(f"Original-Envelope-Id: {envelope.envid}")  # RFC 3464 §2.2.1
        blocks[0].append(f"Arrival-Date: {_date(envelope.received_at)}")  # RFC 3464 §2.2.5
        action = {FAILURE: "failed", DELAY: "delayed", SUCCESS: "delivered"}[report.kind]
        for r in report.recipients:
            last = r.attempts[-1] if r.attempts else None
            remote = _remote_attempt(r)
            block = [f"Final-Recipient: {_address_field(r.address)}"]  # RFC 3464 §2.3.2
            original = r.orcpt or (f"rfc822;{r.original}" if r.original else None)
            if original:
                addr_type, _, address = original.partition(";")
                block.append(f"Original-Recipient: {addr_type}; {address}")  # §2.3.1
            block.append(f"Action: {action}")  # §2.3.3
            block.append(f"Status: {status_code(last.reply) if last else '4.0.0'}")  # §2.3.4
            if remote is not None and report.kind != SUCCESS:
                block.append(f"Remote-MTA: dns; {remote.mta}")  # §2.3.5
                block.append(f"Diagnostic-Code: smtp; {remote.reply}")  # §2.3.6
            if last is not None:
                block.append(f"Last-Attempt-Date: {_date(last.at)}")  # §2.3.7
            if report.kind == DELAY:
                until = self._retry_until(envelope)
                if until is not None:
                    block.append(f"Will-Retry-Until: {_date(until)}")  # §2.3.9
            blocks.append(block)
        return "\r\n\r\n".join("\r\n".join(block) for block in blocks) + "\r\n"

    def _retry_until(self, envelope: Envelope) -> float | None:
        if self._max_lifetime is None:
            return None
        return envelope.received_at + self._max_lifetime


def _remote_attempt(recipient: Recipient) -> Attempt | None:
    """The latest attempt whose reply came from a remote server (for Diagnostic-Code)."""
    for attempt in reversed(recipient.attempts):
        if attempt.mta:
            return attempt
    return None


def _address_field(address: str) -> str:
    # RFC 6533 §3: a non-ASCII address is of type utf-8.
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"


def _date(when: float) -> str:
    return formatdate(when, usegmt=True).replace(" GMT", " +0000")


def _read_original(path: Path, headers_only: bool) -> bytes:
    """Disk thread: the whole spooled message, or its header section only."""
    with open(path, "rb") as f:
        if not headers_only:
            return f.read()
        data = f.read(HEADER_READ_LIMIT)
    end = data.find(b"\r\n\r\n")
    return data[: end + 2] if end >= 0 else data
