"""Starting, reporting and stopping a lab: the lab DNS server and one `twistd -n mailsys` per
domain, each a process of the ordinary user, recorded by process id in the lab directory.

``DIR/lab.json`` holds what the lab is (domains, network) and the processes it started, each
with its pid and its kernel start time, so a pid the system has since given to another process
is never signalled. Every command holds ``DIR/lab.lock`` while it works, so two commands never
start or stop the same lab at once. Problems are LabError: one line for the person typing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from mailsys.lab.ca import HostFiles, LabCA
from mailsys.lab.clock import (
    CLOCK_POLL_INTERVAL,
    MAX_RATE,
    ClockSetting,
    describe,
    read_setting,
    write_setting,
)
from mailsys.lab.configs import ensure_users, write_config
from mailsys.lab.faults import FAULT_POLL_INTERVAL, FAULTS, read_fault, write_fault
from mailsys.lab.plan import LabError, LabHost, LabPlan, Ports, make_plan
from mailsys.lab.zone import build_zone, dkim_records, policy_id_of, read_zone, write_zone

STATE_VERSION = 1
# What `lab fault` says it did, and `lab status` shows.
FAULT_TEXT = {
    "down": "down: its server is stopped; senders retry (RFC 5321 §4.5.4.1)",
    "tempfail": "tempfail: port 25 answers MAIL with 451 4.3.2; senders retry",
    "reject": "reject: port 25 answers MAIL with 550 5.7.1; senders bounce",
    "greylist": "greylist: each first RCPT gets 451 4.7.1, a retry after 15 s passes",
    "slow": "slow: MAIL and RCPT are answered 8 s late",
    "tls-broken": "tls-broken: its certificate names another host; verifying senders defer",
    "dns-servfail": "dns-servfail: the lab DNS answers SERVFAIL for its names; senders defer "
                    "(and remember the failure up to 30 s after a clear, RFC 2308 §7.1)",
    "clear": "clear: no fault",
}
START_DEADLINE = 30.0  # seconds for every process to listen
STOP_DEADLINE = 15.0  # seconds after SIGTERM before SIGKILL
POLL = 0.05
# The lab DNS's TTL: short, so a fault on a domain's names is seen within seconds by servers
# that cached the names before.
DNS_TTL = 2
# A change of a file the servers read each second is in effect after this long.
SETTLE = max(FAULT_POLL_INTERVAL, CLOCK_POLL_INTERVAL) * 1.5


@dataclass
class LabProcess:
    """One process the lab started: what it is, its pid, and the ports it listens on."""

    name: str  # "dns" or the domain
    pid: int
    started: int | None  # kernel start time (clock ticks since boot), None where unknown
    listens: list[tuple[str, int]] = field(default_factory=list)

    def running(self) -> bool:
        """True while this very process lives (not a zombie, not a reused pid)."""
        return _process_start(self.pid) == self.started if self.started is not None else (
            _pid_exists(self.pid))


@dataclass
class LabState:
    """What DIR/lab.json records."""

    domains: int
    network: str
    processes: list[LabProcess] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> LabState | None:
        try:
            data = json.loads(path.read_text())
            return cls(
                int(data["domains"]), str(data["network"]),
                [LabProcess(p["name"], int(p["pid"]), p.get("started"),
                            [(str(a), int(port)) for a, port in p.get("listens", [])])
                 for p in data.get("processes", [])],
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabError(f"{path} is not a lab state file ({exc}); remove it if the lab's "
                           "processes are gone") from None

    def write(self, path: Path) -> None:
        data = {"version": STATE_VERSION, "domains": self.domains, "network": self.network,
                "processes": [asdict(p) for p in self.processes]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)


# -- processes ---------------------------------------------------------------------------------


def _process_start(pid: int) -> int | None:
    """The kernel start time of a live, non-zombie process ``pid``; None if there is none.
    Where /proc is missing, 0 for any existing process (the start time is then not checked)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if not Path("/proc/self/stat").exists():
            return 0 if _pid_exists(pid) else None
        return None
    except OSError:
        return None
    # proc(5): the command name is in parentheses and may hold spaces; fields follow the last ")".
    fields = text.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):  # exited; only its parent's wait() is missing
        return None
    return int(fields[19])


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _spawn(name: str, argv: list[str], cwd: Path, log_path: Path,
           listens: list[tuple[str, int]]) -> LabProcess:
    """Start ``argv`` in its own session (a terminal's Ctrl-C does not reach it), output to
    ``log_path``; it outlives the command that started it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    started = _process_start(process.pid)
    return LabProcess(name, process.pid, started, listens)


def _twistd() -> list[str]:
    """twistd of this Python: the script beside the interpreter (a venv's), else ``-m twisted``."""
    script = Path(sys.executable).parent / "twistd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "twisted"]


def _listening(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((address, port)) == 0


def _serving(process: LabProcess, address: str, port: int) -> bool:
    return process.running() and _listening(address, port)


def _serving_or_gone(process: LabProcess, address: str, port: int) -> bool:
    return not process.running() or _listening(address, port)


def _port_free(address: str, port: int, kind: int = socket.SOCK_STREAM) -> OSError | None:
    """None if ``address:port`` can be bound now as Twisted binds it (SO_REUSEADDR, so a
    connection in TIME_WAIT from a previous lab does not count), else why not."""
    with socket.socket(socket.AF_INET, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            return exc
    return None


def _wait(predicate: Callable[[], bool], deadline: float) -> bool:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(POLL)
    return True


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


# -- the lab -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "lab.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LabError(f"another `mailsys lab` command is working on {directory}; "
                           "wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Lab:
    """The lab in one directory: ``up``, ``status`` and ``down``."""

    def __init__(self, directory: Path, out: IO[str] | None = None,
                 ports: Ports | None = None) -> None:
        self.directory = Path(directory).absolute()
        self.out = out or sys.stdout
        self.ports = ports or Ports()

    @property
    def state_path(self) -> Path:
        return self.directory / "lab.json"

    def plan(self, domains: int, network: str) -> LabPlan:
        return make_plan(self.directory, domains, network, self.ports)

    def _say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # -- up --------------------------------------------------------------------------------------

    def up(self, domains: int, network: str, time_scale: float = 1.0) -> LabPlan:
        """Start the lab, its queues' clock running ``time_scale`` times as fast; on any
        failure stop what was started and raise LabError."""
        if not 1 <= time_scale <= MAX_RATE:
            raise LabError(f"--time-scale must be 1-{MAX_RATE:g} (queue seconds per second)")
        plan = self.plan(domains, network)
        with _locked(self.directory):
            state = LabState.read(self.state_path)
            if state is not None:
                self._refuse_second_lab(state, plan)
            state = LabState(domains, str(plan.network))
            self._check_ports(plan)
            self._prepare(plan)
            if time_scale != 1.0:
                write_setting(plan.clock_path, ClockSetting().with_rate(time_scale, time.time()))
            try:
                self._start(plan, state)
            except BaseException:
                self._stop(state)
                raise
        self._say(render_table(plan))
        return plan

    def _refuse_second_lab(self, state: LabState, plan: LabPlan) -> None:
        where = self.directory
        if state.domains != len(plan.hosts) or state.network != str(plan.network):
            raise LabError(
                f"{where} holds another lab ({state.domains} domains on {state.network}); "
                f"use --domains {state.domains} --net {state.network}, or another --dir")
        running = [p for p in state.processes if p.running()]
        if running:
            dead = [p.name for p in state.processes if not p.running()]
            if dead:
                raise LabError(f"the lab in {where} is partly running ({', '.join(dead)} "
                               f"stopped); `mailsys lab down --dir {where}` first")
            raise LabError(f"a lab is already up in {where}; `mailsys lab status --dir "
                           f"{where}` shows it, `mailsys lab down --dir {where}` stops it")

    def _check_ports(self, plan: LabPlan) -> None:
        wanted: list[tuple[str, str, int, int]] = [
            ("the lab DNS", plan.dns_address, plan.ports.dns, socket.SOCK_STREAM),
            ("the lab DNS", plan.dns_address, plan.ports.dns, socket.SOCK_DGRAM)]
        for host in plan.hosts:
            wanted += [(f"{host.domain} {name}", host.address, port, socket.SOCK_STREAM)
                       for name, port in plan.ports.mail().items()]
        for what, address, port, kind in wanted:
            problem = _port_free(address, port, kind)
            if problem is None:
                continue
            proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
            if problem.errno == errno.EADDRINUSE:
                raise LabError(f"{address}:{port}/{proto} ({what}) is already in use by another "
                               "program (another lab? try --net 127.0.3.0/24)")
            hint = ""
            if problem.errno == errno.EADDRNOTAVAIL:
                # Linux routes all of 127.0.0.0/8 to the loopback; macOS and the BSDs only
                # 127.0.0.1 unless each address is added as an alias.
                hint = f" (add it to the loopback: sudo ifconfig lo0 alias {address})"
            raise LabError(f"cannot bind {address}:{port}/{proto} ({what}): "
                           f"{problem.strerror or problem}{hint}")

    def _prepare(self, plan: LabPlan) -> None:
        """CA and certificates, DKIM keys, zone, configs and users: everything on disk before
        any start. A lab starts without faults, on the real clock."""
        ca = LabCA(plan.ca_directory)
        ca.ensure()
        for host in plan.hosts:
            tls = ca.issue(host.hostname, host.address, host.directory / "tls")
            write_config(plan, host, tls)
            ensure_users(host)
            write_fault(host.fault_path, "clear")
        write_setting(plan.clock_path, ClockSetting())
        write_zone(plan, build_zone(plan, dkim_records(plan)))

    def _spawn_host(self, plan: LabPlan, host: LabHost) -> LabProcess:
        return _spawn(
            host.domain,
            [*_twistd(), "-n", "--pidfile=", "mailsys", "--config", str(host.config_path)],
            host.directory, host.log_path,
            [(host.address, port) for port in plan.ports.mail().values()])

    def _wait_serving(self, plan: LabPlan, processes: list[LabProcess]) -> None:
        end = time.monotonic() + START_DEADLINE  # for all of them, not per port
        for process in processes:
            log = plan.dns_log_path if process.name == "dns" else plan.host(
                process.name).log_path
            for address, port in process.listens:
                # Done when it listens or has exited: a server that failed is said at once.
                _wait(functools.partial(_serving_or_gone, process, address, port),
                      max(0.0, end - time.monotonic()))
                if not _serving(process, address, port):
                    why = "exited" if not process.running() else "is not listening"
                    raise LabError(f"{process.name}'s server {why} at start-up "
                                   f"({address}:{port}): {_last_line(log)} (see {log})")

    def _start(self, plan: LabPlan, state: LabState) -> None:
        # Each process is recorded as soon as it exists, so `lab down` finds it whatever
        # happens next.
        dns = _spawn(
            "dns",
            [sys.executable, "-m", "mailsys.labdns", "--zone", str(plan.zone_path),
             "--port", str(plan.ports.dns), "--interface", plan.dns_address,
             "--ttl", str(DNS_TTL)],
            plan.directory, plan.dns_log_path, [(plan.dns_address, plan.ports.dns)])
        state.processes.append(dns)
        state.write(self.state_path)
        for host in plan.hosts:
            state.processes.append(self._spawn_host(plan, host))
            state.write(self.state_path)
        self._wait_serving(plan, state.processes)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> int:
        """Print the lab's state; 0 when every process runs, 1 when some do not, 3 when the lab
        is down or there is none (as `systemctl status` counts)."""
        state = LabState.read(self.state_path)
        if state is None:
            self._say(f"no lab in {self.directory}")
            return 3
        plan = self.plan(state.domains, state.network)
        if not state.processes:
            self._say(f"lab in {self.directory}: down ({state.domains} domains on "
                      f"{state.network}); `mailsys lab up --dir {self.directory}` starts it")
            return 3
        names = {p.name for p in state.processes}
        stopped = [p.name for p in state.processes if not p.running()]
        stopped += [h.domain for h in plan.hosts if h.domain not in names]
        faults = {h.domain: read_fault(h.fault_path).name for h in plan.hosts}
        summary = "up" if not stopped else f"partly up: {', '.join(stopped)} not running"
        self._say(f"lab in {self.directory}: {summary}")
        for process in state.processes:
            if process.running():
                listening = all(_listening(a, port) for a, port in process.listens)
                condition = "running" if listening else "running, not listening on every port"
            else:
                condition = "NOT RUNNING"
            where = ", ".join(f"{a}:{port}" for a, port in process.listens)
            self._say(f"  {process.name:<14} pid {process.pid:<8} {condition:<12} {where}")
        for domain in stopped:
            if domain not in names:
                self._say(f"  {domain:<14} {'':<12} NOT RUNNING (stopped by the down fault)")
        for domain, fault in faults.items():
            if fault != "clear":
                self._say(f"fault on {domain}: {FAULT_TEXT[fault]}")
        self._say(describe(read_setting(plan.clock_path)))
        if stopped and all(faults.get(name) == "down" for name in stopped):
            self._say(f"`mailsys lab fault DOMAIN clear --dir {self.directory}` starts a "
                      "server the down fault stopped")
        elif stopped:
            self._say(f"`mailsys lab down --dir {self.directory}` then `mailsys lab up` "
                      "restarts it")
        else:
            self._say(render_table(plan, header=False))
        return 0 if not stopped else 1

    # -- down ------------------------------------------------------------------------------------

    def down(self) -> int:
        """Stop every process the lab started, by pid; wait until their ports are closed."""
        if LabState.read(self.state_path) is None:
            self._say(f"no lab in {self.directory}; nothing to stop")
            return 0
        with _locked(self.directory):
            state = LabState.read(self.state_path)
            if state is None:  # removed meanwhile
                return 0
            count = self._stop(state)
        self._say(f"lab in {self.directory} stopped ({count} processes; mail and users kept)")
        return 0

    def _stop(self, state: LabState) -> int:
        """SIGTERM every live process, SIGKILL those still there after STOP_DEADLINE; then
        check that their ports are closed. Returns how many were running."""
        try:
            count = self._stop_some(state.processes)
        except LabError:
            state.processes = [p for p in state.processes if p.running()]
            state.write(self.state_path)
            raise
        state.processes = []
        state.write(self.state_path)
        return count

    def _stop_some(self, processes: list[LabProcess]) -> int:
        """Stop ``processes`` by pid and wait until their ports are closed; how many ran."""
        live = [p for p in processes if p.running()]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        if not _wait(lambda: not any(p.running() for p in live), STOP_DEADLINE):
            for process in live:
                if process.running():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGKILL)
            _wait(lambda: not any(p.running() for p in live), STOP_DEADLINE)
        still = [p.name for p in live if p.running()]
        if still:
            raise LabError(f"could not stop {', '.join(still)}; run `mailsys lab down` again")
        ports = [a for p in processes for a in p.listens]
        _wait(lambda: not any(_listening(a, port) for a, port in ports), STOP_DEADLINE)
        return len(live)


    # -- faults ----------------------------------------------------------------------------------

    def running_plan(self) -> tuple[LabPlan, LabState]:
        """The plan and state of the lab running here; LabError when there is none."""
        state = LabState.read(self.state_path)
        if state is None or not state.processes:
            raise LabError(f"no lab is up in {self.directory}; `mailsys lab up --dir "
                           f"{self.directory}` starts one")
        return self.plan(state.domains, state.network), state

    def fault(self, domain: str, name: str) -> str:
        """Put ``name`` on ``domain`` (one fault at a time: the one before is undone first);
        returns the line said to the teacher."""
        if name not in FAULTS:
            raise LabError(f"unknown fault {name!r} (one of {', '.join(FAULTS)})")
        with _locked(self.directory):
            plan, state = self.running_plan()
            host = plan.host(domain.lower().removesuffix("."))
            before = read_fault(host.fault_path).name
            if before == name:
                return f"{host.domain}: {name} already"
            write_fault(host.fault_path, name)
            try:
                if "dns-servfail" in (before, name):
                    self._write_zone(plan)
                if before in ("down", "tls-broken") or name in ("down", "tls-broken"):
                    self._restart(plan, state, host, name)
            except BaseException:
                write_fault(host.fault_path, before)
                raise
            time.sleep(SETTLE)  # the servers read the file each second
        return f"{host.domain}: {FAULT_TEXT[name]}"

    def _write_zone(self, plan: LabPlan) -> None:
        servfail = [h.domain for h in plan.hosts
                    if read_fault(h.fault_path).name == "dns-servfail"]
        zone = build_zone(plan, dkim_records(plan), policy_id_of(read_zone(plan), plan),
                          servfail=servfail)
        write_zone(plan, zone)

    def _restart(self, plan: LabPlan, state: LabState, host: LabHost, fault: str) -> None:
        """Stop ``host``'s server; unless the fault is ``down``, start it again with the
        certificate the fault asks for."""
        old = [p for p in state.processes if p.name == host.domain]
        self._stop_some(old)
        state.processes = [p for p in state.processes if p.name != host.domain]
        state.write(self.state_path)
        if fault == "down":
            return
        ca = LabCA(plan.ca_directory)
        if fault == "tls-broken":
            # A certificate from the lab CA for another name: senders that verify (RFC 7672
            # and RFC 8461 both ask for the MX name) refuse it.
            tls = ca.issue(f"wrong-name.{host.domain}", plan.dead_address,
                           host.directory / "tls-broken")
        else:
            tls = HostFiles(host.directory / "tls" / "cert.pem", host.directory / "tls" / "key.pem")
        write_config(plan, host, tls)
        process = self._spawn_host(plan, host)
        state.processes.append(process)
        state.write(self.state_path)
        self._wait_serving(plan, [process])

    # -- the hurried clock -----------------------------------------------------------------------

    def clock(self, action: str, amount: float | None = None) -> str:
        """``advance`` the queue clock by ``amount`` seconds, set its ``rate``, ``reset`` it to
        real time, or ``show`` it; returns the line said."""
        plan, _ = self.running_plan()
        setting = read_setting(plan.clock_path)
        now = time.time()
        if action == "advance":
            assert amount is not None
            if amount <= 0:
                raise LabError("the clock only goes forward: give a positive duration")
            setting = setting.advanced(amount)
        elif action == "rate":
            assert amount is not None
            if not 1 <= amount <= MAX_RATE:
                raise LabError(f"the rate must be 1-{MAX_RATE:g} (queue seconds per second)")
            setting = setting.with_rate(amount, now)
        elif action == "reset":
            setting = ClockSetting()
        if action != "show":
            with _locked(self.directory):
                write_setting(plan.clock_path, setting)
            time.sleep(SETTLE)  # the servers read the file each second
        return describe(setting, now)


def render_table(plan: LabPlan, header: bool = True) -> str:
    """What a teacher needs on the screen: hosts, ports, users, the CA, commands to try."""
    ports = plan.ports
    lines = []
    if header:
        lines.append(f"lab up in {plan.directory}: {len(plan.hosts)} domains on {plan.network}")
    lines += [
        f"DNS   {plan.dns_address}:{ports.dns} (udp, tcp)   zone {plan.zone_path}",
        f"CA    {plan.ca_file}   (add it to a mail client to trust every lab host)",
        "",
        f"{'domain':<14}{'host':<20}{'address':<14}users (password)",
    ]
    for host in plan.hosts:
        users = ", ".join(f"{u.address} ({u.password})" for u in host.users)
        lines.append(f"{host.domain:<14}{host.hostname:<20}{host.address:<14}{users}")
    lines += [
        "",
        f"every host listens on its address: smtp {ports.smtp} (port 25's role), "
        f"submission {ports.submission} (STARTTLS), submissions {ports.submissions} (TLS),",
        f"  imap {ports.imap} (STARTTLS), imaps {ports.imaps}, pop3 {ports.pop3} (STLS), "
        f"pop3s {ports.pop3s}, web {ports.web} (HTTP: the journey page, /readyz, /metrics)",
    ]
    if plan.fallback is not None:
        lines.append(f"{plan.fallback.domain} has two MX: mx1.{plan.fallback.domain} "
                     f"(preference 10, {plan.dead_address}, switched off) and "
                     f"{plan.fallback.hostname} (20)")
    lines += [
        f"journeys: mailsys trace --config {plan.hosts[0].config_path} ADDRESS (each domain "
        "has its own),",
        f"  or the journey page http://{plan.hosts[0].address}:{plan.ports.web}/ (log in with "
        "a lab address and its password)",
        f"scenarios: mailsys lab scenario list --dir {plan.directory}",
    ]
    if len(plan.hosts) >= 2:
        first, second = plan.hosts[0], plan.hosts[1]
        sender, recipient = first.users[0], second.users[1]
        lines += [
            "",
            "try:",
            f"  swaks --server {first.address}:{ports.submission} --tls --tls-verify "
            f"--tls-ca-path {plan.ca_file} --auth PLAIN --auth-user {sender.address} "
            f"--auth-password {sender.password} --from {sender.address} --to {recipient.address}",
            f"  mutt -e 'set ssl_ca_certificates_file={plan.ca_file}' "
            f"-f 'imaps://{recipient.address.replace('@', '%40')}@{second.address}:{ports.imaps}/'"
            f"   (password {recipient.password})",
            f"  Thunderbird: import {plan.ca_file} (Settings, Certificates, Authorities), then "
            f"a manual account {sender.address} / {sender.password}: IMAP {first.address} port "
            f"{ports.imaps} SSL/TLS, SMTP {first.address} port {ports.submissions} SSL/TLS, "
            "normal password",
            f"  dig @{plan.dns_address} -p {ports.dns} MX {second.domain}",
        ]
    lines.append(f"stop it with: mailsys lab down --dir {plan.directory}")
    return "\n".join(lines)


def load_plan(directory: Path, ports: Ports | None = None) -> LabPlan | None:
    """The plan of the lab recorded in ``directory``, or None if there is none."""
    state = LabState.read(Path(directory).absolute() / "lab.json")
    if state is None:
        return None
    return make_plan(Path(directory), state.domains, state.network, ports)
