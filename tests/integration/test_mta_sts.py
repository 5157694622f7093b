"""Outbound MTA-STS against the real `twistd -n mailsys`: an MTA-STS lab of the lab DNS
(`_mta-sts` TXT records, `mta-sts.<domain>` on loopback), an HTTPS policy server with a lab CA
certificate that the relay trusts, and a receiving server whose certificate the CA issued for
its MX name. The relay refuses an MX host that is not in an enforced policy, delivers over
verified TLS to one that is, and goes on as without MTA-STS when the policy is too large,
served over TLS it cannot verify, or never comes (the fetch deadline)."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mailsys.lab.ca import LabCA
from tests.integration.conftest import MailServer, free_port, make_server, wait_for
from tests.integration.relay_support import (
    LabDNS,
    find_message,
    message,
    recipient_state,
    relay_section,
    reply_text,
    send,
    start_lab_dns,
)

MX = "mx.remote.test"


def policy(mode: str, mx: str) -> bytes:
    return f"version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n".encode()


# What the policy server answers for mta-sts.<domain>, by domain.
ANSWERS: dict[str, bytes | str] = {
    "enforced.test": policy("enforce", MX),
    "elsewhere.test": policy("enforce", "*.elsewhere.test"),
    "testing.test": policy("testing", "*.elsewhere.test"),
    "large.test": policy("enforce", "*.elsewhere.test") + b"x: " + b"y" * 70_000 + b"\r\n",
    "untrusted.test": policy("enforce", "*.elsewhere.test"),  # served with a foreign certificate
    "hanging.test": "hang",
}
FETCH_DEADLINE = 3  # relay.mta_sts_timeout in the sender's configuration


class PolicyServer:
    """HTTPS on 127.0.0.1: the lab CA's certificate for mta-sts.<domain>, except for
    mta-sts.untrusted.test (a certificate the relay does not trust, chosen by SNI)."""

    def __init__(self, ca: LabCA, directory: Path) -> None:
        self.release = threading.Event()  # lets a hanging answer go at teardown
        release = self.release
        trusted = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        names = [f"mta-sts.{domain}" for domain in ANSWERS]
        files = {name: ca.issue(name, "127.0.0.1", directory / name) for name in names}
        contexts = {}
        for name, host_files in files.items():
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(host_files.certificate, host_files.key)
            contexts[name] = context
        foreign = LabCA(directory / "foreign-ca", name="not the lab CA")
        host_files = foreign.issue("mta-sts.untrusted.test", "127.0.0.1", directory / "foreign")
        contexts["mta-sts.untrusted.test"] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        contexts["mta-sts.untrusted.test"].load_cert_chain(host_files.certificate,
                                                           host_files.key)
        trusted.load_cert_chain(files[names[0]].certificate, files[names[0]].key)

        def by_name(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            if name in contexts:
                sock.context = contexts[name]

        trusted.sni_callback = by_name  # type: ignore[assignment]
        self.requests: list[str] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").split(":")[0]
                requests.append(f"{host}{self.path}")
                answer = ANSWERS.get(host.removeprefix("mta-sts."))
                if answer == "hang":
                    release.wait(timeout=60)
                    return
                if answer is None or self.path != "/.well-known/mta-sts.txt":
                    self.send_error(404)
                    return
                assert isinstance(answer, bytes)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                if host != "mta-sts.large.test":  # its size shows only while it is read
                    self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = trusted.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class STSLab:
    dns: LabDNS
    policies: PolicyServer
    sender: MailServer
    receiver: MailServer


def _zone() -> dict[str, Any]:
    zone: dict[str, Any] = {MX: {"A": ["127.0.0.2"]}}
    for domain in ANSWERS:
        zone[domain] = {"MX": [[10, MX]]}
        zone[f"_mta-sts.{domain}"] = {"TXT": ["v=STSv1; id=20261207"]}
        zone[f"mta-sts.{domain}"] = {"A": ["127.0.0.1"]}
    return zone


@pytest.fixture(scope="module")
def sts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[STSLab]:
    root = tmp_path_factory.mktemp("mta-sts")
    ca = LabCA(root / "ca")
    ca.ensure()
    dns = start_lab_dns(root / "dns", _zone())
    policies = PolicyServer(ca, root / "policy-certs")
    servers: list[MailServer] = []
    try:
        aliases = "\n".join(f'"someone@{domain}" = ["demo@example.test"]' for domain in ANSWERS)
        receiver = make_server(root / "receiver", interface="127.0.0.2",
                               local_domains=("example.test", *ANSWERS), aliases=aliases)
        # The receiver's certificate: the lab CA's, for its MX name (made before it starts, so
        # the development self-signed one is not).
        issued = ca.issue(MX, "127.0.0.2", root / "receiver-tls")
        tls = receiver.directory / "var" / "tls"
        tls.mkdir(parents=True, exist_ok=True)
        (tls / "cert.pem").write_bytes(issued.certificate.read_bytes())
        (tls / "key.pem").write_bytes(issued.key.read_bytes())
        (tls / "key.pem").chmod(0o600)
        servers.append(receiver)
        receiver.start()
        # Port 25 relays for nobody: aliases of ours lead to each remote domain.
        outbound = "\n".join(f'"{_alias(domain)}" = ["someone@{domain}"]' for domain in ANSWERS)
        sender = make_server(root / "sender", aliases=outbound, relay_config=relay_section(
            dns, receiver.smtp_port,
            f'tls_ca_file = "{ca.certificate_path}"\n'
            f"mta_sts_lab_https_port = {policies.port}\n"
            f"mta_sts_timeout = {FETCH_DEADLINE}\n"))
        servers.append(sender)
        sender.start()
        yield STSLab(dns, policies, sender, receiver)
    finally:
        for server in servers:
            server.kill()
        policies.stop()
        dns.stop()


def _alias(domain: str) -> str:
    return f"to-{domain.split('.')[0]}@example.test"


def _send(lab: STSLab, domain: str) -> None:
    send(lab.sender, [_alias(domain)], message(f"to {domain}", to=_alias(domain)))


def _logged(lab: STSLab, text: str) -> Callable[[], bool]:
    return lambda: text in lab.sender.log()


def test_enforced_policy_delivers_over_verified_tls(sts: STSLab) -> None:
    """enforce naming the MX: the policy is fetched over HTTPS, saved under the spool, and the
    mail goes to that MX over TLS whose certificate verified."""
    _send(sts, "enforced.test")
    find_message(sts.receiver.inbox(), b"Subject: to enforced.test", deadline=30)
    log = sts.sender.log()
    assert "MTA-STS policy of enforced.test fetched: id 20261207, mode enforce" in log
    assert f"MTA-STS policy of enforced.test (enforce): verified TLS with {MX}" in log
    assert (sts.sender.spool / "mta-sts" / "enforced.test.json").exists()
    assert "mta-sts.enforced.test/.well-known/mta-sts.txt" in sts.policies.requests


def test_enforced_policy_refuses_an_mx_not_in_it(sts: STSLab) -> None:
    """enforce whose mx patterns do not match the MX: that host is not connected to and the
    recipient is deferred with 4.7.5; nothing arrives."""
    _send(sts, "elsewhere.test")
    wait_for(_logged(sts, f"(enforce): not using MX {MX}"), deadline=30,
             message="the refusal of the MX host")

    def deferred() -> dict[str, Any] | None:
        state = recipient_state(sts.sender, "someone@elsewhere.test")
        return state if state and state.get("attempts") else None

    state = wait_for(deferred, deadline=30, message="the deferred attempt")
    assert isinstance(state, dict)
    assert state["status"] == "deferred"
    assert reply_text(state["attempts"][-1]).startswith("451 4.7.5 No MX host allowed by the "
                                                        "domain's MTA-STS policy")
    assert not any(b"to elsewhere.test" in p.read_bytes()
                   for p in sts.receiver.inbox().iterdir())


def test_testing_policy_only_reports(sts: STSLab) -> None:
    """testing with an MX outside the patterns: logged, and the mail is delivered anyway."""
    _send(sts, "testing.test")
    find_message(sts.receiver.inbox(), b"Subject: to testing.test", deadline=30)
    assert f"(testing): would not use MX {MX}" in sts.sender.log()


@pytest.mark.parametrize(("domain", "reason"), [
    ("large.test", "policy larger than 65536 bytes"),
    ("untrusted.test", "fetch from mta-sts.untrusted.test failed"),
    ("hanging.test", f"no policy from mta-sts.hanging.test within {FETCH_DEADLINE}s"),
])
def test_unusable_policy_is_no_policy(sts: STSLab, domain: str, reason: str) -> None:
    """A policy over 64 KiB, one served with a certificate the relay does not trust, and a
    policy server that never answers (the fetch deadline): the policy is not used, that is
    said in one line, and the mail goes as without MTA-STS (its enforce would have refused)."""
    _send(sts, domain)
    find_message(sts.receiver.inbox(), f"Subject: to {domain}".encode(), deadline=60)
    lines = [line for line in sts.sender.log().splitlines()
             if f"MTA-STS policy of {domain} not used" in line]
    assert len(lines) == 1 and reason in lines[0], lines
