"""File ownership rules: the server's account, created and rewritten files, computed access."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailsys.config import ConfigError, from_mapping
from mailsys.ownership import (
    LockoutError,
    OwnershipError,
    ServerAccount,
    access_problem,
    check_writer,
    configured_account,
    make_directory,
    match_owner,
    open_lock_file,
    replace_file,
    resolve_account,
)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving files to another account needs root (CI runs as root)")


def nobody() -> ServerAccount:
    account = resolve_account("nobody")
    assert account is not None
    return account


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def owner_of(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


def test_account_by_name_defaults_to_the_primary_group() -> None:
    """A user without a group resolves to the user's primary group and its memberships."""
    entry = pwd.getpwnam("nobody")
    account = nobody()
    assert (account.user, account.uid, account.gid) == ("nobody", entry.pw_uid, entry.pw_gid)
    assert account.group == grp.getgrgid(entry.pw_gid).gr_name
    assert entry.pw_gid in account.groups
    assert str(account) == f"nobody:{account.group}"


def test_account_by_number_and_with_another_group() -> None:
    """Ids resolve like names (twistd's --uid/--gid), and a named group replaces the primary."""
    account = resolve_account(0, "nogroup")
    assert account is not None
    assert (account.user, account.group) == ("root", "nogroup")
    assert {0, grp.getgrnam("nogroup").gr_gid} <= account.groups


def test_unknown_user_or_group_is_refused() -> None:
    """An account that does not exist, or a group without a user, is an OwnershipError."""
    assert resolve_account(None) is None
    with pytest.raises(OwnershipError, match="no such user"):
        resolve_account("no-such-user-mailsys")
    with pytest.raises(OwnershipError, match="no such group"):
        resolve_account("nobody", "no-such-group-mailsys")
    with pytest.raises(OwnershipError, match=r"needs server\.user"):
        resolve_account(None, "nogroup")


def test_configured_account_names_the_key(tmp_path: Path) -> None:
    """An unknown [server] user or group is a ConfigError naming the key."""
    path = tmp_path / "mailsys.toml"
    config = from_mapping({"server": {"user": "no-such-user-mailsys"}}, path)
    with pytest.raises(ConfigError, match=r"server\.user: no such user"):
        configured_account(config)
    config = from_mapping({"server": {"user": "nobody", "group": "no-such-group-x"}}, path)
    with pytest.raises(ConfigError, match=r"server\.group: no such group"):
        configured_account(config)
    config = from_mapping({"server": {"user": "nobody"}}, path)
    assert configured_account(config) == nobody()


# -- creating and rewriting ---------------------------------------------------------------------


def test_new_file_without_an_account_is_private(tmp_path: Path) -> None:
    """With no server account configured a new file is 0600, owned by its writer."""
    path = tmp_path / "users"
    replace_file(path, b"data\n", None)
    assert path.read_bytes() == b"data\n"
    assert mode_of(path) == 0o600
    assert owner_of(path) == (os.geteuid(), os.getegid())


@needs_root
def test_new_file_gets_the_server_group_and_0640(open_dir: Path) -> None:
    """Created by root, a file is root:<server group> 0640: the server reads it, no one else."""
    path = open_dir / "users"
    replace_file(path, b"data\n", nobody())
    assert owner_of(path) == (0, nobody().gid)
    assert mode_of(path) == 0o640
    assert access_problem(path, nobody(), "r") is None
    assert sorted(p.name for p in open_dir.iterdir()) == ["users"]


@needs_root
def test_rewrite_keeps_owner_group_and_mode(tmp_path: Path) -> None:
    """An atomic rewrite keeps the owner, group and mode the administrator gave the file."""
    path = tmp_path / "users"
    path.write_bytes(b"old\n")
    account = nobody()
    os.chown(path, account.uid, account.gid)
    path.chmod(0o604)
    replace_file(path, b"new\n", resolve_account("root"))
    assert path.read_bytes() == b"new\n"
    assert owner_of(path) == (account.uid, account.gid)
    assert mode_of(path) == 0o604


@needs_root
def test_rewrite_repairs_a_file_the_server_could_not_read(open_dir: Path) -> None:
    """A root:root 0600 file (as older versions wrote it) is given the server's group and g+r."""
    path = open_dir / "users"
    path.write_bytes(b"old\n")
    path.chmod(0o600)
    assert access_problem(path, nobody(), "r") is not None
    replace_file(path, b"new\n", nobody())
    assert owner_of(path) == (0, nobody().gid)
    assert mode_of(path) == 0o640
    assert access_problem(path, nobody(), "r") is None


