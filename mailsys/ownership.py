"""Who owns what on disk: the server's account, and the files both it and the admin commands write.

A production server starts as root (to bind ports below 1024) and twistd drops to an unprivileged
account (``--uid``/``--gid``); the ``mailsys`` admin commands run as root or as that account. The
account is named in the config (``[server] user``/``group``) so both sides know it, and every file
that both sides write follows these rules, owned here and nowhere else:

- **Created** shared files (the users file; DKIM keys and later secrets in the same position)
  get the server's group and mode 0640 (0600 with no account configured); the owner is whoever
  creates them, root or the server's user (as Dovecot's passwd-file is root:dovecot 0640).
- **Handed over**: what root creates for the server to use or remove is given to the server's
  user and group: directories (spool, control/, tmp/ made by the queue tools), lock files (the
  spool's ``lock``, ``users.lock``: both sides flock them), queue command files, and the
  self-signed certificate and key made at start-up before the privilege drop.
- **Rewritten** files (temporary file, fsync, rename: the users file, envelopes edited by the
  queue tools) keep the owner, group and mode of the file they replace, so an administrator's
  ``chown``/``chmod`` survives every change. One exception repairs what older versions left
  behind: a file the server could not read is given the server's group and ``g+r``.
- **Refused**: a command whose result the server could not read (run as a third user, who can
  neither give the file to the server's group nor keep its owner) refuses with one line
  (LockoutError) before anything is replaced.

Access is computed for the server's account from ``os.stat``, the mode bits and the account's
groups, never with ``os.access`` (which answers for the caller). POSIX ACLs are not consulted.
Everything here blocks (the disk, the user database): the server calls it while it is being
built, before the reactor runs.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from mailsys.config import Config, ConfigError
from mailsys.diskio import fsync_directory

# Mode of a created file that holds secrets (password hashes, keys, queue commands).
SECRET_MODE = 0o640
# Mode of a created file when no server account is configured: only its owner reads it.
PRIVATE_MODE = 0o600


class OwnershipError(ValueError):
    """The configured server account does not exist, or does not match twistd's."""


class LockoutError(ValueError):
    """Writing the file as asked would leave the server unable to read it; nothing was written."""


@dataclass(frozen=True)
class ServerAccount:
    """The account the server runs as after twistd drops privileges."""

    user: str
    uid: int
    group: str
    gid: int
    # Every group whose permission bits apply to the account: the configured group, the user's
    # primary group and the groups that list the user (what initgroups(3) gives it).
    groups: frozenset[int]

    def __str__(self) -> str:
        return f"{self.user}:{self.group}"


def resolve_account(user: str | int | None, group: str | int | None = None) -> ServerAccount | None:
    """The account named by ``user`` and ``group`` (names or ids); None if ``user`` is None.

    The group defaults to the user's primary group. OwnershipError if either does not exist.
    """
    if user is None:
        if group is not None:
            raise OwnershipError("server.group needs server.user")
        return None
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        raise OwnershipError(f"no such user: {user!r}") from None
    try:
        if group is None:
            group_entry = grp.getgrgid(entry.pw_gid)
        elif isinstance(group, int):
            group_entry = grp.getgrgid(group)
        else:
            group_entry = grp.getgrnam(group)
    except KeyError:
        raise OwnershipError(f"no such group: {group if group is not None else entry.pw_gid!r}") \
            from None
    groups = {group_entry.gr_gid, entry.pw_gid}
    groups.update(g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem)
    return ServerAccount(entry.pw_name, entry.pw_uid, group_entry.gr_name, group_entry.gr_gid,
                         frozenset(groups))


def configured_account(config: Config) -> ServerAccount | None:
    """The account of ``[server] user``/``group``; ConfigError naming the key if it is unknown."""
    server = config.server
    try:
        return resolve_account(server.user, server.group)
    except OwnershipError as exc:
        key = "server.group" if "group" in str(exc) else "server.user"
        raise ConfigError(config.path, key, str(exc)) from None


