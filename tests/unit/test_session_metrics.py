"""What sessions report to their listener's metrics: opened and closed sessions, refused
recipients and messages by reply code, failed logins (driven over StringTransport)."""

from __future__ import annotations

import base64
from pathlib import Path

from prometheus_client import CollectorRegistry
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailsys.smtp.policy import StorageFloor
from mailsys.smtp.server import ListenerRole
from mailsys.smtp.testing import SessionDriver, make_factory, memory_portal
from mailsys.web.metrics import ListenerMetrics, Metrics


class Recorder:
    """A SessionMetrics that records each call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def opened(self) -> None:
        self.calls.append("opened")

    def closed(self) -> None:
        self.calls.append("closed")

    def login_failed(self) -> None:
        self.calls.append("login_failed")

    def refused(self, code: int) -> None:
        self.calls.append(f"refused {code}")


def test_session_reports_open_refusals_and_close() -> None:
    """An SMTP session reports its opening, each refused recipient and oversized message by
    code, and its close; accepted commands report nothing."""
    factory = make_factory(max_message_size=100)
    recorder = factory.metrics = Recorder()
    driver = SessionDriver(factory)
    driver.send(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\n")
    driver.send(b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\n")
    driver.send(b"DATA\r\n")
    driver.send(b"Subject: x\r\n\r\n" + b"y" * 200 + b"\r\n.\r\n")
    driver.session.connectionLost(Failure(ConnectionError()))
    assert recorder.calls == ["opened", "refused 550", "refused 552", "closed"]


def test_failed_login_is_reported() -> None:
    """A failed SMTP AUTH reports one login failure."""
    clock = Clock()
    factory = make_factory(role=ListenerRole.SUBMISSIONS, clock=clock,
                           portal=memory_portal({"alice@example.test": "secret"}))
    recorder = factory.metrics = Recorder()
    driver = SessionDriver(factory)
    driver.send(b"EHLO client.test\r\n")
    token = base64.b64encode(b"\0alice@example.test\0wrong")
    driver.send(b"AUTH PLAIN " + token + b"\r\n")
    clock.advance(60)
    assert recorder.calls == ["opened", "login_failed"]


def test_listener_metrics_label_the_listener_and_protocol() -> None:
    """ListenerMetrics turns session reports into the labelled Prometheus series."""
    registry = CollectorRegistry()
    metrics = ListenerMetrics(Metrics(registry, Clock()), "imaps", "imap")
    metrics.opened()
    metrics.login_failed()
    metrics.refused(554)
    assert registry.get_sample_value("mailsys_connections_total", {"listener": "imaps"}) == 1
    assert registry.get_sample_value("mailsys_sessions", {"listener": "imaps"}) == 1
    assert registry.get_sample_value("mailsys_auth_failures_total", {"protocol": "imap"}) == 1
    assert registry.get_sample_value("mailsys_messages_refused_total",
                                     {"listener": "imaps", "code": "554"}) == 1
    metrics.closed()
    assert registry.get_sample_value("mailsys_sessions", {"listener": "imaps"}) == 0


def test_free_space_floor_refusal_is_counted() -> None:
    """MAIL FROM refused with 452 4.3.1 by the spool's free-space floor counts as a refusal."""
    factory = make_factory()
    floor = StorageFloor(Path("/nonexistent"), 1000, lambda *args: succeed(0))
    floor.update(10)
    factory.storage = floor
    recorder = factory.metrics = Recorder()
    driver = SessionDriver(factory)
    lines = driver.send(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\n")
    assert lines[-1].startswith("452 4.3.1")
    assert recorder.calls == ["opened", "refused 452"]
