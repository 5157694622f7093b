"""CPU cost of mail authentication per message, without the network: the inbound checks (iprev,
SPF for MAIL FROM and HELO, DKIM verification of an RSA-2048 signature, DMARC) against a warm
cache, and DKIM signing with RSA-2048 and Ed25519.

    .venv/bin/python bench/authn_cpu.py [--messages N] [--size BYTES]

The "thread" work (DKIM hashing and RSA) runs inline here so that it is counted; in the server it
runs in the thread pool, off the reactor, and its share is shown on a row of its own ("in the
pool"; the rest runs on the reactor thread). Figures are process CPU time per message; the first
row is OpenSSL's bare RSA-2048 signature, the floor under RSA signing on this machine (a loaded
machine inflates every row alike: compare rows with it, and runs side by side).

Last, whether the private-key operations let go of the GIL while they run: with a switch
interval of 10 s, another thread gets to run during a series of operations only if they do.
What holds the GIL in a pool thread delays the reactor; what does not costs it nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
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

# CPU seconds spent in "thread" work (what the server runs in its pool), summed.
_in_pool = [0.0]


def _inline(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    start = time.process_time()
    try:
        return maybeDeferred(function, *args)
    finally:
        _in_pool[0] += time.process_time() - start


def _releases_gil(operation: Callable[[], object], count: int = 200) -> bool:
    """Whether another thread runs while ``operation`` is repeated ``count`` times in one
    thread: with a 10 s switch interval Python never takes the GIL away from that thread, so
    the other runs early only if the operation lets go of it."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        finished: list[float] = []

        def repeat() -> None:
            for _ in range(count):
                operation()
            finished.append(time.monotonic())

        worker = threading.Thread(target=repeat)
        worker.start()
        ran = time.monotonic()  # the first moment this thread had the GIL back
        worker.join()
        return ran < finished[0]
    finally:
        sys.setswitchinterval(before)


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
    def rsa_sign() -> object:
        return rsa.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))

    total = _cpu_per_call(check, args.messages)
    _in_pool[0] = 0.0
    _cpu_per_call(check, args.messages)
    pool = _in_pool[0] / (args.messages + 1) * 1000.0
    rows = [
        ("calibration: one RSA-2048 private-key operation", _cpu_per_call(rsa_sign,
                                                                         args.messages)),
        ("inbound checks (warm cache, RSA-2048 signature)", total),
        ("  of which in the pool (DKIM hashing, RSA)", pool),
        ("  of which on the reactor thread", total - pool),
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
    print("Signing runs wholly in the pool; the private-key operation lets go of the GIL:")
    for name, operation in (("RSA-2048", rsa_sign), ("Ed25519", lambda: ed.private.sign(digest))):
        print(f"  {name:<50} {'yes' if _releases_gil(operation) else 'no'}")


if __name__ == "__main__":
    main()
