"""Prometheus metrics: one ``Metrics`` object, built on a registry passed in (never the global
default registry), that the sessions, the queue and the delivery agents report to.

Names and labels follow Prometheus conventions (``mailsys_..._total`` for counters, base units
in the name). Values that are a state rather than an event (queue size by state, the oldest
message's age, the certificate's expiry) are read when scraped, from callables given here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mailsys.envelope import Attempt, Envelope, Recipient, RecipientStatus
from mailsys.interfaces import IMessageSink

# Delivery latency buckets (seconds from acceptance to the final attempt): local deliveries
# take milliseconds, relayed ones seconds, retried ones hours.
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
                   14400.0, 86400.0)


_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


class _Children(Generic[_Metric]):
    """A labelled metric's children, each looked up in prometheus_client once: its ``labels()``
    validates, formats and locks on every call, six times per SMTP message."""

    def __init__(self, metric: _Metric) -> None:
        self._metric: _Metric = metric
        self._children: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *values: str) -> _Metric:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


@dataclass(frozen=True)
class QueueState:
    """The queue as a scrape sees it: messages per state and the oldest one's arrival time."""

    by_state: dict[str, int]
    oldest_received_at: float | None


class _StateCollector(Collector):
    """Gauges computed at scrape time from the callables the service registered."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.queue: Callable[[], QueueState] | None = None
        self.certificate_expiry: Callable[[], float | None] | None = None

    def collect(self) -> Iterable[Metric]:
        if self.queue is not None:
            state = self.queue()
            size = GaugeMetricFamily("mailsys_queue_messages",
                                     "Messages in the queue, by state.", labels=["state"])
            for name in ("active", "deferred", "held"):
                size.add_metric([name], state.by_state.get(name, 0))
            yield size
            age = 0.0
            if state.oldest_received_at is not None:
                age = max(0.0, self._clock.seconds() - state.oldest_received_at)
            yield GaugeMetricFamily("mailsys_queue_oldest_message_age_seconds",
                                    "Age of the oldest message in the queue (0 when empty).",
                                    value=age)
        if self.certificate_expiry is not None:
            expiry = self.certificate_expiry()
            if expiry is not None:
                yield GaugeMetricFamily(
                    "mailsys_tls_certificate_expiry_timestamp_seconds",
                    "When the server's TLS certificate expires (Unix time).", value=expiry)


class Metrics:
    """What the rooms count; every method is cheap (a dictionary look-up and an addition)."""

    def __init__(self, registry: CollectorRegistry, clock: IReactorTime) -> None:
        self.registry = registry
        self._connections = _Children(Counter(
            "mailsys_connections", "Connections accepted, by listener.", ["listener"],
            registry=registry))
        self._sessions = _Children(Gauge(
            "mailsys_sessions", "Sessions open now, by listener.", ["listener"],
            registry=registry))
        self._accepted = _Children(Counter(
            "mailsys_messages_accepted", "Messages accepted into the queue, by listener.",
            ["listener"], registry=registry))
        self._refused = _Children(Counter(
            "mailsys_messages_refused", "Messages or recipients refused, by listener and reply "
            "code.", ["listener", "code"], registry=registry))
        self._auth_failures = _Children(Counter(
            "mailsys_auth_failures", "Failed logins, by protocol.", ["protocol"],
            registry=registry))
        self._attempts = _Children(Counter(
            "mailsys_delivery_attempts", "Delivery attempts, by target (local, relay) and result "
            "(delivered, deferred, failed).", ["target", "result"], registry=registry))
        self._latency = _Children(Histogram(
            "mailsys_delivery_latency_seconds", "Time from acceptance to delivery.", ["target"],
            buckets=LATENCY_BUCKETS, registry=registry))
        self._bounces = _Children(Counter(
            "mailsys_bounces", "Delivery status notifications queued, by kind (failure, "
            "delay, success).", ["kind"], registry=registry))
        self._state = _StateCollector(clock)
        registry.register(self._state)

    # -- sessions ---------------------------------------------------------------------------------

    def connection_opened(self, listener: str) -> None:
        self._connections(listener).inc()
        self._sessions(listener).inc()

    def connection_closed(self, listener: str) -> None:
        self._sessions(listener).dec()

    def message_accepted(self, listener: str) -> None:
        self._accepted(listener).inc()

    def message_refused(self, listener: str, code: int) -> None:
        self._refused(listener, str(code)).inc()

    def auth_failed(self, protocol: str) -> None:
        self._auth_failures(protocol).inc()

    # -- queue and delivery -----------------------------------------------------------------------

    def delivery_attempted(self, target: str, result: str, latency: float | None = None) -> None:
        self._attempts(target, result).inc()
        if latency is not None and result == "delivered":
            self._latency(target).observe(max(0.0, latency))

    def notice_queued(self, kind: str) -> None:
        self._bounces(kind.lower()).inc()

    def watch_queue(self, state: Callable[[], QueueState]) -> None:
        self._state.queue = state

    def watch_certificate(self, expiry: Callable[[], float | None]) -> None:
        self._state.certificate_expiry = expiry


class ListenerMetrics:
    """One listener's view of the metrics, as its sessions report (mailsys.session's
    SessionMetrics): the listener and protocol labels are fixed here."""

    def __init__(self, metrics: Metrics, listener: str, protocol: str) -> None:
        self._metrics = metrics
        self._listener = listener
        self._protocol = protocol

    def opened(self) -> None:
        self._metrics.connection_opened(self._listener)

    def closed(self) -> None:
        self._metrics.connection_closed(self._listener)

    def login_failed(self) -> None:
        self._metrics.auth_failed(self._protocol)

    def refused(self, code: int) -> None:
        self._metrics.message_refused(self._listener, code)


def queue_state(envelopes: Callable[[], Iterable[Envelope]]) -> Callable[[], QueueState]:
    """The queue's state from the runner's envelopes: held, deferred (some recipient waits
    for a retry) or active."""

    def state() -> QueueState:
        counts = {"active": 0, "deferred": 0, "held": 0}
        oldest: float | None = None
        for envelope in envelopes():
            if envelope.held:
                counts["held"] += 1
            elif any(r.status is RecipientStatus.DEFERRED for r in envelope.recipients):
                counts["deferred"] += 1
            else:
                counts["active"] += 1
            if oldest is None or envelope.received_at < oldest:
                oldest = envelope.received_at
        return QueueState(counts, oldest)

    return state


def attempt_observer(metrics: Metrics) -> Callable[[Envelope, Recipient, Attempt], None]:
    """The runner's observer: each attempt counted by target and result, latency on success."""

    def observe(envelope: Envelope, recipient: Recipient, attempt: Attempt) -> None:
        metrics.delivery_attempted(recipient.kind.value, attempt.status.value,
                                   attempt.at - envelope.received_at)

    return observe


