"""The per-folder UID file: UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ and each message's UID, wire
size, mod-sequence and last recorded flags.

``mailsys-uidlist`` in the folder's directory reads (version 2)::

    mailsys-uidlist 2 <uidvalidity> <uidnext> <highestmodseq>
    <uid> <size> <wire size> <modseq> <flags> <key>

one line per message, in UID order; ``<wire size>`` is "-" while it is not known yet (a message
whose name carried no ``,W=`` when it was numbered: its file is read for it only when a client
asks for a size, see Folder.wire_sizes); ``<flags>`` is the message's Maildir flag letters as last
recorded ("-" for none), so that a sync notices a flag change made by another program (a rename)
and gives the message a new mod-sequence (RFC 7162 §3.1). Version 1 files (``mailsys-uidlist 1
<uidvalidity> <uidnext>`` and ``<uid> <size> <wire size> <key>`` lines) are still read: their
messages have no mod-sequence and no recorded flags yet (``modseq`` 0, ``flags`` None), and the
next sync gives them both. The file is replaced atomically (temporary file, fsync, rename,
directory fsync) and only ever changed under the folder's lock. Reading is tolerant: a damaged
line is dropped and reported, so that the folder can keep every UID still known (RFC 3501
§2.3.1.1: UIDs should not change between sessions, and must not without a new UIDVALIDITY).

``mailsys-uidlist.log`` beside it is the UID file's journal of flag changes: a STORE appends
``<modseq> <flags> <key>`` for each message it changed (fsync'd) instead of rewriting the whole
file, which for a large folder cost milliseconds per STORE. Reading the UID file applies the
journal's lines whose mod-sequence is above the message's; every rewrite of the UID file
supersedes the journal and removes it afterwards, so a journal left behind by a crash between
the two is applied again harmlessly (its mod-sequences are not above the new file's).

``mailsys-uidvalidity`` beside it keeps ``<uidvalidity> <uidnext> <modseq ceiling>`` as a floor
for rebuilding the UID file if it is lost: written when the folder's numbering starts, whenever
UIDNEXT could no longer be worked out from the ``,U=`` fields of the file names (see Folder.sync),
and whenever HIGHESTMODSEQ reaches the ceiling, which is then raised by MODSEQ_RESERVE. Every
mod-sequence ever given out is below the ceiling, so a rebuilt folder starts above anything a
client has seen (RFC 7162 §3.1.2.1: HIGHESTMODSEQ never goes backwards) at the price of one
side-file write per MODSEQ_RESERVE changes. Older side files have no ceiling (None).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from mailsys.diskio import fsync_directory

UIDLIST_NAME = "mailsys-uidlist"
JOURNAL_NAME = "mailsys-uidlist.log"
UIDVALIDITY_NAME = "mailsys-uidvalidity"
_MAGIC = "mailsys-uidlist"
_VERSION = "2"
_VERSION_1 = "1"
# RFC 3501 §9 (nz-number): UIDs and UIDVALIDITY are non-zero 32-bit unsigned integers.
MAX_UID = 2**32 - 1
# RFC 7162 §7 (mod-sequence-value): a positive unsigned 63-bit integer.
MAX_MODSEQ = 2**63 - 1
# How far the side file's mod-sequence ceiling runs ahead of HIGHESTMODSEQ.
MODSEQ_RESERVE = 1 << 20
_NO_FLAGS = "-"
_UNKNOWN = "-"  # a wire size not computed yet


class CorruptUidListError(ValueError):
    """The UID file's header cannot be read: nothing in it can be trusted."""


@dataclass(frozen=True)
class UidEntry:
    """One message's line: its UID, the file size its wire size was computed for, its
    mod-sequence and the flag letters it had when that mod-sequence was given (None: unknown,
    a version 1 line or a UID recovered from a file name)."""

    uid: int
    size: int
    wire_size: int | None  # None: not computed yet (the file has not been read for it)
    modseq: int = 0
    flags: frozenset[str] | None = None


@dataclass
class UidList:
    """The contents of one folder's UID file."""

    uidvalidity: int
    uidnext: int
    entries: dict[str, UidEntry] = field(default_factory=dict)  # key -> entry
    damaged_lines: int = 0  # lines dropped while reading (corrupt, duplicate, out of range)
    # RFC 7162 §3.1.2.1: at least every message's mod-sequence; grows on every change,
    # expunges included. 0 only for a version 1 file (no mod-sequence given yet).
    highest_modseq: int = 1


class Floor(NamedTuple):
    """The side file: floors for UIDVALIDITY/UIDNEXT and the mod-sequence ceiling."""

    uidvalidity: int
    uidnext: int
    modseq_ceiling: int | None = None  # None: a side file from before mod-sequences


