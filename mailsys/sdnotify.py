"""systemd's readiness protocol (sd_notify(3)) without a library: one datagram to the unix
socket named by $NOTIFY_SOCKET. Without that variable (not started by systemd) nothing happens.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.logger import Logger

log = Logger(namespace="mailsys.sdnotify")

READY = "READY=1"
STOPPING = "STOPPING=1"


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``fields`` (``KEY=value`` lines) to systemd; True if sent.

    The socket never makes us wait: it is non-blocking, and a failure is logged, not raised
    (a supervisor that stopped listening must not stop the mail system).
    """
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket (sd_notify(3))
    elif not address.startswith("/"):
        log.warn("NOTIFY_SOCKET={address!r} is not a unix socket path; not notifying",
                 address=address)
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(message, address)
    except OSError as exc:
        log.warn("cannot notify systemd at {address}: {error}", address=address,
                 error=exc.strerror or str(exc))
        return False
    return True
