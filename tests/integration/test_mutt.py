"""mutt (Debian's) reads the demo INBOX over IMAPS from the real server, scripted.

mutt has no batch mode for reading mail: it runs here on a pseudo-terminal, and the keys it
would get from a user come from ``push``: tag every message, pipe each to a file, quit. What
matters is what mutt itself fetched over IMAP (its own parser, TLS and login), so the test
checks the bytes mutt wrote, not the screen.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import MailServer
from tests.integration.test_imap import PASSWORD, USER, IMAPServer, make_imap

MESSAGES = [b"Subject: first for mutt\r\n\r\nhello mutt\r\n",
            b"Subject: second for mutt\r\n\r\nline one\r\nline two\r\n"]


def _muttrc(home: Path, imap: IMAPServer, out: Path) -> Path:
    # The server's self-signed certificate is trusted by being in certificate_file (what mutt
    # stores when a user accepts one); its name is not 127.0.0.1, hence ssl_verify_host.
    rc = home / "muttrc"
    certificate = imap.mail.directory / "var/tls/cert.pem"
    rc.write_text(f"""
set folder="imaps://{USER}@127.0.0.1:{imap.tls_port}/"
set spoolfile="+INBOX"
set imap_user="{USER}"
set imap_pass="{PASSWORD}"
set certificate_file="{certificate}"
set ssl_verify_host=no
set ssl_starttls=no
set header_cache=""
set message_cachedir=""
set pipe_split=yes
set pipe_decode=no
set wait_key=no
set mark_old=no
set move=no
set confirmappend=no
set quit=yes
set sort=date-sent
push "<tag-pattern>~A<enter><tag-prefix><pipe-message>cat >> {out}<enter><quit>"
""")
    return rc


def _run_on_pty(argv: list[str], env: dict[str, str], deadline: float) -> tuple[int, bytes]:
    """Run ``argv`` with a pseudo-terminal as its terminal; (exit status, screen output)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                               start_new_session=True, close_fds=True)
    os.close(slave)
    screen = b""
    try:
        while process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    break
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        return process.wait(timeout=10), screen
    finally:
        os.close(master)


def test_mutt_reads_the_inbox_over_imaps(server_factory: Callable[..., MailServer],
                                         tmp_path: Path) -> None:
    """mutt logs in over implicit TLS, opens the INBOX and fetches every message whole."""
    mutt = shutil.which("mutt")
    if mutt is None:
        pytest.fail("mutt is needed (Debian package mutt)")
    imap = make_imap(server_factory)
    client = imap.implicit()
    for data in MESSAGES:
        status, _ = client.append("INBOX", None, None, data)
        assert status == "OK"
    client.logout()
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "piped"
    rc = _muttrc(home, imap, out)
    env = {"HOME": str(home), "TERM": "vt100", "LINES": "40", "COLUMNS": "120",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    status, screen = _run_on_pty([mutt, "-n", "-F", str(rc)], env, time.monotonic() + 60)
    text = screen.decode("utf-8", "replace")
    assert status == 0, text[-2000:]
    assert out.exists(), text[-2000:]
    piped = out.read_bytes().replace(b"\r\n", b"\n")
    for data in MESSAGES:
        assert data.replace(b"\r\n", b"\n") in piped, piped
