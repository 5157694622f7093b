"""Relay throughput: messages per second from submission into mailsys until a receiving server
on loopback has them, for 1 and for 10 destinations.

This script owns the run. For each destination count it starts, in a fresh temporary
directory: a lab DNS (``python -m mailsys.labdns``, a twisted.names server on 127.0.0.1)
holding one MX per destination domain ``dK.bench.test`` -> ``127.0.0.(10+K)``; one Postfix
``smtp-sink`` per destination on that address (the receiving server: it accepts everything and
stores nothing, so the figure is mailsys's, not a receiver's disk's); and a mailsys whose aliases
``dK@example.test`` point at ``rcpt@dK.bench.test``. Postfix's ``smtp-source`` submits N messages
on mailsys's port 25 (spread evenly over the destinations, S sessions in all); each sink exits
once it has received its share. It prints and saves (bench/results/) the rates and CPU.

    .venv/bin/python bench/relay_throughput.py [--messages 2000] [--destinations 1,10]
                                               [--sessions 10] [--size 4096]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from bench.loopback import (  # noqa: E402
    BenchError,
    free_port,
    require_loopback,
    wait_for_greeting,
)
from bench.mailsys_instance import MailsysInstance, mailsys_revision  # noqa: E402
from bench.processes import (  # noqa: E402
    cpu_seconds,
    install_exit_handlers,
    register_stop,
    terminate,
    unregister_stop,
)

SMTP_SOURCE = Path("/usr/sbin/smtp-source")
SMTP_SINK = Path("/usr/sbin/smtp-sink")
RESULTS_DIR = _REPO / "bench" / "results"
SENDER = "sender@bench.test"
POLL = 0.02


def sink_address(index: int) -> str:
    return require_loopback(f"127.0.0.{10 + index}")


class RelaySender(MailsysInstance):
    """mailsys with aliases to the bench domains and a [relay] section asking the lab DNS."""

    def __init__(self, root: Path, port: int, destinations: int, dns_port: int,
                 sink_port: int, retry_schedule: str) -> None:
        super().__init__(root, port)
        self.destinations = destinations
        self.dns_port = dns_port
        self.sink_port = sink_port
        self.retry_schedule = retry_schedule

    def write_config(self) -> None:
        (self.root / "var").mkdir()
        aliases = "\n".join(f'"d{k}@example.test" = ["rcpt@d{k}.bench.test"]'
                            for k in range(self.destinations))
        self.config_path.write_text(f"""\
# written by bench/relay_throughput.py
[server]
hostname = "mail.example.test"

[storage]
spool = "{self.root}/var/spool"
maildirs = "{self.root}/maildirs"
users = "{self.root}/var/users"

[smtp]
listen = ["tcp:{self.port}:interface={self.host}:backlog=1024"]
max_connections_per_client = 100

[routing]
local_domains = ["example.test"]

[routing.aliases]
{aliases}

[relay]
dns_servers = ["127.0.0.1:{self.dns_port}"]
port = {self.sink_port}
retry_schedule = {self.retry_schedule}
""")


class Process:
    """A helper process started here and stopped by its pid at exit."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self._log = log.open("wb")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._token = register_stop(self.stop)

    def stop(self) -> None:
        unregister_stop(self._token)
        if self.process.poll() is None:
            terminate([self.process.pid], timeout=5.0)
            self.process.wait(timeout=5.0)
        self._log.close()


def start_dns(root: Path, destinations: int) -> tuple[Process, int]:
    zone: dict[str, Any] = {}
    for k in range(destinations):
        zone[f"d{k}.bench.test"] = {"MX": [[10, f"mx.d{k}.bench.test"]]}
        zone[f"mx.d{k}.bench.test"] = {"A": [sink_address(k)]}
    path = root / "zone.json"
    path.write_text(json.dumps(zone))
    port = free_port()
    dns = Process([sys.executable, "-m", "mailsys.labdns", "--zone", str(path), "--port",
                   str(port), "--interface", "127.0.0.1"], root / "labdns.log")
    deadline = time.monotonic() + 20
    while b"serving" not in (root / "labdns.log").read_bytes():
        if dns.process.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"lab DNS did not start: {(root / 'labdns.log').read_text()}")
        time.sleep(0.05)
    return dns, port


