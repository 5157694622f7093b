"""IMAP benchmark: mailsys and Dovecot side by side, each serving a copy of one Maildir.

This script owns the run. It writes a Maildir of N messages (bench/pop3_fetch.py's messages:
about SIZE bytes, CRLF line ends), gives each server its own copy in a temporary directory,
starts the server on a free loopback port, and times what a client waits for:

- ``login+SELECT``: connect, greeting, LOGIN, SELECT INBOX (the first one, on a mailbox no
  server has opened, is reported apart as "cold": both number/index the messages then);
- ``FETCH 1:* (UID FLAGS)`` (what a client does to resynchronise flags);
- ``FETCH 1:* BODY.PEEK[]`` (downloading everything, checked byte for byte);
- ``SEARCH SUBJECT x`` (a header search over every message; no message matches).

Each step is repeated (median of --repeat). The client is a minimal raw-socket client shared by
both servers, so that its own cost stays small next to the servers'. Servers are stopped by
process id. With --profile, mailsys runs under cProfile and the top functions are printed.

    .venv/bin/python bench/imap_bench.py [--messages 5000] [--size 4096] [--repeat 5]
                                         [--only mailsys|dovecot] [--profile] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from bench.dovecot_instance import (  # noqa: E402
    DOVECOT,
    MAIL_GID,
    MAIL_UID,
    DovecotInstance,
    dovecot_version,
)
from bench.loopback import LOOPBACK, BenchError, free_port, require_loopback  # noqa: E402
from bench.mailsys_instance import MailsysInstance, mailsys_revision, print_profile  # noqa: E402
from bench.pop3_fetch import make_maildir  # noqa: E402
from bench.processes import install_exit_handlers, register_stop  # noqa: E402
from mailsys.auth.passwords import hash_password  # noqa: E402
from mailsys.mailbox.folder import SETTLE_SECONDS  # noqa: E402

USER = "demo@example.test"
PASSWORD = "demo"
SERVERS = ("mailsys", "dovecot")
STEPS = ("login+SELECT", "FETCH 1:* (UID FLAGS)", "FETCH 1:* BODY.PEEK[]", "SEARCH SUBJECT x")
RESULTS_DIR = _REPO / "bench" / "results"

_DOVECOT_IMAP = """\
# written by bench/imap_bench.py
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
instance_name = bench-imap-{port}
protocols = imap
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
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


def imap_greeting(host: str, port: int) -> str:
    """The first line an IMAP server at host:port sends, or "" if it does not answer."""
    require_loopback(host)
    try:
        with socket.create_connection((host, port), timeout=2.0) as sock:
            data = sock.recv(4096)
            sock.sendall(b"z LOGOUT\r\n")
            return data.decode("utf-8", "replace").strip()
    except OSError:
        return ""


class DovecotIMAP(DovecotInstance):
    """bench's private Dovecot, serving IMAP instead of POP3 (dovecot-imapd)."""

    extra_config = ""  # settings appended to the configuration (bench/imap_login.py)

    def start(self, timeout: float = 30.0) -> None:
        for sub in ("run", "state", "home"):
            (self.root / sub).mkdir(exist_ok=True)
        os.chown(self.root / "home", MAIL_UID, MAIL_GID)
        # The same Argon2id hash scheme mailsys stores (Dovecot's {ARGON2ID} format), so that
        # both servers pay for one password check per login.
        self.config_path.write_text(_DOVECOT_IMAP.format(
            root=self.root, host=self.host, port=self.port, uid=MAIL_UID, gid=MAIL_GID,
            password_hash=hash_password(PASSWORD)) + self.extra_config)
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
            if imap_greeting(self.host, self.port).startswith("* OK"):
                self.pids()
                return
            time.sleep(0.1)
        raise BenchError(f"dovecot did not greet on {self.host}:{self.port}\n{self.log_tail()}")


class MailsysIMAP(MailsysInstance):
    """bench's private mailsys with a plaintext IMAP listener (like Dovecot's here: no TLS)."""

    def __init__(self, root: Path, smtp_port: int, imap_port: int,
                 profile: Path | None = None) -> None:
        super().__init__(root, smtp_port, profile=profile)
        self.imap_port = imap_port

    def write_config(self) -> None:
        super().write_config()
        with self.config_path.open("a") as config:
            config.write(
                f'\n[imap]\nlisten = ["tcp:{self.imap_port}:interface={self.host}:backlog=1024"]'
                "\nallow_plaintext_auth = true\n")

    def install_maildir(self, source: Path) -> None:
        target = self.root / "maildirs" / "example.test" / "demo"
        target.parent.mkdir(parents=True)
        shutil.copytree(source, target)

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        deadline = time.monotonic() + timeout
        while not imap_greeting(self.host, self.imap_port).startswith("* OK"):
            if time.monotonic() > deadline:
                raise BenchError(f"mailsys IMAP did not greet\n{self.log_tail()}")
            time.sleep(0.05)


