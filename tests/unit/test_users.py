"""The user store: a Dovecot-style passwd-file, changed atomically under a lock, reloaded live."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from twisted.logger import capturedLogs, formatEvent

from mailsys.auth import passwords
from mailsys.auth.passwords import dummy_hash
from mailsys.auth.users import (
    InvalidMailboxError,
    UnknownUserError,
    UserExistsError,
    UserStore,
    canonical_mailbox,
)

SHA512 = ("$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4"
          "OTLiBFdcbYEdFCoEOfaS35inz1")  # "Hello world!"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "users"


def test_missing_file_is_an_empty_store(path: Path) -> None:
    """A store whose file does not exist has no users and creates nothing by reading."""
    store = UserStore(path)
    assert store.list() == []
    assert not store.exists("alice@example.test")
    assert store.get_hash("alice@example.test") is None
    assert not path.parent.exists()


def test_add_creates_file_and_parents_with_mode_0600(path: Path) -> None:
    """The first add creates the parent directories and a file readable by its owner only."""
    store = UserStore(path)
    assert store.add("alice@example.test", "pw1") == "alice@example.test"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.exists("alice@example.test")
    assert path.read_text().startswith("alice@example.test:{ARGON2ID}$argon2id$")


def test_add_list_verify_passwd_delete(path: Path) -> None:
    """The whole life of a user: add, list, verify, change the password, delete."""
    store = UserStore(path)
    store.add("bob@example.test", "old")
    store.add("alice@example.test", "pw")
    assert store.list() == ["alice@example.test", "bob@example.test"]
    assert store.verify("bob@example.test", "old")
    assert not store.verify("bob@example.test", "new")
    store.set_password("bob@example.test", "new")
    assert store.verify("bob@example.test", "new")
    assert not store.verify("bob@example.test", "old")
    store.delete("bob@example.test")
    assert store.list() == ["alice@example.test"]
    assert not store.verify("bob@example.test", "new")


def test_duplicate_add_and_unknown_changes_are_refused(path: Path) -> None:
    """Adding an existing user, or changing or deleting a missing one, raises and writes nothing."""
    store = UserStore(path)
    store.add("alice@example.test", "pw")
    before = path.read_bytes()
    with pytest.raises(UserExistsError, match=r"alice@example\.test already exists"):
        store.add("ALICE@example.test", "other")
    with pytest.raises(UnknownUserError, match=r"no such user: bob@example\.test"):
        store.set_password("bob@example.test", "x")
    with pytest.raises(UnknownUserError):
        store.delete("bob@example.test")
    assert path.read_bytes() == before


def test_names_are_case_insensitive_and_stored_lowercase(path: Path) -> None:
    """Local part and domain are compared case-insensitively and kept in lowercase."""
    store = UserStore(path)
    assert store.add("Alice.Smith@Example.TEST", "pw") == "alice.smith@example.test"
    assert store.exists("ALICE.SMITH@example.test")
    assert store.verify("alice.smith@EXAMPLE.test", "pw")
    assert store.list() == ["alice.smith@example.test"]
    assert path.read_text().startswith("alice.smith@example.test:")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("alice", "expected local@domain"),
        ("@example.test", "empty local part"),
        ("al ice@example.test", "spaces"),
        ("alice@exa mple.test", "spaces"),
        ("al:ice@example.test", "may not contain :"),
        ("a/b@example.test", "may not contain /"),
        ("#alice@example.test", "comment"),
        ("..@example.test", "not a usable local part"),
        ("alice@", "not a valid domain"),
        ("alice@exa_mple.test", "not a valid domain"),
        ("alice@example.test\n", "control characters"),
    ],
)
def test_invalid_names_are_refused(path: Path, name: str, reason: str) -> None:
    """A name that is not a storable local@domain is a ValueError saying what is wrong."""
    store = UserStore(path)
    with pytest.raises(ValueError, match=reason):
        store.add(name, "pw")
    with pytest.raises(InvalidMailboxError):
        canonical_mailbox(name)
    assert not store.exists(name)  # lookups answer "no such user" rather than raise


def test_trailing_dot_of_the_domain_is_dropped() -> None:
    """user@example.test. names the same mailbox as user@example.test."""
    assert canonical_mailbox("User@Example.Test.") == "user@example.test"


def test_empty_password_is_refused(path: Path) -> None:
    """An empty password is a ValueError, not a user anyone can log in as."""
    with pytest.raises(ValueError, match="empty"):
        UserStore(path).add("alice@example.test", "")


def test_extra_fields_comments_and_blank_lines_are_preserved(path: Path) -> None:
    """Rewriting keeps comments, blank lines, Dovecot's extra fields and lines we do not read."""
    path.parent.mkdir(parents=True)
    path.write_text(
        "# users of example.test\n"
        "\n"
        f"carol@example.test:{{SHA512-CRYPT}}{SHA512}:1000:1000::/home/carol::userdb_quota=1G\n"
        "legacyuser:{PLAIN}secret\n"
        "dave@example.test:{PLAIN}pw\n"
    )
    store = UserStore(path)
    assert store.list() == ["carol@example.test", "dave@example.test"]
    assert store.verify("carol@example.test", "Hello world!")
    store.add("erin@example.test", "pw")
    store.set_password("carol@example.test", "new")
    store.delete("dave@example.test")
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# users of example.test", ""]
    assert lines[2].startswith("carol@example.test:{ARGON2ID}$argon2id$")
    assert lines[2].endswith(":1000:1000::/home/carol::userdb_quota=1G")
    assert lines[3] == "legacyuser:{PLAIN}secret"
    assert lines[4].startswith("erin@example.test:{ARGON2ID}")
    assert len(lines) == 5
    assert store.verify("carol@example.test", "new")


