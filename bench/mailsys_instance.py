"""A private mailsys for benchmarks: ``twistd -n mailsys`` with its own config in a temp dir.

It listens only on 127.0.0.1:<port>, accepts mail for demo@example.test and delivers it to
<root>/maildirs/example.test/demo/new/. mailsys's durability is its default: the spool fsyncs
message, envelope and commit directory before 250; the Maildir writer fsyncs the file and new/.
"""

from __future__ import annotations

import pstats
import subprocess
import sys
from pathlib import Path
from typing import IO

from bench.loopback import LOOPBACK, BenchError, require_loopback, wait_for_greeting
from bench.processes import alive, descendants, register_stop, terminate, unregister_stop

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "example.test"
# Mail authentication asks DNS; off unless the benchmark serves a lab zone (--authn).
AUTHN_OFF = "[authn]\nchecks = false"
RECIPIENT = f"demo@{DOMAIN}"

_CONFIG = """\
# written by bench/mailsys_instance.py
[server]
hostname = "mail.example.test"

[storage]
spool = "{root}/var/spool"
maildirs = "{root}/maildirs"
users = "{root}/var/users"

[smtp]
listen = ["tcp:{port}:interface={host}:backlog=1024"]
max_connections_per_client = 100

[routing]
local_domains = ["{domain}"]

{authn}

[dev]
demo_user = "{recipient}"
demo_password = "demo"
"""


def twistd_path() -> Path:
    """The twistd of the venv running this script, else the repository's .venv."""
    here = Path(sys.executable).parent / "twistd"
    return here if here.exists() else REPO / ".venv" / "bin" / "twistd"


def mailsys_revision() -> str:
    """The repository's HEAD commit (read-only), or "unknown"."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    dirty = ""
    try:
        status = subprocess.run(
            [
                "git",
                "--no-optional-locks",
                "-C",
                str(REPO),
                "status",
                "--porcelain",
                "--untracked-files=no",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = "+dirty" if status.stdout.strip() else ""
    except (OSError, subprocess.TimeoutExpired):
        pass
    return (done.stdout.strip() or "unknown") + dirty


class MailsysInstance:
    """One mailsys under ``root`` (which must exist and be empty), run as a twistd child."""

    name = "mailsys"

    def __init__(self, root: Path, port: int, host: str = LOOPBACK,
                 profile: Path | None = None, journey: bool | None = None,
                 authn: str = AUTHN_OFF, defence: str = "") -> None:
        self.root = root
        self.defence = defence  # a [defence] section, or "" for the configuration's default
        # Message journey recording ([journey] enabled); None: the configuration's default.
        self.journey = journey
        self.authn = authn
        # With a path, twistd runs mailsys under cProfile and saves its stats there at exit.
        self.profile = profile
        self.host = require_loopback(host)
        self.port = port
        self.config_path = root / "mailsys.toml"
        self.log_path = root / "twistd.log"
        self.maildir_new = root / "maildirs" / DOMAIN / "demo" / "new"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._known_pids: set[int] = set()
        self._stop_token: int | None = None

    @property
    def root_pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def write_config(self) -> None:
        (self.root / "var").mkdir()
        self.config_path.write_text(
            _CONFIG.format(
                root=self.root, port=self.port, host=self.host, domain=DOMAIN, recipient=RECIPIENT,
                authn=self.authn,
            )
            + f'\n[journey]\npath = "{self.root}/var/journey.sqlite"\n'
            + ("" if self.journey is None else f"enabled = {str(self.journey).lower()}\n")
            + self.defence
        )

    def start(self, timeout: float = 60.0) -> None:
        """Write the config, start twistd in the foreground, wait for the 220 greeting."""
        self.write_config()
        argv = [str(twistd_path()), "-n", "--pidfile="]
        if self.profile is not None:
            argv += [f"--profile={self.profile}", "--profiler=cprofile", "--savestats"]
        argv += ["mailsys", "--config", str(self.config_path)]
        self._log = self.log_path.open("wb")
        self._stop_token = register_stop(self.stop)
        self._process = subprocess.Popen(
            argv,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process = self._process
        try:
            wait_for_greeting(
                self.host, self.port, timeout=timeout, alive=lambda: process.poll() is None
            )
        except BenchError as exc:
            raise BenchError(f"mailsys did not start: {exc}\n{self.log_tail()}") from None

    def pids(self) -> list[int]:
        """The twistd process and any children it has right now."""
        if self._process is None or self._process.poll() is not None:
            return []
        found = descendants([self._process.pid])
        self._known_pids.update(found)
        return found

    def stop(self) -> None:
        """SIGTERM twistd by pid (SIGKILL after 15 s), then any children it left behind."""
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
                raise BenchError(f"mailsys processes still alive after SIGKILL: {survivors}")
        finally:
            self._process = None
            if self._log is not None:
                self._log.close()
                self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no twistd log)"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> dict[str, str]:
        return {
            "version": mailsys_revision(),
            "durability": "spool fsyncs message, envelope and commit directory before 250; "
            "Maildir writer fsyncs the file, renames it into new/ and fsyncs new/ (defaults)",
            "processes": "twistd and any children it starts",
        }


def print_profile(path: Path, top: int = 25) -> None:
    """Print the functions of a ``--profile`` run that took the most time of their own."""
    if not path.exists():
        print(f"(no profile at {path}: twistd saves it only when it stops cleanly)")
        return
    print(f"\n== where mailsys's time went (cProfile, own time, top {top}) ==")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(top)
