"""The teaching lab for real: `mailsys lab up` starts the lab DNS and three `twistd -n mailsys`
on their own loopback addresses; a message submitted at alpha reaches beta by MX lookup over
the lab DNS with verified TLS, and is read back over IMAP; every scenario reaches its expected
outcome; each fault the lab command carries out shows in the journey; bad input is one line;
`mailsys lab down` leaves nothing.

One lab serves the whole module. Each run takes a /24 of its own inside 127.0.0.0/8, so it
never meets another lab on the machine. Processes are stopped by `lab down`, and by their
recorded pids if that failed.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import imaplib
import io
import json
import os
import random
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from twisted.names import dns

from mailsys import cli
from mailsys.lab import control, scenarios
from mailsys.lab.plan import LabError
from mailsys.lab.scenarios import SCENARIOS, Run
from tests.integration.conftest import MAILSYS, wait_for

LAB_TIMEOUT = 90  # seconds for `lab up` or `lab down` as a whole


@dataclass
class RunningLab:
    directory: Path
    net: str
    prefix: str  # "127.x.y."
    up_output: str

    def address(self, index: int) -> str:
        return f"{self.prefix}{index}"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca" / "ca.pem"

    def state(self) -> dict[str, Any]:
        data = json.loads((self.directory / "lab.json").read_text())
        assert isinstance(data, dict)
        return data

    def pid(self, name: str) -> int:
        return int(next(p["pid"] for p in self.state()["processes"] if p["name"] == name))

    def tls(self) -> ssl.SSLContext:
        """A client context trusting only the lab CA, checking host names."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def lab_process(*args: str) -> subprocess.CompletedProcess[str]:
    """`mailsys lab ARGS` as its own process, as a teacher types it."""
    return subprocess.run([MAILSYS, "lab", *args], capture_output=True, text=True,
                          timeout=LAB_TIMEOUT)


def lab(*args: str) -> subprocess.CompletedProcess[str]:
    """`mailsys lab ARGS` through the same entry point in this process: an interpreter start
    costs seconds on a loaded machine, and the lab's own processes are the ones under test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["lab", *args])
    return subprocess.CompletedProcess(["mailsys", "lab", *args], status, out.getvalue(),
                                       err.getvalue())


def _alive(pid: int) -> bool:
    """True while ``pid`` is a process that has not exited (a zombie has)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rpartition(")")[2].split()[0] not in ("Z", "X")


def _listening(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((address, port)) == 0


@pytest.fixture(scope="module")
def running_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    directory = tmp_path_factory.mktemp("lab")
    prefix = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}."
    net = f"{prefix}0/24"
    started = time.monotonic()
    result = lab_process("up", "--domains", "3", "--dir", str(directory), "--net", net)
    running = RunningLab(directory, net, prefix, result.stdout)
    try:
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 60
        yield running
    finally:
        lab_process("down", "--dir", str(directory))
        # Last resort: nothing the lab started survives the test, whatever went wrong.
        state_path = directory / "lab.json"
        if state_path.exists():
            for process in json.loads(state_path.read_text()).get("processes", []):
                if _alive(process["pid"]):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process["pid"], signal.SIGKILL)


def test_lab_up_prints_the_table(running_lab: RunningLab) -> None:
    """`lab up` prints the hosts, users and passwords, the CA file and a swaks line."""
    out = running_lab.up_output
    assert re.search(rf"beta\.test +mail\.beta\.test +{re.escape(running_lab.address(3))} ", out)
    for needle in ("bob@beta.test (bob-beta)", str(running_lab.ca_file), "swaks --server"):
        assert needle in out
    status = lab("status", "--dir", str(running_lab.directory))
    assert status.returncode == 0 and f"lab in {running_lab.directory}: up" in status.stdout


def test_each_lab_server_serves_the_journey_page(running_lab: RunningLab) -> None:
    """Port 5080 of a lab server answers /readyz and offers the journey page's login."""
    base = f"http://{running_lab.address(2)}:5080"
    with urllib.request.urlopen(f"{base}/readyz", timeout=10) as answer:
        assert answer.status == 200
    with urllib.request.urlopen(f"{base}/login", timeout=10) as answer:
        assert answer.status == 200 and b'name="password"' in answer.read()


def ask(server: str, name: str, kind: int) -> list[Any]:
    """One query over UDP to the lab DNS; the answer's record payloads."""
    query = dns.Message(id=random.randint(1, 65535), recDes=True)
    query.addQuery(name.encode(), kind)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(query.toStr(), (server, 5053))
        data, _ = sock.recvfrom(65535)
    answer = dns.Message()
    answer.fromStr(data)
    return [rr.payload for rr in answer.answers]


