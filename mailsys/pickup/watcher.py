"""The server's side of the pickup directory: drop files become queued messages.

Every look at the directory and every file read runs in a disk thread; the envelope is built on
the reactor (routing reads only memory) and committed through the same sink as SMTP intake, so
the queue stays the single path for all mail. A drop is unlinked only after its message is
committed: a crash in between queues it twice (at least once, never lost).
"""

from __future__ import annotations

import pwd
import re
from collections.abc import Callable, Generator
from email.utils import formataddr, formatdate
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailsys import replies
from mailsys.address import AddressError, parse_mailbox
from mailsys.diskio import DiskRunner
from mailsys.envelope import Attempt, Envelope, Recipient, RecipientStatus, TargetKind
from mailsys.interfaces import IMessageSink, IRouter
from mailsys.pickup import maildrop
from mailsys.pickup.maildrop import Drop, DropError
from mailsys.routing import UnknownRecipient
from mailsys.smtp.message import has_field, header_section

log = Logger(namespace="mailsys.pickup")

# Drops handled per look at the directory, so one look never holds more than this in memory.
BATCH = 50
# A .tmp file untouched this long belongs to a writer that died (seconds).
STALE_TEMPORARY = 24 * 3600.0
PROTOCOL = "local"

_LINE_END = re.compile(rb"\r?\n")
# RFC 5322 §2.2: a field name is printable ASCII except ":", then the colon.
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")


