"""Nothing acknowledged is lost: SIGKILL under load, restart, and every 250'd message arrives."""

from __future__ import annotations

import smtplib
import threading
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import MailServer, wait_for

SENDERS = 6
MAX_PER_SENDER = 400
KILL_AFTER = 150  # acknowledged messages before the SIGKILL


def test_sigkill_under_load_loses_nothing_acknowledged(
    server_factory: Callable[..., MailServer],
) -> None:
    """Every message that got 250 before a SIGKILL is in the Maildir after restart, once."""
    srv = server_factory("crash")
    srv.start()
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def send(worker: int) -> None:
        try:
            client = smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10)
            client.ehlo("load.test")
            for n in range(MAX_PER_SENDER):
                if stop.is_set():
                    break
                token = f"w{worker}-n{n}"
                body = f"Subject: {token}\r\nX-Token: {token}\r\n\r\n" + ('x' * 75 + "\r\n") * 40
                client.sendmail("load@sender.test", ["demo@example.test"], body)
                with lock:  # only after the 250 came back
                    acknowledged.append(token)
        except (smtplib.SMTPException, OSError):
            return  # the server died under us: what was acknowledged is all that counts

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(SENDERS)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(acknowledged) >= KILL_AFTER, deadline=60, message="load")
    srv.kill()
    stop.set()
    for thread in threads:
        thread.join(timeout=15)
    with lock:
        promised = set(acknowledged)
    assert len(promised) >= KILL_AFTER

    srv.start()

    def delivered_tokens() -> list[str]:
        return [t for t in (_token(p) for p in srv.inbox_files()) if t]

    wait_for(lambda: promised <= set(delivered_tokens()), deadline=60, message="recovery delivery")
    # Exactly once: the recovery found the copies it had already written instead of writing more.
    wait_for(lambda: not list(srv.spool.glob("queue/*.env")), deadline=30, message="empty spool")
    tokens = delivered_tokens()
    assert len(tokens) == len(set(tokens)), "a message was delivered twice"


def _token(path: Path) -> str | None:
    for line in path.read_bytes().splitlines():
        if line.startswith(b"X-Token: "):
            return line[9:].decode()
    return None
