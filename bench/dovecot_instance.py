"""A private Dovecot POP3 server for benchmarks: its own config, runtime dir and Maildir in a temp
dir, listening only on 127.0.0.1:<port>, started in the foreground and stopped by process id.

The system's Dovecot (if any) is never touched: every path is under the temp dir and the master
is started with ``-c <our config>``. One user, demo@example.test with password "demo" (a static
passdb holding the Argon2id hash mailsys stores, so that both servers pay for one password check
per login), whose Maildir is ``<root>/Maildir`` owned by nobody (Dovecot refuses mail as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

from bench.loopback import LOOPBACK, BenchError, require_loopback
from bench.processes import alive, descendants, register_stop, terminate, unregister_stop
from mailsys.auth.passwords import hash_password

DOVECOT = "/usr/sbin/dovecot"
MAIL_UID = 65534  # nobody
MAIL_GID = 65534  # nogroup

_CONFIG = """\
# written by bench/dovecot_instance.py
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
instance_name = bench-{port}
protocols = pop3
listen = {host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{root}/Maildir
first_valid_uid = {uid}
default_login_user = dovenull
default_internal_user = dovecot
passdb {{
  driver = static
  args = password={password_hash}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""


def require_dovecot() -> None:
    """Raise BenchError unless Debian's dovecot-pop3d is installed."""
    if not Path(DOVECOT).exists() or not Path("/usr/lib/dovecot/pop3").exists():
        raise BenchError("Dovecot's POP3 server is needed: apt-get install dovecot-pop3d")


def dovecot_version() -> str:
    try:
        done = subprocess.run([DOVECOT, "--version"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


class DovecotInstance:
    """One Dovecot under ``root`` (an existing empty directory), serving POP3 on ``port``."""

    name = "dovecot"

    def __init__(self, root: Path, port: int, host: str = LOOPBACK) -> None:
        self.root = root
        self.host = require_loopback(host)
        self.port = port
        self.config_path = root / "dovecot.conf"
        self.maildir = root / "Maildir"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._stop_token: int | None = None
        self._known_pids: set[int] = set()

    def install_maildir(self, source: Path) -> None:
        """Copy the Maildir ``source`` to be served, owned by the mail user."""
        shutil.copytree(source, self.maildir)
        for directory, _, files in os.walk(self.root):
            os.chown(directory, MAIL_UID, MAIL_GID)
            for name in files:
                os.chown(os.path.join(directory, name), MAIL_UID, MAIL_GID)

    def start(self, timeout: float = 30.0) -> None:
        """Write the config, start the master in the foreground, wait for the +OK greeting."""
        for sub in ("run", "state", "home"):
            (self.root / sub).mkdir(exist_ok=True)
        os.chown(self.root / "home", MAIL_UID, MAIL_GID)
        # The same Argon2id hash scheme mailsys stores (Dovecot's {ARGON2ID} format): a plain
        # password here let Dovecot skip the check that costs mailsys 0.05-0.1 s per login.
        self.config_path.write_text(_CONFIG.format(
            root=self.root, host=self.host, port=self.port, uid=MAIL_UID, gid=MAIL_GID,
            password_hash=hash_password("demo")))
        self._log = (self.root / "stdout.log").open("wb")
        self._stop_token = register_stop(self.stop)
        self._process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.config_path)], cwd=self.root,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BenchError(f"dovecot exited with {self._process.returncode}:\n"
                                 f"{self.log_tail()}")
            if pop3_greeting(self.host, self.port).startswith("+OK"):
                self.pids()
                return
            time.sleep(0.1)
        raise BenchError(f"dovecot did not greet on {self.host}:{self.port}\n{self.log_tail()}")

    def pids(self) -> list[int]:
        if self._process is None or self._process.poll() is not None:
            return []
        found = descendants([self._process.pid])
        self._known_pids.update(found)
        return found

    def stop(self) -> None:
        """SIGTERM the master by pid (SIGKILL after 15 s), then anything of its tree left."""
        if self._stop_token is not None:
            unregister_stop(self._stop_token)
            self._stop_token = None
        process = self._process
        if process is None:
            return
        self.pids()
        try:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15.0)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5.0)
            leftovers = [pid for pid in self._known_pids if pid != process.pid and alive(pid)]
            survivors = terminate(leftovers, timeout=5.0)
            if survivors:
                raise BenchError(f"dovecot processes still alive after SIGKILL: {survivors}")
        finally:
            self._process = None
            if self._log is not None:
                self._log.close()
                self._log = None

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for name in ("stdout.log", "dovecot.log"):
            try:
                text = (self.root / name).read_text(errors="replace")
            except OSError:
                continue
            parts.append("\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or "(no dovecot log)"


def pop3_greeting(host: str, port: int) -> str:
    """The first line a POP3 server at host:port sends, or "" if it does not answer."""
    require_loopback(host)
    try:
        with socket.create_connection((host, port), timeout=2.0) as sock:
            data = b""
            while not data.endswith(b"\n") and len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
            return data.decode("utf-8", "replace").strip()
    except OSError:
        return ""
