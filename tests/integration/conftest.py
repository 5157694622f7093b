"""Fixtures that run the real server: `twistd -n mailsys` as a subprocess on free loopback ports.

Every server started here is stopped by its process id at teardown, whatever the test did.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
MAILSYS = str(BIN / "mailsys")
START_DEADLINE = 30.0
# Servers under test never ask the system's resolver: relay stays off unless a test configures
# it with a lab DNS on loopback (tests/integration/test_relay.py).
RELAY_DISABLED = """
[relay]
enabled = false
"""
# Nor do they check mail authentication, which asks DNS, unless a test gives a lab DNS
# (tests/integration/test_authn.py).
AUTHN_DISABLED = """
[authn]
checks = false
"""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], object], deadline: float = 10.0, interval: float = 0.02,
              message: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy, or fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline}s waiting for {message}")
        time.sleep(interval)


def read_greeting(port: int, timeout: float = 2.0, host: str = "127.0.0.1") -> bytes:
    """Connect to host:port and read the first line, or b'' if nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = sock.recv(1024)
                if not chunk:
                    break
                data += chunk
            return data
    except OSError:
        return b""


@dataclass
class MailServer:
    """A running `twistd -n mailsys` in its own directory, with its ports and paths."""

    directory: Path
    smtp_port: int
    submission_port: int
    submissions_port: int
    smtp_extra: str = ""
    extra_config: str = ""
    # The loopback address every listener binds (127.0.0.2, 127.0.0.3 ... for a second host).
    interface: str = "127.0.0.1"
    local_domains: tuple[str, ...] = ("example.test", "lab.test")
    aliases: str = ""  # more lines for [routing.aliases]
    relay_config: str = RELAY_DISABLED  # the whole [relay] section
    authn_config: str = AUTHN_DISABLED  # the whole [authn] section
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.directory / "twistd.log"

    @property
    def config_path(self) -> Path:
        return self.directory / "mailsys.toml"

    @property
    def maildirs(self) -> Path:
        return self.directory / "maildirs"

    @property
    def spool(self) -> Path:
        return self.directory / "var" / "spool"

    def inbox(self, mailbox: str = "demo@example.test") -> Path:
        user, domain = mailbox.split("@")
        return self.maildirs / domain / user / "new"

    def inbox_files(self, mailbox: str = "demo@example.test") -> list[Path]:
        inbox = self.inbox(mailbox)
        return sorted(inbox.iterdir()) if inbox.is_dir() else []

    def write_config(self) -> None:
        d = self.directory
        self.config_path.write_text(f"""
[server]
hostname = "mail.example.test"

[storage]
spool = "{d}/var/spool"
maildirs = "{d}/maildirs"
users = "{d}/var/users"

[tls]
certificate = "{d}/var/tls/cert.pem"
key = "{d}/var/tls/key.pem"
create_self_signed = true

[smtp]
listen = ["tcp:{self.smtp_port}:interface={self.interface}:backlog=1024"]
{self.smtp_extra}

[submission]
listen = ["tcp:{self.submission_port}:interface={self.interface}:backlog=1024"]
listen_tls = ["tcp:{self.submissions_port}:interface={self.interface}:backlog=1024"]

[routing]
local_domains = {json.dumps(list(self.local_domains))}

[routing.aliases]
"team@example.test" = ["demo@example.test", "second@example.test"]
{self.aliases}
{self.relay_config}
{self.authn_config}

[dev]
demo_user = "demo@example.test"
demo_password = "demo"
{self.extra_config}
""")

    def start(self) -> None:
        """Start the server and wait until every listener greets."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "mailsys", "--config", str(self.config_path)],
            cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        for port in (self.smtp_port, self.submission_port, self.submissions_port):
            self._wait_listening(port)

    def _wait_listening(self, port: int) -> None:
        end = time.monotonic() + START_DEADLINE
        while time.monotonic() < end:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.interface, port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"port {port} not listening after {START_DEADLINE}s:\n{self.log()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the server by its process id and reap it."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def add_user(self, mailbox: str, password: str) -> None:
        """Add a user with the `mailsys` command, as an administrator would (also while running)."""
        subprocess.run(
            [MAILSYS, "--config", str(self.config_path), "user", "add", mailbox,
             "--password-stdin"],
            input=f"{password}\n".encode(), check=True, capture_output=True, timeout=60,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def make_server(directory: Path, smtp_extra: str = "", extra_config: str = "",
                **fields: Any) -> MailServer:
    """A configured, not started server; ``fields`` set MailServer fields (interface, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    # Free on the address the server binds: a port free on 127.0.0.1 may be taken on 127.0.0.2
    # (other loopback hosts, a lab).
    host = fields.get("interface", "127.0.0.1")
    server = MailServer(directory, free_port(host), free_port(host), free_port(host), smtp_extra,
                        extra_config, **fields)
    server.write_config()
    return server


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., MailServer]]:
    """Make (not start) servers in tmp_path; all are stopped at teardown."""
    made: list[MailServer] = []

    def factory(name: str = "server", smtp_extra: str = "", extra_config: str = "",
                **fields: Any) -> MailServer:
        server = make_server(tmp_path / name, smtp_extra, extra_config, **fields)
        made.append(server)
        return server

    yield factory
    for server in made:
        server.kill()


@pytest.fixture
def server(server_factory: Callable[..., MailServer]) -> MailServer:
    """A started mail server on the test configuration."""
    srv = server_factory()
    srv.start()
    return srv
