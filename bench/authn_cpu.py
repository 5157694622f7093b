"""CPU cost of mail authentication per message, without the network: the inbound checks (iprev,
SPF for MAIL FROM and HELO, DKIM verification of an RSA-2048 signature, DMARC) against a warm
cache, and DKIM signing with RSA-2048 and Ed25519.

    .venv/bin/python bench/authn_cpu.py [--messages N] [--size BYTES]

The "thread" work (DKIM hashing and RSA) runs inline here so that it is counted; in the server it
runs in the thread pool, off the reactor. Figures are process CPU time per message; the first
row is OpenSSL's bare RSA-2048 signature, the floor under RSA signing on this machine (a loaded
machine inflates every row alike).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from mailsys.authn.checks import InboundChecks
from mailsys.authn.dkim import SigningKey, generate_key, load_key, sign_message
from mailsys.dns import CachingResolver
from mailsys.labdns import Zone


def _inline(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(function, *args)


def _message(size: int) -> bytes:
    header = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\n"
              b"Subject: benchmark\r\nDate: Mon, 07 Dec 2026 04:00:00 +0000\r\n"
              b"Message-ID: <bench@sender.test>\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    return header + line * max(1, (size - len(header)) // len(line))


def _key(algorithm: str) -> tuple[SigningKey, str]:
    pem, record = generate_key(algorithm)  # type: ignore[arg-type]
    with tempfile.NamedTemporaryFile(suffix=".pem") as file:
        file.write(pem)
        file.flush()
        return load_key(Path(file.name), "sender.test", algorithm), record


def _cpu_per_call(function: Callable[[], object], count: int) -> float:
    function()  # warm: caches, imports, first-call costs
    start = time.process_time()
    for _ in range(count):
        function()
    return (time.process_time() - start) / count * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    args = parser.parse_args()
    rsa, rsa_record = _key("rsa")
    ed, _ = _key("ed25519")
    message = _message(args.size)
    zone = Zone({
        "sender.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
        "rsa._domainkey.sender.test": {"TXT": [rsa_record]},
        "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
        "10.2.0.192.in-addr.arpa": {"PTR": ["mx.sender.test"]},
        "mx.sender.test": {"A": ["192.0.2.10"], "TXT": ["v=spf1 a -all"]},
    })
    clock = Clock()
    checks = InboundChecks(CachingResolver(zone, clock), "mx.example.test",
                           run_in_thread=_inline)
    signed = sign_message(message, [rsa]) + message

    def check() -> None:
        results: list[Any] = []
        checks.check("192.0.2.10", "mx.sender.test", "alice@sender.test", signed).addBoth(
            results.append)
        assert results and results[0][1].dmarc.result == "pass", results

    import hashlib

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    digest = hashlib.sha256(message).digest()
    rows = [
        ("calibration: one RSA-2048 private-key operation", _cpu_per_call(
            lambda: rsa.private.sign(digest, padding.PKCS1v15(),
                                     utils.Prehashed(hashes.SHA256())), args.messages)),
        ("inbound checks (warm cache, RSA-2048 signature)", _cpu_per_call(check, args.messages)),
        ("DKIM signing, RSA-2048", _cpu_per_call(lambda: sign_message(message, [rsa]),
                                                 args.messages)),
        ("DKIM signing, Ed25519", _cpu_per_call(lambda: sign_message(message, [ed]),
                                                args.messages)),
        ("DKIM signing, RSA-2048 + Ed25519", _cpu_per_call(
            lambda: sign_message(message, [rsa, ed]), args.messages)),
    ]
    print(f"{args.messages} messages of {len(message)} bytes; CPU ms per message")
    for name, value in rows:
        print(f"  {name:<50} {value:6.3f}")


if __name__ == "__main__":
    main()