_ACTIONS = ((b"Action: failed", "failure"), (b"Action: delayed", "delay"),
            (b"Action: delivered", "success"))


@implementer(IMessageSink)
class CountingSink:
    """A sink that tells ``counted`` of every message committed through it (a listener's
    accepted messages, the notices the DSN notifier queues)."""

    def __init__(self, sink: IMessageSink, counted: Callable[[Envelope, bytes], None]) -> None:
        self._sink = sink
        self._counted = counted

    def new_queue_id(self) -> str:
        return self._sink.new_queue_id()

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
        def count(result: None) -> None:
            self._counted(envelope, message)
            return result

        return self._sink.submit(envelope, message).addCallback(count)


def accepted_by(metrics: Metrics, listener: str) -> Callable[[Envelope, bytes], None]:
    """Counts a listener's accepted messages."""
    return lambda envelope, message: metrics.message_accepted(listener)


def notices(metrics: Metrics) -> Callable[[Envelope, bytes], None]:
    """Counts delivery status notifications by kind (the Action of the report, RFC 3464)."""

    def count(envelope: Envelope, message: bytes) -> None:
        head = message[:65536]
        kind = next((name for action, name in _ACTIONS if action in head), "other")
        metrics.notice_queued(kind)

    return count


class MetricsText:
    """The text exposition of a registry, rendered at most once per ``max_age`` seconds, so
    that scrapes a hundred times a second cost one rendering per interval."""

    def __init__(self, registry: CollectorRegistry, clock: IReactorTime,
                 max_age: float = 1.0) -> None:
        self._registry = registry
        self._clock = clock
        self._max_age = max_age
        self._text = b""
        self._at: float | None = None
        self.renders = 0

    def render(self) -> bytes:
        now = self._clock.seconds()
        if self._at is None or now - self._at >= self._max_age or now < self._at:
            self._text = generate_latest(self._registry)
            self._at = now
            self.renders += 1
        return self._text