class RawClient:
    """A minimal IMAP client: sends a command, reads until its tagged answer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._tag = 0
        self._buffer = b""
        while b"\r\n" not in self._buffer:
            self._buffer += self.sock.recv(65536)
        self._buffer = self._buffer.partition(b"\r\n")[2]

    def command(self, line: str) -> bytes:
        self._tag += 1
        tag = b"b%d " % self._tag
        self.sock.sendall(tag + line.encode() + b"\r\n")
        chunks = [self._buffer]
        tail = self._buffer
        while True:
            end = _tagged_end(tail, tag)
            if end >= 0:
                data = b"".join(chunks)
                cut = len(data) - len(tail) + end
                response, self._buffer = data[:cut], data[cut:]
                line_start = response.rfind(b"\r\n" + tag)
                line_start = line_start + 2 if line_start >= 0 else 0
                if not response.startswith(tag + b"OK", line_start):
                    raise BenchError(f"{line!r}: {response[-300:]!r}")
                return response
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise BenchError(f"connection closed during {line!r}")
            chunks.append(chunk)
            tail = tail[-200:] + chunk

    def close(self) -> None:
        with contextlib.suppress(BenchError, OSError):
            self.command("LOGOUT")
        self.sock.close()


def _tagged_end(data: bytes, tag: bytes) -> int:
    """The offset just after the tagged response line in ``data``, or -1."""
    position = data.rfind(b"\r\n" + tag)
    start = position + 2 if position >= 0 else (0 if data.startswith(tag) else -1)
    if start < 0:
        return -1
    end = data.find(b"\r\n", start)
    return end + 2 if end >= 0 else -1


@dataclass
class ServerResult:
    server: str
    cold_login_select: float | None = None
    times: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None

    def median(self, step: str) -> float | None:
        values = self.times.get(step)
        return statistics.median(values) if values else None


def one_round(port: int, count: int, expected: dict[str, int], result: ServerResult,
              check_bodies: bool) -> None:
    t0 = time.perf_counter()
    client = RawClient(port)
    client.command(f"LOGIN {USER} {PASSWORD}")
    selected = client.command("SELECT INBOX")
    t1 = time.perf_counter()
    if b"* %d EXISTS" % count not in selected:
        raise BenchError(f"SELECT did not report {count} messages: {selected[:300]!r}")
    flags = client.command("FETCH 1:* (UID FLAGS)")
    t2 = time.perf_counter()
    if flags.count(b" FETCH (") != count:
        raise BenchError(f"FETCH (UID FLAGS) gave {flags.count(b' FETCH (')} responses")
    bodies = client.command("FETCH 1:* BODY.PEEK[]")
    t3 = time.perf_counter()
    searched = client.command("SEARCH SUBJECT x")
    t4 = time.perf_counter()
    if b"* SEARCH\r\n" not in searched:
        raise BenchError(f"SEARCH SUBJECT x matched something: {searched[:200]!r}")
    client.close()
    if check_bodies:
        check(bodies, count, expected)
    for step, seconds in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
        result.times.setdefault(step, []).append(seconds)


_LITERAL = re.compile(rb"BODY\[\] \{(\d+)\}\r\n")


def check(data: bytes, count: int, expected: dict[str, int]) -> None:
    """Every message of the FETCH BODY[] answer against what was written."""
    got: dict[str, int] = {}
    position = 0
    for _ in range(count):
        match = _LITERAL.search(data, position)
        if match is None:
            raise BenchError("fewer BODY[] literals than messages")
        size = int(match.group(1))
        body = data[match.end():match.end() + size]
        digest = hashlib.sha256(body).hexdigest()
        got[digest] = got.get(digest, 0) + 1
        position = match.end() + size
    if got != expected:
        raise BenchError("fetched messages differ from the Maildir")


def run_server(kind: str, source: Path, expected: dict[str, int], args: argparse.Namespace,
               workdir: Path) -> ServerResult:
    result = ServerResult(kind)
    root = workdir / kind
    root.mkdir()
    server: MailsysIMAP | DovecotIMAP
    if kind == "mailsys":
        profile = workdir / "mailsys.prof" if args.profile else None
        server = MailsysIMAP(root, free_port(), free_port(), profile)
        port = server.imap_port
    else:
        server = DovecotIMAP(root, free_port())
        port = server.port
    server.install_maildir(source)
    try:
        server.start()
        t0 = time.perf_counter()
        client = RawClient(port)
        client.command(f"LOGIN {USER} {PASSWORD}")
        client.command("SELECT INBOX")
        result.cold_login_select = time.perf_counter() - t0
        client.close()
        one_round(port, args.messages, expected, ServerResult(kind), check_bodies=True)  # warm
        # A mailbox at rest, as between a client's visits: mailsys trusts a folder's
        # directory stamps only once they are SETTLE_SECONDS old (mailsys.mailbox.folder).
        time.sleep(SETTLE_SECONDS + 0.5)
        for _ in range(args.repeat):
            one_round(port, args.messages, expected, result, check_bodies=False)
    except (BenchError, OSError) as exc:
        result.error = str(exc)
    finally:
        server.stop()
    return result


def print_table(results: list[ServerResult], args: argparse.Namespace) -> None:
    print(f"\n== IMAP: {args.messages} messages of about {args.size} bytes, "
          f"median of {args.repeat} ==")
    print(f"{'step':<24}" + "".join(f"{r.server:>12}" for r in results) + "   ratio")
    ok = {r.server: r for r in results if not r.error}
    for r in results:
        if r.error:
            print(f"{r.server}: FAILED: {r.error}")
    cold = [f"{r.cold_login_select:12.3f}" if r.cold_login_select else f"{'-':>12}"
            for r in results]
    print(f"{'cold login+SELECT s':<24}" + "".join(cold) + _ratio(
        ok, lambda r: r.cold_login_select))
    for step in STEPS:
        cells = []
        for r in results:
            value = r.median(step)
            cells.append(f"{value:12.3f}" if value is not None else f"{'-':>12}")
        print(f"{step + ' s':<24}" + "".join(cells) + _ratio(
            ok, lambda r, s=step: r.median(s)))  # type: ignore[misc]
    print("ratio = mailsys time / dovecot time (below 1 is faster; targets: cold login+SELECT 1.3, "
          "FETCH BODY.PEEK[] and SEARCH SUBJECT 1.2)")


def _ratio(ok: dict[str, ServerResult], value: Any) -> str:
    if "mailsys" not in ok or "dovecot" not in ok:
        return ""
    ours, theirs = value(ok["mailsys"]), value(ok["dovecot"])
    if not ours or not theirs:
        return ""
    return f"   {ours / theirs:5.2f}x"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096, help="bytes per message (about)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds after a warm-up")
    parser.add_argument("--only", choices=SERVERS)
    parser.add_argument("--profile", action="store_true",
                        help="run mailsys under cProfile and print where its time went")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and logs")
    parser.add_argument("--tmpdir", type=Path, default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_exit_handlers()
    kinds = [args.only] if args.only else list(SERVERS)
    if "dovecot" in kinds and not Path("/usr/lib/dovecot/imap").exists():
        raise SystemExit("Dovecot's IMAP server is needed: apt-get install dovecot-imapd")
    workdir = Path(tempfile.mkdtemp(prefix="imap-bench-", dir=args.tmpdir))
    os.chmod(workdir, 0o755)  # Dovecot's unprivileged processes walk into it
    failed = False
    try:
        source = workdir / "source"
        print(f"writing {args.messages} messages into {source} ...", flush=True)
        expected = make_maildir(source, args.messages, args.size)
        results = []
        for kind in kinds:
            print(f"running {kind} ...", flush=True)
            results.append(run_server(kind, source, expected, args, workdir))
        print_table(results, args)
        failed = any(r.error for r in results)
        if args.profile:
            print_profile(workdir / "mailsys.prof")
        save(results, args, kinds)
    finally:
        if args.keep or failed:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def save(results: list[ServerResult], args: argparse.Namespace, kinds: list[str]) -> None:
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"imap-{stamp}.json"
    data: dict[str, Any] = {
        "benchmark": "imap",
        "argv": sys.argv,
        "messages": args.messages,
        "size": args.size,
        "repeat": args.repeat,
        "mailsys": mailsys_revision(),
        "dovecot": dovecot_version() if "dovecot" in kinds else None,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"saved {path.relative_to(_REPO) if path.is_relative_to(_REPO) else path}")


if __name__ == "__main__":
    sys.exit(main())
