"""Shared pieces of the journey tests: a reactor stand-in for the writer thread, sample events."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from mailsys.journey.events import JourneyEvent

DEADLINE = 10.0
T0 = 1_800_000_000.0


class ThreadCallReactor:
    """Stands in for the reactor: a settable time, and calls from threads run by the test."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def seconds(self) -> float:
        return self.now

    def callFromThread(self, func: Callable[..., Any], *args: Any) -> None:  # noqa: N802
        with self._lock:
            self._calls.append((func, args))

    def run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for func, args in calls:
            func(*args)

    def wait_for(self, done: Callable[[], object], what: str = "the writer") -> None:
        """Run the calls from threads until ``done()`` is true, or fail at the deadline."""
        end = time.monotonic() + DEADLINE
        while not done():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            self.run_calls()
            time.sleep(0.002)


def submission_events(queue_id: str = "Q1", session: str = "S1", at: float = T0,
                      message_id: str = "m1@client.test") -> list[JourneyEvent]:
    """A submission with one refused and one accepted recipient, queued and delivered locally."""
    def event(offset: float, kind: str, queue: str | None = None, mid: str | None = None,
              sess: str | None = session, **fields: Any) -> JourneyEvent:
        return JourneyEvent(at + offset, kind, queue, mid, sess, fields)

    return [
        event(0.000, "smtp.connect", client="127.0.0.1", rdns="localhost",
              listener="submission"),
        event(0.010, "smtp.tls", version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384"),
        event(0.020, "smtp.ehlo", command="EHLO", name="client.test", reply="250"),
        event(0.030, "smtp.auth", user="demo@example.test", mechanism="PLAIN",
              reply="235 2.7.0 Authentication successful"),
        event(0.040, "smtp.mail", txn=1, sender="demo@example.test", reply="250 2.1.0 Ok"),
        event(0.050, "smtp.rcpt", txn=1, recipient="nobody@example.test",
              reply="550 5.1.1 No such user here"),
        event(0.060, "smtp.rcpt", txn=1, recipient="alice@example.test", reply="250 2.1.5 Ok"),
        event(0.070, "smtp.data", queue_id, message_id, txn=1, command="DATA", size=512,
              reply=f"250 2.0.0 Ok: queued as {queue_id}"),
        event(0.075, "spool.commit", queue_id, message_id, None, sender="demo@example.test",
              recipients=["alice@example.test"], size=512),
        event(0.080, "route", queue_id, None, None, recipient="alice@example.test",
              target="local", mailbox="alice@example.test"),
        event(0.200, "delivery.maildir", queue_id, None, None, recipient="alice@example.test",
              mailbox="alice@example.test", folder="INBOX", file=f"{queue_id}.abc"),
        event(0.210, "delivery.attempt", queue_id, None, None, recipient="alice@example.test",
              agent="maildir", status="delivered"),
        event(0.300, "smtp.close", reason="QUIT"),
    ]
