"""The per-folder UID file: UIDVALIDITY, UIDNEXT and each message's UID and wire size.

``mailsys-uidlist`` in the folder's directory reads::

    mailsys-uidlist 1 <uidvalidity> <uidnext>
    <uid> <size> <wire size> <key>

one line per message, in UID order. It is replaced atomically (temporary file, fsync, rename,
directory fsync) and only ever changed under the folder's lock. Reading is tolerant: a damaged
line is dropped and reported, so that the folder can keep every UID still known (RFC 3501
§2.3.1.1: UIDs should not change between sessions, and must not without a new UIDVALIDITY).

``mailsys-uidvalidity`` beside it keeps ``<uidvalidity> <uidnext>`` as a floor for rebuilding the
UID file if it is lost: written when the folder's numbering starts and whenever UIDNEXT could no
longer be worked out from the ``,U=`` fields of the file names (see Folder.sync).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mailsys.diskio import fsync_directory

UIDLIST_NAME = "mailsys-uidlist"
UIDVALIDITY_NAME = "mailsys-uidvalidity"
_MAGIC = "mailsys-uidlist"
_VERSION = "1"
# RFC 3501 §9 (nz-number): UIDs and UIDVALIDITY are non-zero 32-bit unsigned integers.
MAX_UID = 2**32 - 1


class CorruptUidListError(ValueError):
    """The UID file's header cannot be read: nothing in it can be trusted."""


@dataclass
class UidEntry:
    """One message's line: its UID, and the file size its wire size was computed for."""

    uid: int
    size: int
    wire_size: int


@dataclass
class UidList:
    """The contents of one folder's UID file."""

    uidvalidity: int
    uidnext: int
    entries: dict[str, UidEntry] = field(default_factory=dict)  # key -> entry
    damaged_lines: int = 0  # lines dropped while reading (corrupt, duplicate, out of range)


def parse_uidlist(text: str) -> UidList:
    """Parse the UID file; CorruptUidListError if the header is unusable."""
    lines = text.split("\n")
    header = lines[0].split(" ")
    if len(header) != 4 or header[0] != _MAGIC or header[1] != _VERSION:
        raise CorruptUidListError("bad header")
    try:
        uidvalidity = int(header[2])
        uidnext = int(header[3])
    except ValueError:
        raise CorruptUidListError("bad header numbers") from None
    if not 0 < uidvalidity <= MAX_UID or not 0 < uidnext <= MAX_UID + 1:
        raise CorruptUidListError("header numbers out of range")
    result = UidList(uidvalidity, uidnext)
    seen_uids: set[int] = set()
    body = lines[1:]
    if body and body[-1] == "":
        body.pop()  # the final newline
    else:
        # A file that does not end in a newline was cut short: its last line is suspect.
        if body:
            body.pop()
            result.damaged_lines += 1
    for line in body:
        parts = line.split(" ", 3)
        try:
            if len(parts) != 4 or not parts[3] or "\r" in parts[3] or parts[3] in result.entries:
                raise ValueError
            uid, size, wire = int(parts[0]), int(parts[1]), int(parts[2])
            if not 0 < uid < uidnext or uid in seen_uids or size < 0 or wire < 0:
                raise ValueError
        except ValueError:
            result.damaged_lines += 1
            continue
        seen_uids.add(uid)
        result.entries[parts[3]] = UidEntry(uid, size, wire)
    return result


def render_uidlist(uids: UidList) -> bytes:
    """The file's bytes, entries in UID order."""
    out = [f"{_MAGIC} {_VERSION} {uids.uidvalidity} {uids.uidnext}\n"]
    for key, entry in sorted(uids.entries.items(), key=lambda item: item[1].uid):
        out.append(f"{entry.uid} {entry.size} {entry.wire_size} {key}\n")
    return "".join(out).encode("utf-8", "surrogateescape")


def read_uidlist(directory: Path) -> UidList | None:
    """The folder's UID file; None if there is none. Raises CorruptUidListError."""
    try:
        data = (directory / UIDLIST_NAME).read_bytes()
    except FileNotFoundError:
        return None
    return parse_uidlist(data.decode("utf-8", "surrogateescape"))


def read_uidvalidity_floor(directory: Path) -> tuple[int, int] | None:
    """(uidvalidity, uidnext) from the side file, or None if missing or unreadable."""
    try:
        parts = (directory / UIDVALIDITY_NAME).read_text("ascii").split()
        uidvalidity, uidnext = int(parts[0]), int(parts[1])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    if not 0 < uidvalidity <= MAX_UID or not 0 < uidnext <= MAX_UID + 1:
        return None
    return uidvalidity, uidnext


def write_state(directory: Path, uids: UidList, *, floor: bool) -> None:
    """Replace the UID file (and with ``floor`` the side file) atomically and durably."""
    files = [(UIDLIST_NAME, render_uidlist(uids))]
    if floor:
        files.append((UIDVALIDITY_NAME, f"{uids.uidvalidity} {uids.uidnext}\n".encode()))
    temporaries = []
    try:
        for name, data in files:
            # Not a dot name: in a Maildir++ INBOX those are folders.
            tmp = directory / f"{name}.{os.getpid()}.{threading.get_ident()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            temporaries.append(tmp)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        # The side file first: a crash between the renames leaves a floor at least as new.
        for (name, _), tmp in reversed(list(zip(files, temporaries, strict=True))):
            os.replace(tmp, directory / name)
    except BaseException:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
        raise
    fsync_directory(directory)