def test_rewrite_that_would_lock_the_server_out_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the new file could not be given to the server's group, nothing is replaced."""
    path = tmp_path / "users"
    path.write_bytes(b"old\n")
    path.chmod(0o600)

    def refused(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refused)
    with pytest.raises(LockoutError, match="server's user nobody cannot read"):
        replace_file(path, b"new\n", nobody())
    assert path.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]


def test_check_writer_refuses_a_user_outside_the_servers_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third user, not in the server's group, is refused before anything is asked or written."""
    account = ServerAccount("mail", 8, "mail", 8, frozenset({8}))
    check_writer(tmp_path / "users", None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    check_writer(tmp_path / "users", account)  # root
    monkeypatch.setattr(os, "geteuid", lambda: 8)
    check_writer(tmp_path / "users", account)  # the server's user
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(os, "getegid", lambda: 4242)
    monkeypatch.setattr(os, "getgroups", lambda: [4242, 8])
    check_writer(tmp_path / "users", account)  # a member of the server's group
    monkeypatch.setattr(os, "getgroups", lambda: [4242])
    with pytest.raises(LockoutError, match="run this as root or as mail"):
        check_writer(tmp_path / "users", account)


# -- access, computed for the account -------------------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every account can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="mailsys-ownership-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


OWNER = ServerAccount("owner", 4242, "staff", 4343, frozenset({4343}))
MEMBER = ServerAccount("member", 4244, "staff", 4343, frozenset({4343}))
OTHER = ServerAccount("other", 4245, "other", 4345, frozenset({4345}))


@needs_root
def test_access_by_owner_group_and_other_bits(open_dir: Path) -> None:
    """The owner class applies to the owner, the group class to members, else the other class."""
    path = open_dir / "file"
    path.write_bytes(b"")
    os.chown(path, OWNER.uid, OWNER.gid)
    path.chmod(0o640)
    assert access_problem(path, OWNER, "rw") is None
    assert access_problem(path, MEMBER, "r") is None
    assert access_problem(path, MEMBER, "w") == f"member cannot write {path} (4242:4343 0640)"
    assert access_problem(path, OTHER, "r") == f"other cannot read {path} (4242:4343 0640)"
    path.chmod(0o604)
    assert access_problem(path, OTHER, "r") is None
    assert access_problem(path, MEMBER, "r") is not None  # the group class, not other, applies
    assert access_problem(path, resolve_account("root"), "rw") is None  # type: ignore[arg-type]


def test_access_needs_every_directory_above_to_be_enterable(open_dir: Path) -> None:
    """A readable file under a directory the account cannot enter is reported at the directory."""
    inner = open_dir / "private"
    inner.mkdir()
    (inner / "users").write_bytes(b"")
    (inner / "users").chmod(0o644)
    inner.chmod(0o700)
    problem = access_problem(inner / "users", OTHER, "r")
    assert problem is not None and problem.startswith(f"other cannot enter {inner} (")
    assert access_problem(open_dir, OTHER, "rx") is None


def test_missing_paths(open_dir: Path) -> None:
    """A missing file to read is fine; one to write needs a writable directory above it."""
    assert access_problem(open_dir / "var" / "users", OTHER, "r") is None
    problem = access_problem(open_dir / "var" / "spool", OTHER, "rwx")
    assert problem is not None and f"cannot create it in {open_dir}" in problem
    root = ServerAccount("root", 0, "root", 0, frozenset({0}))
    assert access_problem(open_dir / "var" / "spool", root, "rwx") is None


@needs_root
def test_lock_file_and_directories_are_handed_to_the_account(tmp_path: Path) -> None:
    """Lock files and directories root creates for the server belong to the server's account."""
    account = nobody()
    make_directory(tmp_path / "spool" / "control", account)
    assert owner_of(tmp_path / "spool") == (account.uid, account.gid)
    assert owner_of(tmp_path / "spool" / "control") == (account.uid, account.gid)
    assert owner_of(tmp_path)[0] == 0  # it existed: untouched
    fd = open_lock_file(tmp_path / "spool" / "lock", account)
    os.close(fd)
    assert owner_of(tmp_path / "spool" / "lock") == (account.uid, account.gid)


@needs_root
def test_match_owner_copies_owner_group_and_mode(tmp_path: Path) -> None:
    """A file about to replace another takes its owner, group and mode."""
    model, new = tmp_path / "model", tmp_path / "new"
    model.write_bytes(b"")
    new.write_bytes(b"")
    os.chown(model, nobody().uid, nobody().gid)
    model.chmod(0o640)
    match_owner(new, model)
    assert owner_of(new) == owner_of(model)
    assert mode_of(new) == 0o640
