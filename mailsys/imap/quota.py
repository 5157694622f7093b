"""The IMAP QUOTA extension (RFC 9208) and the quota check of APPEND and COPY, as a command
group over a ``CommandContext`` (mailsys.imap.context).

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
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailsys.delivery.quota import Limits, MailboxFullError, MailboxQuota, Usage
from mailsys.diskio import is_no_space
from mailsys.imap.context import AUTHED, CommandContext, CommandSpec
from mailsys.imap.names import encode_name
from mailsys.imap.parser import Reader
from mailsys.imap.responses import (
    NO_DISK_SPACE,
    NO_QUOTA_ROOT,
    NONEXISTENT,
    OVER_QUOTA,
    QUOTA_BY_ADMINISTRATOR,
    QUOTA_UNREADABLE,
    astring,
    completed,
    untagged,
)
from mailsys.mailbox.store import INBOX, InvalidFolderNameError

log = Logger(namespace="mailsys.imap")
T = TypeVar("T")
ROOT = ""


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


class QuotaCommands:
    """GETQUOTAROOT, GETQUOTA and SETQUOTA, and the quota guard of messages stored by a client."""

    def __init__(self, ctx: CommandContext, quota: MailboxQuota | None) -> None:
        self._ctx = ctx
        self._quota = quota  # the listener's (set_quota), None without quotas

    def capabilities(self) -> list[str]:
        """RFC 9208 §3.1: QUOTA with the resources we count (none without quotas at all)."""
        if self._quota is None:
            return []
        return ["QUOTA", "QUOTA=RES-STORAGE", "QUOTA=RES-MESSAGE"]

    def commands(self) -> dict[bytes, CommandSpec]:
        """This group's entries of the dispatch table (all in the authenticated states)."""
        if self._quota is None:
            return {}
        return {b"GETQUOTAROOT": CommandSpec(self._do_getquotaroot, AUTHED),
                b"GETQUOTA": CommandSpec(self._do_getquota, AUTHED),
                b"SETQUOTA": CommandSpec(self._do_setquota, AUTHED)}

    def _limits(self) -> Limits | None:
        assert self._quota is not None
        return self._quota.limits_for(self._ctx.user)

    def _do_getquotaroot(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.space()
        name = self._ctx.mailbox_name(reader)
        reader.end()
        # An atom where it is one (INBOX), else the quoted form mailbox responses use.
        plain = name.isascii() and name.isalnum()
        raw = astring(name.encode()) if plain else encode_name(name, utf8=self._ctx.utf8)
        try:
            path = self._ctx.store.folder_path(self._ctx.user, name)
        except InvalidFolderNameError:
            return NONEXISTENT.to(tag)
        limits = self._limits()

        def answer(exists: bool) -> bytes | Deferred[bytes]:
            # RFC 9208 §4.3.2: GETQUOTAROOT of a mailbox that does not exist is an error.
            if not exists and name.upper() != INBOX:
                return NONEXISTENT.to(tag)
            if limits is None:
                # RFC 9208 §4.3.2: a mailbox without quota roots lists none.
                self._ctx.write(untagged(b"QUOTAROOT " + raw))
                return completed(tag, "GETQUOTAROOT")
            return self._report(tag, limits, "GETQUOTAROOT", b"QUOTAROOT " + raw + b' ""')

        found: Deferred[bool] = self._ctx.run(os.path.isdir, path)
        return found.addCallback(answer)

    def _do_getquota(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.space()
        root = reader.astring()
        reader.end()
        limits = self._limits()
        if root != ROOT.encode() or limits is None:
            return NO_QUOTA_ROOT.to(tag)
        return self._report(tag, limits, "GETQUOTA", None)

    def _do_setquota(self, tag: bytes, reader: Reader, uid: bool) -> bytes:
        reader.space()
        reader.astring()
        # RFC 9208 §4.2.3: limits are the administrator's, in the server's configuration.
        return QUOTA_BY_ADMINISTRATOR.to(tag)

    def _report(self, tag: bytes, limits: Limits, verb: str,
                first: bytes | None) -> Deferred[bytes]:
        assert self._quota is not None

        def answer(usage: Usage) -> bytes:
            if first is not None:
                self._ctx.write(untagged(first))
            self._ctx.write(untagged(quota_line(limits, usage)))
            return completed(tag, verb)

        def failed(_: object) -> bytes:
            return QUOTA_UNREADABLE.to(tag)

        d: Deferred[Usage] = self._ctx.run(self._quota.usage, self._ctx.user)
        return d.addCallbacks(answer, failed)

    def guard(self, func: Callable[..., T], size: int, count: int) -> Callable[..., T]:
        """``func`` (run in a disk thread) preceded by the quota check and followed by the
        accounting of ``count`` messages of ``size`` bytes in all; ``func`` itself without
        quotas. The check raises MailboxFullError, which ``quota_refusal`` answers."""
        quota = self._quota
        mailbox = self._ctx.mailbox
        if quota is None or mailbox is None or quota.limits_for(mailbox) is None:
            return func

        def guarded(*args: Any) -> T:
            return quota.store_within(mailbox, size, count, func, *args)

        return guarded


def quota_refusal(tag: bytes, failure: Any) -> bytes | None:
    """NO [OVERQUOTA] for a message refused by the quota (RFC 9208 §5.3) or by a full file
    system (as Dovecot answers ENOSPC: the client's advice is the same, make room), else None."""
    if failure.check(MailboxFullError):
        return OVER_QUOTA.to(tag)
    if is_no_space(failure.value):
        log.warn("imap: no space to store a message: {error}", error=failure.value)
        return NO_DISK_SPACE.to(tag)
    return None
