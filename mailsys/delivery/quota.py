"""Per-mailbox quotas: the limits from the config, the usage of each Maildir, and the check that
a new message fits (for local delivery, IMAP APPEND and RCPT TO).

Usage is kept the Maildir++ way (Courier's deliverquota, Dovecot's "maildir" quota backend): a
``maildirsize`` file in the Maildir whose first line states the limits ("10485760S,1000C") and
whose other lines are "<bytes> <messages>" deltas, one appended (O_APPEND, one small write) per
message stored. Reading it is one small file per delivery, in a disk thread; the Maildir is
walked only when the file is missing, has grown past 5120 bytes, or says a message would not fit
while a folder changed after the file did (a message deleted by IMAP or POP3, which do not write
deltas): so a mailbox of 5,000 messages is never listed per delivery, and a mailbox that looks
full is recounted before anything is refused. Other Maildir++ readers see the same numbers.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar

from twisted.logger import Logger

from mailsys.config import QuotaSection
from mailsys.mailbox.layout import (
    escape_hostname,
    folder_names,
    folder_path,
    mailbox_path,
    new_name,
    parse_name,
    unique_name,
    write_message,
)

log = Logger(namespace="mailsys.delivery.quota")

MAILDIRSIZE = "maildirsize"
# Maildir++: recalculate once the file is larger than this (it only ever grows by deltas).
MAILDIRSIZE_LIMIT = 5120
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """One mailbox's limits; None means no limit for that resource."""

    storage: int | None = None  # bytes
    messages: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.storage is None and self.messages is None

    def header(self) -> str:
        """The first line of maildirsize (Maildir++): "<bytes>S,<count>C", the limits set."""
        parts = []
        if self.storage is not None:
            parts.append(f"{self.storage}S")
        if self.messages is not None:
            parts.append(f"{self.messages}C")
        return ",".join(parts) or "0S"


@dataclass(frozen=True)
class Usage:
    """What a mailbox holds: bytes (as stored) and messages, in every folder."""

    storage: int = 0
    messages: int = 0

    def plus(self, size: int, count: int = 1) -> Usage:
        return Usage(self.storage + size, self.messages + count)


class MailboxFullError(Exception):
    """A message that would take its mailbox over its quota (RFC 3463 X.2.2)."""

    def __init__(self, mailbox: str, usage: Usage, limits: Limits) -> None:
        super().__init__(f"mailbox {mailbox} over quota")
        self.mailbox = mailbox
        self.usage = usage
        self.limits = limits

    def describe(self) -> str:
        """One line: what the mailbox holds against its limits."""
        parts = []
        if self.limits.storage is not None:
            parts.append(f"{self.usage.storage}/{self.limits.storage} bytes")
        if self.limits.messages is not None:
            parts.append(f"{self.usage.messages}/{self.limits.messages} messages")
        return ", ".join(parts)


def exceeds(limits: Limits, usage: Usage) -> bool:
    """True if ``usage`` is over ``limits`` (reaching a limit exactly is still allowed)."""
    return (limits.storage is not None and usage.storage > limits.storage) or (
        limits.messages is not None and usage.messages > limits.messages
    )


def percent_used(limits: Limits, usage: Usage) -> float:
    """The larger share of its limits that ``usage`` takes, in percent (0 when unlimited)."""
    shares = [0.0]
    if limits.storage:
        shares.append(100.0 * usage.storage / limits.storage)
    if limits.messages:
        shares.append(100.0 * usage.messages / limits.messages)
    return max(shares)


