"""Adding messages to a folder: IMAP APPEND, and COPY/MOVE from another folder (blocking).

A message enters a folder as a Maildir writer would add it (a new unique name, written in tmp/,
fsync'd, renamed into place), then the folder is synced so that it gets the next UID, which is
returned (RFC 4315 UIDPLUS). Copies get a fresh unique name with the size fields but never the
source's ``,U=``: a UID is only meaningful in its own folder, and a stale one would mislead the
target's next UID-file rebuild. Copies are hard links where the file system allows (a flag change
renames and never rewrites, so sharing the inode is safe), as Dovecot does.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO

from mailsys.diskio import fsync_directory, write_file_synced
from mailsys.mailbox.folder import Folder, MessageInfo
from mailsys.mailbox.names import parse_name, render_flags
from mailsys.mailbox.uidlist import UIDLIST_NAME
from mailsys.mailbox.wire import WireEncoder, wire_size

_sequence = itertools.count(1)
_COPY_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Added:
    """Where messages went: the target's UIDVALIDITY and (source UID or 0, new UID) pairs."""

    uidvalidity: int
    uids: tuple[tuple[int, int], ...]


def unique_name() -> str:
    """A Maildir unique name (cr.yp.to/proto/maildir: time.MusecPpidQn.host)."""
    now = time.time()
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"
    return f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{os.getpid()}Q{next(_sequence)}.{host}"


def stored_form(data: bytes) -> bytes:
    """The bytes to store for a message a client sent: LF line ends, as our delivery writes,
    when that is exact (every LF has its CR, no lone CR); otherwise the bytes as sent."""
    crlf = data.count(b"\r\n")
    if crlf and crlf == data.count(b"\n") and crlf == data.count(b"\r"):
        return data.replace(b"\r\n", b"\n")
    return data


def _numbered(folder: Folder) -> None:
    """Give a folder its UID file before a message is put into cur/ behind sync's back:
    a cur/ message in a folder without one would look like a lost UID file."""
    if not (folder.path / UIDLIST_NAME).exists():
        folder.sync()


def _file_name(key: str, size: int, wire: int, flags: frozenset[str]) -> str:
    return f"{key},S={size},W={wire}:2,{render_flags(flags)}"


def _uids_of(folder: Folder, keys: list[tuple[int, str]]) -> Added:
    result = folder.sync()
    by_key = {info.key: info.uid for info in result.messages}
    return Added(result.uidvalidity,
                 tuple((source, by_key[key]) for source, key in keys if key in by_key))


def append_message(folder: Folder, data: bytes, flags: frozenset[str],
                   internal_date: float | None = None) -> Added:
    """Store ``data`` in ``folder`` with ``flags`` and the given INTERNALDATE (mtime)."""
    _numbered(folder)
    stored = stored_form(data)
    key = unique_name()
    tmp = folder.path / "tmp" / key
    write_file_synced(tmp, stored)
    try:
        if internal_date is not None:
            os.utime(tmp, (internal_date, internal_date))
        name = _file_name(key, len(stored), wire_size(stored), flags)
        os.rename(tmp, folder.path / "cur" / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(folder.path / "cur")
    return _uids_of(folder, [(0, key)])


def append_file(folder: Folder, source: IO[bytes], flags: frozenset[str],
                internal_date: float | None = None) -> Added:
    """Like append_message, for a message in an open file (a large APPEND literal the IMAP
    parser spooled to disk): copied in chunks, never whole in memory, and stored as sent."""
    _numbered(folder)
    key = unique_name()
    tmp = folder.path / "tmp" / key
    encoder = WireEncoder(stuff_dots=False)
    size = wire = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            while chunk := source.read(_COPY_CHUNK):
                size += len(chunk)
                wire += len(encoder.feed(chunk))
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            wire += len(encoder.finish())
            os.fsync(fd)
        finally:
            os.close(fd)
        if internal_date is not None:
            os.utime(tmp, (internal_date, internal_date))
        os.rename(tmp, folder.path / "cur" / _file_name(key, size, wire, flags))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(folder.path / "cur")
    return _uids_of(folder, [(0, key)])


def _locate(folder: Folder, info: MessageInfo) -> str | None:
    """The message's current path: its last known name, or found again by key."""
    path = f"{folder.path}/cur/{info.name}"
    if os.path.exists(path):
        return path
    for sub in ("cur", "new"):
        try:
            names = os.listdir(f"{folder.path}/{sub}")
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith(info.key) and parse_name(name).key == info.key:
                return f"{folder.path}/{sub}/{name}"
    return None


def copy_messages(source: Folder, infos: Iterable[MessageInfo], target: Folder,
                  flags_of: Callable[[MessageInfo], frozenset[str]]) -> Added:
    """Copy messages into ``target`` (keeping INTERNALDATE) with the flags ``flags_of`` gives.

    Messages expunged from the source meanwhile are left out of the result.
    """
    _numbered(target)
    placed: list[tuple[int, str]] = []
    cur = target.path / "cur"
    for info in infos:
        name_key = unique_name()
        name = _file_name(name_key, info.size, info.wire_size, flags_of(info))
        for _ in range(3):
            path = _locate(source, info)
            if path is None:
                break
            try:
                os.link(path, cur / name)
            except FileNotFoundError:
                continue  # renamed by a flag change meanwhile: look again
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                if not _copy_bytes(path, target, name_key, name, info.internal_date):
                    continue
            placed.append((info.uid, name_key))
            break
    if placed:
        fsync_directory(cur)
    return _uids_of(target, placed)


def _copy_bytes(path: str, target: Folder, key: str, name: str, mtime: float) -> bool:
    """Copy a file where hard links are not possible; False if the source vanished."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    tmp = target.path / "tmp" / key
    write_file_synced(tmp, data)
    os.utime(tmp, (mtime, mtime))
    os.rename(tmp, target.path / "cur" / name)
    return True