@dataclass
class RunResult:
    mode: str  # "stream": relayed while submitted; "drain": a full queue flushed at once
    destinations: int
    sessions: int
    messages: int
    size: int
    accept_seconds: float
    relay_seconds: float
    accepted_per_s: float
    relayed_per_s: float
    sender_cpu_ms_per_msg: float
    load_cpu_seconds: float


def start_sinks(root: Path, destinations: int, port: int,
                processes: list[Process]) -> list[Path]:
    """One smtp-sink per destination address; returns their dump directories."""
    # The sinks run as nobody and must reach their dump directories.
    root.chmod(0o711)
    dumps = []
    for k in range(destinations):
        # Each message the sink takes becomes one file (written, not fsync'd), counted like a
        # Maildir. (-M would count a message before its 250 had been sent.)
        dump = root / f"sink{k}"
        dump.mkdir()
        dump.chmod(0o777)
        dumps.append(dump)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        sink = Process([str(SMTP_SINK), *user, "-d", f"{dump}/",
                        f"{sink_address(k)}:{port}", "1024"], root / f"sink{k}.log")
        processes.append(sink)
        try:
            wait_for_greeting(sink_address(k), port, timeout=10,
                              alive=lambda p=sink.process: p.poll() is None)
        except BenchError:
            raise BenchError(f"smtp-sink did not start: "
                             f"{(root / f'sink{k}.log').read_text()}") from None
    return dumps


def received(dumps: list[Path]) -> int:
    return sum(len(os.listdir(d)) for d in dumps)


