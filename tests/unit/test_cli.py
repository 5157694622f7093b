"""The mailsys command: user management and check-config, one line per error, no tracebacks."""

from __future__ import annotations

import grp
import io
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailsys import cli
from mailsys.auth.users import UserStore

CONFIG = """\
[storage]
users = "var/users"

[routing]
local_domains = ["example.test", "other.test"]

[routing.domain_aliases]
"alias.test" = "example.test"
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with etc/mailsys.toml, made the current directory like a checkout."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mailsys.toml").write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.CONFIG_ENV, raising=False)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str, stdin: str = "",
        ) -> tuple[int, str, str]:
    """Run the command in-process with ``stdin`` as standard input; (status, stdout, stderr)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdin", io.StringIO(stdin))
        status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert err.startswith("mailsys: ")
    return err


def store(workdir: Path) -> UserStore:
    return UserStore(workdir / "var" / "users")


def test_user_add_with_password_on_stdin(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """user add --password-stdin reads one line and stores the canonical name, hashed."""
    status, out, err = run(capsys, "user", "add", "Alice@Example.test", "--password-stdin",
                           stdin="wonder land\nignored\n")
    assert (status, out, err) == (0, "added alice@example.test\n", "")
    assert store(workdir).verify("alice@example.test", "wonder land")


def test_user_add_prompts_twice(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --password-stdin the password is asked twice with getpass."""
    prompts: list[str] = []
    answers = iter(["s3cret", "s3cret"])

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr("mailsys.cli.getpass.getpass", fake_getpass)
    status, out, _ = run(capsys, "user", "add", "bob@example.test")
    assert (status, out) == (0, "added bob@example.test\n")
    assert len(prompts) == 2
    assert store(workdir).verify("bob@example.test", "s3cret")


def test_user_add_refuses_mismatched_prompts(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two different answers to the prompts add nobody and say so in one line."""
    answers = iter(["one", "two"])
    monkeypatch.setattr("mailsys.cli.getpass.getpass", lambda prompt="": next(answers))
    status, _, err = run(capsys, "user", "add", "bob@example.test")
    assert status == 1
    assert one_line(err) == "mailsys: the passwords do not match\n"
    assert store(workdir).list() == []


def test_user_add_refuses_empty_stdin(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty first line on stdin is refused, not stored as an empty password."""
    status, _, err = run(capsys, "user", "add", "bob@example.test", "--password-stdin", stdin="\n")
    assert status == 1
    assert "no password" in one_line(err)


def test_user_add_refuses_a_domain_that_is_not_local(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user outside routing.local_domains is refused, naming the local domains."""
    status, _, err = run(capsys, "user", "add", "bob@example.org", "--password-stdin", stdin="x\n")
    assert status == 1
    assert one_line(err) == (
        "mailsys: example.org is not a local domain of etc/mailsys.toml "
        "(routing.local_domains: example.test, other.test)\n")
    status, _, err = run(capsys, "user", "add", "bob@alias.test", "--password-stdin", stdin="x\n")
    assert status == 1
    assert "alias domain of example.test" in one_line(err)
    assert store(workdir).list() == []


def test_user_add_refuses_existing_and_invalid_names(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing user or a malformed name is one line and exit status 1."""
    assert run(capsys, "user", "add", "a@example.test", "--password-stdin", stdin="x\n")[0] == 0
    status, _, err = run(capsys, "user", "add", "A@example.test", "--password-stdin", stdin="y\n")
    assert status == 1
    assert one_line(err) == "mailsys: a@example.test already exists\n"
    status, _, err = run(capsys, "user", "add", "a b@example.test", "--password-stdin",
                         stdin="y\n")
    assert status == 1
    assert "spaces" in one_line(err)


def test_user_passwd_list_and_del(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """passwd changes a password, list prints users sorted, del removes one."""
    run(capsys, "user", "add", "zed@example.test", "--password-stdin", stdin="z\n")
    run(capsys, "user", "add", "amy@other.test", "--password-stdin", stdin="a\n")
    status, out, _ = run(capsys, "user", "passwd", "ZED@example.test", "--password-stdin",
                         stdin="new\n")
    assert (status, out) == (0, "changed the password of zed@example.test\n")
    assert store(workdir).verify("zed@example.test", "new")
    assert run(capsys, "user", "list") == (0, "amy@other.test\nzed@example.test\n", "")
    status, out, _ = run(capsys, "user", "del", "amy@other.test")
    assert status == 0
    assert out.startswith("deleted amy@other.test")
    assert run(capsys, "user", "list") == (0, "zed@example.test\n", "")


def test_unknown_user_for_passwd_and_del(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """passwd and del of a missing user fail with one line and exit status 1."""
    status, _, err = run(capsys, "user", "passwd", "nobody@example.test", "--password-stdin",
                         stdin="x\n")
    assert (status, one_line(err)) == (1, "mailsys: no such user: nobody@example.test\n")
    status, _, err = run(capsys, "user", "del", "nobody@example.test")
    assert (status, one_line(err)) == (1, "mailsys: no such user: nobody@example.test\n")


def test_config_option_before_or_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--config works before the command and after it; the users file comes from the config."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "elsewhere.toml"
    config.write_text(CONFIG.replace("var/users", str(tmp_path / "db" / "passwd")))
    assert run(capsys, "--config", str(config), "user", "add", "a@example.test",
               "--password-stdin", stdin="x\n")[0] == 0
    assert run(capsys, "user", "list", "--config", str(config)) == (0, "a@example.test\n", "")
    assert (tmp_path / "db" / "passwd").is_file()


def test_broken_config_is_one_line_and_status_2(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user command with a broken or missing config says why in one line and exits 2."""
    (workdir / "etc" / "mailsys.toml").write_text("[routing]\nlocal_domains = 3\n")
    status, _, err = run(capsys, "user", "list")
    assert status == 2
    assert one_line(err) == (
        "mailsys: etc/mailsys.toml: routing.local_domains: must be a list, got 3\n")
    status, _, err = run(capsys, "--config", "missing.toml", "user", "list")
    assert status == 2
    assert one_line(err).startswith("mailsys: missing.toml: cannot read")


def test_io_error_is_one_line_and_status_1(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unwritable users file is reported in one line, without a traceback."""
    (workdir / "var").write_text("not a directory")
    status, _, err = run(capsys, "user", "add", "a@example.test", "--password-stdin", stdin="x\n")
    assert status == 1
    assert "Traceback" not in one_line(err)


def test_check_config_ok(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config summarises a good file in one line and exits 0."""
    (workdir / "etc" / "mailsys.toml").write_text(
        CONFIG + '[smtp]\nlisten = ["tcp:2525"]\n[submission]\nlisten = ["tcp:2587"]\n'
        '[imap]\nlisten = ["tcp:2143"]\n')
    assert run(capsys, "check-config") == (
        0, "etc/mailsys.toml: ok (3 listeners, 2 local domains)\n", "")
    other = workdir / "one.toml"
    other.write_text('[routing]\nlocal_domains = ["example.test"]\n')
    assert run(capsys, "check-config", str(other)) == (
        0, f"{other}: ok (0 listeners, 1 local domain)\n", "")


def test_check_config_error(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config prints exactly one line `mailsys: <error>` to stderr and exits 2."""
    bad = workdir / "bad.toml"
    bad.write_text("[smtp]\nmax_recipients = 0\n")
    status, out, err = run(capsys, "check-config", str(bad))
    assert (status, out) == (2, "")
    assert one_line(err) == (
        f"mailsys: {bad}: smtp.max_recipients: must be a positive integer, got 0\n")
    status, _, err = run(capsys, "check-config", str(workdir / "absent.toml"))
    assert status == 2
    one_line(err)


def test_usage_errors_exit_2(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing or unknown command is a usage error with exit status 2."""
    for argv in ([], ["user"], ["frobnicate"], ["user", "add"]):
        status, _, err = run(capsys, *argv)
        assert status == 2, argv
        assert err.splitlines()[-1].startswith("mailsys: ")


def test_check_config_as_a_real_command(tmp_path: Path) -> None:
    """The installed `mailsys` script reports a broken config in one stderr line, exit 2."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\n")
    script = Path(sys.executable).with_name("mailsys")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mailsys.cli"]
    result = subprocess.run([*command, "check-config", str(bad)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"mailsys: {bad}: TOML syntax error")


def test_config_from_the_environment(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Without --config the command reads $MAILSYS_CONFIG, and --config still wins over it."""
    other = workdir / "other.toml"
    other.write_text('[routing]\nlocal_domains = ["example.test"]\n')
    monkeypatch.setenv("MAILSYS_CONFIG", str(other))
    assert run(capsys, "check-config") == (0, f"{other}: ok (0 listeners, 1 local domain)\n", "")
    assert run(capsys, "--config", "etc/mailsys.toml", "check-config") == (
        0, "etc/mailsys.toml: ok (0 listeners, 2 local domains)\n", "")
    monkeypatch.setenv("MAILSYS_CONFIG", "")
    assert run(capsys, "check-config")[1].startswith("etc/mailsys.toml: ok")


def test_reload_without_a_running_server(workdir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`mailsys reload` with no server on the spool says so in one line and exits 1."""
    (workdir / "etc" / "mailsys.toml").write_text(CONFIG.replace(
        'users = "var/users"\n', f'users = "var/users"\nspool = "{workdir / "spool"}"\n'))
    status, out, err = run(capsys, "reload")
    assert (status, out) == (1, "")
    assert one_line(err).startswith("mailsys: no server is running on the spool")


def test_config_path_order() -> None:
    """--config first, then a non-empty $MAILSYS_CONFIG, then etc/mailsys.toml."""
    assert cli.config_path(Path("/a.toml"), {"MAILSYS_CONFIG": "/b.toml"}) == Path("/a.toml")
    assert cli.config_path(None, {"MAILSYS_CONFIG": "/b.toml"}) == Path("/b.toml")
    assert cli.config_path(None, {"MAILSYS_CONFIG": ""}) == cli.DEFAULT_CONFIG
    assert cli.config_path(None, {}) == cli.DEFAULT_CONFIG


def test_reader_that_left_is_no_error(tmp_path: Path) -> None:
    """Output to a pipe whose reader has gone (`mailsys ... | head`) ends quietly: nothing on
    stderr, status 141 as for a process that SIGPIPE ended."""
    good = tmp_path / "good.toml"
    good.write_text('[routing]\nlocal_domains = ["example.test"]\n')
    script = Path(sys.executable).with_name("mailsys")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mailsys.cli"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    try:
        result = subprocess.run([*command, "check-config", str(good)], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == cli.EXIT_BROKEN_PIPE


# --- user import: a Dovecot passwd-file ----------------------------------------------------------

SHA512 = ("$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4"
          "OTLiBFdcbYEdFCoEOfaS35inz1")  # "Hello world!"
BCRYPT = "$2b$04$3FNzQMmCzW9mkofcBsZicuzT5FLspk5Q8yn5b.kpIHc0V3pfPfa8G"  # "correct horse"


def passwd_file(workdir: Path) -> Path:
    path = workdir / "dovecot.passwd"
    path.write_text(
        "# exported from dovecot\n"
        "\n"
        f"carol@example.test:{{SHA512-CRYPT}}{SHA512}:1000:1000::/home/carol::\n"
        f"Dave@Example.test:{{BLF-CRYPT}}{BCRYPT}\r\n"
        "eve@example.test:{MD5}1a1dc91c907325c69271ddf0c944bc72\n"
        f"frank@elsewhere.test:{{SHA512-CRYPT}}{SHA512}\n"
        "no-colon-here\n"
        "grace@example.test:\n"
        f"carol@example.test:{{BLF-CRYPT}}{BCRYPT}\n"
        f"heidi@alias.test:{{SHA512-CRYPT}}{SHA512}\n"
    )
    return path


def test_user_import_imports_good_lines_and_names_bad_ones(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """user import adds every usable line and names each refused line with its number and why."""
    path = passwd_file(workdir)
    status, out, err = run(capsys, "user", "import", str(path))
    assert status == 1
    assert out == (f"imported from {path}: 2 users added, 0 replaced, 6 lines refused\n")
    lines = err.splitlines()
    assert lines[0] == (f"mailsys: {path} line 5: unsupported password scheme {{MD5}}; "
                        "not imported")
    assert lines[1].startswith(f"mailsys: {path} line 6: elsewhere.test is not a local domain")
    assert lines[2].startswith(f"mailsys: {path} line 7: expected user@domain:{{SCHEME}}hash")
    assert lines[3].startswith(f"mailsys: {path} line 8: grace@example.test has no password")
    assert lines[4].startswith(f"mailsys: {path} line 9: carol@example.test again (first on "
                               "line 3)")
    assert lines[5].startswith(f"mailsys: {path} line 10: alias.test is an alias domain")
    assert len(lines) == 6
    users = store(workdir)
    assert users.list() == ["carol@example.test", "dave@example.test"]
    assert users.verify("carol@example.test", "Hello world!")
    assert users.verify("dave@example.test", "correct horse")


def test_user_import_keeps_existing_users_unless_replace(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Existing users are kept (and counted) unless --replace overwrites their hash."""
    run(capsys, "user", "add", "carol@example.test", "--password-stdin", stdin="mine\n")
    path = workdir / "one.passwd"
    path.write_text(f"carol@example.test:{{SHA512-CRYPT}}{SHA512}\n")
    status, out, _ = run(capsys, "user", "import", str(path))
    assert status == 0
    assert "0 users added, 0 replaced, 1 already present and kept (--replace overwrites)" in out
    assert store(workdir).verify("carol@example.test", "mine")
    status, out, _ = run(capsys, "user", "import", "--replace", str(path))
    assert (status, out) == (0, f"imported from {path}: 0 users added, 1 replaced\n")
    assert store(workdir).verify("carol@example.test", "Hello world!")


def test_user_import_of_a_missing_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that cannot be read is one line and exit status 1."""
    status, _, err = run(capsys, "user", "import", str(workdir / "absent"))
    assert status == 1
    assert "absent" in one_line(err)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving files to another account needs root (CI runs as root)")


@pytest.fixture
def open_workdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Like workdir, but in a directory other accounts may enter, with [server] user nobody."""
    path = Path(tempfile.mkdtemp(prefix="mailsys-cli-", dir="/tmp"))
    path.chmod(0o755)
    (path / "etc").mkdir()
    (path / "etc" / "mailsys.toml").write_text(
        '[server]\nuser = "nobody"\n' + CONFIG.replace(
            'users = "var/users"', 'users = "var/users"\nspool = "var/spool"\n'
                                   'maildirs = "maildirs"'))
    monkeypatch.chdir(path)
    yield path
    shutil.rmtree(path)


@needs_root
def test_user_add_as_root_gives_the_file_to_the_servers_group(
    open_workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run as root, user add leaves the file root:<server group> 0640, readable by the server."""
    status, _, err = run(capsys, "user", "add", "a@example.test", "--password-stdin", stdin="x\n")
    assert (status, err) == (0, "")
    users = open_workdir / "var" / "users"
    st = users.stat()
    assert (st.st_uid, st.st_gid) == (0, pwd.getpwnam("nobody").pw_gid)
    assert stat.S_IMODE(st.st_mode) == 0o640
    lock = (open_workdir / "var" / "users.lock").stat()
    assert lock.st_uid == pwd.getpwnam("nobody").pw_uid  # the server's user may take the lock


def test_user_change_by_a_third_user_is_refused_in_one_line(
    open_workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user who is neither root, the server's user nor in its group is refused before the
    password is asked, in one line, and nothing is written."""
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(os, "getegid", lambda: 4242)
    monkeypatch.setattr(os, "getgroups", lambda: [4242])
    status, out, err = run(capsys, "user", "add", "a@example.test", "--password-stdin",
                           stdin="x\n")
    assert (status, out) == (1, "")
    assert one_line(err).startswith("mailsys: refusing to change var/users as 4242: the "
                                    "server's user nobody could not read the result")
    assert not (open_workdir / "var").exists()
    assert run(capsys, "user", "list")[0] == 0  # reading is fine


@needs_root
def test_check_config_reports_what_the_server_account_cannot_use(
    open_workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config names each path the server's account could not read or write, and exits 1;
    once the files are the account's, it says ok and whom the server runs as."""
    nobody = pwd.getpwnam("nobody")
    (open_workdir / "var" / "spool").mkdir(parents=True, mode=0o700)
    (open_workdir / "var" / "users").write_text("")
    (open_workdir / "var" / "users").chmod(0o600)
    status, out, err = run(capsys, "check-config")
    assert (status, out) == (1, "")
    lines = err.splitlines()
    path = "etc/mailsys.toml"
    spool, users = open_workdir / "var" / "spool", open_workdir / "var" / "users"
    assert lines == [
        f"mailsys: {path}: storage.spool: nobody cannot read, write and enter {spool} "
        "(root:root 0700)",
        f"mailsys: {path}: storage.maildirs: {open_workdir / 'maildirs'} does not exist and "
        f"nobody cannot create it in {open_workdir} (root:root 0755)",
        f"mailsys: {path}: storage.users: nobody cannot read {users} (root:root 0600)",
    ]
    os.chown(spool, nobody.pw_uid, nobody.pw_gid)
    (open_workdir / "maildirs").mkdir()
    os.chown(open_workdir / "maildirs", nobody.pw_uid, nobody.pw_gid)
    os.chown(users, 0, nobody.pw_gid)
    users.chmod(0o640)
    group = grp.getgrgid(nobody.pw_gid).gr_name
    assert run(capsys, "check-config") == (
        0, f"{path}: ok (0 listeners, 2 local domains, runs as nobody:{group})\n", "")


@needs_root
def test_user_add_warns_when_the_server_cannot_reach_the_file(
    open_workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A users file in a directory the server's account cannot enter is written, with one
    warning line saying why the server will not read it."""
    (open_workdir / "var").mkdir(mode=0o700)
    status, out, err = run(capsys, "user", "add", "a@example.test", "--password-stdin",
                           stdin="x\n")
    assert (status, out) == (0, "added a@example.test\n")
    assert one_line(err) == (f"mailsys: warning: the server cannot read var/users: nobody "
                             f"cannot enter {open_workdir / 'var'} (root:root 0700)\n")


def test_user_add_admin_and_user_admin_on_off(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """user add --admin makes an administrator of the web page; user admin USER on|off changes
    it for an existing user; an unknown user is one line and status 1."""
    status, out, _ = run(capsys, "user", "add", "boss@example.test", "--admin",
                         "--password-stdin", stdin="pw\n")
    assert (status, out) == (0, "added boss@example.test (administrator)\n")
    run(capsys, "user", "add", "plain@example.test", "--password-stdin", stdin="pw\n")
    assert store(workdir).is_admin("boss@example.test")
    assert not store(workdir).is_admin("plain@example.test")
    status, out, _ = run(capsys, "user", "admin", "plain@example.test", "on")
    assert (status, out) == (0, "plain@example.test is now an administrator\n")
    status, out, _ = run(capsys, "user", "admin", "boss@example.test", "off")
    assert (status, out) == (0, "boss@example.test is no longer an administrator\n")
    assert store(workdir).is_admin("plain@example.test")
    assert not store(workdir).is_admin("boss@example.test")
    status, _, err = run(capsys, "user", "admin", "nobody@example.test", "on")
    assert status == 1 and "no such user: nobody@example.test" in one_line(err)
    status, _, _ = run(capsys, "user", "admin", "boss@example.test", "maybe")
    assert status == 2