class QuotaRules:
    """The limits of each mailbox: a default for all, overridden per user (canonical address)."""

    def __init__(
        self,
        default: Limits = Limits(),
        per_user: Mapping[str, Limits] | None = None,
        warn_percent: int = 90,
    ) -> None:
        self.default = default
        self.per_user = {_key(k): v for k, v in (per_user or {}).items()}
        self.warn_percent = warn_percent

    @classmethod
    def from_section(cls, section: QuotaSection) -> QuotaRules:
        """From the [quota] section of the config (mailsys.config.QuotaSection)."""
        default = Limits(section.storage or None, section.messages)
        users = set(section.storage_per_user) | set(section.messages_per_user)
        per_user = {}
        for user in users:
            storage = default.storage
            if user in section.storage_per_user:
                storage = section.storage_per_user[user] or None
            per_user[user] = Limits(storage, section.messages_per_user.get(user, default.messages))
        return cls(default, per_user, section.warn_percent)

    @property
    def any(self) -> bool:
        """True if some mailbox has a limit (else quota work is skipped altogether)."""
        return not self.default.unlimited or any(not v.unlimited for v in self.per_user.values())

    def limits_for(self, mailbox: str) -> Limits:
        return self.per_user.get(_key(mailbox), self.default)


def _key(mailbox: str) -> str:
    user, sep, domain = mailbox.rpartition("@")
    return f"{user}{sep}{domain.lower()}" if sep else mailbox


def maildir_of(root: Path, mailbox: str) -> Path:
    """The Maildir (INBOX) of canonical ``user@domain`` under ``root`` (mailsys.mailbox.layout)."""
    return mailbox_path(root, mailbox)