def parse_uidlist(text: str) -> UidList:
    """Parse the UID file; CorruptUidListError if the header is unusable."""
    lines = text.split("\n")
    header = lines[0].split(" ")
    version_1 = len(header) == 4 and header[1] == _VERSION_1
    if header[0] != _MAGIC or not (version_1 or (len(header) == 5 and header[1] == _VERSION)):
        raise CorruptUidListError("bad header")
    try:
        uidvalidity = int(header[2])
        uidnext = int(header[3])
        highest = 0 if version_1 else int(header[4])
    except ValueError:
        raise CorruptUidListError("bad header numbers") from None
    if (not 0 < uidvalidity <= MAX_UID or not 0 < uidnext <= MAX_UID + 1
            or not (version_1 or 0 < highest <= MAX_MODSEQ)):
        raise CorruptUidListError("header numbers out of range")
    result = UidList(uidvalidity, uidnext, highest_modseq=highest)
    fields = 4 if version_1 else 6
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
        parts = line.split(" ", fields - 1)
        try:
            key = parts[-1]
            if len(parts) != fields or not key or "\r" in key or key in result.entries:
                raise ValueError
            uid, size = int(parts[0]), int(parts[1])
            wire = None if parts[2] == _UNKNOWN and not version_1 else int(parts[2])
            if (not 0 < uid < uidnext or uid in seen_uids or size < 0
                    or (wire is not None and wire < 0)):
                raise ValueError
            if version_1:
                entry = UidEntry(uid, size, wire)
            else:
                modseq, letters = int(parts[3]), parts[4]
                if not 0 < modseq <= highest or not (letters == _NO_FLAGS
                                                     or (letters.isascii() and letters.isalpha())):
                    raise ValueError
                entry = UidEntry(uid, size, wire, modseq,
                                 frozenset() if letters == _NO_FLAGS else frozenset(letters))
        except ValueError:
            result.damaged_lines += 1
            continue
        seen_uids.add(uid)
        result.entries[key] = entry
    return result


def render_uidlist(uids: UidList) -> bytes:
    """The file's bytes (version 2), entries in UID order; every entry must have its
    mod-sequence and flags."""
    out = [f"{_MAGIC} {_VERSION} {uids.uidvalidity} {uids.uidnext} {uids.highest_modseq}\n"]
    for key, entry in sorted(uids.entries.items(), key=lambda item: item[1].uid):
        assert entry.flags is not None and 0 < entry.modseq <= uids.highest_modseq
        letters = "".join(sorted(entry.flags)) or _NO_FLAGS
        wire = _UNKNOWN if entry.wire_size is None else entry.wire_size
        out.append(f"{entry.uid} {entry.size} {wire} {entry.modseq} {letters} {key}\n")
    return "".join(out).encode("utf-8", "surrogateescape")


def read_uidlist(directory: Path) -> UidList | None:
    """The folder's UID file with its journal applied; None if there is none. Raises
    CorruptUidListError."""
    try:
        data = (directory / UIDLIST_NAME).read_bytes()
    except FileNotFoundError:
        return None
    uids = parse_uidlist(data.decode("utf-8", "surrogateescape"))
    try:
        journal = (directory / JOURNAL_NAME).read_bytes()
    except FileNotFoundError:
        return uids
    apply_journal(uids, journal.decode("utf-8", "surrogateescape"))
    return uids


def apply_journal(uids: UidList, text: str) -> None:
    """Apply journal lines to ``uids`` in place: a line counts only if its mod-sequence is above
    the message's. A line cut short by a crash (no newline) was never acknowledged: dropped."""
    if uids.highest_modseq < 1:
        return  # a version 1 file has no mod-sequences for a journal to follow
    lines = text.split("\n")
    lines.pop()  # after the last newline: empty, or an unfinished line
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) != 3:
            continue
        modseq_text, letters, key = parts
        entry = uids.entries.get(key)
        if entry is None or not modseq_text.isdigit():
            continue  # expunged since, or damaged
        modseq = int(modseq_text)
        if modseq <= entry.modseq or modseq > MAX_MODSEQ or not (
                letters == _NO_FLAGS or (letters.isascii() and letters.isalpha())):
            continue
        flags = frozenset() if letters == _NO_FLAGS else frozenset(letters)
        uids.entries[key] = UidEntry(entry.uid, entry.size, entry.wire_size, modseq, flags)
        uids.highest_modseq = max(uids.highest_modseq, modseq)


def append_journal(directory: Path, changes: list[tuple[str, int, frozenset[str]]]) -> bool:
    """Record flag changes (key, mod-sequence, flags) durably in the journal; False, writing
    nothing, when its last line was cut short (a failed or interrupted append): a line appended
    after that fragment would be unreadable, so the caller rewrites the UID file instead."""
    path = directory / JOURNAL_NAME
    text = "".join(f"{modseq} {''.join(sorted(flags)) or _NO_FLAGS} {key}\n"
                   for key, modseq, flags in changes)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            return False
        view = memoryview(text.encode("utf-8", "surrogateescape"))
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if not size:
        fsync_directory(directory)  # a new journal: its name must survive a crash too
    return True


def read_uidvalidity_floor(directory: Path) -> Floor | None:
    """The side file's floors, or None if missing or unreadable (an unreadable ceiling alone
    reads as None: the rebuild then falls back to the clock)."""
    try:
        parts = (directory / UIDVALIDITY_NAME).read_text("ascii").split()
        uidvalidity, uidnext = int(parts[0]), int(parts[1])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    if not 0 < uidvalidity <= MAX_UID or not 0 < uidnext <= MAX_UID + 1:
        return None
    ceiling: int | None = None
    if len(parts) > 2 and parts[2].isdigit() and 0 < int(parts[2]) <= MAX_MODSEQ:
        ceiling = int(parts[2])
    return Floor(uidvalidity, uidnext, ceiling)


def write_state(directory: Path, uids: UidList, *, floor: bool,
                modseq_ceiling: int | None = None) -> None:
    """Replace the UID file (and with ``floor`` the side file, with ``modseq_ceiling``)
    atomically and durably."""
    files = [(UIDLIST_NAME, render_uidlist(uids))]
    if floor:
        ceiling = f" {modseq_ceiling}" if modseq_ceiling is not None else ""
        files.append((UIDVALIDITY_NAME,
                      f"{uids.uidvalidity} {uids.uidnext}{ceiling}\n".encode()))
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
    # Only now that the new file is durable: the journal it supersedes goes.
    (directory / JOURNAL_NAME).unlink(missing_ok=True)
