"""SMTP intake benchmark: mailsys and Postfix side by side on loopback, loaded by smtp-source.

This script owns the run. For each session count and each server it starts a fresh private
server in its own temporary directory, sends N messages of SIZE bytes to demo@example.test with
Postfix's smtp-source, times acceptance (smtp-source's wall time) and delivery (until N files are
in the Maildir's new/), samples the server's memory, checks that exactly N messages arrived,
stops the server by process id, then prints the comparison and saves it as JSON in
bench/results/.

    .venv/bin/python bench/smtp_intake.py [--messages N] [--sessions 1,10,50] [--size 4096]
                                          [--only mailsys|postfix]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

# Run as a script (`python bench/smtp_intake.py`), sys.path[0] is bench/; the helpers are
# imported as the bench package from the repository root either way.
_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from bench.loopback import LOOPBACK, BenchError, free_port  # noqa: E402
from bench.mailsys_instance import AUTHN_OFF, MailsysInstance, print_profile  # noqa: E402
from bench.postfix_instance import (  # noqa: E402
    RECIPIENT,
    SMTP_SOURCE,
    PostfixInstance,
    require_tools,
)
from bench.processes import (  # noqa: E402
    MemorySampler,
    cpu_seconds,
    install_exit_handlers,
    register_stop,
)

SENDER = "sender@bench.test"
HELO_NAME = "bench.test"
SERVERS = ("mailsys", "postfix")
RESULTS_DIR = _REPO / "bench" / "results"
POLL_INTERVAL = 0.02  # seconds between counts of new/
# Share of the machine's CPU spent outside the server, smtp-source and sampler above which a
# run is reported as disturbed.
DISTURBED = 0.25
SETTLE = 1.0  # seconds to wait after N files appeared, to catch duplicates arriving late


class Server(Protocol):
    """What the benchmark needs of a server under test (PostfixInstance, MailsysInstance)."""

    name: str
    host: str
    port: int
    maildir_new: Path

    @property
    def root_pid(self) -> int | None: ...

    def start(self, timeout: float = ...) -> None: ...
    def stop(self) -> None: ...
    def pids(self) -> list[int]: ...
    def log_tail(self, lines: int = ...) -> str: ...
    def describe(self) -> dict[str, str]: ...


@dataclass
class RunResult:
    """One run: one server, one session count, N messages."""

    server: str
    sessions: int
    messages: int
    size: int
    accept_seconds: float
    deliver_seconds: float
    accepted_per_s: float
    delivered_per_s: float
    peak_rss_kib: int  # largest sampled sum of VmHWM over the server's live processes
    peak_pss_kib: int  # largest sampled sum of Pss over the server's processes
    peak_rss_sampled_kib: int  # largest sampled sum of VmRSS over the server's processes
    max_processes: int
    memory_samples: int
    sampler_cpu_seconds: float  # CPU the memory sampler took from the machine
    # CPU (user + system) of the server's processes and of smtp-source, load start to delivery.
    server_cpu_seconds: float = 0.0
    load_cpu_seconds: float = 0.0
    # The rest of the machine's busy CPU meanwhile: this script's polling, kernel threads
    # (journal, writeback) and anything else running. Large values mean a disturbed run.
    other_cpu_seconds: float = 0.0
    # Busy share (0-1) of the machine's CPU in the second before the load started.
    machine_busy_before: float = 0.0
    # Machine-wide CPU seconds by kind from load start to last delivery (/proc/stat): "idle"
    # near zero means the machine, not the server, was the limit; "steal" is the hypervisor's.
    machine_cpu_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Failure:
    server: str
    sessions: int
    repeat: int
    error: str


@dataclass
class Report:
    meta: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def make_server(kind: str, root: Path, port: int, profile: bool = False,
                journey: bool | None = None, authn_dns: int | None = None,
                authn_checks: bool = False, defences: bool | None = None) -> Server:
    if kind == "postfix":
        return PostfixInstance(root, port)
    authn = AUTHN_OFF if authn_dns is None else (
        f"[authn]\nchecks = {str(authn_checks).lower()}\n"
        f'dns_servers = ["{LOOPBACK}:{authn_dns}"]\n')
    return MailsysInstance(root, port, profile=root / "mailsys.prof" if profile else None,
                           journey=journey, authn=authn, defence=defence_section(defences))


# --defences on: every intake defence that costs per message, applied to the load's address
# (127.0.0.1 is exempt by default), with limits the load stays under: the rate limits per
# client network counted at connect, MAIL, RCPT and end of DATA, a DNS blocklist (whose
# negative answer for 127.0.0.1 the shared cache keeps), the HELO check.
DEFENCES_ON = """
[defence]
exempt_networks = []
connections_per_minute = 10000000
messages_per_hour = 10000000
recipients_per_hour = 10000000
dnsbl = { "bl.bench.test" = 1.0 }
"""


def defence_section(defences: bool | None) -> str:
    if defences is None:
        return ""
    return DEFENCES_ON if defences else "[defence]\nenabled = false\n"


# What the lab DNS says about the load's sender (smtp-source -M bench.test -f sender@bench.test
# from 127.0.0.1) for --authn: an SPF pass, a DMARC record, forward-confirmed reverse DNS.
AUTHN_ZONE = {
    "bench.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"], "A": ["127.0.0.1"]},
    "_dmarc.bench.test": {"TXT": ["v=DMARC1; p=reject"]},
    "1.0.0.127.in-addr.arpa": {"PTR": ["bench.test"]},
}


def start_lab_dns(workdir: Path) -> tuple[int, Callable[[], None]]:
    """``python -m mailsys.labdns`` on a free loopback port with AUTHN_ZONE; (port, stop)."""
    zone = workdir / "authn-zone.json"
    zone.write_text(json.dumps(AUTHN_ZONE))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mailsys.labdns", "--zone", str(zone), "--port", str(port),
         "--interface", LOOPBACK],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if b"serving" not in line:
        process.kill()
        process.wait()
        raise BenchError(f"lab DNS did not start: {line!r}")

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    return port, stop


def count_files(directory: Path) -> int:
    try:
        return len(os.listdir(directory))
    except FileNotFoundError:
        return 0


def cpu_times() -> dict[str, float]:
    """Machine-wide CPU seconds so far, from /proc/stat's first line (all CPUs summed)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    with open("/proc/stat") as f:
        fields = f.readline().split()[1 : 1 + len(names)]
    hz = os.sysconf("SC_CLK_TCK")
    return {name: int(value) / hz for name, value in zip(names, fields, strict=False)}