def test_first_line_of_a_duplicated_user_wins(path: Path) -> None:
    """When a file names a user twice, the first line is the one used."""
    path.parent.mkdir(parents=True)
    path.write_text("alice@example.test:{PLAIN}first\nALICE@example.test:{PLAIN}second\n")
    store = UserStore(path)
    assert store.verify("alice@example.test", "first")
    assert not store.verify("alice@example.test", "second")


def test_rewrite_leaves_no_temporary_files(path: Path) -> None:
    """After changes only the store and its lock file are in the directory."""
    store = UserStore(path)
    store.add("alice@example.test", "pw")
    store.set_password("alice@example.test", "pw2")
    store.add("bob@example.test", "pw")
    store.delete("bob@example.test")
    assert sorted(p.name for p in path.parent.iterdir()) == ["users", "users.lock"]


def test_failed_rewrite_keeps_the_old_file_and_no_temporary(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the rename fails, the old file is intact, no temp file is left and memory is unchanged."""
    store = UserStore(path)
    store.add("alice@example.test", "pw")
    before = path.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        store.add("bob@example.test", "pw")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["users", "users.lock"]
    assert store.list() == ["alice@example.test"]


def test_change_by_another_instance_is_seen_after_the_reload_interval(path: Path) -> None:
    """A user added by another process shows up at the next check, at most a second later."""
    clock = FakeClock()
    server = UserStore(path, clock=clock)
    assert not server.exists("alice@example.test")
    UserStore(path).add("alice@example.test", "pw")  # the mailsys command, say
    clock.now += 0.5
    assert not server.exists("alice@example.test")  # no stat() within the interval
    clock.now += 0.6
    assert server.exists("alice@example.test")
    UserStore(path).delete("alice@example.test")
    clock.now += 1.0
    assert not server.exists("alice@example.test")


def test_stat_is_called_at_most_once_per_interval(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many lookups within a second cost one stat() of the file, not one each."""
    clock = FakeClock()
    store = UserStore(path, clock=clock)
    calls = []
    real_stat = os.stat

    def counting_stat(*args: object, **kwargs: object) -> os.stat_result:
        calls.append(args[0])
        return real_stat(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("mailsys.auth.users.os.stat", counting_stat)
    for _ in range(100):
        store.exists("alice@example.test")
    assert calls == []
    clock.now += 1.0
    for _ in range(100):
        store.exists("alice@example.test")
    assert len(calls) == 1


def test_changes_keep_what_another_instance_wrote(path: Path) -> None:
    """A change re-reads the file under the lock, so another writer's user is never lost."""
    clock = FakeClock()
    first = UserStore(path, clock=clock)
    second = UserStore(path, clock=clock)
    first.add("alice@example.test", "pw")
    second.add("bob@example.test", "pw")  # second's memory has not seen alice yet
    assert second.list() == ["alice@example.test", "bob@example.test"]
    assert UserStore(path).list() == ["alice@example.test", "bob@example.test"]


def test_concurrent_writers_lose_nothing(path: Path) -> None:
    """Threads adding users through separate instances all end up in the file."""
    names = [f"user{i}@example.test" for i in range(8)]
    errors: list[BaseException] = []

    def add(name: str) -> None:
        try:
            UserStore(path).add(name, "pw")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert UserStore(path).list() == sorted(names)


def test_unknown_user_verify_checks_a_dummy_hash(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verifying an unknown or malformed user still runs the hasher, on the dummy hash."""
    store = UserStore(path)
    store.add("alice@example.test", "pw")
    checked: list[str] = []
    real_verify = passwords.verify_password

    def spy(stored: str, password: str) -> bool:
        checked.append(stored)
        return real_verify(stored, password)

    monkeypatch.setattr("mailsys.auth.users.verify_password", spy)
    assert not store.verify("nobody@example.test", "pw")
    assert not store.verify("not a name", "pw")
    assert checked == [dummy_hash(), dummy_hash()]
    assert store.verify("alice@example.test", "pw")
    assert checked[-1] == store.get_hash("alice@example.test")


def test_unusable_stored_hash_fails_the_login(path: Path) -> None:
    """A user whose hash cannot be checked cannot log in; the store does not raise."""
    path.parent.mkdir(parents=True)
    path.write_text("alice@example.test:{MD5}1a1dc91c907325c69271ddf0c944bc72\n")
    assert not UserStore(path).verify("alice@example.test", "password")


def test_non_utf8_bytes_survive_a_rewrite(path: Path) -> None:
    """A line in another encoding is written back byte for byte."""
    path.parent.mkdir(parents=True)
    path.write_bytes(b"# caf\xe9\n")
    UserStore(path).add("alice@example.test", "pw")
    assert path.read_bytes().startswith(b"# caf\xe9\n")


def test_import_hashed_adds_skips_and_replaces(path: Path) -> None:
    """import_hashed adds new users with their hash and extra fields; existing ones are kept
    unless replace, which changes their hash (and extra fields when given)."""
    store = UserStore(path)
    store.add("old@example.test", "old password")
    result = store.import_hashed([
        ("New@Example.test", f"{{SHA512-CRYPT}}{SHA512}", "::::::userdb_quota_rule=*:storage=1G"),
        ("old@example.test", f"{{SHA512-CRYPT}}{SHA512}", None),
    ])
    assert (result.added, result.replaced, result.skipped) == (
        ["new@example.test"], [], ["old@example.test"])
    assert store.verify("new@example.test", "Hello world!")
    assert store.verify("old@example.test", "old password")
    assert "new@example.test:{SHA512-CRYPT}$6$saltstring$" in path.read_text()
    assert path.read_text().rstrip().endswith("::::::userdb_quota_rule=*:storage=1G")
    result = store.import_hashed([("old@example.test", f"{{SHA512-CRYPT}}{SHA512}", None)],
                                 replace=True)
    assert result.replaced == ["old@example.test"]
    assert store.verify("old@example.test", "Hello world!")


def test_import_hashed_refuses_line_breaks(path: Path) -> None:
    """A hash with a line break or colon would corrupt the file: refused, nothing written."""
    store = UserStore(path)
    with pytest.raises(ValueError):
        store.import_hashed([("a@example.test", "{PLAIN}x\nb@example.test:{PLAIN}y", None)])
    with pytest.raises(ValueError):
        store.import_hashed([("a@example.test", "{PLAIN}x:y", None)])
    assert store.list() == []


def test_server_store_never_touches_the_file_on_lookup(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With reload_on_lookup=False lookups read memory only; reload_if_changed sees changes."""
    clock = FakeClock()
    server = UserStore(path, clock=clock, reload_on_lookup=False)
    UserStore(path).add("alice@example.test", "pw")
    clock.now += 5.0
    touched: list[object] = []
    real_stat = os.stat

    def counting_stat(*args: object, **kwargs: object) -> os.stat_result:
        touched.append(args)
        return real_stat(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", counting_stat)
    assert not server.exists("alice@example.test")
    assert touched == []
    monkeypatch.undo()
    server.reload_if_changed()
    assert server.exists("alice@example.test")


def test_verify_fresh_finds_a_user_added_since_the_last_reload(path: Path) -> None:
    """verify_fresh logs in a user whose line was added after the server's copy was read."""
    server = UserStore(path, reload_on_lookup=False)
    UserStore(path).add("alice@example.test", "pw")  # the mailsys command, say
    assert not server.verify("alice@example.test", "pw")  # the copy is stale
    assert server.verify_fresh("alice@example.test", "pw")
    assert server.exists("alice@example.test")


def test_verify_fresh_accepts_a_password_changed_since_the_last_reload(path: Path) -> None:
    """verify_fresh accepts a new password whose line the server's copy has not seen yet."""
    UserStore(path).add("alice@example.test", "old")
    server = UserStore(path, reload_on_lookup=False)
    UserStore(path).set_password("alice@example.test", "new")
    assert server.verify_fresh("alice@example.test", "new")
    assert not server.verify_fresh("alice@example.test", "old")


def test_verify_fresh_failure_costs_one_check_and_one_stat(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the file unchanged, a failed verify_fresh stats it once, reads nothing, hashes once,
    for an unknown user and a wrong password alike."""
    UserStore(path).add("alice@example.test", "pw")
    server = UserStore(path, reload_on_lookup=False)
    stats: list[object] = []
    checks: list[str] = []
    real_stat = os.stat
    real_verify = passwords.verify_password

    def counting_stat(*args: object, **kwargs: object) -> os.stat_result:
        stats.append(args[0])
        return real_stat(*args, **kwargs)  # type: ignore[arg-type]

    def counting_verify(stored: str, password: str) -> bool:
        checks.append(stored)
        return real_verify(stored, password)

    def no_read(*args: object) -> None:
        raise AssertionError("the file was read")

    monkeypatch.setattr("mailsys.auth.users.os.stat", counting_stat)
    monkeypatch.setattr("mailsys.auth.users.verify_password", counting_verify)
    monkeypatch.setattr(server, "_read", no_read)
    for name, password in (("nobody@example.test", "pw"), ("alice@example.test", "wrong")):
        stats.clear()
        checks.clear()
        assert not server.verify_fresh(name, password)
        assert (len(stats), len(checks)) == (1, 1)


def test_reload_if_changed_is_not_undone_by_an_older_concurrent_load(path: Path) -> None:
    """A reload that loses the race to another thread's older copy looks again, so it still
    returns with the file as it was when it was called."""
    server = UserStore(path, reload_on_lookup=False)
    UserStore(path).add("alice@example.test", "pw")
    # The reload timer's thread took its generation before this change, read "alice only" and
    # installs that copy while our reload is reading the newer file.
    timer_generation = server._generation
    timer_lines = server._read()
    timer_signature = server._stat()
    UserStore(path).add("bob@example.test", "pw")
    real_read = server._read
    raced = []

    def read_then_lose_the_race() -> list[object]:
        lines = real_read()
        if not raced:
            raced.append(True)
            assert server._install(timer_lines, timer_signature, timer_generation)
        return lines  # type: ignore[return-value]

    server._read = read_then_lose_the_race  # type: ignore[method-assign, assignment]
    assert server.reload_if_changed()
    assert raced
    assert server.exists("bob@example.test")


def test_unreadable_file_keeps_the_last_good_copy_and_logs_once(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A changed file the server cannot read leaves the last good copy serving, and one log
    line names the file and its permissions; once readable again, the change is seen."""
    server = UserStore(path, reload_on_lookup=False)
    UserStore(path).add("alice@example.test", "pw")
    server.reload_if_changed()
    UserStore(path).add("carol@example.test", "pw")

    def denied() -> object:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(server, "_read", denied)
    with capturedLogs() as events:
        assert server.reload_if_changed() is False
        assert server.reload_if_changed() is False
        assert server.verify_fresh("alice@example.test", "pw")
        assert not server.verify_fresh("carol@example.test", "pw")
    lines = [formatEvent(e) for e in events]
    assert len(lines) == 1
    assert lines[0].startswith(f"user store {path}: cannot read it: Permission denied (the file "
                               "is ")
    assert "0600" in lines[0] and "keeping the last good copy (1 users)" in lines[0]
    monkeypatch.undo()
    with capturedLogs() as events:
        assert server.reload_if_changed() is True
    assert [formatEvent(e) for e in events] == [f"user store {path}: readable again"]
    assert server.verify_fresh("carol@example.test", "pw")


def test_unreadable_file_at_start_is_an_error(path: Path) -> None:
    """With no good copy to keep, a store that cannot read its file raises at construction."""
    path.mkdir(parents=True)  # reading a directory fails like an unreadable file
    with pytest.raises(IsADirectoryError):
        UserStore(path, reload_on_lookup=False)


def test_admin_flag_is_an_extra_field_dovecot_ignores(path: Path) -> None:
    """add(admin=True) and set_admin write mailsys_admin=yes in the extra-fields column, keep
    every other field, and is_admin reads it back; unknown and plain users are not admins."""
    store = UserStore(path)
    store.add("boss@example.test", "pw", admin=True)
    store.add("plain@example.test", "pw")
    assert store.is_admin("Boss@Example.test") and not store.is_admin("plain@example.test")
    assert not store.is_admin("nobody@example.test") and not store.is_admin("not a name")
    line = next(li for li in path.read_text().splitlines() if li.startswith("boss@"))
    # user:hash:uid:gid:gecos:home:shell:extra_fields (Dovecot's passwd-file columns)
    assert line.split(":", 2)[2] == ":::::mailsys_admin=yes"
    store.set_admin("plain@example.test", True)
    store.set_admin("boss@example.test", False)
    assert store.is_admin("plain@example.test") and not store.is_admin("boss@example.test")
    assert next(li for li in path.read_text().splitlines()
                if li.startswith("boss@")).count(":") == 1  # nothing left after the hash
    with pytest.raises(UnknownUserError):
        store.set_admin("nobody@example.test", True)


def test_admin_flag_keeps_dovecot_fields(path: Path) -> None:
    """A line with uid, gid, home and its own extra fields keeps them when the flag changes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("ann@example.test:{PLAIN}x:1000:1000::/home/ann::userdb_quota_rule=*:10M\n")
    store = UserStore(path)
    store.set_admin("ann@example.test", True)
    assert path.read_text() == ("ann@example.test:{PLAIN}x:1000:1000::/home/ann::"
                                "userdb_quota_rule=*:10M mailsys_admin=yes\n")
    assert store.is_admin("ann@example.test")
    store.set_admin("ann@example.test", False)
    assert path.read_text() == ("ann@example.test:{PLAIN}x:1000:1000::/home/ann::"
                                "userdb_quota_rule=*:10M\n")