def process_account() -> str:
    """``user:group`` of this process's effective ids, for messages."""
    return f"{_user_name(os.geteuid())}:{_group_name(os.getegid())}"


def check_writer(path: Path, account: ServerAccount | None) -> None:
    """Refuse early (LockoutError) when this process could not leave ``path`` to the server.

    Root and the server's user always can; anyone else must be in the server's group, or the
    file they write would be theirs alone. ``replace_file`` checks the actual result again.
    """
    if account is None or os.geteuid() in (0, account.uid):
        return
    if account.gid in os.getgroups() or account.gid == os.getegid():
        return
    raise LockoutError(f"refusing to change {path} as {_user_name(os.geteuid())}: the server's "
                       f"user {account.user} could not read the result; run this as root or as "
                       f"{account.user}")


def describe(path: Path) -> str:
    """``owner:group mode`` of ``path``, as ls would show the ids (for messages)."""
    st = os.stat(path)
    return f"{_user_name(st.st_uid)}:{_group_name(st.st_gid)} {stat.S_IMODE(st.st_mode):04o}"


# -- access, computed for the account -------------------------------------------------------------

_BITS = {"r": (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH),
         "w": (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH),
         "x": (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)}


def _allowed(st: os.stat_result, account: ServerAccount, want: str) -> bool:
    """Whether the mode bits of ``st`` give ``account`` every permission in ``want`` (r, w, x)."""
    if account.uid == 0:
        # Root reads and writes anything; it executes what has any x bit (directories: always).
        return "x" not in want or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
    # POSIX: the owner class applies to the owner, else the group class to a member, else other.
    if st.st_uid == account.uid:
        index = 0
    elif st.st_gid in account.groups:
        index = 1
    else:
        index = 2
    return all(st.st_mode & _BITS[letter][index] for letter in want)


def access_problem(path: Path, account: ServerAccount, want: str) -> str | None:
    """Why ``account`` cannot ``want`` (a string of r, w, x) ``path``, or None if it can.

    Every directory above ``path`` must let the account pass (x). A path to write that does not
    exist yet is judged by the nearest directory above it, which the account must be able to
    write (the server creates it there); one only to read is fine missing (an empty store).
    """
    path = Path(os.path.abspath(path))
    missing = not path.exists()
    target = path
    while not target.exists():
        target = target.parent
    for directory in reversed(target.parents):
        if not _allowed(os.stat(directory), account, "x"):
            return f"{account.user} cannot enter {directory} ({describe(directory)})"
    if missing:
        if "w" in want and not _allowed(os.stat(target), account, "wx"):
            return (f"{path} does not exist and {account.user} cannot create it in {target} "
                    f"({describe(target)})")
        return None
    if not _allowed(os.stat(target), account, want):
        words = {"r": "read", "w": "write", "x": "enter" if target.is_dir() else "execute"}
        verbs = [words[letter] for letter in want]
        needs = verbs[0] if len(verbs) == 1 else f"{', '.join(verbs[:-1])} and {verbs[-1]}"
        return f"{account.user} cannot {needs} {path} ({describe(path)})"
    return None


def server_access_problems(config: Config, account: ServerAccount) -> list[str]:
    """What the server's account could not do that it must, one line each naming the key:
    write the spool and the Maildirs, read the users file, certificate and key.

    For ``mailsys check-config`` (and a readiness check): blocking, call it in a thread.
    """
    wanted: list[tuple[str, Path | None, str]] = [
        ("storage.spool", config.storage.spool, "rwx"),
        ("storage.maildirs", config.storage.maildirs, "rwx"),
        ("storage.users", config.storage.users, "r"),
        ("tls.certificate", config.tls.certificate, "r"),
        ("tls.key", config.tls.key, "r"),
    ]
    problems = []
    for key, file, want in wanted:
        if file is None:
            continue
        problem = access_problem(file, account, want)
        if problem is not None:
            problems.append(f"{key}: {problem}")
    return problems