def test_lab_dns_serves_delivery_and_authentication_records(running_lab: RunningLab) -> None:
    """The lab DNS answers over UDP: beta's MX, its host's A and PTR, SPF and DMARC."""
    server, beta = running_lab.address(1), running_lab.address(3)
    (mx,) = ask(server, "beta.test", dns.MX)
    assert str(mx.name) == "mail.beta.test"
    (a,) = ask(server, "mail.beta.test", dns.A)
    assert a.dottedQuad() == beta
    reverse = ".".join(reversed(beta.split("."))) + ".in-addr.arpa"
    (ptr,) = ask(server, reverse, dns.PTR)
    assert str(ptr.name) == "mail.beta.test"
    (spf,) = ask(server, "beta.test", dns.TXT)
    assert spf.data == [f"v=spf1 ip4:{beta} -all".encode()]
    (dmarc,) = ask(server, "_dmarc.beta.test", dns.TXT)
    assert dmarc.data[0].startswith(b"v=DMARC1; p=reject")


def test_mail_from_alpha_reaches_beta_by_mx_with_verified_tls(running_lab: RunningLab) -> None:
    """alice@alpha.test submits (587's role, STARTTLS, AUTH) to bob@beta.test: alpha finds
    beta's MX in the lab DNS, relays from its own address over TLS verified against the lab
    CA, and bob reads the message over IMAPS."""
    alpha, beta = running_lab.address(2), running_lab.address(3)
    msg = EmailMessage()
    msg["From"] = "alice@alpha.test"
    msg["To"] = "bob@beta.test"
    msg["Subject"] = "first mail in the lab"
    msg.set_content("Hello Bob, this came through the lab.\n")
    with smtplib.SMTP(alpha, 5587, timeout=20) as client:
        client.starttls(context=running_lab.tls())  # the certificate names the address
        client.login("alice@alpha.test", "alice-alpha")
        client.send_message(msg)
    inbox = running_lab.directory / "beta.test" / "maildirs" / "beta.test" / "bob" / "new"
    wait_for(lambda: inbox.is_dir() and any(inbox.iterdir()), deadline=30,
             message="the message in bob@beta.test's Maildir")
    (path,) = list(inbox.iterdir())
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    received = " ".join(str(parsed.get_all("Received")[0]).split())
    # beta saw the connection come from alpha's own address, under alpha's host name, in TLS.
    assert received.startswith(f"from mail.alpha.test ([{alpha}])"), received
    assert "using TLSv1.3" in received and "by mail.beta.test" in received
    alpha_log = (running_lab.directory / "alpha.test" / "twistd.log").read_text()
    assert f"connected to mail.beta.test[{beta}]:2525 tls=using TLS" in alpha_log

    with imaplib.IMAP4_SSL(beta, 5993, ssl_context=running_lab.tls(), timeout=20) as imap:
        imap.login("bob@beta.test", "bob-beta")
        imap.select("INBOX")
        _, found = imap.search(None, "SUBJECT", '"first mail in the lab"')
        (number,) = found[0].split()
        _, data = imap.fetch(number, "(BODY[TEXT])")
        body = data[0]
        assert isinstance(body, tuple) and b"this came through the lab" in body[1]


@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_scenario_reaches_its_expected_outcome(running_lab: RunningLab, name: str) -> None:
    """Each scenario reaches its expected outcome within 60 s, having printed what to watch for
    and the journeys with the RFC behind each step."""
    started = time.monotonic()
    # In this process (as `scenario run` does it) to spare an interpreter start per scenario;
    # the command line itself runs in test_scenario_command_line.
    buffer = io.StringIO()
    ok = scenarios.run_scenario(control.Lab(running_lab.directory, io.StringIO()), name, buffer)
    out = buffer.getvalue()
    assert ok, out[-4000:]
    assert time.monotonic() - started < 60
    assert f"OK: {name}" in out and "watch for:" in out and "journey on mail." in out
    assert "RFC 5321" in out


def test_scenario_command_line(running_lab: RunningLab) -> None:
    """`mailsys lab scenario list` names every scenario; `scenario run NAME` exits 0 when the
    outcome is the expected one."""
    listed = lab_process("scenario", "list")
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [
        s.name for s in SCENARIOS]
    result = lab_process("scenario", "run", "open-relay-attempt", "--dir",
                         str(running_lab.directory))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    assert "OK: open-relay-attempt" in result.stdout


def _probe(running_lab: RunningLab, subject: str) -> tuple[Run, str]:
    """alice@alpha.test submits to bob@gamma.test; the run and the Message-ID."""
    lab_ = control.Lab(running_lab.directory, io.StringIO())
    plan, _ = lab_.running_plan()
    run = Run(lab_, plan, io.StringIO())
    msg = run.message("alice@alpha.test", "bob@gamma.test", subject, "probe\n")
    return run, run.submit(plan.hosts[0], 0, msg)


# In this order, one after the other without a clear between (a fault replaces the one
# before): a server start costs seconds on a loaded machine, and tls-broken -> down -> clear
# restarts gamma's server twice, not three times. dns-servfail is last: alpha's resolver
# remembers the failure for a while after the clear (RFC 2308 §7.1).
FAULT_PROBES = [
    ("reject", "delivery.attempt", "550 5.7.1 Lab fault"),
    ("tls-broken", "relay.tls", "does not match the host name mail.gamma.test"),
    ("down", "relay.connect", "connection refused"),
    ("dns-servfail", "relay.mx", "SERVFAIL"),
]


