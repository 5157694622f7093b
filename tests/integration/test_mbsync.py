"""mbsync (isync) syncs a whole mailbox tree with the real server, both ways, over STARTTLS."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import MailServer
from tests.integration.test_imap import PASSWORD, USER, IMAPServer, make_imap

# server folder -> [(flags for APPEND, message)]
SEED: dict[str, list[tuple[str, bytes]]] = {
    "INBOX": [("(\\Seen)", b"Subject: in 1\r\n\r\nfirst\r\n"),
              ("(\\Flagged)", b"Subject: in 2\r\n\r\nsecond\r\n.dot line\r\n"),
              ("", b"Subject: in 3\r\n\r\n\xe9t\xe9 8-bit\r\n")],
    "Sent": [("(\\Seen)", b"Subject: sent 1\r\n\r\nsent\r\n")],
    "Archive.2026": [("(\\Seen \\Answered)", b"Subject: old 1\r\n\r\nold\r\n"),
                     ("(\\Seen)", b"Subject: old 2\r\n\r\nolder\r\n")],
}


def _mbsync_config(home: Path, imap: IMAPServer) -> Path:
    rc = home / "mbsyncrc"
    rc.write_text(f"""
IMAPAccount mailsys
Host 127.0.0.1
Port {imap.port}
User {USER}
Pass {PASSWORD}
SSLType STARTTLS
CertificateFile {imap.mail.directory / "var/tls/cert.pem"}

IMAPStore far
Account mailsys

MaildirStore near
Path {home}/mail/
Inbox {home}/mail/INBOX
SubFolders Verbatim

Channel all
Far :far:
Near :near:
Patterns *
Create Both
Expunge Both
SyncState *
CopyArrivalDate yes
""")
    return rc


def _mbsync(home: Path, rc: Path) -> None:
    mbsync = shutil.which("mbsync")
    assert mbsync is not None, "mbsync is needed (Debian package isync)"
    done = subprocess.run([mbsync, "-c", str(rc), "-a"], env={"HOME": str(home)},
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def _local(home: Path) -> dict[str, dict[bytes, str]]:
    """folder (server name) -> {message with LF line ends: Maildir flags}, of the near side."""
    out: dict[str, dict[bytes, str]] = {}
    root = home / "mail"
    for directory, subdirs, _ in os.walk(root):
        if "cur" not in subdirs:
            continue
        name = os.path.relpath(directory, root).replace(os.sep, ".")
        messages = {}
        for sub in ("cur", "new"):
            for file in os.listdir(Path(directory) / sub):
                data = (Path(directory) / sub / file).read_bytes().replace(b"\r\n", b"\n")
                # mbsync marks the copies it writes with its own X-TUID field.
                data = re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", data, count=1)
                flags = file.rpartition(":2,")[2] if ":2," in file else ""
                messages[data] = "".join(sorted(c for c in flags if c.isupper() and c != "T"))
        out[name] = messages
    return out


_LETTERS = {"\\Seen": "S", "\\Flagged": "F", "\\Answered": "R", "\\Draft": "D",
            "$Forwarded": "P"}


def _remote_flags(imap: IMAPServer) -> dict[str, dict[bytes, str]]:
    """folder -> {message with LF line ends: flags as Maildir letters}, as IMAP shows it."""
    client = imap.starttls()
    out: dict[str, dict[bytes, str]] = {}
    _, listing = client.list()
    for line in listing:
        assert isinstance(line, bytes)
        name = re.search(rb'"\." "?([^"]*)"?$', line).group(1).decode()  # type: ignore[union-attr]
        _, count = client.select(f'"{name}"')
        messages = {}
        for number in range(1, int(count[0] or 0) + 1):  # type: ignore[arg-type]
            _, flag_data = client.fetch(str(number), "(FLAGS)")
            names = re.search(rb"FLAGS \(([^)]*)\)", flag_data[0]).group(1)  # type: ignore
            _, body = client.fetch(str(number), "(BODY.PEEK[])")
            letters = "".join(sorted(_LETTERS[n] for n in names.decode().split()
                                     if n in _LETTERS))
            data = body[0][1].replace(b"\r\n", b"\n")  # type: ignore[index]
            # mbsync marks what it uploads with its own X-TUID field.
            messages[re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", data, count=1)] = letters
        out[name] = messages
    client.logout()
    return out


def test_mbsync_round_trip(server_factory: Callable[..., MailServer], tmp_path: Path) -> None:
    """mbsync pulls every folder with flags and contents, then pushes local changes back."""
    imap = make_imap(server_factory)
    client = imap.starttls()
    client.create("Archive.2026")
    for folder, messages in SEED.items():
        for flags, data in messages:
            status, _ = client.append(folder, flags or None, None, data)
            assert status == "OK"
    client.logout()
    home = tmp_path / "home"
    (home / "mail").mkdir(parents=True)
    rc = _mbsync_config(home, imap)

    # --- far to near: everything arrives, with its flags ---
    _mbsync(home, rc)
    local = _local(home)
    remote = _remote_flags(imap)
    assert set(local) == set(remote) >= {"INBOX", "Sent", "Archive.2026", "Drafts", "Junk",
                                         "Trash"}
    assert local == remote
    assert remote["INBOX"][b"Subject: in 2\n\nsecond\n.dot line\n"] == "F"
    assert remote["Archive.2026"][b"Subject: old 1\n\nold\n"] == "RS"

    # --- near to far: a new message, a flag change, a deletion and a new folder ---
    inbox = home / "mail" / "INBOX"
    (inbox / "new" / "1800000000.local1.host").write_bytes(b"Subject: local\n\nwritten here\n")
    for sub in ("cur", "new"):
        for file in os.listdir(inbox / sub):
            data = (inbox / sub / file).read_bytes()
            base, _, flags = file.partition(":2,")
            if b"Subject: in 3" in data:
                os.rename(inbox / sub / file, inbox / "cur" / f"{base}:2,{flags}FS")
            if b"Subject: in 1" in data:
                os.unlink(inbox / sub / file)
    extra = home / "mail" / "Local"
    for sub in ("cur", "new", "tmp"):
        (extra / sub).mkdir(parents=True)
    (extra / "cur" / "1800000001.local2.host:2,S").write_bytes(b"Subject: folder\n\nnew\n")
    _mbsync(home, rc)
    local = _local(home)
    remote = _remote_flags(imap)
    assert local == remote
    assert b"Subject: in 1\n\nfirst\n" not in remote["INBOX"]
    assert remote["INBOX"][b"Subject: local\n\nwritten here\n"] == ""
    assert remote["INBOX"][b"Subject: in 3\n\n\xe9t\xe9 8-bit\n"] == "FS"
    assert remote["Local"] == {b"Subject: folder\n\nnew\n": "S"}

    # --- and again: nothing left to do, nothing changes ---
    _mbsync(home, rc)
    assert _local(home) == local and _remote_flags(imap) == remote
