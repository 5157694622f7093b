"""DKIM against verifiers and signers that are not ours: dkimpy's `dkimverify` command asking
the lab DNS server over UDP for our keys; OpenDKIM's filter in its test mode (`opendkim -t`,
keys from its TestDNSData table instead of live DNS) verifying our RSA and Ed25519 signatures
and making its own, which our verifier checks; and `opendkim-testmsg`'s rsa-sha1 signature."""

from __future__ import annotations

import re
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


# The signing and verifying test modes of OpenDKIM's filter (Debian: opendkim).
OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
NEEDS_OPENDKIM = pytest.mark.skipif(
    not Path(OPENDKIM).exists(),
    reason="OpenDKIM's filter is not installed (Debian: opendkim; .ci/run installs it)")
# A message with every kind of header field we sign and a body that relaxed canonicalization
# changes (trailing white space, runs of it, empty lines at the end).
RICH = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
        b"Cc: Carol <carol@remote.test>,\r\n  dave@remote.test\r\n"
        b"Reply-To: alice+replies@example.test\r\nSubject:   Interop,\t folded\r\n"
        b" and continued\r\nDate: Mon, 07 Dec 2026 04:00:00 +0000\r\n"
        b"Message-ID: <rich@example.test>\r\nIn-Reply-To: <earlier@remote.test>\r\n"
        b"References: <first@remote.test> <earlier@remote.test>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        b"Signed here,  \t checked elsewhere.   \r\n\r\nBye.\r\n\r\n\r\n")


def _opendkim(tmp_path: Path, name: str, settings: str, message: bytes
              ) -> subprocess.CompletedProcess[bytes]:
    """``opendkim -t`` (test mode: one message from a file, no milter, no syslog) with
    ``settings`` as its whole configuration file."""
    config = tmp_path / f"{name}.conf"
    config.write_text(settings + "Syslog no\n")
    path = tmp_path / f"{name}.eml"
    path.write_bytes(message)
    return subprocess.run([OPENDKIM, "-x", str(config), "-vvv", "-t", str(path)],
                          capture_output=True, timeout=60, check=False)


def _inserted(output: bytes, field: str) -> str:
    """The value of ``field`` as the test mode shows it would add it (`### INSHEADER`)."""
    match = re.search(rb"### INSHEADER: idx=\d+ hname='" + field.encode() + rb"' hvalue='(.*?)'",
                      output, re.DOTALL)
    assert match is not None, output.decode(errors="replace")
    return match.group(1).decode()


@NEEDS_OPENDKIM
def test_opendkim_verifies_our_signatures(tmp_path: Path,
                                          keys: tuple[dict[str, Any], list[Any]]) -> None:
    """OpenDKIM's verifier, given our public keys as its test DNS data, passes both our RSA
    and our Ed25519 signature (RFC 8463) of a message with every field we sign, and fails both
    once the body is changed."""
    zone, loaded = keys
    data = tmp_path / "dnsdata"
    # TestDNSData: a flat-file data set, "name value" per line, the values TXT contents.
    data.write_text("".join(f"{name} {records['TXT'][0]}\n" for name, records in zone.items()))
    settings = f"Mode v\nTestDNSData {data}\n"
    signed = sign_message(RICH, loaded) + RICH
    done = _opendkim(tmp_path, "verify", settings, signed)
    assert done.returncode == 0, done.stderr
    results = _inserted(done.stdout + done.stderr, "Authentication-Results")
    assert re.search(r"dkim=pass \(2048-bit key\) header\.d=example\.test "
                     r"header\.i=@example\.test header\.a=rsa-sha256 header\.s=rsa1", results), \
        results
    assert re.search(r"dkim=pass header\.d=example\.test header\.i=@example\.test "
                     r"header\.a=ed25519-sha256 header\.s=ed1", results), results
    tampered = signed.replace(b"Bye.", b"Bye!")
    done = _opendkim(tmp_path, "tampered", settings, tampered)
    results = _inserted(done.stdout + done.stderr, "Authentication-Results")
    assert results.count('dkim=fail reason="signature verification failed"') == 2, results
    assert "dkim=pass" not in results


@NEEDS_OPENDKIM
def test_opendkim_rsa_and_ed25519_signatures_verify_with_ours(
        tmp_path: Path, keys: tuple[dict[str, Any], list[Any]]) -> None:
    """Signatures OpenDKIM's signer makes (rsa-sha256 and ed25519-sha256, relaxed/relaxed)
    pass our verifier, and fail once a signed field is changed."""
    zone, _ = keys
    fields = b""
    for selector, algorithm in (("rsa1", "rsa-sha256"), ("ed1", "ed25519-sha256")):
        settings = (f"Mode s\nDomain example.test\nSelector {selector}\n"
                    f"KeyFile {tmp_path / (selector + '.pem')}\n"
                    f"Canonicalization relaxed/relaxed\nSignatureAlgorithm {algorithm}\n"
                    f"RequireSafeKeys false\n")
        done = _opendkim(tmp_path, f"sign-{selector}", settings, RICH)
        assert done.returncode == 0, done.stderr
        value = _inserted(done.stdout + done.stderr, "DKIM-Signature")
        assert f"a={algorithm};" in value
        fields += b"DKIM-Signature: " + value.replace("\n", "\r\n").encode() + b"\r\n"
    signed = fields + RICH
    verifier = DKIMVerifier(CachingResolver(Zone(zone), Clock()), run_in_thread=_now)
    results: list[Any] = []
    verifier.verify(signed).addCallback(results.append)
    assert [(r.result, r.selector, r.algorithm) for r in results[0]] == [
        ("pass", "rsa1", "rsa-sha256"), ("pass", "ed1", "ed25519-sha256")]
    results.clear()
    verifier.verify(signed.replace(b"Subject:   Interop", b"Subject: Interop")).addCallback(
        results.append)
    assert [r.result for r in results[0]] == ["pass", "pass"]  # relaxed: only white space
    results.clear()
    verifier.verify(signed.replace(b"Interop,", b"Intercept,")).addCallback(results.append)
    assert [r.result for r in results[0]] == ["fail", "fail"]


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