class MailboxQuota:
    """Quota checks and accounting for the Maildirs under ``root``; blocking methods run in disk
    threads. Holds no usage in memory: maildirsize is the one record, so the delivery agent and
    the IMAP sessions (separate instances) agree."""

    def __init__(self, rules: QuotaRules, root: Path, hostname: str = "localhost") -> None:
        self.rules = rules
        self.root = Path(root)
        self.hostname = hostname
        # One writer per Maildir at a time inside this process: check, store and delta must not
        # interleave with another delivery's (other processes: Maildir++ accepts the race).
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def limits_for(self, mailbox: str) -> Limits | None:
        """The limits of ``mailbox``, or None when it has none (cheap: no disk)."""
        limits = self.rules.limits_for(mailbox)
        return None if limits.unlimited else limits

    def _lock(self, maildir: Path) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(os.fspath(maildir), threading.Lock())

    # -- disk threads ----------------------------------------------------------------------------

    def usage(self, mailbox: str) -> Usage:
        """Blocking: the current usage, recounted if any folder changed since the last count."""
        limits = self.rules.limits_for(mailbox)
        maildir = maildir_of(self.root, mailbox)
        usage, stamp = read_maildirsize(maildir)
        if usage is None or folders_changed_since(maildir, stamp):
            usage = recalculate(maildir, limits)
        return usage

    def is_full(self, mailbox: str) -> bool:
        """Blocking: True if ``mailbox`` has reached a limit (not even one more byte fits)."""
        limits = self.limits_for(mailbox)
        if limits is None:
            return False
        maildir = maildir_of(self.root, mailbox)
        try:
            usage = self._fitting_usage(maildir, limits, 1, 1)
        except FileNotFoundError:
            return False
        return exceeds(limits, usage.plus(1))

    def check(self, mailbox: str, size: int, count: int = 1) -> Usage:
        """Blocking: the usage, or MailboxFullError if ``count`` messages of ``size`` bytes in
        all would not fit (for IMAP APPEND and COPY)."""
        limits = self.limits_for(mailbox)
        maildir = maildir_of(self.root, mailbox)
        if limits is None:
            return Usage()
        usage = self._fitting_usage(maildir, limits, size, count)
        if exceeds(limits, usage.plus(size, count)):
            raise MailboxFullError(mailbox, usage, limits)
        return usage

    def store_within(self, mailbox: str, size: int, count: int, store: Callable[..., T],
                     *args: Any) -> T:
        """Blocking: ``store(*args)`` if ``count`` messages of ``size`` bytes in all fit, then
        count them; else MailboxFullError (IMAP APPEND and COPY). Serialised with deliveries to
        the same mailbox, so two writers cannot both take the last room."""
        with self._lock(maildir_of(self.root, mailbox)):
            self.check(mailbox, size, count)
            result = store(*args)
            self.record(mailbox, size, count)
            return result

    def record(self, mailbox: str, size: int, count: int = 1) -> None:
        """Blocking: add a delta line for messages stored outside ``deliver`` (IMAP APPEND)."""
        if self.limits_for(mailbox) is None:
            return
        add_usage(maildir_of(self.root, mailbox), size, count)

    def deliver(
        self, mailbox: str, limits: Limits, size: int, write: Callable[..., str | None],
        *args: Any, present: Callable[[], bool] | None = None,
    ) -> str | None:
        """Blocking: ``write(*args)`` a message of about ``size`` bytes if it fits, else raise
        MailboxFullError; then account for it, and leave the user a warning when the delivery
        took the mailbox across the warning level.

        ``write`` returns the Maildir name it wrote (with ",S=<size>"), or None if the copy was
        already there (nothing to count). ``present`` says whether the copy is already in the
        Maildir: asked only when the message does not fit, so that a copy written before a
        crash (and counted since) is recognised as delivered instead of deferred as too big.
        """
        maildir = maildir_of(self.root, mailbox)
        with self._lock(maildir):
            try:
                usage = self._fitting_usage(maildir, limits, size, 1)
            except FileNotFoundError:
                usage = Usage()  # no Maildir yet: the writer creates it
            if exceeds(limits, usage.plus(size)):
                if present is not None and present():
                    return None
                raise MailboxFullError(mailbox, usage, limits)
            name = write(*args)
            if name is None:
                return None
            stored = parse_name(name).size or size
            add_usage(maildir, stored, 1)
            after = usage.plus(stored)
            level = self.rules.warn_percent
            if percent_used(limits, usage) < level <= percent_used(limits, after):
                self._warn(maildir, mailbox, limits, after)
            return name

    def _fitting_usage(self, maildir: Path, limits: Limits, size: int, count: int) -> Usage:
        """The usage from maildirsize; recounted when missing, too long, or when the message
        would not fit (or would cross the warning level) while a folder changed since."""
        usage, stamp = read_maildirsize(maildir)
        if usage is None:
            if not maildir.is_dir():
                raise FileNotFoundError(os.fspath(maildir))
            return recalculate(maildir, limits)
        after = usage.plus(size, count)
        crossing = percent_used(limits, after) >= self.rules.warn_percent
        if (exceeds(limits, after) or crossing) and folders_changed_since(maildir, stamp):
            return recalculate(maildir, limits)
        return usage

    def _warn(self, maildir: Path, mailbox: str, limits: Limits, usage: Usage) -> None:
        """Put a short notice into the user's INBOX (as Courier's deliverquota does): it is
        written directly, not queued, and is counted like any message."""
        try:
            data = warning_message(mailbox, self.hostname, limits, usage,
                                   self.rules.warn_percent)
            name = new_name(unique_name(escape_hostname(self.hostname)), data)
            write_message(maildir, "new", name, data)
            add_usage(maildir, len(data), 1)
            log.info("quota warning for {mailbox}: {percent:.0f}% used", mailbox=mailbox,
                     percent=percent_used(limits, usage))
        except OSError as error:
            log.warn("quota warning for {mailbox} not written: {path}: {error}",
                     mailbox=mailbox, path=str(maildir), error=error.strerror or error)


def warning_message(mailbox: str, hostname: str, limits: Limits, usage: Usage,
                    level: int) -> bytes:
    """The text of the quota warning, LF line ends as in a Maildir (RFC 3834 auto-generated)."""
    used = []
    if limits.storage is not None:
        used.append(f"{_human(usage.storage)} of {_human(limits.storage)}")
    if limits.messages is not None:
        used.append(f"{usage.messages} of {limits.messages} messages")
    text = (
        f"From: Mail System <MAILER-DAEMON@{hostname}>\n"
        f"To: <{mailbox}>\n"
        f"Subject: Your mailbox is over {level}% full\n"
        f"Date: {formatdate(localtime=False)}\n"
        f"Message-ID: <{time.time_ns()}.quota@{hostname}>\n"
        "Auto-Submitted: auto-generated\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
        f"Your mailbox <{mailbox}> now uses {' and '.join(used)}.\n"
        "\n"
        "When it is full, new mail for you waits on the server and is returned to its\n"
        "senders if no room is made in time. Please delete or archive the messages you\n"
        "no longer need (remember to empty the Trash).\n"
    )
    return text.encode("ascii", "replace")


