"""POP3 fetch benchmark: mailsys and Dovecot side by side, each serving a copy of one Maildir.

This script owns the run. It writes a Maildir of N messages of about SIZE bytes (CRLF line ends,
as mailsys's delivery stores them, a few "." lines in each), gives each server its own copy in a
temporary directory, starts the server on a free loopback port, and fetches the whole mailbox
with Python's poplib as a POP3 client does: USER/PASS, STAT, UIDL, LIST, RETR of every message,
QUIT. The first fetch meets a mailbox no server has opened yet (cold: every message still in
new/); the following ones meet it again (warm). Every fetched message is checked against what
was written. Servers are stopped by process id.

    .venv/bin/python bench/pop3_fetch.py [--messages 5000] [--size 4096] [--repeat 3]
                                         [--only mailsys|dovecot] [--profile] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import poplib
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from bench.dovecot_instance import (  # noqa: E402
    DovecotInstance,
    dovecot_version,
    pop3_greeting,
    require_dovecot,
)
from bench.loopback import LOOPBACK, BenchError, free_port  # noqa: E402
from bench.mailsys_instance import MailsysInstance, mailsys_revision, print_profile  # noqa: E402
from bench.processes import install_exit_handlers  # noqa: E402

USER = "demo@example.test"
PASSWORD = "demo"
SERVERS = ("mailsys", "dovecot")
RESULTS_DIR = _REPO / "bench" / "results"


class Server(Protocol):
    name: str
    port: int

    def start(self) -> None: ...

    def stop(self) -> None: ...


class MailsysPOP3(MailsysInstance):
    """bench's private mailsys with a plaintext POP3 listener (like Dovecot's here: no TLS)."""

    def __init__(self, root: Path, smtp_port: int, pop3_port: int,
                 profile: Path | None = None) -> None:
        super().__init__(root, smtp_port, profile=profile)
        self.pop3_port = pop3_port

    def write_config(self) -> None:
        super().write_config()
        with self.config_path.open("a") as config:
            config.write(
                f'\n[pop3]\nlisten = ["tcp:{self.pop3_port}:interface={self.host}:backlog=1024"]\n'
                "allow_plaintext_auth = true\n"
            )

    def install_maildir(self, source: Path) -> None:
        target = self.root / "maildirs" / "example.test" / "demo"
        target.parent.mkdir(parents=True)
        shutil.copytree(source, target)

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        deadline = time.monotonic() + timeout
        while not pop3_greeting(self.host, self.pop3_port).startswith("+OK"):
            if time.monotonic() > deadline:
                raise BenchError(f"mailsys POP3 did not greet\n{self.log_tail()}")
            time.sleep(0.05)


@dataclass
class Fetch:
    """One fetch of the whole mailbox."""

    seconds: float
    login_seconds: float  # connect + greeting + USER/PASS (the server opens the mailbox)
    retr_seconds: float  # every RETR
    quit_seconds: float  # QUIT (the UPDATE state: retrieved messages are marked seen)
    messages: int
    octets: int


@dataclass
class ServerResult:
    server: str
    cold: Fetch | None = None
    warm: list[Fetch] = field(default_factory=list)
    error: str | None = None

    @property
    def warm_median(self) -> float | None:
        return statistics.median(f.seconds for f in self.warm) if self.warm else None


def make_maildir(directory: Path, count: int, size: int) -> dict[str, int]:
    """Write ``count`` messages into ``directory``/new; return {sha256: count} of their bytes."""
    for sub in ("cur", "new", "tmp"):
        (directory / sub).mkdir(parents=True)
    digests: dict[str, int] = {}
    start = 1_800_000_000
    for i in range(count):
        header = (
            f"Return-Path: <sender@bench.test>\r\nDelivered-To: {USER}\r\n"
            f"Received: from [127.0.0.1] by mail.example.test (mailsys) with ESMTP id B{i:08X}"
            f"\r\n\tfor <{USER}>; Fri, 15 Jan 2027 08:00:00 +0000\r\n"
            f"From: sender@bench.test\r\nTo: {USER}\r\nSubject: bench message {i}\r\n"
            f"Message-ID: <bench{i}@bench.test>\r\nDate: Fri, 15 Jan 2027 08:00:00 +0000\r\n\r\n"
        ).encode()
        lines = []
        length = len(header)
        n = 0
        while length < size:
            line = (b"." if n % 20 == 0 else b"") + (b"%d " % i + b"lorem ipsum " * 6)[:70]
            lines.append(line + b"\r\n")
            length += len(line) + 2
            n += 1
        data = header + b"".join(lines)
        name = f"{start + i}.Q{i:010X}RBENCH.bench.host"
        path = directory / "new" / name
        path.write_bytes(data)
        os.utime(path, (start + i, start + i))
        digest = hashlib.sha256(data).hexdigest()
        digests[digest] = digests.get(digest, 0) + 1
    return digests


def fetch_all(port: int, expected: dict[str, int]) -> Fetch:
    """Fetch every message with poplib; check each against what was written."""
    got: dict[str, int] = {}
    octets = 0
    t0 = time.perf_counter()
    client = poplib.POP3(LOOPBACK, port, timeout=120)
    client.user(USER)
    client.pass_(PASSWORD)
    t1 = time.perf_counter()
    count, _ = client.stat()
    client.uidl()
    sizes = {int(n): int(s) for n, s in (line.split() for line in client.list()[1])}
    for number in range(1, count + 1):
        _, lines, received = client.retr(number)
        data = b"\r\n".join(lines) + b"\r\n"
        if received != sizes[number] or len(data) != sizes[number]:
            raise BenchError(f"message {number}: LIST said {sizes[number]}, RETR gave "
                             f"{received} octets ({len(data)} bytes)")
        octets += received
        digest = hashlib.sha256(data).hexdigest()
        got[digest] = got.get(digest, 0) + 1
    t2 = time.perf_counter()
    client.quit()
    t3 = time.perf_counter()
    if got != expected:
        missing = sum((expected.get(k, 0) - got.get(k, 0)) for k in expected)
        raise BenchError(f"fetched messages differ from the Maildir ({count} fetched, "
                         f"{missing} missing or changed)")
    return Fetch(t3 - t0, t1 - t0, t2 - t1, t3 - t2, count, octets)


def run_server(kind: str, source: Path, expected: dict[str, int], args: argparse.Namespace,
               workdir: Path) -> ServerResult:
    result = ServerResult(kind)
    root = workdir / kind
    root.mkdir()
    server: MailsysPOP3 | DovecotInstance
    if kind == "mailsys":
        profile = workdir / "mailsys.prof" if args.profile else None
        server = MailsysPOP3(root, free_port(), free_port(), profile)
        port = server.pop3_port
    else:
        server = DovecotInstance(root, free_port())
        port = server.port
    server.install_maildir(source)
    try:
        server.start()
        result.cold = fetch_all(port, expected)
        for _ in range(args.repeat):
            result.warm.append(fetch_all(port, expected))
    except BenchError as exc:
        result.error = str(exc)
    finally:
        server.stop()
    return result


def print_table(results: list[ServerResult], args: argparse.Namespace) -> None:
    print(f"\n== POP3 fetch of {args.messages} messages of about {args.size} bytes (poplib) ==")
    print(f"{'server':<9} {'cold s':>8} {'login':>7} {'retr':>7} {'quit':>7}   "
          f"{'warm s (median)':>15} {'msg/s warm':>11}")
    for r in results:
        if r.error or r.cold is None:
            print(f"{r.server:<9} FAILED: {r.error}")
            continue
        warm = r.warm_median
        rate = f"{r.cold.messages / warm:11.0f}" if warm else f"{'-':>11}"
        print(f"{r.server:<9} {r.cold.seconds:8.2f} {r.cold.login_seconds:7.2f} "
              f"{r.cold.retr_seconds:7.2f} {r.cold.quit_seconds:7.2f}   "
              f"{warm if warm is not None else float('nan'):15.2f} {rate}")
    ok = {r.server: r for r in results if not r.error and r.cold is not None}
    if "mailsys" in ok and "dovecot" in ok:
        ours, theirs = ok["mailsys"], ok["dovecot"]
        assert ours.cold is not None and theirs.cold is not None
        cold = theirs.cold.seconds / ours.cold.seconds
        line = f"mailsys/dovecot speed: cold {cold:.2f}x"
        if ours.warm_median and theirs.warm_median:
            line += f", warm {theirs.warm_median / ours.warm_median:.2f}x"
        print(line + "  (above 1 = mailsys faster)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096, help="bytes per message (about)")
    parser.add_argument("--repeat", type=int, default=3, help="warm fetches after the cold one")
    parser.add_argument("--only", choices=SERVERS)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and logs")
    parser.add_argument("--profile", action="store_true",
                        help="run mailsys under cProfile and print where its time went")
    parser.add_argument("--tmpdir", type=Path, default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_exit_handlers()
    kinds = [args.only] if args.only else list(SERVERS)
    if "dovecot" in kinds:
        require_dovecot()
    workdir = Path(tempfile.mkdtemp(prefix="pop3-bench-", dir=args.tmpdir))
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
    path = args.results_dir / f"pop3_fetch-{stamp}.json"
    data: dict[str, Any] = {
        "benchmark": "pop3_fetch",
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
