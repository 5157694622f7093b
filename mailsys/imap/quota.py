"""The IMAP QUOTA extension (RFC 9208) and the quota check of APPEND and COPY, as a mixin of
IMAPSession.

Each user has one quota root, named "" (RFC 9208 §3.1 lets the server choose), covering every
folder of the mailbox, with the STORAGE (in units of 1024 octets) and MESSAGE resources that
mailsys.delivery.quota keeps. Limits come from the server's config, so SETQUOTA is refused and
QUOTASET is not advertised (RFC 9208 §4.2.3). A message that would take the mailbox over its
quota is refused with NO [OVERQUOTA] (RFC 9208 §5.3).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailsys.delivery.quota import Limits, MailboxFullError, MailboxQuota, Usage
from mailsys.diskio import is_no_space
from mailsys.imap.names import encode_name
from mailsys.imap.parser import Reader
from mailsys.imap.responses import NO, OK, astring, tagged, untagged
from mailsys.imap.sessionparts import SessionParts
from mailsys.mailbox.store import INBOX, InvalidFolderNameError

if TYPE_CHECKING:
    from mailsys.imap.session import IMAPServerFactory

log = Logger(namespace="mailsys.imap")
T = TypeVar("T")
ROOT = ""
OVERQUOTA = "OVERQUOTA"  # RFC 9208 §5.3 response code


def set_quota(factory: Any, quota: MailboxQuota | None) -> None:
    """Give the IMAP sessions of ``factory`` (or of the factory a TLS wrapper wraps) the quota."""
    inner = getattr(factory, "wrappedFactory", factory)
    inner.quota = quota


def quota_line(limits: Limits, usage: Usage) -> str:
    """The resource list of a QUOTA response: "(STORAGE used limit MESSAGE used limit)"."""
    parts = []
    if limits.storage is not None:
        # RFC 9208 §5.1: STORAGE is in units of 1024 octets; round usage up, limits down.
        parts.append(f"STORAGE {math.ceil(usage.storage / 1024)} {limits.storage // 1024}")
    if limits.messages is not None:
        parts.append(f"MESSAGE {usage.messages} {limits.messages}")
    return f'QUOTA "" ({" ".join(parts)})'


class QuotaCommands(SessionParts):
    """GETQUOTAROOT, GETQUOTA and SETQUOTA, and the quota guard of messages stored by a client."""

    _factory: IMAPServerFactory  # with ``quota`` set by set_quota

    @property
    def _quota(self) -> MailboxQuota | None:
        return self._factory.quota

    def _quota_capabilities(self) -> list[str]:
        """RFC 9208 §3.1: QUOTA with the resources we count (none without quotas at all)."""
        if self._quota is None:
            return []
        return ["QUOTA", "QUOTA=RES-STORAGE", "QUOTA=RES-MESSAGE"]

    def _quota_commands(self) -> dict[bytes, Callable[[bytes, Reader, bool],
                                                      bytes | Deferred[bytes]]]:
        """The commands to add to the session's table (all in the authenticated states)."""
        if self._quota is None:
            return {}
        return {b"GETQUOTAROOT": self._do_getquotaroot, b"GETQUOTA": self._do_getquota,
                b"SETQUOTA": self._do_setquota}

    def _quota_limits(self) -> Limits | None:
        assert self._quota is not None and self._mailbox is not None
        return self._quota.limits_for(self._mailbox)

    def _do_getquotaroot(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.space()
        name = self._mailbox_name(reader)
        reader.end()
        # An atom where it is one (INBOX), else the quoted form mailbox responses use.
        plain = name.isascii() and name.isalnum()
        raw = astring(name.encode()) if plain else encode_name(name, utf8=self.utf8)
        assert self._mailbox is not None
        try:
            path = self._store.folder_path(self._mailbox, name)
        except InvalidFolderNameError:
            return tagged(tag, NO, "No such mailbox", "NONEXISTENT")
        limits = self._quota_limits()

        def answer(exists: bool) -> bytes | Deferred[bytes]:
            # RFC 9208 §4.3.2: GETQUOTAROOT of a mailbox that does not exist is an error.
            if not exists and name.upper() != INBOX:
                return tagged(tag, NO, "No such mailbox", "NONEXISTENT")
            if limits is None:
                # RFC 9208 §4.3.2: a mailbox without quota roots lists none.
                self.write(untagged(b"QUOTAROOT " + raw))
                return tagged(tag, OK, "GETQUOTAROOT completed")
            return self._report(tag, limits, "GETQUOTAROOT", b"QUOTAROOT " + raw + b' ""')

        found: Deferred[bool] = self.run(os.path.isdir, path)
        return found.addCallback(answer)

    def _do_getquota(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.space()
        root = reader.astring()
        reader.end()
        limits = self._quota_limits()
        if root != ROOT.encode() or limits is None:
            return tagged(tag, NO, "No such quota root", "NONEXISTENT")
        return self._report(tag, limits, "GETQUOTA", None)

    def _do_setquota(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.space()
        reader.astring()
        # RFC 9208 §4.2.3: limits are the administrator's, in the server's configuration.
        return tagged(tag, NO, "Quotas are set by the administrator", "NOPERM")

    def _report(self, tag: bytes, limits: Limits, verb: str,
                first: bytes | None) -> Deferred[bytes]:
        assert self._quota is not None and self._mailbox is not None

        def answer(usage: Usage) -> bytes:
            if first is not None:
                self.write(untagged(first))
            self.write(untagged(quota_line(limits, usage)))
            return tagged(tag, OK, f"{verb} completed")

        def failed(_: object) -> bytes:
            return tagged(tag, NO, "Cannot read the quota now, try again", "UNAVAILABLE")

        d: Deferred[Usage] = self.run(self._quota.usage, self._mailbox)
        return d.addCallbacks(answer, failed)

    def _quota_guard(self, func: Callable[..., T], size: int, count: int) -> Callable[..., T]:
        """``func`` (run in a disk thread) preceded by the quota check and followed by the
        accounting of ``count`` messages of ``size`` bytes in all; ``func`` itself without
        quotas. The check raises MailboxFullError, which ``quota_refusal`` answers."""
        quota = self._quota
        mailbox = self._mailbox
        if quota is None or mailbox is None or quota.limits_for(mailbox) is None:
            return func

        def guarded(*args: Any) -> T:
            return quota.store_within(mailbox, size, count, func, *args)

        return guarded


def quota_refusal(tag: bytes, failure: Any) -> bytes | None:
    """NO [OVERQUOTA] for a message refused by the quota (RFC 9208 §5.3) or by a full file
    system (as Dovecot answers ENOSPC: the client's advice is the same, make room), else None."""
    if failure.check(MailboxFullError):
        return tagged(tag, NO, "Mailbox is over its quota", OVERQUOTA)
    if is_no_space(failure.value):
        log.warn("imap: no space to store a message: {error}", error=failure.value)
        return tagged(tag, NO, "Not enough disk space", OVERQUOTA)
    return None