def _human(size: int) -> str:
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


# -- maildirsize ------------------------------------------------------------------------------


def read_maildirsize(maildir: Path) -> tuple[Usage | None, int]:
    """Blocking: the usage maildirsize records and its mtime (ns); (None, 0) when it is missing,
    unreadable or too long (then the caller recounts)."""
    path = os.path.join(maildir, MAILDIRSIZE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None, 0
    try:
        stat = os.fstat(fd)
        if stat.st_size > MAILDIRSIZE_LIMIT:
            return None, 0
        data = os.read(fd, MAILDIRSIZE_LIMIT + 1)
    finally:
        os.close(fd)
    lines = data.decode("ascii", "replace").split("\n")
    storage = messages = 0
    for line in lines[1:]:
        parts = line.split()
        if not parts:
            continue
        try:
            storage += int(parts[0])
            messages += int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            return None, 0
    return Usage(max(storage, 0), max(messages, 0)), stat.st_mtime_ns


def add_usage(maildir: Path, size: int, count: int) -> None:
    """Blocking: append one delta line (one write with O_APPEND: lines never interleave)."""
    path = os.path.join(maildir, MAILDIRSIZE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # the next reader recounts
    try:
        os.write(fd, f"{size} {count}\n".encode())
    except OSError:
        # No room even for a line: drop the file so that the next reader recounts.
        with contextlib.suppress(OSError):
            os.unlink(path)
    finally:
        os.close(fd)


def folders(maildir: Path) -> list[str]:
    """Blocking: the INBOX and every Maildir++ folder of ``maildir``, as paths."""
    return [os.fspath(maildir)] + [os.fspath(folder_path(maildir, name))
                                   for name in folder_names(maildir)]


def folders_changed_since(maildir: Path, stamp: int) -> bool:
    """Blocking: True if a cur/ or new/ of any folder changed after ``stamp`` (ns): a message
    was added or removed by something that wrote no delta."""
    for folder in folders(maildir):
        for sub in ("cur", "new"):
            try:
                if os.stat(f"{folder}/{sub}").st_mtime_ns > stamp:
                    return True
            except FileNotFoundError:
                continue
    return False


def recalculate(maildir: Path, limits: Limits) -> Usage:
    """Blocking: count every message of every folder and write a fresh maildirsize.

    Sizes come from the ",S=" field of the names where present (no stat needed).
    """
    storage = messages = 0
    for folder in folders(maildir):
        for sub in ("cur", "new"):
            try:
                with os.scandir(f"{folder}/{sub}") as entries:
                    for entry in entries:
                        if entry.name.startswith("."):
                            continue
                        size = parse_name(entry.name).size
                        if size is not None:
                            storage += size
                        else:
                            try:
                                storage += entry.stat().st_size
                            except FileNotFoundError:
                                continue
                        messages += 1
            except FileNotFoundError:
                continue
    usage = Usage(storage, messages)
    _write_maildirsize(maildir, limits, usage)
    return usage


def _write_maildirsize(maildir: Path, limits: Limits, usage: Usage) -> None:
    """Replace maildirsize by the limits line and one line of totals (written aside, renamed)."""
    if not os.path.isdir(maildir):
        return
    tmp = os.path.join(maildir, "tmp", f"{MAILDIRSIZE}.{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{limits.header()}\n{usage.storage} {usage.messages}\n")
        os.replace(tmp, os.path.join(maildir, MAILDIRSIZE))
    except OSError:
        # No room (or no tmp/): the totals are still right for this caller; the next recounts.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
