"""Local delivery: one queued message becomes one file in a recipient's Maildir, exactly once.

The Maildir root holds ``<domain>/<user>/`` per mailbox (Maildir++: that directory is the INBOX
with cur/ new/ tmp/, folders are ``.Name`` subdirectories). Each copy is written to tmp/, fsync'd
and renamed into new/, and new/ is fsync'd (group commit) before the attempt counts as delivered.

The file name is derived from the queue id and the recipient, not drawn at random, so that a
recovered message whose copy was written before a crash is recognised instead of written twice.
Paths, names and the stored form are the Maildir format's rules (mailsys.mailbox.layout).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsys import replies
from mailsys.delivery.quota import MailboxFullError, MailboxQuota
from mailsys.diskio import DiskPool, Staged, finish, is_no_space
from mailsys.envelope import Attempt, Envelope, Recipient, RecipientStatus
from mailsys.interfaces import IDeliveryAgent
from mailsys.journey.events import NULL_RECORDER
from mailsys.journey.interfaces import IJourneyRecorder
from mailsys.mailbox.layout import (
    InvalidFolderNameError,
    InvalidMailboxNameError,
    create_maildir,
    delivery_base,
    escape_hostname,
    folder_path,
    local_host,
    mailbox_path,
    name_prefix,
    new_name,
    stage_message,
    stored_form,
)
from mailsys.replies import Reply

log = Logger(namespace="mailsys.delivery.maildir")

HOST = "maildir"
REPLY_DELIVERED = Reply(250, "2.0.0", "delivered to maildir")
REPLY_TEMPORARY = Reply(451, "4.3.0", "Temporary local delivery failure, will retry")
REPLY_NO_MAILBOX = Reply(550, "5.1.1", "No such mailbox")
# RFC 3463: X.2.2 the recipient's mailbox is over its quota; X.3.1 the file system is full.
REPLY_MAILBOX_FULL = replies.DELIVERY_MAILBOX_FULL
REPLY_SYSTEM_FULL = replies.DELIVERY_SYSTEM_FULL

_PATH_CACHE_SIZE = 10_000


def delivery_headers(envelope: Envelope, recipient: Recipient) -> bytes:
    """The trace lines prepended at final delivery.

    RFC 5321 §4.4: the delivering server adds Return-Path with the reverse-path ("<>" when it was
    null). Delivered-To names the final recipient address (the Postfix convention, also used for
    loop detection). CR and LF are dropped so that an address can never end the header early.
    """
    sender = _one_line(envelope.sender)
    address = _one_line(recipient.address)
    return f"Return-Path: <{sender}>\r\nDelivered-To: {address}\r\n".encode()


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "")


@implementer(IDeliveryAgent)
class MaildirWriter:
    """Delivers LOCAL recipients into ``root/<domain>/<user>/`` Maildirs."""

    def __init__(
        self,
        root: Path,
        pool: DiskPool,
        hostname: str,
        clock: IReactorTime | None = None,
        *,
        on_delivered: Callable[[str], None] | None = None,
        journey: IJourneyRecorder = NULL_RECORDER,
        quota: MailboxQuota | None = None,
    ) -> None:
        self.root = Path(root)
        self._journey = journey
        # Per-mailbox limits (mailsys.delivery.quota); None: no mailbox has any.
        self._quota = quota
        self._pool = pool
        # Called with the mailbox after each delivery (the mailbox store wakes open sessions).
        self._on_delivered = on_delivered
        # Fall back to the machine's name: the host part only needs to be stable per machine.
        self._host = escape_hostname(hostname) if hostname else local_host()
        self._clock = clock
        # mailbox -> (Maildir, its new/ as a string): validated and joined once per mailbox,
        # since path handling is a visible share of a delivery's time on the reactor thread.
        self._paths: dict[str, tuple[Path, str]] = {}
        self._recovered_copies = RecoveredCopies()

    def maildir_path(self, mailbox: str) -> Path:
        """The Maildir (INBOX) of canonical ``user@domain``.

        Raises InvalidMailboxNameError for a name that is malformed or would leave the root.
        """
        return mailbox_path(self.root, mailbox)

    def _paths_of(self, mailbox: str) -> tuple[Path, str]:
        paths = self._paths.get(mailbox)
        if paths is None:
            maildir = self.maildir_path(mailbox)
            if len(self._paths) >= _PATH_CACHE_SIZE:
                self._paths.clear()
            paths = self._paths[mailbox] = (maildir, os.path.join(maildir, "new"))
        return paths

    def file_name(self, envelope: Envelope, recipient: Recipient) -> str:
        """The base name this writer uses for ``recipient``'s copy of ``envelope``."""
        return delivery_base(envelope.received_at, envelope.queue_id, recipient.address,
                             recipient.mailbox, self._host)

    def deliver(
        self,
        envelope: Envelope,
        recipient: Recipient,
        message_path: Path,
        *,
        recovered: bool = False,
    ) -> Deferred[Attempt]:
        """Write one copy and fire with the Attempt; never fails (problems become DEFERRED).

        ``recovered`` says the message was in the spool at start-up, so a copy may already have
        been written and even read by the user (moved to cur/ with flags): then both new/ and cur/
        are searched. Otherwise only the exact name in new/ is checked.
        """
        queue_id = envelope.queue_id
        try:
            if recipient.mailbox is None:
                raise InvalidMailboxNameError("recipient has no mailbox")
            maildir, new_dir = self._paths_of(recipient.mailbox)
            write = write_copy
            if recipient.folder:  # e.g. Junk, when mail authentication says so
                maildir, new_dir = _folder_paths(maildir, recipient.folder)
                write = write_folder_copy
        except InvalidMailboxNameError as e:
            log.error(
                "{queue_id}: to=<{to}> invalid local mailbox {mailbox!r}: {error}",
                queue_id=queue_id,
                to=recipient.address,
                mailbox=recipient.mailbox,
                error=e,
            )
            return succeed(self._attempt(RecipientStatus.FAILED, REPLY_NO_MAILBOX))

        base = self.file_name(envelope, recipient)
        header = delivery_headers(envelope, recipient)
        copy = (maildir, base, header, message_path,
                self._recovered_copies if recovered else None)
        limits = None if self._quota is None else self._quota.limits_for(recipient.mailbox)
        # The copy and the fsync of new/ in one disk job: every hand-over to the reactor costs.
        if self._quota is None or limits is None:
            # An INBOX copy is staged: its data is made durable with the other copies of the
            # disk pool's batch (group commit), then renamed into new/.
            stage = stage_copy if write is write_copy else write
            d = self._pool.run_and_sync(new_dir, stage, *copy)
        else:
            size = envelope.size + len(header)
            d = self._pool.run_and_sync(new_dir, functools.partial(
                self._quota.deliver, present=functools.partial(copy_present, maildir, base)),
                recipient.mailbox, limits, size, write, *copy)

        def delivered(name: str | None) -> Attempt:
            if name is None:
                # Found, not written: new/ was fsync'd all the same, since the copy may have been
                # there only in the page cache of a process killed before its directory fsync.
                log.info(
                    "{queue_id}: to=<{to}> copy {name} already in {maildir}, not written again",
                    queue_id=queue_id,
                    to=recipient.address,
                    name=base,
                    maildir=str(maildir),
                )
            # The journey: which Maildir folder and file (the name is new/'s, or the one found).
            self._journey.emit("delivery.maildir", queue_id, recipient=recipient.address,
                               mailbox=recipient.mailbox, folder="INBOX", file=name or base,
                               written=name is not None)
            if self._on_delivered is not None and recipient.mailbox is not None:
                try:
                    self._on_delivered(recipient.mailbox)
                except Exception:  # a listener's bug must not turn a delivery into a retry
                    log.failure("{queue_id}: delivery listener failed", queue_id=queue_id)
            return self._attempt(RecipientStatus.DELIVERED, REPLY_DELIVERED)

        def failed(failure: Failure) -> Attempt:
            # Storage errors are expected events: one line each, no traceback.
            error = failure.value
            if isinstance(error, MailboxFullError):
                log.info("{queue_id}: to=<{to}> mailbox full ({usage}) in {maildir}, will retry",
                         queue_id=queue_id, to=recipient.address, maildir=str(maildir),
                         usage=error.describe())
                return self._attempt(RecipientStatus.DEFERRED, REPLY_MAILBOX_FULL)
            if isinstance(error, OSError):
                log.warn("{queue_id}: to=<{to}> maildir delivery failed, will retry: {path}: "
                         "{error}", queue_id=queue_id, to=recipient.address,
                         path=str(getattr(error, "filename", None) or maildir),
                         error=f"[Errno {error.errno}] {error.strerror}")
                reply = REPLY_SYSTEM_FULL if is_no_space(error) else REPLY_TEMPORARY
                return self._attempt(RecipientStatus.DEFERRED, reply)
            log.failure(
                "{queue_id}: to=<{to}> maildir delivery to {maildir} failed, will retry",
                failure,
                queue_id=queue_id,
                to=recipient.address,
                maildir=str(maildir),
            )
            return self._attempt(RecipientStatus.DEFERRED, REPLY_TEMPORARY)

        return d.addCallbacks(delivered, failed)

    def _attempt(self, status: RecipientStatus, reply: Reply) -> Attempt:
        now = self._clock.seconds() if self._clock is not None else time.time()
        return Attempt(at=now, status=status, host=HOST, reply=reply)


