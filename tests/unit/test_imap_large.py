"""A 10,000-message mailbox: SELECT and UID FETCH of flags open no message file."""

from __future__ import annotations

import builtins
import os
import time
from pathlib import Path
from typing import Any

import pytest

from mailsys.mailbox.folder import Folder
from mailsys.mailbox.names import format_base
from tests.unit.imap_support import Server

COUNT = 10_000


def test_select_and_fetch_flags_read_no_message(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """SELECT and UID FETCH 1:* (UID FLAGS) of 10,000 messages only list and stat files."""
    server = Server(tmp_path / "maildirs", allow_plaintext_auth=True)
    inbox = server.inbox
    for sub in ("cur", "new", "tmp"):
        (inbox / sub).mkdir(parents=True)
    body = b"Subject: x\n\nbody\n"
    for i in range(COUNT):
        # Names as a sync leaves them, with UIDs: the state of a mailbox in daily use.
        base = format_base(f"{1_700_000_000 + i}.M{i}.host", size=len(body),
                           wire_size=len(body) + 3, uid=i + 1)
        (inbox / "cur" / f"{base}:2,{'S' if i % 3 else ''}").write_bytes(body)
    Folder(inbox).sync()
    client = server.connect()
    client.login()
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(os.fspath(file) if isinstance(file, str | os.PathLike) else str(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(os.fspath(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    started = time.perf_counter()
    out = client.select()
    assert f"* {COUNT} EXISTS" in out
    out = client.ok("UID FETCH 1:* (UID FLAGS)")
    elapsed = time.perf_counter() - started
    monkeypatch.undo()
    assert out.count(" FETCH (UID ") == COUNT
    assert "* 9999 FETCH (UID 9999 FLAGS (\\Seen))" in out
    assert "* 10000 FETCH (UID 10000 FLAGS ())" in out
    messages = [p for p in opened if os.sep + "cur" + os.sep in p or os.sep + "new" + os.sep in p]
    assert messages == []  # no message was opened: names and stat() were enough
    assert elapsed < 20
