"""mailsys.web without a reactor: pages by path and host, readiness with fake checks, the
metrics text cached under scrapes, and the [web] config section."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.names.error import DNSNameError
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from mailsys.config import ConfigError, from_mapping
from mailsys.envelope import Attempt, Envelope, Recipient, RecipientStatus, TargetKind
from mailsys.replies import Reply
from mailsys.web.autoconfig import autodiscover_address, services
from mailsys.web.health import Check, Readiness, dns_answering, files_usable
from mailsys.web.metrics import Metrics, MetricsText, attempt_observer, queue_state
from mailsys.web.site import WebRoot
from mailsys.web.wiring import web_settings

CONFIG = {
    "server": {"hostname": "mail.example.test"},
    "tls": {"certificate": "c.pem", "key": "k.pem", "create_self_signed": True},
    "imap": {"listen": ["tcp:143"], "listen_tls": ["tcp:993"]},
    "submission": {"listen": ["tcp:587"], "listen_tls": ["tcp:465"]},
    "routing": {"local_domains": ["example.test"], "domain_aliases": {"alias.test":
                                                                      "example.test"}},
    "web": {"listen": ["tcp:8080"], "mta_sts_mode": "testing"},
}


def root(checks: list[Check] | None = None, clock: Clock | None = None) -> WebRoot:
    config = from_mapping(CONFIG, "t.toml", check_files=False)
    clock = clock or Clock()
    registry = CollectorRegistry()
    Metrics(registry, clock)
    return WebRoot(web_settings(config), Readiness(checks or [], clock),
                   MetricsText(registry, clock))


def get(resource: WebRoot, path: str, host: str = "localhost", method: bytes = b"GET",
        body: bytes = b"", args: dict[bytes, list[bytes]] | None = None) -> DummyRequest:
    request = DummyRequest([])
    request.path = path.encode()
    request.method = method
    request.args = args or {}
    request.content = io.BytesIO(body)
    request.requestHeaders.setRawHeaders(b"host", [host.encode()])
    request._serverName = host.encode()  # what DummyRequest.getRequestHostname answers
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    return request


def body(request: DummyRequest) -> bytes:
    return b"".join(request.written)


def test_services_come_from_the_listeners() -> None:
    """Autoconfig advertises each protocol's ports, implicit TLS first (RFC 8314 §3)."""
    config = from_mapping(CONFIG, "t.toml", check_files=False)
    assert [(s.protocol, s.port, s.socket_type) for s in services(config)] == [
        ("imap", 993, "SSL"), ("imap", 143, "STARTTLS"), ("smtp", 465, "SSL"),
        ("smtp", 587, "STARTTLS")]


def test_alias_domains_are_served_others_are_not() -> None:
    """Thunderbird's autoconfig answers for a local and an alias domain, 404 for others."""
    resource = root()
    for address, code in ((b"a@example.test", 200), (b"a@alias.test", 200),
                          (b"a@other.test", 404)):
        request = get(resource, "/mail/config-v1.1.xml", args={b"emailaddress": [address]})
        assert (request.responseCode or 200) == code
    assert body(request) == b"not found\n"


def test_mta_sts_needs_the_mta_sts_host_of_a_served_domain() -> None:
    """The policy is served on mta-sts.<local domain> only; any other host gets 404."""
    resource = root()
    assert b"mode: testing\r\n" in body(get(resource, "/.well-known/mta-sts.txt",
                                            host="mta-sts.example.test"))
    for host in ("example.test", "mta-sts.other.test", "autoconfig.example.test"):
        assert get(resource, "/.well-known/mta-sts.txt", host=host).responseCode == 404


def test_autodiscover_wants_post_and_an_address() -> None:
    """GET is 405, a body without EMailAddress is 400, a huge body is 413."""
    resource = root()
    assert get(resource, "/autodiscover/autodiscover.xml").responseCode == 405
    assert get(resource, "/autodiscover/autodiscover.xml", method=b"POST",
               body=b"<x/>").responseCode == 400
    assert get(resource, "/autodiscover/autodiscover.xml", method=b"POST",
               body=b"x" * 20000).responseCode == 413


def test_autodiscover_address_is_read_without_an_xml_parser() -> None:
    """The address is taken from EMailAddress, with or without a namespace prefix; entity
    tricks are not expanded."""
    assert autodiscover_address(b"<a:EMailAddress>u@d.test</a:EMailAddress>") == "u@d.test"
    assert autodiscover_address(b'<!DOCTYPE x [<!ENTITY e "u@d.test">]>'
                                b"<EMailAddress>&e;</EMailAddress>") == "&e;"


def test_unknown_path_is_404() -> None:
    """A path the listener does not have is 404."""
    assert get(root(), "/etc/passwd").responseCode == 404