_BUSY = ("user", "nice", "system", "irq", "softirq")


def busy_share(seconds: float) -> float:
    """The share (0-1) of the machine's CPU busy over the next ``seconds``, from /proc/stat."""
    before = cpu_times()
    time.sleep(seconds)
    after = cpu_times()
    delta = {name: after[name] - before[name] for name in after}
    total = sum(delta.values())
    return sum(delta[name] for name in _BUSY) / total if total else 0.0


def wait_for_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Measure how busy the machine is before a run; wait up to ``max_wait`` s for it to calm.

    Other work on the machine (a test suite, a build) competes with the server for CPU and
    disk. Returns the last busy share measured over one second.
    """
    deadline = time.monotonic() + max_wait
    share = busy_share(1.0)
    while share > threshold and time.monotonic() < deadline:
        share = busy_share(1.0)
    return share


def _children_cpu() -> float:
    """CPU (user + system) of this script's reaped children so far: here, smtp-source."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def smtp_source_argv(server: Server, sessions: int, args: argparse.Namespace) -> list[str]:
    argv = [
        str(SMTP_SOURCE),
        "-s",
        str(sessions),
        "-m",
        str(args.messages),
        "-l",
        str(args.size),
        "-M",
        HELO_NAME,
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
    ]
    if args.reuse_connections:
        argv.append("-d")
    argv.append(f"{server.host}:{server.port}")
    return argv


