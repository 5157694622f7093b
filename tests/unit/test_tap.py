"""The twistd plugin's options: the server's account from the config and twistd's --uid/--gid,
and the warning when it would keep running as root."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage

from mailsys import tap
from mailsys.config import from_mapping
from mailsys.ownership import OwnershipError, resolve_account


class FakeTwistd(usage.Options):
    """Stands for twistd's ServerOptions: a dict with uid and gid (ints, as twistd makes them)."""

    def __init__(self, uid: int | None = None, gid: int | None = None) -> None:
        super().__init__()
        self["uid"] = uid
        self["gid"] = gid


def options(tmp_path: Path, server: dict[str, str], twistd: FakeTwistd | None) -> tap.Options:
    config = from_mapping({"server": server}, tmp_path / "mailsys.toml")
    opts = tap.Options()
    opts["loaded"] = config
    opts["account"] = tap._server_account(config, twistd)
    if twistd is not None:
        opts.parent = twistd
    return opts


def test_account_from_the_config_or_from_twistd(tmp_path: Path) -> None:
    """[server] user names the account; without it, twistd's --uid/--gid do; neither: none."""
    nobody = pwd.getpwnam("nobody")
    assert options(tmp_path, {"user": "nobody"}, None)["account"] == resolve_account("nobody")
    from_twistd = options(tmp_path, {}, FakeTwistd(nobody.pw_uid, nobody.pw_gid))["account"]
    assert from_twistd == resolve_account("nobody")
    assert options(tmp_path, {}, FakeTwistd())["account"] is None
    same = options(tmp_path, {"user": "nobody"}, FakeTwistd(nobody.pw_uid))["account"]
    assert same == resolve_account("nobody")


def test_twistd_and_config_naming_different_accounts_is_refused(tmp_path: Path) -> None:
    """--uid of one account and [server] user of another is one clear error."""
    with pytest.raises(OwnershipError, match=r"twistd runs the server as root:root .* but "
                                             r".*mailsys.toml says \[server\] user/group nobody"):
        options(tmp_path, {"user": "nobody"}, FakeTwistd(0, 0))


def test_root_without_uid_warns_once_naming_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root without --uid, one warning line names twistd's --uid flag; with it, none."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with capturedLogs() as events:
        tap._warn_if_root(options(tmp_path, {"user": "nobody"}, FakeTwistd()))
    group = resolve_account("nobody").group  # type: ignore[union-attr]
    assert [formatEvent(e) for e in events] == [
        "running as root: give twistd --uid (and --gid) to serve as an unprivileged account, "
        f"e.g. twistd --uid=nobody --gid={group} mailsys"]
    nobody = pwd.getpwnam("nobody")
    with capturedLogs() as events:
        tap._warn_if_root(options(tmp_path, {}, FakeTwistd(nobody.pw_uid)))
    assert list(events) == []
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with capturedLogs() as events:
        tap._warn_if_root(options(tmp_path, {}, FakeTwistd()))
    assert list(events) == []