def write_copy(
    maildir: Path,
    base: str,
    header: bytes,
    message_path: str | Path,
    recovered: RecoveredCopies | None = None,
) -> str | None:
    """Disk thread: write ``header`` (CRLF lines) + the spool message into ``maildir/new/``.

    Returns the file name written, or None, writing nothing, if the copy is already there. All
    per-message file work is in this one call: reading the spool file, a stat, write + fsync in
    tmp/, rename into new/. The directory fsync of new/ is left to the caller so that concurrent
    deliveries share it.
    """
    staged = stage_copy(maildir, base, header, message_path, recovered)
    return staged if staged is None else finish(staged)


def stage_copy(
    maildir: Path,
    base: str,
    header: bytes,
    message_path: str | Path,
    recovered: RecoveredCopies | None = None,
) -> Staged[str] | None:
    """Disk thread: ``write_copy`` in two steps (mailsys.diskio.Staged): the file is written in
    tmp/ now, renamed into new/ once the pool made it durable with the others of its batch."""
    root = os.fspath(maildir)
    stored = stored_form(_read_file(message_path), header)
    name = new_name(base, stored)
    if _exists(f"{root}/new/{name}") or (recovered is not None and recovered.contains(root, base)):
        return None
    staged = stage_message(root, "new", name, stored, create=True)

    def publish() -> str:
        staged.publish()
        if recovered is not None:
            recovered.add(root, base)
        return name

    return Staged(staged.fds, publish, staged.discard)