def drive(server: Server, sessions: int, args: argparse.Namespace, workdir: Path) -> RunResult:
    """Send the load, time acceptance and delivery, check the Maildir; the server is running."""
    n = args.messages
    new_dir = server.maildir_new
    if count_files(new_dir):
        raise BenchError(f"{new_dir} is not empty before the run")
    sampler = MemorySampler(
        server.pids, interval=args.sample_interval, max_seconds=args.timeout + 60
    )
    out_path = workdir / "smtp-source.out"
    # Write back what earlier runs left dirty (deleted temp dirs, logs), so that this run does
    # not pay for it.
    os.sync()
    busy_before = wait_for_quiet(args.wait_quiet)
    if busy_before > 0.15:
        print(
            f"  warning: machine {100 * busy_before:.0f}% busy before the load started "
            "(other processes); this run's figures are disturbed",
            flush=True,
        )
    root = server.root_pid
    if root is None:
        raise BenchError(f"{server.name} has no running process")
    cpu_before = cpu_times()
    server_cpu_before = cpu_seconds(root, server.pids())
    load_cpu_before = _children_cpu()
    sampler.start()
    source: subprocess.Popen[bytes] | None = None
    try:
        with out_path.open("wb") as out:
            start = time.monotonic()
            source = subprocess.Popen(
                smtp_source_argv(server, sessions, args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            deadline = start + args.timeout
            accepted_at: float | None = None
            delivered_at: float | None = None
            count = last_count = 0
            last_progress = start
            while time.monotonic() < deadline:
                now = time.monotonic()
                if accepted_at is None and source.poll() is not None:
                    accepted_at = now
                    if source.returncode != 0:
                        raise BenchError(
                            f"smtp-source exited {source.returncode}: "
                            f"{out_path.read_text(errors='replace').strip()[-2000:]}"
                        )
                count = count_files(new_dir)
                if count != last_count:
                    last_count, last_progress = count, now
                if delivered_at is None and count >= n:
                    delivered_at = now
                if accepted_at is not None and delivered_at is not None:
                    break
                if accepted_at is not None and now - last_progress > args.stall:
                    raise BenchError(
                        f"delivery stalled: {count}/{n} in {new_dir} and no progress "
                        f"for {args.stall:.0f} s"
                    )
                time.sleep(POLL_INTERVAL)
            else:
                raise BenchError(
                    f"not done within {args.timeout:.0f} s: smtp-source "
                    f"{'finished' if accepted_at is not None else 'still running'}, "
                    f"{count}/{n} delivered"
                )
        cpu_after = cpu_times()
        server_cpu = cpu_seconds(root, server.pids()) - server_cpu_before
        load_cpu = _children_cpu() - load_cpu_before
        time.sleep(SETTLE)
        final = count_files(new_dir)
        if final != n:
            raise BenchError(f"expected exactly {n} messages in {new_dir}, found {final}")
        short = [p.name for p in new_dir.iterdir() if p.stat().st_size < args.size]
        if short:
            raise BenchError(
                f"{len(short)} delivered files are smaller than {args.size} bytes, e.g. {short[0]}"
            )
    finally:
        if source is not None and source.poll() is None:
            source.kill()  # by its pid; it is our child
            source.wait(timeout=10)
        peaks = sampler.stop()
    assert accepted_at is not None and delivered_at is not None  # the loop broke out
    accept_s = accepted_at - start
    deliver_s = delivered_at - start
    return RunResult(
        server=server.name,
        sessions=sessions,
        messages=n,
        size=args.size,
        accept_seconds=round(accept_s, 4),
        deliver_seconds=round(deliver_s, 4),
        accepted_per_s=round(n / accept_s, 1),
        delivered_per_s=round(n / deliver_s, 1),
        peak_rss_kib=peaks.hwm_sum_kib,
        peak_pss_kib=peaks.pss_peak_kib,
        peak_rss_sampled_kib=peaks.rss_peak_kib,
        max_processes=peaks.max_processes,
        memory_samples=peaks.samples,
        sampler_cpu_seconds=round(peaks.cpu_seconds, 3),
        server_cpu_seconds=round(server_cpu, 2),
        load_cpu_seconds=round(load_cpu, 2),
        # Clock ticks are 10 ms, so the difference can dip just below zero on a quiet machine.
        other_cpu_seconds=round(
            max(
                0.0,
                sum(cpu_after[k] - cpu_before[k] for k in _BUSY)
                - server_cpu
                - load_cpu
                - peaks.cpu_seconds,
            ),
            2,
        ),
        machine_busy_before=round(busy_before, 3),
        machine_cpu_seconds={
            name: round(cpu_after[name] - cpu_before[name], 2) for name in cpu_after
        },
    )


def run_once(kind: str, sessions: int, args: argparse.Namespace) -> RunResult:
    """A fresh server in a fresh temp dir, one load run, the server stopped by pid."""
    root = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-s{sessions}-", dir=args.tmpdir))
    server = make_server(kind, root, free_port(), profile=args.profile, journey=args.journey,
                         authn_dns=args.authn_dns, authn_checks=args.authn,
                         defences=args.defences)
    ok = False
    try:
        try:
            server.start(timeout=args.start_timeout)
            result = drive(server, sessions, args, root)
        except BenchError as exc:
            raise BenchError(f"{exc}\n--- {kind} log tail ---\n{server.log_tail()}") from None
        ok = True
        return result
    finally:
        server.stop()
        if args.profile and kind == "mailsys":
            print_profile(root / "mailsys.prof")
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"  kept {root}")


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def ratio(ours: RunResult | None, theirs: RunResult | None, attr: str) -> str:
    """ours/theirs for one figure, as "0.85x"; "n/a" when either run is missing."""
    if ours is None or theirs is None or not getattr(theirs, attr):
        return "n/a"
    return f"{getattr(ours, attr) / getattr(theirs, attr):.2f}x"


def summarize(runs: list[RunResult]) -> RunResult | None:
    """The median run by delivered/s (the lower median for an even count), shown whole.

    A whole run rather than per-column medians, so that a row's figures belong together.
    """
    if not runs:
        return None
    ordered = sorted(runs, key=lambda r: r.delivered_per_s)
    return ordered[(len(ordered) - 1) // 2]


def print_table(sessions: int, report: Report, kinds: list[str], args: argparse.Namespace) -> None:
    print()
    print(
        f"== {sessions} session(s), {args.messages} messages of {args.size} bytes"
        f"{', connections reused' if args.reuse_connections else ''}"
        f"{f', median run of {args.repeat}' if args.repeat > 1 else ''} =="
    )
    header = (
        f"{'server':<8} {'accepted/s':>11} {'delivered/s':>12} {'peak RSS MiB':>13} "
        f"{'peak PSS MiB':>13} {'procs':>6} {'CPU ms/msg':>11} {'other CPU s':>12}"
    )
    print(header)
    print("-" * len(header))
    summary: dict[str, RunResult | None] = {}
    for kind in kinds:
        runs = [r for r in report.runs if r.server == kind and r.sessions == sessions]
        summary[kind] = best = summarize(runs)
        failed = [f for f in report.failures if f.server == kind and f.sessions == sessions]
        if best is None:
            reason = failed[0].error.splitlines()[0] if failed else "not run"
            print(f"{kind:<8} FAILED: {reason}")
            continue
        note = f"  ({len(failed)} failed)" if failed else ""
        print(
            f"{kind:<8} {best.accepted_per_s:>11.1f} {best.delivered_per_s:>12.1f} "
            f"{mib(best.peak_rss_kib):>13} {mib(best.peak_pss_kib):>13} "
            f"{best.max_processes:>6} "
            f"{1000 * best.server_cpu_seconds / best.messages:>11.2f} "
            f"{best.other_cpu_seconds:>12.2f}{note}"
        )
    if len(kinds) == 2:
        ms, pf = summary.get("mailsys"), summary.get("postfix")
        print(
            f"mailsys/postfix: accepted {ratio(ms, pf, 'accepted_per_s')}, "
            f"delivered {ratio(ms, pf, 'delivered_per_s')} (above 1 = mailsys faster); "
            f"CPU per message {ratio(ms, pf, 'server_cpu_seconds')} "
            "(above 1 = mailsys uses more)"
        )


def filesystem_of(path: Path) -> str:
    """The mount point and type of the file system holding ``path``, from /proc/mounts."""
    target = os.path.realpath(path)
    best = ("", "unknown")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mount, fstype = parts[1], parts[2]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[0]):
                    best = (mount, fstype)
    except OSError:
        pass
    return f"{best[1]} ({best[0]})"


def fsync_latency_ms(directory: Path, rounds: int = 50) -> dict[str, float]:
    """Median and 90th percentile of write(4 KiB) + fsync in ``directory``, in milliseconds.

    Both servers wait for fsync before every 250, so this is the floor under their figures and
    the first thing to compare when two machines, or two invocations, disagree.
    """
    times: list[float] = []
    with tempfile.NamedTemporaryFile(dir=directory, prefix="bench-fsync-") as f:
        for _ in range(rounds):
            began = time.perf_counter()
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
            times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return {
        "median": round(statistics.median(times), 3),
        "p90": round(times[int(len(times) * 0.9)], 3),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="SMTP intake throughput and memory of mailsys versus Postfix, on loopback."
    )
    parser.add_argument(
        "--messages", "-n", type=int, default=2000, help="messages per run (default 2000)"
    )
    parser.add_argument(
        "--sessions",
        default="1,10,50",
        help="comma-separated parallel SMTP session counts (default 1,10,50)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=4096,
        help="message body bytes, headers not included (default 4096)",
    )
    parser.add_argument("--only", choices=SERVERS, help="run one server only")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per server and session count; the table shows medians",
    )
    parser.add_argument(
        "--reuse-connections",
        action="store_true",
        help="send all of a session's messages over one connection "
        "(smtp-source -d); default is one connection per message",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds allowed per run, from load start to last delivery",
    )
    parser.add_argument(
        "--stall",
        type=float,
        default=60.0,
        help="fail when no delivery progress for this long after acceptance",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=60.0,
        help="seconds a server has to send its 220 greeting",
    )
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=0.5,
        help="seconds between memory samples (default 0.5)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for the machine "
        "to be under 15%% busy (default 0: measure and warn only)",
    )
    parser.add_argument(
        "--tmpdir",
        type=Path,
        default=None,
        help="where the servers' temp dirs go (default: $TMPDIR or /tmp); "
        "use a real disk, not tmpfs, or fsync costs nothing",
    )
    parser.add_argument("--keep", action="store_true", help="keep temp dirs after the run")
    parser.add_argument("--journey", choices=("on", "off"), default=None,
                        help="message journey recording in mailsys ([journey] enabled; "
                        "default: the configuration's default, off)")
    parser.add_argument("--authn", action="store_true",
                        help="mailsys with its inbound checks on (iprev, SPF for MAIL FROM and "
                        "HELO, DKIM, DMARC) against a lab DNS on loopback")
    parser.add_argument("--defences", choices=("on", "off"), default=None,
                        help="mailsys's intake defences applied to the load (on: rate limits, "
                        "a DNS blocklist answered from the cache, the HELO check; off: "
                        "[defence] enabled = false; default: the configuration's, which "
                        "exempts loopback)")
    parser.add_argument("--profile", action="store_true",
                        help="run mailsys under cProfile (reactor thread only; slower) and "
                        "print where its time went after each run")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where the JSON goes (default bench/results/)",
    )
    args = parser.parse_args(argv)
    args.journey = None if args.journey is None else args.journey == "on"
    args.defences = None if args.defences is None else args.defences == "on"
    try:
        args.session_counts = [int(s) for s in args.sessions.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sessions must be comma-separated integers, got {args.sessions!r}")
    if not args.session_counts or any(not 1 <= s <= 1000 for s in args.session_counts):
        parser.error("--sessions: each count must be between 1 and 1000")
    if not 1 <= args.messages <= 1_000_000:
        parser.error("--messages must be between 1 and 1000000")
    if not 0 <= args.size <= 50_000_000:
        parser.error("--size must be between 0 and 50000000")
    if not 1 <= args.repeat <= 100:
        parser.error("--repeat must be between 1 and 100")
    if not 0 <= args.wait_quiet <= 3600:
        parser.error("--wait-quiet must be between 0 and 3600 seconds")
    return args


def meta(args: argparse.Namespace, kinds: list[str]) -> dict[str, Any]:
    tmp = args.tmpdir or Path(tempfile.gettempdir())
    servers: dict[str, dict[str, str]] = {}
    for kind in kinds:
        servers[kind] = make_server(kind, tmp, 0).describe()
    return {
        "benchmark": "smtp_intake",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "messages": args.messages,
        "sessions": args.session_counts,
        "size": args.size,
        "repeat": args.repeat,
        "mailsys_authentication_checks": bool(args.authn),
        "mailsys_defences": {None: "configuration default (loopback exempt)", True: "on",
                             False: "off"}[args.defences],
        "connections": "reused per session (-d)" if args.reuse_connections else "one per message",
        "load_generator": " ".join(
            [
                str(SMTP_SOURCE),
                "-s SESSIONS -m",
                str(args.messages),
                "-l",
                str(args.size),
                "-M",
                HELO_NAME,
                "-f",
                SENDER,
                "-t",
                RECIPIENT,
            ]
            + (["-d"] if args.reuse_connections else [])
            + ["127.0.0.1:PORT"]
        ),
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "workdir": str(tmp),
            "workdir_filesystem": filesystem_of(tmp),
            "workdir_fsync_ms": fsync_latency_ms(tmp),
        },
        "servers": servers,
        "measures": {
            "accepted_per_s": "messages / wall time of smtp-source (start to exit)",
            "delivered_per_s": "messages / time from load start until all are in new/ "
            f"(polled every {POLL_INTERVAL * 1000:.0f} ms)",
            "peak_rss_kib": "largest sampled sum of VmHWM over the server's live processes "
            "(exact peak RSS for one process; an upper bound for several)",
            "peak_pss_kib": "largest sampled sum of Pss (smaps_rollup) over the server's "
            f"processes, sampled every {args.sample_interval * 1000:.0f} ms",
            "server_cpu_seconds": "user + system CPU of the server's processes (and of those "
            "its root process reaped) from load start to last delivery",
            "load_cpu_seconds": "user + system CPU of smtp-source",
            "machine_cpu_seconds": "machine-wide /proc/stat deltas, load start to last delivery",
            "other_cpu_seconds": "machine busy CPU minus server, smtp-source and sampler: this "
            "script's polling, kernel threads, and any other work on the machine",
            "machine_busy_before": "busy share of all CPUs in the second before the load",
        },
    }