def login_name(uid: int) -> str:
    """The login name of ``uid``, or ``uid<N>`` when the system has no such user."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def to_crlf(message: bytes) -> bytes:
    """``message`` with every line ending CRLF (RFC 5322 §2.1), as local programs write LF."""
    if not message:
        return b""
    converted = _LINE_END.sub(b"\r\n", message)
    return converted if converted.endswith(b"\r\n") else converted + b"\r\n"


class PickupWatcher:
    """Queues the drops of one pickup directory; ``poll`` is called by a TimerService."""

    def __init__(
        self,
        directory: Path,
        sink: IMessageSink,
        router: IRouter,
        disk: DiskRunner,
        clock: IReactorTime,
        *,
        hostname: str,
        origin: str,
        max_message_size: int,
        user_name: Callable[[int], str] = login_name,
    ) -> None:
        self.directory = directory
        self._sink = sink
        self._router = router
        self._disk = disk
        self._clock = clock
        self._hostname = hostname
        self._origin = origin
        self._max_size = max_message_size
        self._user_name = user_name
        self._busy = False
        self._last_cleanup = 0.0

    def poll(self) -> Deferred[None]:
        """Queue every complete drop now there (one look at a time); never fails."""
        if self._busy:
            return succeed(None)
        self._busy = True
        d: Deferred[None] = self._poll()
        d.addErrback(lambda failure: log.failure("pickup {directory}: look failed", failure,
                                                 directory=str(self.directory)))

        def done(result: object) -> None:
            self._busy = False

        return d.addBoth(done)

    @inlineCallbacks
    def _poll(self) -> Generator[Deferred[Any], Any, None]:
        now = self._clock.seconds()
        if now - self._last_cleanup > 3600.0:
            self._last_cleanup = now
            yield self._disk.run(maildrop.remove_stale_temporaries, self.directory,
                                 STALE_TEMPORARY, now)
        names: list[str] = yield self._disk.run(maildrop.list_drops, self.directory, BATCH)
        for name in names:
            queued: bool = yield self._take(name)
            if not queued:
                break  # the spool refused a commit: the next look tries again

    @inlineCallbacks
    def _take(self, name: str) -> Generator[Deferred[Any], Any, bool]:
        """Queue one drop; False if the spool could not commit it (it stays for later)."""
        try:
            drop: Drop = yield self._disk.run(maildrop.read_drop, self.directory, name,
                                              self._max_size)
        except FileNotFoundError:
            return True  # taken by another look, or removed by its writer
        except (DropError, UnicodeDecodeError, OSError) as exc:
            # OSError: a file the server may not read (written with another group or mode).
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warn("pickup {name}: refused ({reason}); moved to {refused}/", name=name,
                     reason=reason, refused=maildrop.REFUSED_DIR)
            yield self._disk.run(maildrop.refuse, self.directory, name)
            return True
        try:
            envelope, message = self.prepare(drop)
        except DropError as exc:
            log.warn("pickup {name}: uid={uid} refused ({reason}); moved to {refused}/",
                     name=name, uid=drop.uid, reason=str(exc), refused=maildrop.REFUSED_DIR)
            yield self._disk.run(maildrop.refuse, self.directory, name)
            return True
        try:
            yield self._sink.submit(envelope, message)
        except Exception as exc:
            # The drop stays where it is, for the next look; one line, not a traceback a second.
            log.warn("pickup {name}: not queued ({error}); tried again later", name=name,
                     error=str(exc) or type(exc).__name__)
            return False
        log.info(
            "{queue_id}: from=<{sender}> size={size} nrcpt={nrcpt} uid={uid} user={user} "
            "proto={proto} (pickup {name})",
            queue_id=envelope.queue_id, sender=envelope.sender, size=envelope.size,
            nrcpt=len(envelope.recipients), uid=drop.uid, user=self._user_name(drop.uid),
            proto=PROTOCOL, name=name,
        )
        yield self._disk.run(maildrop.remove, self.directory, name)
        return True

    # -- building the envelope and the message (on the reactor: memory only) -------------------

    def prepare(self, drop: Drop) -> tuple[Envelope, bytes]:
        """The envelope and the message to queue for ``drop``; DropError if it is unusable."""
        request = drop.request
        user = self._user_name(drop.uid)
        if request.sender is None:
            sender = f"{user}@{self._origin}"
        else:
            sender = self._qualify(request.sender) if request.sender else ""
        if sender:
            try:
                parse_mailbox(sender)
            except AddressError:
                raise DropError(f"bad sender address {sender!r}") from None
        if not request.recipients:
            raise DropError("no recipients")
        now = self._clock.seconds()
        queue_id = self._sink.new_queue_id()
        recipients = self._recipients(request.recipients, now)
        content = to_crlf(drop.message)
        header = header_section(content)
        added = self._received(queue_id, drop.uid, user, now)
        if not has_field(header, b"From"):
            # RFC 6409 §8.1 (a submission server may add a missing From), as Postfix does.
            display = formataddr((request.full_name or "", sender or f"{user}@{self._origin}"))
            added += f"From: {display}\r\n".encode()
        if not has_field(header, b"Date"):
            added += f"Date: {_date(now)}\r\n".encode()
        if not has_field(header, b"Message-ID"):
            # RFC 5322 §3.6.4: unique; the queue id is, and the host name makes it global.
            added += f"Message-ID: <{queue_id}@{self._hostname}>\r\n".encode()
        if not content.startswith(b"\r\n") and not _FIELD.match(content):
            # No header section at all (plain text, or nothing): the added fields need the
            # empty line that separates them from the body (RFC 5322 §2.1).
            content = b"\r\n" + content
        message = added + content
        if len(message) > self._max_size:
            raise DropError(f"message larger than {self._max_size} bytes")
        utf8 = not (sender.isascii() and all(r.address.isascii() for r in recipients))
        envelope = Envelope(
            queue_id=queue_id,
            sender=sender,
            recipients=recipients,
            received_at=now,
            size=len(message),
            body="8BITMIME" if not message.isascii() else None,
            smtputf8=utf8,
            client_helo="localhost",
            protocol=PROTOCOL,
        )
        return envelope, message

    def _qualify(self, address: str) -> str:
        """A bare login name gets the origin domain (Postfix's append_at_myorigin)."""
        address = address.strip()
        if address.startswith("<") and address.endswith(">"):
            address = address[1:-1]
        return address if "@" in address else f"{address}@{self._origin}"

    def _recipients(self, addresses: tuple[str, ...], now: float) -> list[Recipient]:
        """One Recipient per destination; a bad or unknown address is a failed recipient, so
        that the sender gets a bounce (no SMTP session is there to refuse it)."""
        result: list[Recipient] = []
        seen: set[tuple[str, str]] = set()
        for given in addresses:
            address = self._qualify(given)
            try:
                mailbox = parse_mailbox(address)
                destinations = self._router.resolve(str(mailbox))
            except AddressError:
                result.append(_failed(address, replies.BAD_RECIPIENT_SYNTAX, now))
                continue
            except UnknownRecipient:
                result.append(_failed(address, replies.MAILBOX_UNKNOWN, now))
                continue
            for destination in destinations:
                key = (destination.address.lower(), destination.kind.value)
                if key in seen:
                    continue
                seen.add(key)
                result.append(Recipient(address=destination.address, original=address,
                                        kind=destination.kind, mailbox=destination.mailbox))
        return result

    def _received(self, queue_id: str, uid: int, user: str, now: float) -> bytes:
        """The Received field (RFC 5321 §4.4) naming the local user, as Postfix's pickup does
        ("from userid 1000")."""
        return (f"Received: by {self._hostname} (mailsys, from userid {uid} ({user}))\r\n"
                f"\tid {queue_id}; {_date(now)}\r\n").encode("utf-8", "replace")


def _failed(address: str, reply: replies.Reply, now: float) -> Recipient:
    recipient = Recipient(address=address, original=address, kind=TargetKind.LOCAL)
    recipient.record(Attempt(at=now, status=RecipientStatus.FAILED, host="", reply=reply))
    return recipient


def _date(when: float) -> str:
    """``when`` as an RFC 5322 §3.3 date in UTC."""
    return formatdate(when, usegmt=True).replace(" GMT", " +0000")
