"""The user store: who has a mailbox here and their password hash, in one passwd-file.

The file is Dovecot passwd-file compatible, one ``local@domain:{SCHEME}hash[:extra...]`` line per
user, so it can be shared with or imported from Dovecot. Extra colon fields, comments and blank
lines are kept when the file is rewritten. Changes take an exclusive lock on a side file and
replace the file atomically, so the ``mailsys`` command and a running server never corrupt it; a
running server sees the change within a second, without a restart, and at once where it would
otherwise refuse a user (``verify_fresh``, and the SMTP policy's reload before a 550).

An administrator of the web page is marked by ``mailsys_admin=yes`` among the line's extra fields
(Dovecot's sixth field after the hash, space-separated key=value pairs); Dovecot passes fields it
does not know along and ignores them, so the file stays shareable.

The file and its lock follow mailsys.ownership: created 0640 with the server's group, rewritten
keeping owner, group and mode. A server that cannot read a changed file keeps serving the last
copy it read, and says so in one log line naming the file and its permissions.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from twisted.logger import Logger

from mailsys.auth.passwords import UnusableHashError, dummy_hash, hash_password, verify_password
from mailsys.ownership import (
    ServerAccount,
    describe,
    open_lock_file,
    process_account,
    replace_file,
)

# The extra field that marks an administrator of the web page.
ADMIN_FIELD = "mailsys_admin=yes"
# After the hash: uid, gid, gecos, home, shell, extra fields (Dovecot's passwd-file order).
_EXTRA_COLUMNS = 6

# How stale the in-memory copy may be: at most one stat() of the file per this many seconds.
RELOAD_INTERVAL = 1.0

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
                     r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Not in a local part we store: ":" separates passwd-file fields, "/" and "\" would let a
# mailbox name escape the Maildir root, quotes and "@" need a quoted local part we do not keep.
_LOCAL_FORBIDDEN = set(':/\\@"')


class InvalidMailboxError(ValueError):
    """A mailbox name that cannot be stored: it must be ``local@domain``."""


class UserStoreError(Exception):
    """A user store change that cannot be made as asked."""


class UserExistsError(UserStoreError):
    """``add`` of a mailbox that is already in the store."""


class UnknownUserError(UserStoreError):
    """A change to a mailbox that is not in the store."""


def canonical_mailbox(name: str) -> str:
    """The canonical form ``local@domain`` of ``name``, all lowercase; InvalidMailboxError if unfit.

    Local parts are compared case-insensitively in mailsys (as nearly every mail system does in
    practice, though RFC 5321 §2.4 allows otherwise), so the store keeps them lowercase too.
    """
    local, at, domain = name.rpartition("@")
    if not at:
        raise InvalidMailboxError(f"{name!r} is not a mailbox: expected local@domain")
    if not local:
        raise InvalidMailboxError(f"{name!r} has an empty local part")
    if any(c.isspace() or not c.isprintable() for c in name):
        raise InvalidMailboxError(f"{name!r} contains spaces or control characters")
    bad = sorted(_LOCAL_FORBIDDEN.intersection(local))
    if bad:
        raise InvalidMailboxError(f"{name!r}: the local part may not contain {' '.join(bad)}")
    if local.startswith("#"):
        raise InvalidMailboxError(f"{name!r}: a local part starting with # reads as a comment")
    if local in (".", ".."):
        raise InvalidMailboxError(f"{name!r}: {local!r} is not a usable local part")
    domain = domain.lower().removesuffix(".")
    if not _DOMAIN.match(domain):
        raise InvalidMailboxError(f"{name!r}: {domain!r} is not a valid domain name")
    return f"{local.lower()}@{domain}"


@dataclass
class _Entry:
    """One user line: the canonical mailbox, its hash, and the fields after it (kept verbatim)."""

    mailbox: str
    hash: str
    extra: str | None  # the text after the second ":" — uid:gid:gecos:home:shell:extra_fields

    @property
    def admin(self) -> bool:
        """True if the extra fields mark the user an administrator of the web page."""
        if not self.extra:
            return False
        columns = self.extra.split(":", _EXTRA_COLUMNS - 1)
        return len(columns) == _EXTRA_COLUMNS and ADMIN_FIELD in columns[-1].split()

    def set_admin(self, admin: bool) -> None:
        """Add or remove the administrator field, keeping every other field as it was."""
        columns = (self.extra or "").split(":", _EXTRA_COLUMNS - 1)
        columns += [""] * (_EXTRA_COLUMNS - len(columns))
        fields = [item for item in columns[-1].split() if item != ADMIN_FIELD]
        if admin:
            fields.append(ADMIN_FIELD)
        columns[-1] = " ".join(fields)
        extra = ":".join(columns)
        self.extra = None if not extra.strip(":") else extra


# A line of the file: an _Entry, or any other line (comment, blank, unreadable) kept as text.
_Line = _Entry | str
_Lines = list[_Line]  # named here because UserStore.list shadows the builtin in the class body


def _parse(text: str) -> list[_Line]:
    lines: list[_Line] = []
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        name, colon, rest = line.partition(":")
        if not colon or line.lstrip().startswith("#"):
            lines.append(line)
            continue
        try:
            mailbox = canonical_mailbox(name)
        except InvalidMailboxError:
            lines.append(line)  # not ours to understand (e.g. a bare Dovecot user name): keep it
            continue
        hash_, colon, extra = rest.partition(":")
        lines.append(_Entry(mailbox, hash_, extra if colon else None))
    return lines


def _render(lines: list[_Line]) -> bytes:
    out = []
    for line in lines:
        if isinstance(line, str):
            out.append(line)
        elif line.extra is None:
            out.append(f"{line.mailbox}:{line.hash}")
        else:
            out.append(f"{line.mailbox}:{line.hash}:{line.extra}")
    text = "".join(f"{line}\n" for line in out)
    return text.encode("utf-8", "surrogateescape")


def _index(lines: list[_Line]) -> dict[str, _Entry]:
    index: dict[str, _Entry] = {}
    for line in lines:
        # The first line for a name wins, as a reader going top to bottom would expect.
        if isinstance(line, _Entry) and line.mailbox not in index:
            index[line.mailbox] = line
    return index


# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)
_Signature = tuple[int, int, int, int, int] | None


class UserStore:
    """The users of this mail system and their password hashes, backed by a passwd-file.

    Lookups (``exists``, ``list``, ``get_hash``) are served from memory and are cheap enough for
    the reactor thread; at most once per ``RELOAD_INTERVAL`` they stat the file and reload it if
    another process changed it. ``verify`` and the changing methods hash passwords or write the
    file: they block, so a server runs them in a thread.
    """

    _log = Logger()

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic, *,
                 reload_on_lookup: bool = True, account: ServerAccount | None = None) -> None:
        self.path = Path(path)
        self._clock = clock
        # The server's account: files written here are given its group (mailsys.ownership).
        self._account = account
        # A server looks users up on the reactor thread (RCPT TO), where the stat and the read
        # of a reload must not run: it passes False and calls reload_if_changed from a thread.
        self._reload_on_lookup = reload_on_lookup
        # _state guards the in-memory copy only and is never held during file I/O, so a lookup
        # on the reactor thread never waits for another thread's fsync. _writing serialises this
        # process's writers; the flock on lock_path serialises processes.
        self._state = threading.Lock()
        self._writing = threading.Lock()
        self._index: dict[str, _Entry] = {}
        self._signature: _Signature = None
        self._generation = 0  # bumped by every update of the in-memory copy
        self._checked_at: float | None = None
        # The (signature, error) of a file we could not read and have said so: said once only.
        self._unreadable: tuple[_Signature, str] | None = None
        self.reload()

    @property
    def lock_path(self) -> Path:
        """The side file locked while the store is changed (the store file itself is replaced,
        so a lock on it would be lost at the first rename)."""
        return self.path.with_name(self.path.name + ".lock")

    # -- reading -------------------------------------------------------------------------------

    def exists(self, mailbox: str) -> bool:
        """True if ``mailbox`` is a user here (case-insensitive); False for any unfit name."""
        return self.get_hash(mailbox) is not None

    def list(self) -> list[str]:
        """All users' canonical mailbox names, sorted."""
        self._maybe_reload()
        with self._state:
            return sorted(self._index)

    @property
    def generation(self) -> int:
        """The number of the in-memory copy: it grows each time the file is read again."""
        with self._state:
            return self._generation

    def get_hash(self, mailbox: str) -> str | None:
        """The stored ``{SCHEME}hash`` of ``mailbox``, or None if it is not a user here."""
        try:
            name = canonical_mailbox(mailbox)
        except InvalidMailboxError:
            return None
        self._maybe_reload()
        with self._state:
            entry = self._index.get(name)
            return entry.hash if entry is not None else None

    def is_admin(self, mailbox: str) -> bool:
        """True if ``mailbox`` is a user here marked as an administrator of the web page."""
        try:
            name = canonical_mailbox(mailbox)
        except InvalidMailboxError:
            return False
        self._maybe_reload()
        with self._state:
            entry = self._index.get(name)
            return entry is not None and entry.admin

    def verify(self, mailbox: str, password: str) -> bool:
        """True if ``password`` is ``mailbox``'s password (blocking: run it in a thread).

        An unknown user is checked against a dummy hash, so that it costs as long as a wrong
        password and the answer time does not reveal which users exist.
        """
        return self._verify_stored(mailbox, self.get_hash(mailbox), password)

    def _verify_stored(self, mailbox: str, stored: str | None, password: str) -> bool:
        if stored is None:
            verify_password(dummy_hash(), password)
            return False
        try:
            return verify_password(stored, password)
        except UnusableHashError as exc:
            self._log.warn("user store {path}: cannot check the password of {mailbox}: {reason}",
                           path=str(self.path), mailbox=mailbox, reason=str(exc))
            return False

    def reload(self) -> None:
        """Read the file now (a missing file is an empty store); OSError if it cannot be read."""
        with self._state:
            self._checked_at = self._clock()
            generation = self._generation
        self._load(generation, keep_last_good=False)

    def reload_if_changed(self) -> bool:
        """Reload if the file changed since it was read (blocking: run it in a thread).

        When this returns, the in-memory copy is at least as new as the file was when it was
        called; True if that took a reload. An unchanged file costs one stat(), no read.
        """
        reloaded = False
        while True:
            with self._state:
                self._checked_at = self._clock()
                generation = self._generation
                known = self._signature
            if self._stat() == known:
                return reloaded
            # Another thread (the reload timer) may install a copy it read before ours: then
            # ours is dropped, and we look again rather than trust that older copy.
            loaded = self._load(generation)
            if loaded is None:
                return False  # unreadable: the last good copy stays (logged once)
            reloaded = True
            if loaded:
                return reloaded

    def verify_fresh(self, mailbox: str, password: str) -> bool:
        """``verify``, and if that fails, reload a changed file and verify once more (blocking).

        A server's copy may lag the file by up to its reload interval; a user just added or
        given a new password must not be refused meanwhile. The second check runs only when
        this user's hash changed, so a failure costs the same for known and unknown users:
        one password check and one stat().
        """
        return self.matching_hash(mailbox, password) is not None

    def matching_hash(self, mailbox: str, password: str) -> str | None:
        """``verify_fresh``, answering with the stored hash ``password`` matched, or None.

        The credential cache (mailsys.auth.credcache) remembers the hash a password was found
        right for, so that a later change of the password is seen at once.
        """
        stored = self.get_hash(mailbox)
        if self._verify_stored(mailbox, stored, password):
            return stored
        self.reload_if_changed()
        current = self.get_hash(mailbox)
        if current is None or current == stored:
            return None
        return current if self._verify_stored(mailbox, current, password) else None

    def _maybe_reload(self) -> None:
        """Reload if the file changed, looking at most once per RELOAD_INTERVAL."""
        if not self._reload_on_lookup:
            return
        with self._state:
            now = self._clock()
            if self._checked_at is not None and now - self._checked_at < RELOAD_INTERVAL:
                return
            self._checked_at = now
            generation = self._generation
            known = self._signature
        if self._stat() != known:
            self._load(generation)

    def _load(self, generation: int, *, keep_last_good: bool = True) -> bool | None:
        """Read and install the file; None if it cannot be read and the last copy is kept."""
        # stat before read: if the file is replaced in between, the older signature stored with
        # the newer content only causes one more reload later, never a missed change.
        signature = self._stat()
        try:
            lines = self._read()
        except OSError as exc:
            if not keep_last_good:
                raise
            self._report_unreadable(signature, exc)
            return None
        with self._state:
            was_unreadable, self._unreadable = self._unreadable is not None, None
        if was_unreadable:
            self._log.info("user store {path}: readable again", path=str(self.path))
        return self._install(lines, signature, generation)

    def _report_unreadable(self, signature: _Signature, exc: OSError) -> None:
        """One log line per unreadable version of the file, not one per login or reload."""
        reason = exc.strerror or str(exc)
        with self._state:  # the reload timer and login threads may both get here
            if self._unreadable == (signature, reason):
                return
            self._unreadable = (signature, reason)
            count = len(self._index)
        try:
            permissions = describe(self.path)
        except OSError:
            permissions = "unknown permissions"
        self._log.error(
            "user store {path}: cannot read it: {reason} (the file is {permissions}, this "
            "process runs as {account}); keeping the last good copy ({count} users)",
            path=str(self.path), reason=reason, permissions=permissions,
            account=process_account(), count=count)

    def _install(self, lines: _Lines, signature: _Signature, generation: int | None) -> bool:
        """Make ``lines`` the in-memory copy, unless another was installed meanwhile (False)."""
        with self._state:
            if generation is not None and generation != self._generation:
                return False
            self._index = _index(lines)
            self._signature = signature
            self._generation += 1
            return True

    def _stat(self) -> _Signature:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        # ctime too: a chmod or chown that makes the file readable again changes only that.
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _read(self) -> _Lines:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return _parse(data.decode("utf-8", "surrogateescape"))

    # -- changing (blocking) -------------------------------------------------------------------

    def add(self, mailbox: str, password: str, *, admin: bool = False) -> str:
        """Add a user with ``password``; return the canonical name. UserExistsError if present.

        ``admin`` marks the user an administrator of the web page.
        """
        name = canonical_mailbox(mailbox)
        hashed = hash_password(_check_password(password))  # slow: done before taking the lock
        with self._changing() as lines:
            if any(isinstance(line, _Entry) and line.mailbox == name for line in lines):
                raise UserExistsError(f"{name} already exists")
            entry = _Entry(name, hashed, None)
            entry.set_admin(admin)
            lines.append(entry)
        return name

    def set_admin(self, mailbox: str, admin: bool) -> str:
        """Mark an existing user an administrator of the web page, or not; the canonical name."""
        name = canonical_mailbox(mailbox)
        with self._changing() as lines:
            entries = [line for line in lines if isinstance(line, _Entry) and line.mailbox == name]
            if not entries:
                raise UnknownUserError(f"no such user: {name}")
            for entry in entries:
                entry.set_admin(admin)
        return name

    def set_password(self, mailbox: str, password: str) -> str:
        """Replace the password of an existing user; return the canonical name."""
        name = canonical_mailbox(mailbox)
        hashed = hash_password(_check_password(password))
        with self._changing() as lines:
            entries = [line for line in lines if isinstance(line, _Entry) and line.mailbox == name]
            if not entries:
                raise UnknownUserError(f"no such user: {name}")
            for entry in entries:
                entry.hash = hashed
        return name

    def delete(self, mailbox: str) -> str:
        """Remove a user (every line for it); return the canonical name.

        UnknownUserError if absent.
        """
        name = canonical_mailbox(mailbox)
        with self._changing() as lines:
            kept = [line for line in lines
                    if not (isinstance(line, _Entry) and line.mailbox == name)]
            if len(kept) == len(lines):
                raise UnknownUserError(f"no such user: {name}")
            lines[:] = kept
        return name

    def import_hashed(
        self, users: Iterable[tuple[str, str, str | None]], *, replace: bool = False
    ) -> ImportResult:
        """Add users whose passwords are already hashed, in one locked rewrite of the file.

        ``users`` holds (mailbox, ``{SCHEME}hash``, extra fields or None), checked by the caller
        (``passwords.hash_scheme``). An existing user is left alone unless ``replace``; then its
        hash is replaced, and its extra fields too when the import has some.
        """
        result = ImportResult()
        with self._changing() as lines:
            existing: dict[str, list[_Entry]] = {}
            for line in lines:
                if isinstance(line, _Entry):
                    existing.setdefault(line.mailbox, []).append(line)
            for mailbox, hashed, extra in users:
                name = canonical_mailbox(mailbox)
                if _bad_field(hashed) or (extra is not None and _bad_field(extra, colons=True)):
                    raise ValueError(f"{name}: a hash or field with a line break or colon")
                entries = existing.get(name)
                if entries is None:
                    entry = _Entry(name, hashed, extra)
                    lines.append(entry)
                    existing[name] = [entry]
                    result.added.append(name)
                elif replace:
                    for entry in entries:
                        entry.hash = hashed
                        if extra is not None:
                            entry.extra = extra
                    result.replaced.append(name)
                else:
                    result.skipped.append(name)
        return result

    @contextmanager
    def _changing(self) -> Iterator[_Lines]:
        """Lock, read the file as it is now, let the caller edit the lines, write them back.

        Reading under the lock (not using the in-memory copy) means a change made meanwhile by
        another process is kept, never overwritten. If the caller raises, nothing is written.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._writing:
            fd = open_lock_file(self.lock_path, self._account)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                lines = self._read()
                yield lines
                self._write(_render(lines))
                self._install(lines, self._stat(), None)
            finally:
                os.close(fd)  # closing the descriptor releases the flock

    def _write(self, data: bytes) -> None:
        # Owner, group and mode by mailsys.ownership's rules; LockoutError before any change if
        # the server could not read the result. The temporary file is removed on any failure.
        replace_file(self.path, data, self._account)


@dataclass
class ImportResult:
    """What ``UserStore.import_hashed`` did, by canonical mailbox name."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already there, and not replace


def _bad_field(text: str, colons: bool = False) -> bool:
    """True if ``text`` would break the passwd-file: a line break, or a colon inside a hash."""
    return "\n" in text or "\r" in text or (not colons and ":" in text)


def _check_password(password: str) -> str:
    if not password:
        raise ValueError("the password is empty")
    return password
