"""IMAP login under load: N clients logging in and out in a loop, as imaptest's stress run does.

This script owns the run. It starts, side by side on free loopback ports, mailsys with its
credential cache (the default), mailsys with ``[auth] cache = false``, and Dovecot at its defaults
(no auth cache: ``auth_cache_size = 0``; its cache does not serve the static passdb this
benchmark gives it, so it is not run with one); every server checks
the same kind of password hash (an Argon2id made by mailsys's ``hash_password``). Then, round
after round, for each server in turn, CLIENTS threads each connect, LOGIN, LOGOUT and start again
for SECONDS; the time from sending LOGIN to its tagged OK is recorded. The table gives, per server,
the median over rounds of the average LOGIN time and of logins per second, and the server's CPU
time per login. Servers are stopped by process id.

    .venv/bin/python bench/imap_login.py [--clients 10] [--seconds 10] [--rounds 3]
                                         [--only mailsys,mailsys-nocache,dovecot]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from bench.dovecot_instance import dovecot_version  # noqa: E402
from bench.imap_bench import (  # noqa: E402
    PASSWORD,
    USER,
    DovecotIMAP,
    MailsysIMAP,
    RawClient,
)
from bench.loopback import BenchError, free_port  # noqa: E402
from bench.mailsys_instance import mailsys_revision  # noqa: E402
from bench.pop3_fetch import make_maildir  # noqa: E402
from bench.processes import install_exit_handlers  # noqa: E402

RESULTS_DIR = _REPO / "bench" / "results"
SERVERS = ("mailsys", "mailsys-nocache", "dovecot")


class MailsysNoCache(MailsysIMAP):
    """mailsys with the credential cache off: every LOGIN pays the Argon2id check."""

    def write_config(self) -> None:
        super().write_config()
        with self.config_path.open("a") as config:
            config.write("\n[auth]\ncache = false\n")


@dataclass
class Round:
    logins: int
    average_ms: float
    per_second: float
    cpu_ms_per_login: float


@dataclass
class ServerResult:
    server: str
    rounds: list[Round] = field(default_factory=list)
    error: str | None = None


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # utime stime cutime cstime (fields 14-17 of stat(5), 12-15 after the name)
        total += sum(int(v) for v in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def one_round(port: int, pids: list[int], clients: int, seconds: float) -> Round:
    times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop_at:
            try:
                raw = RawClient(port)
                t0 = time.perf_counter()
                raw.command(f"LOGIN {USER} {PASSWORD}")
                spent = time.perf_counter() - t0
                raw.close()
            except (BenchError, OSError) as exc:
                with lock:
                    errors.append(str(exc))
                return
            with lock:
                times.append(spent)

    cpu0 = _cpu_seconds(pids)
    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - t0
    cpu = _cpu_seconds(pids) - cpu0
    if errors:
        raise BenchError(f"{len(errors)} client(s) failed, first: {errors[0]}")
    return Round(len(times), 1000 * statistics.fmean(times), len(times) / wall,
                 1000 * cpu / max(len(times), 1))


def _server(kind: str, root: Path) -> tuple[Any, int]:
    server: Any
    if kind == "mailsys":
        server = MailsysIMAP(root, free_port(), free_port())
        return server, server.imap_port
    if kind == "mailsys-nocache":
        server = MailsysNoCache(root, free_port(), free_port())
        return server, server.imap_port
    server = DovecotIMAP(root, free_port())
    return server, server.port


def _pids(server: Any) -> list[int]:
    pids: list[int] = server.pids()
    return pids


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(SERVERS),
                        help=f"comma-separated, from {', '.join(SERVERS)}")
    parser.add_argument("--tmpdir", default="/var/tmp")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_exit_handlers()
    kinds = [k for k in args.only.split(",") if k]
    unknown = set(kinds) - set(SERVERS)
    if unknown:
        raise SystemExit(f"unknown server(s): {', '.join(sorted(unknown))}")
    workdir = Path(tempfile.mkdtemp(prefix="imap-login-", dir=args.tmpdir))
    os.chmod(workdir, 0o755)  # Dovecot's unprivileged processes walk into it
    source = workdir / "source"
    make_maildir(source, 10, 1024)
    results = {kind: ServerResult(kind) for kind in kinds}
    servers: dict[str, tuple[Any, int]] = {}
    try:
        for kind in kinds:
            root = workdir / kind
            root.mkdir()
            server, port = _server(kind, root)
            server.install_maildir(source)
            server.start()
            servers[kind] = (server, port)
        for number in range(args.rounds):
            for kind in kinds:  # alternating: every server once per round
                server, port = servers[kind]
                if results[kind].error:
                    continue
                try:
                    measured = one_round(port, _pids(server), args.clients, args.seconds)
                except BenchError as exc:
                    results[kind].error = str(exc)
                    continue
                results[kind].rounds.append(measured)
                print(f"round {number + 1} {kind:<16} {measured.logins:5d} logins, "
                      f"average LOGIN {measured.average_ms:7.1f} ms, "
                      f"{measured.per_second:6.1f}/s, CPU {measured.cpu_ms_per_login:5.1f} "
                      "ms/login", flush=True)
    finally:
        for server, _ in servers.values():
            server.stop()
    print(f"\n== {args.clients} clients logging in and out, {args.seconds:g} s per round, "
          f"median of {args.rounds} rounds ==")
    print(f"{'server':<16}{'avg LOGIN ms':>14}{'spread':>18}{'logins/s':>10}{'CPU ms/login':>14}")
    for result in results.values():
        if result.error or not result.rounds:
            print(f"{result.server:<16} FAILED: {result.error}")
            continue
        averages = [r.average_ms for r in result.rounds]
        print(f"{result.server:<16}{statistics.median(averages):>14.1f}"
              f"{f'{min(averages):.1f}-{max(averages):.1f}':>18}"
              f"{statistics.median(r.per_second for r in result.rounds):>10.1f}"
              f"{statistics.median(r.cpu_ms_per_login for r in result.rounds):>14.1f}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"imap_login-{stamp}.json"
    path.write_text(json.dumps({
        "benchmark": "imap_login", "argv": sys.argv, "clients": args.clients,
        "seconds": args.seconds, "rounds": args.rounds, "mailsys": mailsys_revision(),
        "dovecot": dovecot_version() if any(k.startswith("dovecot") for k in kinds) else None,
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "results": [asdict(r) for r in results.values()],
    }, indent=2) + "\n")
    print(f"saved {path}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(r.error for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
