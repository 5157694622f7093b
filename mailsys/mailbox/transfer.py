"""Adding messages to a folder: IMAP APPEND, and COPY/MOVE from another folder (blocking).

A message enters a folder as local delivery adds one, by the rules of mailsys.mailbox.layout (a
new unique name, written in tmp/, fsync'd, renamed into place), then the folder is synced so that
it gets the next UID, which is returned (RFC 4315 UIDPLUS). Copies get a fresh unique name with
the size fields but never the source's ``,U=``: a UID is only meaningful in its own folder, and a
stale one would mislead the target's next UID-file rebuild. Copies are hard links where the file
system allows (a flag change renames and never rewrites, so sharing the inode is safe), as
Dovecot does.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from mailsys.diskio import fsync_directory
from mailsys.mailbox.folder import Folder, MessageInfo
from mailsys.mailbox.layout import (
    file_name,
    format_base,
    locate_message,
    stored_form,
    unique_name,
    write_message,
    write_streamed,
)
from mailsys.mailbox.uidlist import UIDLIST_NAME
from mailsys.mailbox.wire import WireEncoder, wire_size

_COPY_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Added:
    """Where messages went: the target's UIDVALIDITY and (source UID or 0, new UID) pairs."""

    uidvalidity: int
    uids: tuple[tuple[int, int], ...]


def _numbered(folder: Folder) -> None:
    """Give a folder its UID file before a message is put into cur/ behind sync's back:
    a cur/ message in a folder without one would look like a lost UID file."""
    if not (folder.path / UIDLIST_NAME).exists():
        folder.sync()


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
    name = file_name(format_base(key, size=len(stored), wire_size=wire_size(stored)), flags)
    write_message(folder.path, "cur", name, stored, mtime=internal_date)
    fsync_directory(folder.path / "cur")
    return _uids_of(folder, [(0, key)])


def append_file(folder: Folder, source: IO[bytes], flags: frozenset[str],
                internal_date: float | None = None) -> Added:
    """Like append_message, for a message in an open file (a large APPEND literal the IMAP
    parser spooled to disk): copied in chunks, never whole in memory, and stored as sent."""
    _numbered(folder)
    key = unique_name()
    encoder = WireEncoder(stuff_dots=False)
    size = wire = 0

    def chunks() -> Iterator[bytes]:
        nonlocal size, wire
        while chunk := source.read(_COPY_CHUNK):
            size += len(chunk)
            wire += len(encoder.feed(chunk))
            yield chunk
        wire += len(encoder.finish())

    def name() -> str:
        return file_name(format_base(key, size=size, wire_size=wire), flags)

    write_streamed(folder.path, "cur", key, chunks(), name, mtime=internal_date)
    fsync_directory(folder.path / "cur")
    return _uids_of(folder, [(0, key)])


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
        name = file_name(format_base(name_key, size=info.size, wire_size=info.wire_size),
                         flags_of(info))
        for _ in range(3):
            path = locate_message(source.path, info.name, info.key)
            if path is None:
                break
            try:
                os.link(path, cur / name)
            except FileNotFoundError:
                continue  # renamed by a flag change meanwhile: look again
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                if not _copy_bytes(path, target, name, info.internal_date):
                    continue
            placed.append((info.uid, name_key))
            break
    if placed:
        fsync_directory(cur)
    return _uids_of(target, placed)


def _copy_bytes(path: str, target: Folder, name: str, mtime: float) -> bool:
    """Copy a file where hard links are not possible; False if the source vanished."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    write_message(target.path, "cur", name, data, mtime=mtime)
    return True
