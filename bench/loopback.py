"""Loopback networking for the benchmarks: free ports and waiting for an SMTP greeting.

Every address used here is checked to be in 127.0.0.0/8 or ::1; nothing in bench/ connects
anywhere else.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable

LOOPBACK = "127.0.0.1"


class BenchError(Exception):
    """A benchmark run that cannot give a trustworthy figure: it fails loudly with the reason."""


def require_loopback(host: str) -> str:
    """Return ``host`` if it is a loopback address literal; raise ValueError otherwise."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"refusing non-loopback address {host!r}: benchmarks stay on loopback")
    return host


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (bind port 0, read it, close)."""
    family = socket.AF_INET6 if ":" in require_loopback(host) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_greeting(
    host: str,
    port: int,
    *,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    interval: float = 0.1,
) -> str:
    """Poll until the server at host:port sends a 220 greeting; return that line.

    Bounded by ``timeout`` seconds. Gives up at once when ``alive()`` turns false (the server
    process exited), so a crash at start is reported instead of waited out.
    """
    require_loopback(host)
    deadline = time.monotonic() + timeout
    last_error = "no attempt made"
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"server for {host}:{port} exited before greeting ({last_error})")
        try:
            with socket.create_connection((host, port), timeout=2.0) as sock:
                sock.settimeout(max(0.5, min(5.0, deadline - time.monotonic())))
                line = _read_line(sock)
                if line.startswith("220"):
                    try:
                        sock.sendall(b"QUIT\r\n")
                        _read_line(sock)
                    except OSError:
                        pass
                    return line
                last_error = f"unexpected greeting {line!r}"
        except OSError as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(interval)
    raise BenchError(f"no 220 greeting from {host}:{port} within {timeout:.0f} s ({last_error})")


def _read_line(sock: socket.socket, limit: int = 4096) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = sock.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").rstrip("\r\n")
