"""What the relay's integration tests share: a lab DNS server on loopback and the two-host setup.

The DNS server is ``python -m mailsys.labdns`` (a twisted.names server) on a free port of
127.0.0.1, serving a JSON zone the test rewrites at will; it is stopped by its process id. The
sender's [relay] section names only this server, so nothing ever asks the system's resolver.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import select
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import MailServer, wait_for

PYTHON = sys.executable
DNS_START_DEADLINE = 15.0


def free_dns_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (the lab DNS serves both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no free port for the lab DNS")


@dataclass
class LabDNS:
    """A running lab DNS server and its zone file."""

    zone_path: Path
    port: int
    process: subprocess.Popen[bytes]

    def set(self, zone: dict[str, Any]) -> None:
        """Replace the zone (written aside, then renamed: the server never reads half a file)."""
        tmp = self.zone_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(zone))
        os.replace(tmp, self.zone_path)

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_lab_dns(directory: Path, zone: dict[str, Any]) -> LabDNS:
    directory.mkdir(parents=True, exist_ok=True)
    zone_path = directory / "zone.json"
    zone_path.write_text(json.dumps(zone))
    port = free_dns_port()
    process = subprocess.Popen(
        [PYTHON, "-m", "mailsys.labdns", "--zone", str(zone_path), "--port", str(port),
         "--interface", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    dns = LabDNS(zone_path, port, process)
    assert process.stdout is not None
    end = time.monotonic() + DNS_START_DEADLINE
    line = b""
    while time.monotonic() < end and b"serving" not in line:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            line = process.stdout.readline()
            if not line:
                break
    if b"serving" not in line:
        dns.stop()
        raise AssertionError(f"lab DNS did not start: {line!r}")
    return dns


@pytest.fixture
def lab_dns(tmp_path: Path) -> Iterator[LabDNS]:
    dns = start_lab_dns(tmp_path / "dns", {})
    try:
        yield dns
    finally:
        dns.stop()


def relay_section(dns: LabDNS, port: int, extra: str = "") -> str:
    """A [relay] section that asks only the lab DNS and delivers MX mail to ``port``, with
    short retries so that tests wait seconds, not minutes."""
    return f"""
[relay]
dns_servers = ["{dns.server}"]
port = {port}
retry_schedule = [0.5, 1.0]
connect_timeout = 5.0
{extra}
"""


def message(subject: str, body: str = "Hello.\r\n", to: str = "out@example.test") -> bytes:
    msg = EmailMessage()
    msg["From"] = "demo@example.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)


def send(server: MailServer, recipients: list[str], data: bytes,
         sender: str = "demo@example.test", options: list[str] | None = None,
         rcpt_options: list[str] | None = None) -> None:
    """Submit on the MTA port (aliases turn local addresses into external recipients)."""
    with smtplib.SMTP(server.interface, server.smtp_port, timeout=10) as client:
        client.ehlo("client.test")
        client.sendmail(sender, recipients, data, mail_options=options or [],
                        rcpt_options=rcpt_options or [])


def files_in(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


def wait_for_files(directory: Path, count: int, deadline: float = 15.0,
                   what: str = "messages") -> list[Path]:
    wait_for(lambda: len(files_in(directory)) >= count, deadline=deadline,
             message=f"{count} {what} in {directory}")
    return files_in(directory)


def parse(path: Path) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def envelopes(server: MailServer) -> list[dict[str, Any]]:
    """The envelopes in the server's spool right now (read-only)."""
    queue = server.spool / "queue"
    found = []
    for path in sorted(queue.glob("*.env")) if queue.is_dir() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # replaced or removed while we read
    return found


def find_message(directory: Path, needle: bytes, deadline: float = 15.0,
                 what: str = "") -> Path:
    """Wait for a message in ``directory`` whose bytes contain ``needle``; return its path."""

    def found() -> Path | None:
        for path in files_in(directory):
            try:
                if needle in path.read_bytes():
                    return path
            except FileNotFoundError:
                continue  # moved to cur/ meanwhile
        return None

    result = wait_for(found, deadline=deadline,
                      message=what or f"a message containing {needle!r} in {directory}")
    assert isinstance(result, Path)
    return result


def delivery_status(path: Path) -> list[email.message.Message]:
    """The blocks of the message/delivery-status part of a notice."""
    parsed = parse(path)
    assert parsed.get_content_type() == "multipart/report"
    for part in parsed.iter_parts():
        if part.get_content_type() == "message/delivery-status":
            blocks = part.get_payload()
            assert isinstance(blocks, list)
            return blocks
    raise AssertionError("no message/delivery-status part")


def recipient_state(server: MailServer, address: str) -> dict[str, Any] | None:
    """The spooled state of the recipient ``address`` (the newest message that has it)."""
    for envelope in reversed(envelopes(server)):
        for recipient in envelope["recipients"]:
            if recipient["address"] == address:
                state: dict[str, Any] = recipient
                return state
    return None


def reply_text(attempt: dict[str, Any]) -> str:
    """An attempt's stored reply ({"code", "enhanced", "text"}) as one line, as logs show it."""
    reply = attempt["reply"]
    return " ".join(str(part) for part in (reply["code"], reply["enhanced"], reply["text"]) if part)


def block_for(path: Path, address: str) -> email.message.Message:
    """The per-recipient delivery-status block of ``address`` in a notice."""
    for block in delivery_status(path)[1:]:
        if block["Final-Recipient"] == f"rfc822; {address}":
            return block
    raise AssertionError(f"no delivery-status block for {address}")