def run(destinations: int, mode: str, args: argparse.Namespace) -> RunResult:
    root = Path(tempfile.mkdtemp(prefix=f"relay-{mode}-{destinations}-", dir=args.tmpdir))
    processes: list[Process] = []
    sender: RelaySender | None = None
    try:
        dns, dns_port = start_dns(root, destinations)
        processes.append(dns)
        sink_port = free_port()
        shares = [args.messages // destinations + (1 if k < args.messages % destinations else 0)
                  for k in range(destinations)]
        dumps = start_sinks(root, destinations, sink_port, processes) if mode == "stream" else []
        sender = RelaySender(root / "mailsys", free_port(), destinations, dns_port, sink_port,
                             retry_schedule="[1.0, 2.0]" if mode == "stream" else "[3600]")
        sender.root.mkdir()
        sender.start()
        pids = sender.pids()
        cpu_before = cpu_seconds(pids[0], pids)
        load_before = _children_cpu()
        sessions = max(1, args.sessions // destinations)
        start = intake_start = time.monotonic()
        sources = [
            subprocess.Popen([str(SMTP_SOURCE), "-s", str(sessions), "-m", str(share),
                              "-l", str(args.size), "-M", "bench.test", "-f", SENDER,
                              "-t", f"d{k}@example.test", f"{sender.host}:{sender.port}"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
            for k, share in enumerate(shares)
        ]
        if mode == "drain":
            for source in sources:
                source.wait(timeout=args.timeout)
            accepted_at = time.monotonic()
            _check_sources(sources)
            # Every message tried once (nothing listens yet) and deferred for an hour.
            _wait_all_deferred(sender, args.messages, args.timeout)
            dumps = start_sinks(root, destinations, sink_port, processes)
            pids = sender.pids()
            cpu_before = cpu_seconds(pids[0], pids)
            start = time.monotonic()
            subprocess.run([str(Path(sys.executable).parent / "mailsys"), "--config",
                            str(sender.config_path), "queue", "flush"], check=True,
                           capture_output=True, timeout=60)
        else:
            accepted_at = None
        deadline = start + args.timeout
        progress, progress_at = 0, start
        while True:
            now = time.monotonic()
            if accepted_at is None and all(s.poll() is not None for s in sources):
                accepted_at = now
                _check_sources(sources)
            count = received(dumps)
            if count >= args.messages:
                break
            if count != progress:
                progress, progress_at = count, now
            elif now - progress_at > args.stall:
                raise BenchError(f"no progress for {args.stall}s at {count} messages; "
                                 f"sender log:\n{sender.log_tail()}")
            if now > deadline:
                raise BenchError(f"not relayed within {args.timeout}s; sender log:\n"
                                 f"{sender.log_tail()}")
            time.sleep(POLL)
        relayed_at = time.monotonic()
        if accepted_at is None:
            for s in sources:
                s.wait(timeout=60)
            accepted_at = time.monotonic()
        pids = sender.pids() or pids
        sender_cpu = cpu_seconds(pids[0], pids) - cpu_before
        _wait_empty(sender.root / "var" / "spool" / "queue")
        time.sleep(1.0)  # late duplicates would show now
        count = received(dumps)
        if count != args.messages:
            raise BenchError(f"the sinks received {count} messages, not {args.messages}")
        return RunResult(
            mode=mode,
            destinations=destinations,
            sessions=sessions * destinations,
            messages=args.messages,
            size=args.size,
            accept_seconds=round(accepted_at - intake_start, 3),
            relay_seconds=round(relayed_at - start, 3),
            accepted_per_s=round(args.messages / (accepted_at - intake_start), 1),
            relayed_per_s=round(args.messages / (relayed_at - start), 1),
            sender_cpu_ms_per_msg=round(1000 * sender_cpu / args.messages, 3),
            load_cpu_seconds=round(_children_cpu() - load_before, 3),
        )
    finally:
        if sender is not None:
            sender.stop()
        for process in reversed(processes):
            process.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def _check_sources(sources: list[subprocess.Popen[bytes]]) -> None:
    for source in sources:
        if source.returncode != 0:
            error = source.stderr.read().decode() if source.stderr else ""
            raise BenchError(f"smtp-source failed: {error.strip()}")


def _wait_all_deferred(sender: RelaySender, messages: int, timeout: float) -> None:
    """Until every queued message has had its first (refused) attempt."""
    queue = sender.root / "var" / "spool" / "queue"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tried = 0
        for name in os.listdir(queue):
            if name.endswith(".env"):
                with contextlib.suppress(OSError, ValueError):
                    envelope = json.loads((queue / name).read_bytes())
                    tried += all(r["attempts"] for r in envelope["recipients"])
        if tried >= messages:
            return
        time.sleep(0.5)
    raise BenchError("the messages were not all tried within the timeout")


def _wait_empty(queue: Path, timeout: float = 10.0) -> None:
    """Every message left the sender's queue (the runner removes it after the last 250)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(name.endswith(".env") for name in os.listdir(queue)):
            return
        time.sleep(0.05)
    raise BenchError(f"messages left in {queue} after the sinks had them all")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--destinations", default="1,10",
                        help="comma-separated destination counts (at most 200)")
    parser.add_argument("--sessions", type=int, default=10,
                        help="submission sessions in all, spread over the destinations")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--modes", default="stream,drain",
                        help="stream (relay while submitting) and/or drain (flush a full queue)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--stall", type=float, default=30.0,
                        help="fail when no message arrives for this many seconds")
    parser.add_argument("--tmpdir", default=None, help="where the temporary directories go")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.destination_counts = [int(x) for x in args.destinations.split(",") if x]
    args.mode_list = [m for m in args.modes.split(",") if m]
    if not set(args.mode_list) <= {"stream", "drain"}:
        parser.error("modes are stream and drain")
    if not all(0 < d <= 200 for d in args.destination_counts):
        parser.error("destination counts must be 1-200")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not tool.exists():
            print(f"bench: {tool} not found (apt-get install postfix)", file=sys.stderr)
            return 2
    install_exit_handlers()
    results = []
    for mode in args.mode_list:
        for destinations in args.destination_counts:
            result = run(destinations, mode, args)
            results.append(result)
            what = ("submitted and relayed together" if mode == "stream"
                    else "a full queue flushed at once")
            print(f"== relay, {what}: {destinations} destination(s), {args.messages} messages "
                  f"of {args.size} bytes, {result.sessions} submission session(s) ==")
            print(f"accepted/s {result.accepted_per_s:>8}   relayed/s {result.relayed_per_s:>8}   "
                  f"sender CPU ms/msg {result.sender_cpu_ms_per_msg:>7}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"relay_throughput-{stamp}.json"
    path.write_text(json.dumps({
        "meta": {"command": sys.argv, "mailsys": mailsys_revision(), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "machine": platform.machine()},
        "runs": [asdict(r) for r in results],
    }, indent=2) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