def save(report: Report, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = results_dir / f"{stamp}.json"
    data = {
        "meta": report.meta,
        "runs": [asdict(r) for r in report.runs],
        "failures": [asdict(f) for f in report.failures],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = [args.only] if args.only else list(SERVERS)
    install_exit_handlers()
    try:
        require_tools()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    report = Report(meta=meta(args, kinds))
    fs = report.meta["host"]["workdir_filesystem"]
    if fs.startswith(("tmpfs", "ramfs")):
        print(
            f"bench: warning: temp dirs are on {fs}; fsync is free there, figures "
            "will flatter both servers",
            file=sys.stderr,
        )
    fsync_ms = report.meta["host"]["workdir_fsync_ms"]
    print(
        f"smtp_intake: {args.messages} messages x {args.size} bytes, sessions "
        f"{args.session_counts}, servers {kinds}, temp dirs on {fs}, "
        f"fsync {fsync_ms['median']:.2f} ms (p90 {fsync_ms['p90']:.2f})"
    )
    args.authn_dns = None
    stop_dns: Callable[[], None] | None = None
    if args.authn or args.defences:
        args.authn_dns, stop_dns = start_lab_dns(Path(tempfile.mkdtemp(prefix="bench-dns-")))
        register_stop(stop_dns)
    try:
        for sessions in args.session_counts:
            for repeat in range(args.repeat):
                for kind in kinds:
                    label = f"{kind}, {sessions} session(s)"
                    if args.repeat > 1:
                        label += f", run {repeat + 1}/{args.repeat}"
                    print(f"- {label} ...", flush=True)
                    try:
                        result = run_once(kind, sessions, args)
                    except BenchError as exc:
                        print(f"  FAILED: {exc}", flush=True)
                        report.failures.append(Failure(kind, sessions, repeat, str(exc)))
                        continue
                    report.runs.append(result)
                    disturbed = result.other_cpu_seconds / (
                        result.deliver_seconds * (os.cpu_count() or 1)
                    )
                    if disturbed > DISTURBED:
                        print(
                            f"  warning: {100 * disturbed:.0f}% of the machine's CPU went to "
                            "other work during the run; its figures are disturbed",
                            flush=True,
                        )
                    print(
                        f"  accepted {result.accepted_per_s:.1f}/s in "
                        f"{result.accept_seconds:.2f} s, delivered "
                        f"{result.delivered_per_s:.1f}/s in {result.deliver_seconds:.2f} s, "
                        f"peak RSS {mib(result.peak_rss_kib)} MiB",
                        flush=True,
                    )
            print_table(sessions, report, kinds, args)
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped", file=sys.stderr)
        return 130
    finally:
        if stop_dns is not None:
            stop_dns()
        if report.runs or report.failures:
            print(f"\nresults: {save(report, args.results_dir)}")
    if report.failures:
        print(f"\n{len(report.failures)} run(s) FAILED:", file=sys.stderr)
        for failure in report.failures:
            first = failure.error.splitlines()[0]
            print(f"  {failure.server}, {failure.sessions} session(s): {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
