"""The Maildir on-disk format, in one place: where mailboxes and folders live, how message files
are named, and which bytes a message file holds.

Local delivery (mailsys.delivery.maildir), APPEND/COPY (mailsys.mailbox.transfer), the folder
tree (mailsys.mailbox.hierarchy) and the read model (mailsys.mailbox.store, .folder) all take
these rules from here, so a file one of them writes is one every other reads.

- Paths: ``root/<domain>/<user>/`` is a mailbox's INBOX, a Maildir++ folder ``A.B`` is the
  directory ``.A.B`` under it (Courier's Maildir++, as Dovecot lays it out). Every directory name
  must fit the file system's NAME_MAX: a longer name is refused before the disk is touched.
- Unique names: ``time.unique.host`` (cr.yp.to/proto/maildir). Local delivery derives the unique
  part from the queue id and the recipient (exactly once across a crash); APPEND and COPY draw
  one (``M<usec>P<pid>Q<n>``, the spec's recommended form).
- Name fields: ``unique[,S=size][,W=wiresize][,U=uid]:2,FLAGS``; ``,S=`` and ``,W=`` are the
  Courier/Dovecot size fields, ``,U=`` carries the UID as mbsync and OfflineIMAP do, and the
  ``:2,`` info lists the flag letters in ASCII order (cr.yp.to/proto/maildir).
- Stored form: a message is stored with LF line ends when that is exact (every line end is
  CRLF), as mail readers expect of a Maildir; otherwise the bytes as they came. Sizes reported
  to clients are always the wire size (mailsys.mailbox.wire).

Everything is pure string work except the functions marked "Disk thread", which block.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mailsys.diskio import Staged, finish, fsync_directory, write_all
from mailsys.mailbox.wire import wire_size

# --- paths ---------------------------------------------------------------------------------------

INBOX = "INBOX"
# Maildir++ separates hierarchy levels with "." in directory names.
HIERARCHY_SEPARATOR = "."
SUBDIRS = ("cur", "new", "tmp")
# Maildir++: every folder below the INBOX holds an empty file of this name.
FOLDER_MARKER = "maildirfolder"
# POSIX NAME_MAX as nearly every Linux file system has it (ext4, xfs, btrfs, tmpfs): the longest
# directory entry in bytes. Maildir++ is flat, so a folder 100 levels deep is one entry too.
NAME_MAX = 255


class InvalidMailboxNameError(ValueError):
    """A mailbox name that cannot name a Maildir under the root."""


class InvalidFolderNameError(ValueError):
    """A folder name that cannot be a Maildir++ folder."""


class NameTooLongError(InvalidFolderNameError):
    """A folder whose Maildir++ directory name would be longer than NAME_MAX bytes.

    Refused before anything touches the disk, so CREATE and RENAME never meet ENAMETOOLONG
    (an IMAP server answers it with NO [LIMIT], RFC 5530 §3).
    """


def _fits(component: str) -> bool:
    """Whether ``component`` is at most NAME_MAX bytes as the file system sees it."""
    try:
        return len(os.fsencode(component)) <= NAME_MAX
    except UnicodeEncodeError:  # a lone surrogate: no file name can hold it
        return False


def mailbox_path(root: Path, mailbox: str) -> Path:
    """``root/<domain>/<user>``: the INBOX Maildir of canonical ``user@domain``.

    The domain is lowercased (domains are case-insensitive, RFC 5321 §2.4); the local part is
    kept as given. InvalidMailboxNameError for a name that is malformed, would leave the root, is
    hidden or a Maildir++ folder (leading "."), or does not fit a directory entry.
    """
    user, at, domain = mailbox.rpartition("@")
    domain = domain.lower()
    for part in (user, domain):
        if (not at or not part or part.startswith(".") or "/" in part or "\0" in part
                or not _fits(part)):
            raise InvalidMailboxNameError(f"not a usable mailbox name: {mailbox!r}")
    return Path(root) / domain / user


def folder_directory(name: str) -> str | None:
    """The directory (under the INBOX) of folder ``name``, None for the INBOX itself.

    Maildir++ names a folder ".Name", a subfolder ".Name.Sub" (so "." separates levels).
    InvalidFolderNameError for a name that cannot be one; NameTooLongError (a subclass) when the
    directory name would not fit NAME_MAX.
    """
    if name.upper() == INBOX:
        return None
    parts = name.split(HIERARCHY_SEPARATOR)
    if (not name or any(not p for p in parts) or "/" in name or "\0" in name
            or any(c in name for c in "\r\n") or parts[0].upper() == INBOX):
        raise InvalidFolderNameError(f"not a usable folder name: {name!r}")
    directory = HIERARCHY_SEPARATOR + name
    if not _fits(directory):
        raise NameTooLongError(f"folder name too long: {len(name)} characters")
    return directory


def folder_path(inbox: Path, name: str) -> Path:
    """The Maildir of folder ``name`` in the mailbox whose INBOX is ``inbox``."""
    directory = folder_directory(name)
    return inbox if directory is None else inbox / directory


def folder_names(inbox: Path) -> list[str]:
    """Disk thread: every folder below the INBOX (not the INBOX itself), sorted."""
    try:
        entries = list(os.scandir(inbox))
    except FileNotFoundError:
        return []
    return sorted(entry.name[1:] for entry in entries
                  if entry.name.startswith(HIERARCHY_SEPARATOR) and entry.name not in (".", "..")
                  and entry.is_dir())


def locate_message(directory: Path, name: str, key: str) -> str | None:
    """Disk thread: the path of the message last seen as cur/``name`` in Maildir ``directory``,
    or found again by its ``key`` in cur/ or new/ (a flag change renames it); None if gone."""
    path = f"{directory}/cur/{name}"
    if os.path.exists(path):
        return path
    return find_message(directory, key)


def find_message(directory: Path | str, key: str) -> str | None:
    """Disk thread: the path of the message with ``key`` in cur/ or new/ of Maildir
    ``directory``, by a directory scan (the slow path); None if it is gone."""
    for sub in ("cur", "new"):
        try:
            names = os.listdir(f"{directory}/{sub}")
        except FileNotFoundError:
            continue
        for candidate in names:
            if candidate.startswith(key) and parse_name(candidate).key == key:
                return f"{directory}/{sub}/{candidate}"
    return None


def create_maildir(directory: Path, *, subfolder: bool = False) -> None:
    """Disk thread: create a Maildir (cur/ new/ tmp/, and the Maildir++ marker for a subfolder)
    and any missing parents, durably: the parent of every entry created is fsync'd.

    Without the parent fsyncs a crash could lose a whole new Maildir, and the first message in
    it, even though its new/ was fsync'd.
    """
    created: list[Path] = []
    missing: list[Path] = []
    parent = directory
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
            created.append(path)
        except FileExistsError:
            pass
    for sub in SUBDIRS:
        try:
            (directory / sub).mkdir(mode=0o700)
            created.append(directory / sub)
        except FileExistsError:
            pass
    if subfolder:
        marker = directory / FOLDER_MARKER
        if not marker.exists():
            marker.touch(mode=0o600)
            created.append(marker)
    for changed in {c.parent for c in created}:
        fsync_directory(changed)


def write_message(maildir: Path | str, sub: str, name: str, stored: bytes, *,
                  mtime: float | None = None, create: bool = False) -> None:
    """Disk thread: put ``stored`` into ``maildir/<sub>/<name>`` the Maildir way.

    Written as tmp/<name>, on disk (data and inode) before the rename into ``sub`` makes it
    visible, so a reader never sees a partial file (cr.yp.to/proto/maildir). The fsync of
    ``sub`` itself is the caller's, so that concurrent writers can share it. With ``create`` a
    missing Maildir is created first (an INBOX's first delivery); never for a folder, which a
    missing tmp/ means was deleted meanwhile.
    """
    finish(stage_message(maildir, sub, name, stored, mtime=mtime, create=create))


def stage_message(maildir: Path | str, sub: str, name: str, stored: bytes, *,
                  mtime: float | None = None, create: bool = False) -> Staged[None]:
    """Disk thread: ``write_message`` in two steps, for a disk pool that makes the files of
    several deliveries durable together (mailsys.diskio.Staged): tmp/<name> is written now;
    once its data is on disk, publishing renames it into ``sub``."""
    root = os.fspath(maildir)
    tmp = f"{root}/tmp/{name}"
    # O_TRUNC, not O_EXCL: a leftover of this very name is an earlier try of this copy.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileNotFoundError:
        if not create:
            raise
        create_maildir(Path(root))
        fd = os.open(tmp, flags, 0o600)

    def discard() -> None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)

    try:
        write_all(fd, stored)
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
    except BaseException:
        os.close(fd)
        discard()
        raise

    def publish() -> None:
        try:
            os.rename(tmp, f"{root}/{sub}/{name}")
        except BaseException:
            discard()
            raise

    return Staged([fd], publish, discard)


def write_streamed(maildir: Path | str, sub: str, key: str, chunks: Iterable[bytes],
                   name: Callable[[], str], *, mtime: float | None = None) -> str:
    """Disk thread: ``write_message`` for a message that comes in chunks (a large APPEND
    literal, never whole in memory): written as tmp/<key>, fsync'd, then renamed into ``sub``
    under ``name()``, asked after the last chunk because the size fields are known only then.
    Returns the file's name."""
    root = os.fspath(maildir)
    tmp = f"{root}/tmp/{key}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            for chunk in chunks:
                write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        final = name()
        os.rename(tmp, f"{root}/{sub}/{final}")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return final



# --- unique names --------------------------------------------------------------------------------

_sequence = itertools.count(1)


def escape_hostname(hostname: str) -> str:
    """The host part of a Maildir name: '/' and ':' cannot appear in it (cr.yp.to/proto/maildir).

    The spec's escapes are \\057 and \\072; the backslash itself is escaped first (as \\134) so
    that the mapping stays unambiguous.
    """
    return hostname.replace("\\", "\\134").replace("/", "\\057").replace(":", "\\072")


def local_host() -> str:
    """This machine's name as the host part of a unique name."""
    return escape_hostname(socket.gethostname()) or "localhost"


def delivery_unique(queue_id: str, address: str, mailbox: str | None) -> str:
    """The unique part of a delivered copy: the queue id and a short hash of the recipient.

    Derived, not drawn, so that a recovered message finds the copy written before a crash. One
    message can have several recipients with the same mailbox (two aliases of one user): the
    hash covers the address as well, so each gets its own, still deterministic, copy.
    """
    key = f"{address}\0{mailbox or ''}".encode()
    digest = hashlib.blake2s(key, digest_size=5).hexdigest().upper()
    return f"Q{queue_id}R{digest}"


_DELIVERED = re.compile(r"\.Q([0-9A-F]+)R[0-9A-F]{10}\.")


def delivered_queue_id(name: str) -> str | None:
    """The queue id a Maildir file name was delivered from (see delivery_unique), or None for a
    file this server did not deliver (APPEND, COPY, another program): POP3 and IMAP find a
    message's journey by it."""
    match = _DELIVERED.search(name)
    return match.group(1) if match else None


def delivery_base(received_at: float, queue_id: str, address: str, mailbox: str | None,
                  host: str) -> str:
    """The deterministic "time.unique.host" of one recipient's delivered copy."""
    return f"{int(received_at)}.{delivery_unique(queue_id, address, mailbox)}.{host}"


def unique_name(host: str | None = None, now: float | None = None) -> str:
    """A fresh "time.MusecPpidQn.host" for a message a client adds (cr.yp.to/proto/maildir)."""
    now = time.time() if now is None else now
    host = local_host() if host is None else host
    return f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{os.getpid()}Q{next(_sequence)}.{host}"


def name_prefix(name: str) -> str:
    """ "time.unique." of a Maildir name: a copy's identity whatever follows (the host, which
    may change between a crash and the restart, the size fields, ":2,flags")."""
    time_part, _, rest = name.partition(".")
    unique, _, _ = rest.partition(".")
    return f"{time_part}.{unique}."


# --- name fields and flags -----------------------------------------------------------------------

# The flags of the Maildir spec ("2," info): each is one ASCII letter, listed in ASCII order.
DRAFT = "D"
FLAGGED = "F"
PASSED = "P"  # resent/forwarded/bounced
REPLIED = "R"
SEEN = "S"
TRASHED = "T"  # marked for deletion (IMAP \Deleted)
SYSTEM_FLAGS = frozenset({DRAFT, FLAGGED, PASSED, REPLIED, SEEN, TRASHED})

_FIELD = re.compile(r"^([SWU])=(\d{1,18})$")
# The names we write ourselves, parsed in one step (the general path handles any other).
_OURS = re.compile(r"^([^,:]+),S=(\d{1,18}),W=(\d{1,18}),U=([1-9]\d{0,17})(?::2,([A-Za-z]*))?$")

# Names are immutable strings and a folder's sync parses every one of them each time it scans:
# the parses of this many names are kept, so a rescan of a large unchanged folder costs one
# dictionary lookup per file instead of a parse (a few MiB for the whole cache).
PARSED_NAMES_KEPT = 65536


@dataclass(frozen=True, slots=True)
class MaildirName:
    """A parsed message file name."""

    base: str  # everything before ":", verbatim (a flag change keeps it byte for byte)
    key: str  # the base without our size/UID fields: the message's identity in its folder
    size: int | None  # ,S=: the file's size in bytes
    wire_size: int | None  # ,W=: the size with CRLF line ends
    uid: int | None  # ,U=: the UID the message had when it was moved into cur/
    flags: frozenset[str]  # the letters after ":2,"

    def with_flags(self, flags: frozenset[str]) -> str:
        """The file name of this message carrying ``flags`` instead (base unchanged)."""
        return file_name(self.base, flags)

    def without_uid(self) -> str:
        """The file name with the key, sizes and flags but no ``,U=``: the name a message
        takes into another folder, where its UID means nothing."""
        if self.size is None or self.wire_size is None:
            return file_name(self.key, self.flags)
        return file_name(format_base(self.key, size=self.size, wire_size=self.wire_size),
                         self.flags)


@functools.lru_cache(maxsize=PARSED_NAMES_KEPT)
def parse_name(name: str) -> MaildirName:
    """Split a Maildir file name into its parts; never fails (a foreign name is all key)."""
    ours = _OURS.match(name)
    if ours is not None:
        key, size, wire, uid, letters = ours.groups()
        base = name.partition(":")[0]
        return MaildirName(base, key, int(size), int(wire), int(uid),
                           frozenset(letters) if letters else frozenset())
    base, colon, info = name.partition(":")
    flags: frozenset[str] = frozenset()
    if colon and info.startswith("2,"):
        flags = frozenset(c for c in info[2:] if c.isascii() and c.isalpha())
    size = wire = uid = None
    key_parts: list[str] = []
    tokens = base.split(",")
    key_parts.append(tokens[0])
    for token in tokens[1:]:
        match = _FIELD.match(token)
        if match is None:
            key_parts.append(token)
            continue
        value = int(match.group(2))
        letter = match.group(1)
        if letter == "S":
            size = value
        elif letter == "W":
            wire = value
        else:
            uid = value if value > 0 else None
    return MaildirName(base, ",".join(key_parts), size, wire, uid, flags)


def format_base(key: str, *, size: int, wire_size: int | None,
                uid: int | None = None) -> str:
    """A message's base name: its key, ``,S=`` and ``,W=`` (left out while the wire size is not
    known: a reader then computes it from the file), and ``,U=`` once it has a UID."""
    fields = f"{key},S={size}" if wire_size is None else f"{key},S={size},W={wire_size}"
    return fields if uid is None else f"{fields},U={uid}"


def render_flags(flags: frozenset[str] | set[str]) -> str:
    """Flags as the Maildir spec writes them: letters in ASCII order, each once."""
    return "".join(sorted(flags))


def file_name(base: str, flags: frozenset[str] | set[str]) -> str:
    """The name of a file in cur/: ``base`` and the ":2," info with ``flags``."""
    return f"{base}:2,{render_flags(flags)}"


def new_name(unique: str, stored: bytes) -> str:
    """The name of a delivered file in new/: ``unique`` and the size fields of ``stored``.

    Files in new/ carry no ":2," info (cr.yp.to/proto/maildir); readers then know both sizes
    (POP3 LIST, IMAP RFC822.SIZE) without opening the file.
    """
    return format_base(unique, size=len(stored), wire_size=wire_size(stored))


# --- stored form ---------------------------------------------------------------------------------

_CRLF = b"\r\n"


def stored_form(message: bytes, header: bytes = b"") -> bytes:
    """The bytes of a Maildir file for ``header`` + ``message``, both given with CRLF line ends.

    LF line ends, as mail readers expect of a Maildir, when that is exact: every LF of the
    message has its CR and there is no lone CR, so the wire form (mailsys.mailbox.wire) gives
    back exactly the bytes received. Otherwise the bytes as they came. The SMTP server refuses
    bare CR and LF (RFC 5321 §2.3.8), so every delivered message converts; a client's APPEND may
    not.
    """
    crlf = message.count(_CRLF)
    if crlf == message.count(b"\n") and crlf == message.count(b"\r"):
        if header:
            return header.replace(_CRLF, b"\n") + message.replace(_CRLF, b"\n")
        return message.replace(_CRLF, b"\n")
    return header + message