def _folder_paths(inbox: Path, folder: str) -> tuple[Path, str]:
    """The Maildir of a folder of the mailbox and its new/ (Maildir++ ``.Name``)."""
    try:
        path = folder_path(inbox, folder)
    except InvalidFolderNameError as exc:
        raise InvalidMailboxNameError(str(exc)) from None
    return path, os.path.join(path, "new")


def write_folder_copy(maildir: Path, base: str, header: bytes, message_path: str | Path,
                      recovered: RecoveredCopies | None = None) -> str | None:
    """Disk thread: write_copy into a folder, created first (with its Maildir++ marker) if the
    user has none yet."""
    if not os.path.isdir(os.path.join(maildir, "tmp")):
        create_maildir(maildir, subfolder=True)
    return write_copy(maildir, base, header, message_path, recovered)


def _read_file(path: str | Path) -> bytes:
    """The whole of a file, in four system calls (open() and read() make nine of them).

    Each system call of a disk thread gives up the GIL and must win it back from the reactor.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        chunks = []
        while size > 0:
            chunk = os.read(fd, size)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def _exists(path: str) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


class RecoveredCopies:
    """Which copies were in each Maildir's new/ and cur/ when a recovered message came for it.

    A recovered message's copy may have been written by the process before the crash, and read
    since (moved to cur/ with flags in its name). Each Maildir is listed once, on the first
    recovered delivery to it, not once per message: after a crash with a long queue and a large
    mailbox, a listing per message would hold the disk threads for minutes. Copies of earlier
    lives predate this process, so a listing taken any time after start-up contains them.
    Names are compared on "time.unique." only, so a copy is found even if the host name changed
    between the crash and the restart. Used from disk threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_maildir: dict[str, set[str]] = {}

    def contains(self, maildir: str, base: str) -> bool:
        with self._lock:
            known = self._by_maildir.get(maildir)
        if known is None:
            known = _listed_prefixes(maildir)
            with self._lock:
                known = self._by_maildir.setdefault(maildir, known)
        return name_prefix(base) in known

    def add(self, maildir: str, base: str) -> None:
        with self._lock:
            known = self._by_maildir.get(maildir)
            if known is not None:
                known.add(name_prefix(base))


def copy_present(maildir: Path, base: str) -> bool:
    """Disk thread: True if the copy named ``base`` is in new/ or cur/ (read, flagged or not)."""
    return name_prefix(base) in _listed_prefixes(os.fspath(maildir))


def _listed_prefixes(maildir: str) -> set[str]:
    prefixes: set[str] = set()
    for sub in ("new", "cur"):
        try:
            with os.scandir(f"{maildir}/{sub}") as entries:
                prefixes.update(name_prefix(entry.name) for entry in entries)
        except FileNotFoundError:
            continue
    return prefixes