# -- creating and rewriting ---------------------------------------------------------------------


def replace_file(path: Path, data: bytes, account: ServerAccount | None) -> None:
    """Atomically replace (or create) ``path`` with ``data`` by the rules of this module.

    Temporary file, owner/group/mode as the rules say, fsync, check that the server can still
    read it (LockoutError if not, before the rename), rename, fsync of the directory.
    """
    path = Path(path)
    try:
        old: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        old = None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        try:
            _settle(fd, old, account)
            _check_readable(fd, path, account)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _settle(fd: int, old: os.stat_result | None, account: ServerAccount | None) -> None:
    """Give the open new file the owner, group and mode it should have (see the module rules)."""
    if old is not None:
        uid, gid, mode = old.st_uid, old.st_gid, stat.S_IMODE(old.st_mode)
        if account is not None and not _allowed(old, account, "r"):
            gid, mode = account.gid, mode | stat.S_IRGRP  # repair: the server could not read it
    else:
        uid = os.geteuid()
        gid = account.gid if account is not None else os.getegid()
        mode = SECRET_MODE if account is not None else PRIVATE_MODE
    try:
        os.fchown(fd, uid, gid)
    except PermissionError:
        # Not root: we may still keep the group (if we are in it), never give the file away.
        with contextlib.suppress(PermissionError):
            os.fchown(fd, -1, gid)
    os.fchmod(fd, mode)


def _check_readable(fd: int, path: Path, account: ServerAccount | None) -> None:
    if account is None:
        return
    st = os.fstat(fd)
    if not _allowed(st, account, "r"):
        who = _user_name(os.geteuid())
        made = (f"{_user_name(st.st_uid)}:{_group_name(st.st_gid)} "
                f"{stat.S_IMODE(st.st_mode):04o}")
        raise LockoutError(f"refusing to write {path} as {who}: it would be {made}, which the "
                           f"server's user {account.user} cannot read; run this as root or as "
                           f"{account.user}")


def hand_over(path: Path, account: ServerAccount | None, *, mode: int | None = None) -> None:
    """Give ``path``, just created by this process, to the server's account, when we are root.

    For a file or directory the server must use that an admin command created. Run as anyone
    else, only ``mode`` is applied: such a process cannot give files away.
    """
    if account is not None and os.geteuid() == 0:
        os.chown(path, account.uid, account.gid)
    if mode is not None:
        os.chmod(path, mode)


def match_owner(path: Path, model: Path) -> None:
    """Give ``path`` (a new file about to replace ``model``) the owner, group and mode of
    ``model``, as far as this process may (all of it as root, only the mode otherwise)."""
    st = os.stat(model)
    with contextlib.suppress(PermissionError):
        os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, stat.S_IMODE(st.st_mode))


def make_directory(path: Path, account: ServerAccount | None, mode: int = 0o700) -> None:
    """``mkdir -p`` that hands every directory it creates to the server's account.

    As with ``Path.mkdir(parents=True)``, ``mode`` applies to ``path``; parents get 0777 less
    the umask.
    """
    path = Path(path)
    if path.is_dir():
        return
    make_directory(path.parent, account, 0o777)
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        return
    hand_over(path, account)


def open_lock_file(path: Path, account: ServerAccount | None) -> int:
    """Open (creating it) a lock file both the server and the admin commands can flock.

    flock needs no write access, so the file is opened read-only; root gives it to the server's
    account, so that the account can open it too. The caller closes the descriptor.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, SECRET_MODE if account else PRIVATE_MODE)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)  # a lock file of root's we may read: flock works
    if account is not None and os.geteuid() == 0:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (account.uid, account.gid):
            os.fchown(fd, account.uid, account.gid)
    return fd


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)