def test_faults_show_in_the_journey(running_lab: RunningLab) -> None:
    """`mailsys lab fault gamma.test FAULT` takes effect at once, `lab status` names it, and a
    message that meets it shows it in the sender's journey; `clear` undoes the last one."""
    directory = str(running_lab.directory)
    try:
        for fault, kind, needle in FAULT_PROBES:
            set_ = lab("fault", "gamma.test", fault, "--dir", directory)
            assert set_.returncode == 0, set_.stderr
            assert set_.stdout.startswith(f"gamma.test: {fault}:")
            status = lab("status", "--dir", directory)
            assert f"fault on gamma.test: {fault}" in status.stdout
            assert status.returncode == (1 if fault == "down" else 0), status.stdout
            run, message_id = _probe(running_lab, f"meets {fault}")
            event = run.wait_event(run.plan.hosts[0], message_id,
                                   lambda e, k=kind, n=needle: e.kind == k
                                   and n in json.dumps(e.fields), f"{kind} with {needle!r}")
            assert event.queue_id
    finally:
        clear = lab("fault", "gamma.test", "clear", "--dir", directory)
        assert clear.returncode == 0, clear.stderr
    status = lab("status", "--dir", directory)
    assert status.returncode == 0 and "fault on" not in status.stdout


def test_lab_commands_refuse_bad_input_in_one_line(running_lab: RunningLab) -> None:
    """Another lab in the same directory, an unknown domain or fault, a clock going back: each
    is one line on stderr and status 1, and the running lab is untouched."""
    directory = str(running_lab.directory)
    cases = [
        (("up", "--domains", "2", "--dir", directory, "--net", running_lab.net),
         "holds another lab"),
        (("fault", "omega.test", "down", "--dir", directory), "no lab domain 'omega.test'"),
        (("clock", "advance", "0s", "--dir", directory), "only goes forward"),
        (("clock", "rate", "0", "--dir", directory), "rate must be"),
        (("scenario", "run", "no-such", "--dir", directory), "no scenario 'no-such'"),
    ]
    for args, message in cases:
        result = lab(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert lab("status", "--dir", directory).returncode == 0


def test_commands_on_a_directory_without_a_lab(tmp_path: Path) -> None:
    """fault, clock and scenario on a directory with no running lab say so in one line."""
    for args in (("fault", "alpha.test", "down"), ("clock", "advance", "1h"),
                 ("scenario", "run", "first-mail")):
        result = lab(*args, "--dir", str(tmp_path))
        assert result.returncode == 1 and "no lab is up in" in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1


def test_a_port_taken_by_another_program_is_one_line(tmp_path: Path) -> None:
    """`lab up` where another program holds a lab port says which, starts nothing, and
    `lab status` reports no lab running."""
    prefix = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}."
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((f"{prefix}3", 2525))
        holder.listen()
        result = lab("up", "--domains", "3", "--dir", str(tmp_path), "--net", f"{prefix}0/24")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert f"{prefix}3:2525/tcp (beta.test smtp) is already in use" in result.stderr
    assert lab("status", "--dir", str(tmp_path)).returncode == 3
    assert not _listening(f"{prefix}1", 5053)


def test_bad_input_then_down_leaves_nothing(running_lab: RunningLab) -> None:
    """A second `lab up` is refused in one line; a killed server shows in `lab status`;
    `lab down` then stops every process and leaves no port listening."""
    directory = str(running_lab.directory)
    again = lab("up", "--domains", "3", "--dir", directory, "--net", running_lab.net)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "already up" in again.stderr

    gamma = running_lab.pid("gamma.test")
    os.kill(gamma, signal.SIGKILL)
    wait_for(lambda: not _alive(gamma), deadline=10, message="gamma's server gone")
    status = lab("status", "--dir", directory)
    assert status.returncode == 1 and "partly up: gamma.test not running" in status.stdout

    processes = running_lab.state()["processes"]
    assert len(processes) == 4
    down = lab("down", "--dir", directory)
    assert down.returncode == 0, down.stderr
    assert not [p["name"] for p in processes if _alive(p["pid"])]
    ports = [(a, port) for p in processes for a, port in p["listens"]]
    assert not [f"{a}:{port}" for a, port in ports if _listening(a, port)]
    status = lab("status", "--dir", directory)
    assert status.returncode == 3 and ": down" in status.stdout


def test_a_server_failing_at_start_up_is_one_line_and_nothing_stays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If a lab server exits at start-up, `lab up` says which, with its last log line, and
    stops what it had started (the lab DNS): the lab is left down."""
    monkeypatch.setattr(control, "_twistd", lambda: [
        sys.executable, "-c", "import sys; print('config is broken'); sys.exit(1)"])
    prefix = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}."
    lab_ = control.Lab(tmp_path, io.StringIO())
    with pytest.raises(LabError, match=r"alpha\.test's server exited at start-up "
                                       r".*: config is broken \(see "):
        lab_.up(2, f"{prefix}0/24")
    state = control.LabState.read(tmp_path / "lab.json")
    assert state is not None and state.processes == []
    assert not _listening(f"{prefix}1", 5053)
