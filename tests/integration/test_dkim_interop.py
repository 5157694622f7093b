"""DKIM against verifiers and signers that are not ours: dkimpy's `dkimverify` command asking
the lab DNS server over UDP for our keys, and OpenDKIM's `opendkim-testmsg` signing a message
that our verifier then checks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from mailsys.authn.dkim import DKIMVerifier, generate_key, load_key, sign_message
from mailsys.dns import CachingResolver
from mailsys.labdns import Zone
from tests.integration.relay_support import LabDNS, start_lab_dns

BIN = Path(sys.executable).parent
MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
           b"Subject: Interop\r\nDate: Mon, 07 Dec 2026 04:00:00 +0000\r\n"
           b"Message-ID: <interop@example.test>\r\n\r\nSigned here, checked elsewhere.\r\n")
# dnspython, which dkimverify uses, reads /etc/resolv.conf; this makes it ask the lab DNS
# server instead, without touching the system's configuration.
SITECUSTOMIZE = """
import dns.resolver
_lab = dns.resolver.Resolver(configure=False)
_lab.nameservers = ["127.0.0.1"]
_lab.port = {port}
dns.resolver.default_resolver = _lab
"""


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[tuple[dict[str, Any], list[Any]]]:
    zone: dict[str, Any] = {}
    loaded = []
    for selector, algorithm in (("rsa1", "rsa"), ("ed1", "ed25519")):
        pem, record = generate_key(algorithm)  # type: ignore[arg-type]
        path = tmp_path / f"{selector}.pem"
        path.write_bytes(pem)
        zone[f"{selector}._domainkey.example.test"] = {"TXT": [record]}
        loaded.append(load_key(path, "example.test", selector))
    yield zone, loaded


@pytest.fixture
def lab(tmp_path: Path, keys: tuple[dict[str, Any], list[Any]]) -> Iterator[LabDNS]:
    dns_server = start_lab_dns(tmp_path / "dns", keys[0])
    try:
        yield dns_server
    finally:
        dns_server.stop()


def test_dkimverify_accepts_our_signatures(tmp_path: Path, lab: LabDNS,
                                           keys: tuple[dict[str, Any], list[Any]]) -> None:
    """dkimpy's dkimverify, looking our keys up in the lab DNS, accepts both our RSA and our
    Ed25519 signature."""
    command = BIN / "dkimverify"
    assert command.exists(), "dkimverify comes with dkimpy, a dependency"
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE.format(port=lab.port))
    signed = sign_message(MESSAGE, keys[1]) + MESSAGE
    for index in ("0", "1"):
        done = subprocess.run([str(command), "--index", index], input=signed,
                              capture_output=True, timeout=60,
                              env={"PYTHONPATH": str(shim), "PATH": "/usr/bin:/bin"})
        assert done.stdout.strip() == b"signature ok", (index, done.stdout, done.stderr)
    tampered = signed.replace(b"checked elsewhere", b"changed elsewhere")
    done = subprocess.run([str(command)], input=tampered, capture_output=True, timeout=60,
                          env={"PYTHONPATH": str(shim), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1


def _now(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(function, *args)


@pytest.mark.skipif(shutil.which("opendkim-testmsg") is None
                    and not Path("/usr/sbin/opendkim-testmsg").exists(),
                    reason="OpenDKIM's opendkim-testmsg is not installed (Debian: "
                           "opendkim-tools; .ci/run installs it)")
def test_opendkim_signature_verifies_with_ours(tmp_path: Path) -> None:
    """A message signed by OpenDKIM verifies with our verifier. opendkim-testmsg signs only
    with rsa-sha1 (relaxed/simple), which RFC 8301 forbids trusting: by default it is reported
    as policy; with rsa-sha1 allowed the signature passes, and fails once tampered with."""
    pem, record = generate_key("rsa")
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    traditional = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    key_path = tmp_path / "odkim.pem"
    key_path.write_bytes(traditional)
    program = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"
    done = subprocess.run([program, "-d", "example.test", "-s", "odkim", "-k", str(key_path),
                           "-C", "-t", str(tmp_path)],
                          input=MESSAGE, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    signed = done.stdout
    assert signed.startswith(b"DKIM-Signature:"), signed[:200]
    zone = Zone({"odkim._domainkey.example.test": {"TXT": [record]}})

    def verify(message: bytes, accept_sha1: bool) -> list[tuple[str, str, str]]:
        verifier = DKIMVerifier(CachingResolver(zone, Clock()), run_in_thread=_now,
                                accept_sha1=accept_sha1)
        results: list[Any] = []
        verifier.verify(message).addCallback(results.append)
        return [(r.result, r.domain, r.selector) for r in results[0]]

    assert verify(signed, False) == [("policy", "example.test", "odkim")]
    assert verify(signed, True) == [("pass", "example.test", "odkim")]
    assert verify(signed.replace(b"Signed here", b"Signed there"), True) == [
        ("fail", "example.test", "odkim")]
