"""Many idle IMAP clients in one server: memory per client and how fast a new message reaches all.

This script owns the run. It raises its open-file limit (a child inherits it), starts a private
mailsys (plaintext IMAP on a free loopback port, the connection limits raised to fit), measures
the server's RSS, then opens CLIENTS connections from one select loop (epoll), spread over
several loopback source addresses, at most BURST at a time in the login phase. Each client logs
in, SELECTs INBOX and enters IDLE (RFC 2177). With every client idle, the server's RSS is
measured again: the growth divided by CLIENTS is the memory an idle client costs. Then one
message is submitted over SMTP, and the time from its 250 until every client has read its
``* N EXISTS`` is measured (``--wakes``: that many messages, one after the other, each timed).
Every client then sends DONE and LOGOUT and its socket is closed; the server is stopped by
process id.

    .venv/bin/python bench/imap_idle.py [--clients 10000] [--burst 200] [--deadline 2] [--wakes 1]

Targets (issue 18): RSS growth at most 300 MB for 10,000 clients; the message seen by every
client within 2 s. The script exits 1 when a client fails or a target is missed. The server's
CPU time from the submission until the last client has the message is printed too: on a busy
machine the wall time stretches, the CPU time much less.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import resource
import selectors
import shutil
import smtplib
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from bench.imap_bench import PASSWORD, USER, MailsysIMAP  # noqa: E402
from bench.loopback import BenchError, free_port  # noqa: E402
from bench.mailsys_instance import mailsys_revision  # noqa: E402
from bench.processes import install_exit_handlers  # noqa: E402

RESULTS_DIR = _REPO / "bench" / "results"
# Source addresses the clients bind to: 127.0.0.1 has about 28,000 ephemeral ports towards one
# server port, and a spread keeps the per-address connection count modest.
SOURCES = [f"127.0.0.{n}" for n in range(2, 12)]

# The phases of one client; each waits for a line that starts with its prefix.
CONNECTING, GREETING, LOGIN, SELECT, IDLE_WAIT, IDLING, DONE = range(7)
_EXPECT = {GREETING: b"* OK", LOGIN: b"a OK", SELECT: b"b OK", IDLE_WAIT: b"+ "}


class IdleServer(MailsysIMAP):
    """mailsys with its IMAP connection limits raised for this many clients."""

    def __init__(self, root: Path, smtp_port: int, imap_port: int, clients: int) -> None:
        super().__init__(root, smtp_port, imap_port)
        self.clients = clients

    def write_config(self) -> None:
        super().write_config()
        with self.config_path.open("a") as config:
            config.write(f"max_connections = {self.clients + 100}\n"
                         f"max_connections_per_client = {self.clients + 100}\n")


@dataclass(slots=True)
class Client:
    sock: socket.socket
    state: int = CONNECTING
    buffer: bytes = b""
    seen_exists: float | None = None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_nofile(needed: int) -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
        except (ValueError, OSError):
            raise BenchError(f"open-file limit {hard} < {needed}, and it cannot be raised "
                             "(run as root)") from None
    target = needed if hard == resource.RLIM_INFINITY else max(needed, min(hard, needed * 2))
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


class Swarm:
    """Every client, driven by one epoll loop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.clients: list[Client] = []
        self.idle = 0
        self.failures: list[str] = []

    def open(self, index: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((SOURCES[index % len(SOURCES)], 0))
        err = sock.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise BenchError(f"connect: {os.strerror(err)}")
        client = Client(sock)
        self.clients.append(client)
        self.selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def pump(self, timeout: float) -> None:
        for key, events in self.selector.select(timeout):
            client: Client = key.data
            if client.state == CONNECTING and events & selectors.EVENT_WRITE:
                err = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._fail(client, f"connect: {os.strerror(err)}")
                    continue
                client.state = GREETING
                self.selector.modify(client.sock, selectors.EVENT_READ, client)
            if events & selectors.EVENT_READ:
                self._read(client)

    def _read(self, client: Client) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(client, str(exc))
            return
        if not data:
            self._fail(client, f"closed by the server in state {client.state}")
            return
        client.buffer += data
        while b"\r\n" in client.buffer:
            line, _, client.buffer = client.buffer.partition(b"\r\n")
            self._line(client, line)

    def _line(self, client: Client, line: bytes) -> None:
        if client.state == IDLING:
            if line.endswith(b" EXISTS") and client.seen_exists is None:
                client.seen_exists = time.monotonic()
            return
        expected = _EXPECT.get(client.state)
        if expected is None or not line.startswith(expected):
            if line[:2] in (b"a ", b"b ") or (client.state == IDLE_WAIT and line.startswith(b"c ")):
                self._fail(client, f"unexpected answer: {line[:200]!r}")
            return  # untagged data before the tagged answer
        if client.state == GREETING:
            client.sock.sendall(f"a LOGIN {USER} {PASSWORD}\r\n".encode())
            client.state = LOGIN
        elif client.state == LOGIN:
            client.sock.sendall(b"b SELECT INBOX\r\n")
            client.state = SELECT
        elif client.state == SELECT:
            client.sock.sendall(b"c IDLE\r\n")
            client.state = IDLE_WAIT
        elif client.state == IDLE_WAIT:
            client.state = IDLING
            self.idle += 1

    def _fail(self, client: Client, reason: str) -> None:
        self.failures.append(reason)
        client.state = DONE
        self.selector.unregister(client.sock)
        client.sock.close()

    def busy(self) -> int:
        """Clients on their way to IDLE."""
        return sum(1 for c in self.clients if c.state not in (IDLING, DONE))

    def close_all(self) -> None:
        for client in self.clients:
            if client.state == DONE:
                continue
            try:
                client.sock.setblocking(True)
                client.sock.settimeout(1.0)
                client.sock.sendall(b"DONE\r\nd LOGOUT\r\n")
            except OSError:
                pass
            self.selector.unregister(client.sock)
            client.sock.close()
            client.state = DONE


def submit(smtp_port: int) -> None:
    message = EmailMessage()
    message["From"] = "sender@bench.test"
    message["To"] = USER
    message["Subject"] = "to every idle client"
    message.set_content("Hello, all of you.\n")
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
        smtp.send_message(message)


def wake(swarm: Swarm, idle_clients: list[Client], smtp_port: int, pid: int,
         wait: float) -> dict[str, object]:
    """Submit one message and wait until every idle client has read its EXISTS (or ``wait``
    seconds pass): the times from the 250, and the server's CPU meanwhile."""
    for client in idle_clients:
        client.seen_exists = None
    cpu_before = cpu_seconds(pid)
    sent = time.monotonic()
    submit(smtp_port)
    accepted = time.monotonic()
    wait_until = accepted + wait
    while (any(c.seen_exists is None for c in idle_clients)
           and time.monotonic() < wait_until):
        swarm.pump(0.05)
    wake_cpu = cpu_seconds(pid) - cpu_before
    seen = sorted(c.seen_exists - accepted for c in idle_clients if c.seen_exists is not None)
    # Let the last RECENT lines arrive before the next message.
    settle = time.monotonic() + 0.5
    while time.monotonic() < settle:
        swarm.pump(0.05)
    return {
        "smtp_seconds": round(accepted - sent, 3),
        "reached": len(seen),
        "all_reached_seconds": round(seen[-1], 3) if len(seen) == len(idle_clients) and seen
        else None,
        "median_seconds": round(seen[len(seen) // 2], 3) if seen else None,
        # The server's CPU from the submission until every client had the message (or the
        # wait ended): on a busy machine the steadier figure, wall time being stretched.
        "wake_cpu_seconds": round(wake_cpu, 3),
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    limit = raise_nofile(args.clients + 2000)  # each side: one socket per client, and more
    root = workdir / "mailsys"
    root.mkdir()
    server = IdleServer(root, free_port(), free_port(), args.clients)
    server.start()
    swarm = Swarm(server.imap_port)
    try:
        pid = server.root_pid
        assert pid is not None
        time.sleep(1.0)  # start-up allocations settle
        before = rss_kib(pid)
        t0 = time.monotonic()
        opened = 0
        deadline = t0 + args.timeout
        while swarm.idle + len(swarm.failures) < args.clients:
            if time.monotonic() > deadline:
                raise BenchError(f"only {swarm.idle} of {args.clients} clients idle after "
                                 f"{args.timeout:g} s")
            while opened < args.clients and swarm.busy() < args.burst:
                swarm.open(opened)
                opened += 1
            swarm.pump(0.05)
            if swarm.failures and not args.keep_going:
                raise BenchError(f"{len(swarm.failures)} client(s) failed, first: "
                                 f"{swarm.failures[0]}")
        setup = time.monotonic() - t0
        # Let the server finish what the last logins left (timers, buffers), then measure.
        settle = time.monotonic() + 2.0
        while time.monotonic() < settle:
            swarm.pump(0.1)
        after = rss_kib(pid)
        idle_clients = [c for c in swarm.clients if c.state == IDLING]
        wakes = [wake(swarm, idle_clients, server.port, pid, args.wait)
                 for _ in range(args.wakes)]
        first = wakes[0]
        growth_mib = (after - before) / 1024
        result: dict[str, object] = {
            "clients": args.clients, "idle": len(idle_clients), "failed": len(swarm.failures),
            "nofile_limit": limit, "setup_seconds": round(setup, 2),
            "rss_before_mib": round(before / 1024, 1), "rss_after_mib": round(after / 1024, 1),
            "rss_growth_mib": round(growth_mib, 1),
            "kib_per_client": round((after - before) / max(len(idle_clients), 1), 1),
            # The first wake-up, as before --wakes existed; then every one of them.
            **first,
            "wakes": wakes,
        }
        return result
    finally:
        swarm.close_all()
        server.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--burst", type=int, default=200,
                        help="at most this many clients logging in at once")
    parser.add_argument("--deadline", type=float, default=2.0,
                        help="target: seconds for the message to reach every client")
    parser.add_argument("--max-growth", type=float, default=300.0,
                        help="target: MB of RSS growth for all the clients")
    parser.add_argument("--wait", type=float, default=30.0,
                        help="how long to wait for every client to see the message")
    parser.add_argument("--wakes", type=int, default=1,
                        help="deliver this many messages one after the other, each timed")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="give up if the clients are not all idle by then")
    parser.add_argument("--keep-going", action="store_true",
                        help="measure with the clients that made it when some fail")
    parser.add_argument("--tmpdir", default="/var/tmp")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def _median(values: list[object]) -> float | None:
    """The median of the values measured (None when one is missing: a client not reached)."""
    if any(v is None for v in values):
        return None
    ordered = sorted(float(v) for v in values)  # type: ignore[arg-type]
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else round(
        (ordered[middle - 1] + ordered[middle]) / 2, 3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_exit_handlers()
    workdir = Path(tempfile.mkdtemp(prefix="imap-idle-", dir=args.tmpdir))
    try:
        result = run(args, workdir)
    except BenchError as exc:
        print(f"FAILED: {exc}")
        print(f"kept {workdir}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    growth_mb = float(result["rss_growth_mib"]) * 1.048576  # type: ignore[arg-type]
    reached = result["all_reached_seconds"]
    print(f"\n== {result['idle']} idle IMAP clients ({result['failed']} failed), "
          f"set up in {result['setup_seconds']} s ==")
    print(f"RSS {result['rss_before_mib']} -> {result['rss_after_mib']} MiB: growth "
          f"{growth_mb:.0f} MB ({result['kib_per_client']} KiB per client); "
          f"target <= {args.max_growth:g} MB")
    print(f"new message: 250 after {result['smtp_seconds']} s; seen by {result['reached']} "
          f"clients, median {result['median_seconds']} s, all "
          f"{reached if reached is not None else 'NOT'} s after the 250; "
          f"target <= {args.deadline:g} s; server CPU meanwhile {result['wake_cpu_seconds']} s")
    wakes: list[dict[str, object]] = result["wakes"]  # type: ignore[assignment]
    if len(wakes) > 1:
        for n, one in enumerate(wakes[1:], 2):
            print(f"message {n}: median {one['median_seconds']} s, all "
                  f"{one['all_reached_seconds'] or 'NOT'} s, "
                  f"server CPU {one['wake_cpu_seconds']} s")
        print(f"over {len(wakes)} messages: all reached, median "
              f"{_median([w['all_reached_seconds'] for w in wakes])} s; server CPU per wake-up, "
              f"median {_median([w['wake_cpu_seconds'] for w in wakes])} s")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"imap_idle-{stamp}.json"
    path.write_text(json.dumps({"benchmark": "imap_idle", "argv": sys.argv,
                                "mailsys": mailsys_revision(), "cpus": os.cpu_count(),
                                "python": platform.python_version(), **result}, indent=2) + "\n")
    print(f"saved {path}")
    met = (result["failed"] == 0 and growth_mb <= args.max_growth
           and all(w["all_reached_seconds"] is not None
                   and float(w["all_reached_seconds"]) <= args.deadline  # type: ignore[arg-type]
                   for w in wakes))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
