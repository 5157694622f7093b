"""The pickup directory and its drop files: how a local program hands a message to the server
without a password, as Postfix's maildrop does, and how the server reads it back.

Layout of the directory (mode 3730: setgid and sticky; owner the server's user, group the users
allowed to submit, who may create files there but not list, read or remove other users' files):

    <random>.tmp    being written by ``mailsys-sendmail``; ignored, removed when stale
    <random>.drop   complete (fsync'd, then renamed from .tmp): the server queues it, then
                    unlinks it
    refused/        (mode 0700) drops the server could not use, kept for the administrator

A drop file is one line ``mailsys-drop 1 <JSON>`` (sender, recipients, full name), then the
message as the program gave it. Who wrote it is not in the file: the server takes the local
user from the file's owner (st_uid), which the kernel sets and a writer cannot forge. A drop
waits there while no server runs and is queued when one starts: nothing is lost.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"mailsys-drop 1 "
DROP_SUFFIX = ".drop"
TEMP_SUFFIX = ".tmp"
REFUSED_DIR = "refused"
# rwx for the server's user, -wx for the submitters' group; setgid so that every drop gets the
# directory's group (the server reads it through the group), sticky so that nobody but the
# owner of a file (and the directory's owner) can rename or remove it.
DIRECTORY_MODE = 0o3730
# Read by the group (the server, when it runs as another user than the writer); the random
# name, in a directory the group cannot list, keeps other submitters from finding it.
FILE_MODE = 0o640
# The first line (the JSON request) is never longer than this.
MAX_REQUEST_LINE = 1024 * 1024


class DropError(Exception):
    """A drop file that cannot be used; the text says why, for the log."""


@dataclass(frozen=True)
class DropRequest:
    """What the submitting program asked for: the envelope, before the server checks it.

    ``sender`` None means "the local user's own address"; "" is the null sender.
    """

    sender: str | None
    recipients: tuple[str, ...]
    full_name: str | None = None

    def to_line(self) -> bytes:
        data = {"sender": self.sender, "recipients": list(self.recipients),
                "full_name": self.full_name}
        return MAGIC + json.dumps(data, ensure_ascii=False).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> DropRequest:
        if not line.startswith(MAGIC) or not line.endswith(b"\n"):
            raise DropError("not a drop file (bad first line)")
        try:
            data = json.loads(line[len(MAGIC):])
            sender = data["sender"]
            recipients = tuple(str(r) for r in data["recipients"])
            full_name = data.get("full_name")
        except (ValueError, KeyError, TypeError) as exc:
            raise DropError(f"unreadable request line: {exc}") from None
        if sender is not None and not isinstance(sender, str):
            raise DropError("unreadable request line: sender is not a string")
        if full_name is not None and not isinstance(full_name, str):
            raise DropError("unreadable request line: full_name is not a string")
        return cls(sender, recipients, full_name)


@dataclass(frozen=True)
class Drop:
    """A complete drop file as the server reads it."""

    name: str
    uid: int
    request: DropRequest
    message: bytes  # as written: LF or CRLF line ends


def prepare_directory(directory: Path, group: str | None = None) -> None:
    """Create the pickup directory (blocking, at start-up) with its mode and group.

    Without ``group`` the directory keeps the group it gets from its parent or the process.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if group is not None:
        gid = grp.getgrnam(group).gr_gid
        if directory.stat().st_gid != gid:
            os.chown(directory, -1, gid)
    if stat.S_IMODE(directory.stat().st_mode) != DIRECTORY_MODE:
        os.chmod(directory, DIRECTORY_MODE)
    refused = directory / REFUSED_DIR
    refused.mkdir(exist_ok=True)
    os.chmod(refused, 0o700)  # not the setgid bit mkdir inherits: only the server looks here


class DropWriter:
    """Writes one drop file: the request line, then the message in pieces, then commit()."""

    def __init__(self, directory: Path, request: DropRequest) -> None:
        self._directory = directory
        self._name = secrets.token_hex(16)
        self._temp = directory / (self._name + TEMP_SUFFIX)
        self._fd = os.open(self._temp,
                           os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                           FILE_MODE)
        self.size = 0
        try:
            self._write_all(request.to_line())
        except BaseException:
            self.abort()
            raise

    @property
    def name(self) -> str:
        return self._name

    def write(self, data: bytes) -> None:
        self._write_all(data)
        self.size += len(data)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def commit(self) -> str:
        """Make the drop durable and visible to the server; return its name."""
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.rename(self._temp, self._directory / (self._name + DROP_SUFFIX))
        # The writer may not open a directory it cannot read; then the rename is made durable
        # by the next fsync of the file system (as Postfix's postdrop, which fsyncs the file).
        with contextlib.suppress(OSError):
            fd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self._name

    def abort(self) -> None:
        """Remove the unfinished file (a refused or interrupted submission)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temp)


def list_drops(directory: Path, limit: int) -> list[str]:
    """Names of complete drops, oldest first, at most ``limit`` (blocking)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    drops: list[tuple[float, str]] = []
    for entry in entries:
        if entry.name.endswith(DROP_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                drops.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
    drops.sort()
    return [name for _, name in drops[:limit]]


def remove_stale_temporaries(directory: Path, older_than: float, now: float) -> int:
    """Remove .tmp files left by writers that died; return how many (blocking)."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not entry.name.endswith(TEMP_SUFFIX):
            continue
        with contextlib.suppress(FileNotFoundError):
            if now - entry.stat(follow_symlinks=False).st_mtime > older_than:
                os.unlink(entry.path)
                removed += 1
    return removed


def read_drop(directory: Path, name: str, max_size: int) -> Drop:
    """Read a complete drop (blocking); DropError if it cannot be used."""
    try:
        fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DropError("a symbolic link, not a file") from None
        raise
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DropError("not a regular file")
        if info.st_nlink != 1:
            # A hard link to someone else's file would be queued in their name.
            raise DropError(f"has {info.st_nlink} links; only a file of its own is accepted")
        line = file.readline(MAX_REQUEST_LINE)
        request = DropRequest.from_line(line)
        message = file.read(max_size + 1)
        if len(message) > max_size:
            raise DropError(f"message larger than {max_size} bytes")
    return Drop(name=name, uid=info.st_uid, request=request, message=message)


def refuse(directory: Path, name: str) -> None:
    """Move an unusable drop aside into refused/ (blocking)."""
    (directory / REFUSED_DIR).mkdir(mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.rename(directory / name, directory / REFUSED_DIR / name)


def remove(directory: Path, name: str) -> None:
    """Unlink a queued drop (blocking)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / name)