def test_readyz_reports_each_check() -> None:
    """/readyz is 200 when every check passes, else 503 naming the one that failed."""
    ok = Check("spool", lambda: succeed(True))
    bad = Check("dns", lambda: succeed(False))
    request = get(root([ok]), "/readyz")
    assert request.finished and (request.responseCode or 200) == 200
    request = get(root([ok, bad]), "/readyz")
    assert request.responseCode == 503
    assert body(request) == b"spool: ok\ndns: failed\nnot ready\n"


def test_readyz_fails_while_a_needed_file_is_unusable(tmp_path: Path) -> None:
    """The files check fails while the users file is missing or unreadable to this process,
    and passes again once it is back."""

    class Now:
        def run(self, fn: Any, *args: Any) -> Deferred[Any]:
            return succeed(fn(*args))

    users = tmp_path / "users"
    check = files_usable([(tmp_path, os.W_OK | os.X_OK), (users, os.R_OK)], Now())
    assert body(get(root([check]), "/readyz")) == b"files: failed\nnot ready\n"
    users.write_text("")
    assert body(get(root([check]), "/readyz")) == b"files: ok\nready\n"


def test_readiness_check_that_hangs_times_out() -> None:
    """A check that never answers counts as failed after the timeout."""
    clock = Clock()
    hanging = Check("dns", lambda: Deferred())
    request = get(root([hanging], clock), "/readyz")
    assert not request.finished
    clock.advance(10)
    assert request.finished and request.responseCode == 503


def test_dns_no_such_name_is_an_answer() -> None:
    """DNS answering "no such name" is ready; a timeout is not."""
    results: list[bool] = []
    dns_answering(lambda: fail(DNSNameError())).run().addCallback(results.append)
    dns_answering(lambda: fail(TimeoutError())).run().addCallback(results.append)
    assert results == [True, False]


def test_metrics_text_renders_at_most_once_a_second() -> None:
    """Many scrapes within a second render the registry once; later scrapes see new values."""
    clock = Clock()
    registry = CollectorRegistry()
    metrics = Metrics(registry, clock)
    text = MetricsText(registry, clock)
    for _ in range(100):
        text.render()
    assert text.renders == 1
    metrics.auth_failed("imap")
    clock.advance(1.0)
    families = text_string_to_metric_families(text.render().decode())
    samples = {(s.name, tuple(s.labels.items())): s.value for f in families for s in f.samples}
    assert samples[("mailsys_auth_failures_total", (("protocol", "imap"),))] == 1.0
    assert text.renders == 2


def test_queue_and_delivery_metrics() -> None:
    """Queue size by state and the oldest age are read at scrape time; attempts count by target
    and result, and a delivery's latency lands in the histogram."""
    clock = Clock()
    clock.advance(1000)
    registry = CollectorRegistry()
    metrics = Metrics(registry, clock)
    deferred = Recipient("a@x.test", "a@x.test", TargetKind.RELAY,
                         status=RecipientStatus.DEFERRED)
    envelopes = [Envelope("Q1", "s@x.test", [deferred], received_at=400.0),
                 Envelope("Q2", "s@x.test", [], received_at=900.0, held=True)]
    metrics.watch_queue(queue_state(lambda: envelopes))
    attempt_observer(metrics)(envelopes[0], deferred, Attempt(
        at=1000.0, status=RecipientStatus.DELIVERED, host="h", reply=Reply(250, "", "ok")))
    text = MetricsText(registry, clock).render().decode()
    samples = {(s.name, frozenset(s.labels.values())): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("mailsys_queue_messages", frozenset({"deferred"}))] == 1
    assert samples[("mailsys_queue_messages", frozenset({"held"}))] == 1
    assert samples[("mailsys_queue_oldest_message_age_seconds", frozenset())] == 600.0
    assert samples[("mailsys_delivery_attempts_total", frozenset({"relay", "delivered"}))] == 1
    assert samples[("mailsys_delivery_latency_seconds_count", frozenset({"relay"}))] == 1


def test_web_config_section() -> None:
    """[web] values are checked: the MTA-STS mode, max_age's RFC 8461 limit, MX patterns."""
    assert from_mapping({}, Path("t.toml")).web.listen == ()
    for web, key in (({"mta_sts_mode": "on"}, "web.mta_sts_mode"),
                     ({"mta_sts_max_age": 40000000}, "web.mta_sts_max_age"),
                     ({"mta_sts_mx": ["bad host"]}, "web.mta_sts_mx")):
        with pytest.raises(ConfigError) as caught:
            from_mapping({"web": web}, "t.toml")
        assert caught.value.key == key
    assert from_mapping({"web": {"mta_sts_mx": ["*.example.test"]}}, "t.toml")
