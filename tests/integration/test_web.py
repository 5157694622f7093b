"""The HTTP listener of the real server (`twistd -n mailsys` with [web] listen): health,
readiness, metrics read by prometheus_client's own parser, Thunderbird autoconfig, Outlook
autodiscover and the MTA-STS policy, with a 404 that tells nothing for unknown domains."""

from __future__ import annotations

import imaplib
import smtplib
import ssl
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import MailServer, free_port, read_greeting, wait_for

OUTLOOK = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"


class Web:
    def __init__(self, server: MailServer, port: int, imaps_port: int = 0) -> None:
        self.server = server
        self.port = port
        self.imaps_port = imaps_port

    def get(self, path: str, host: str = "127.0.0.1", data: bytes | None = None,
            ) -> tuple[int, bytes, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read(), response.headers["Content-Type"]
        except urllib.error.HTTPError as error:
            return error.code, error.read(), error.headers["Content-Type"]


@pytest.fixture
def web(server_factory: Callable[..., MailServer]) -> Web:
    port, imaps = free_port(), free_port()
    server = server_factory(extra_config=f"""
[imap]
listen_tls = ["tcp:{imaps}:interface=127.0.0.1"]

[web]
listen = ["tcp:{port}:interface=127.0.0.1"]
mta_sts_mode = "enforce"
""")
    server.start()
    web = Web(server, port, imaps)

    def live() -> bool:
        try:
            return web.get("/livez")[0] == 200
        except OSError:  # not answering yet
            return False

    wait_for(live, message="the web listener")
    return web


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_livez_and_readyz(web: Web) -> None:
    """/livez answers ok; /readyz says ready with the spool and the listeners checked."""
    assert web.get("/livez")[:2] == (200, b"ok\n")
    status, body, _ = web.get("/readyz")
    assert status == 200
    assert b"spool: ok" in body and b"listeners: ok" in body and body.endswith(b"ready\n")


def test_metrics_parse(web: Web) -> None:
    """/metrics is Prometheus text prometheus_client's parser reads, with the families that
    monitoring needs."""
    status, body, content_type = web.get("/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"mailsys_connections", "mailsys_queue_messages",
            "mailsys_queue_oldest_message_age_seconds", "mailsys_delivery_latency_seconds",
            "mailsys_tls_certificate_expiry_timestamp_seconds"} <= names


def test_scrapes_100_a_second_leave_the_server_responsive(web: Web) -> None:
    """Two seconds of /metrics scraped at 100 a second (a bounded loop of 200, on two
    connections' worth of threads): every scrape answers 200, and meanwhile SMTP greets, mail
    is accepted and /livez answers."""
    results: list[int] = []

    def scrape(count: int) -> None:
        start = time.monotonic()
        for number in range(count):
            # Paced at 50 a second per thread, two threads: 100 a second together.
            pause = start + number / 50 - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                results.append(web.get("/metrics")[0])
            except OSError:
                results.append(0)

    threads = [threading.Thread(target=scrape, args=(100,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            assert read_greeting(web.server.smtp_port, timeout=10).startswith(b"220 ")
            assert web.get("/livez")[0] == 200
            with smtplib.SMTP("127.0.0.1", web.server.smtp_port, timeout=10) as client:
                client.sendmail("someone@remote.test", ["demo@example.test"],
                                "Subject: while scraped\r\n\r\nx\r\n")
    finally:
        for thread in threads:
            thread.join(timeout=120)
    assert len(results) == 200 and set(results) == {200}


def test_thunderbird_autoconfig_has_the_fields_thunderbird_reads(web: Web) -> None:
    """Both Thunderbird URLs give a clientConfig 1.1 with IMAP, POP3 and SMTP servers:
    hostname, port, socketType, authentication and username, for a served domain."""
    for path, host in (("/mail/config-v1.1.xml?emailaddress=demo%40example.test", "127.0.0.1"),
                       ("/.well-known/autoconfig/mail/config-v1.1.xml",
                        "autoconfig.example.test")):
        status, body, content_type = web.get(path, host=host)
        assert status == 200 and "xml" in content_type
        root = ET.fromstring(body)
        assert root.tag == "clientConfig" and root.get("version") == "1.1"
        provider = root.find("emailProvider")
        assert provider is not None and provider.findtext("domain") == "example.test"
        incoming = provider.findall("incomingServer")
        assert [server.get("type") for server in incoming] == ["imap"]
        outgoing = provider.find("outgoingServer")
        assert outgoing is not None and outgoing.get("type") == "smtp"
        for server in [*incoming, outgoing]:
            assert server.findtext("hostname") == "mail.example.test"
            assert server.findtext("port", "").isdigit()
            assert server.findtext("socketType") in ("SSL", "STARTTLS")
            assert server.findtext("authentication") == "password-cleartext"
            assert server.findtext("username") == "%EMAILADDRESS%"
        ports = {server.findtext("port") for server in [*incoming, outgoing]}
        assert str(web.server.submissions_port) in ports


def test_autodiscover_answers_outlooks_post(web: Web) -> None:
    """Outlook's autodiscover POST gets settings for IMAP and SMTP with the address as login."""
    request = (b'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.'
               b'microsoft.com/exchange/autodiscover/outlook/requestschema/2006"><Request>'
               b"<EMailAddress>demo@example.test</EMailAddress><AcceptableResponseSchema>"
               b"http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/"
               b"2006a</AcceptableResponseSchema></Request></Autodiscover>")
    status, body, _ = web.get("/autodiscover/autodiscover.xml", data=request)
    assert status == 200
    account = ET.fromstring(body).find(f"{OUTLOOK}Response/{OUTLOOK}Account")
    assert account is not None and account.findtext(f"{OUTLOOK}Action") == "settings"
    protocols = {p.findtext(f"{OUTLOOK}Type"): p for p in account.findall(f"{OUTLOOK}Protocol")}
    assert {"IMAP", "SMTP"} <= set(protocols)
    assert protocols["SMTP"].findtext(f"{OUTLOOK}LoginName") == "demo@example.test"


def test_unknown_domain_is_404_with_nothing_about_others(web: Web) -> None:
    """Autoconfig, autodiscover and MTA-STS for a domain we do not serve: 404, and the body
    names none of our domains or hosts."""
    answers = [
        web.get("/mail/config-v1.1.xml?emailaddress=x%40other.test"),
        web.get("/.well-known/autoconfig/mail/config-v1.1.xml", host="autoconfig.other.test"),
        web.get("/autodiscover/autodiscover.xml",
                data=b"<Request><EMailAddress>x@other.test</EMailAddress></Request>"),
        web.get("/.well-known/mta-sts.txt", host="mta-sts.other.test"),
    ]
    for status, body, _ in answers:
        assert status == 404
        assert b"example.test" not in body and b"mail." not in body


def test_mta_sts_policy(web: Web) -> None:
    """The policy file for mta-sts.<local domain> is RFC 8461 §3.2 text with our MX."""
    status, body, content_type = web.get("/.well-known/mta-sts.txt", host="mta-sts.example.test")
    assert status == 200 and content_type.startswith("text/plain")
    assert body == (b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\n"
                    b"max_age: 604800\r\n")


def test_counters_move_as_mail_flows(web: Web) -> None:
    """Mail over SMTP, a refused recipient and a failed IMAP login move the connection,
    accepted, refused, delivery and authentication-failure counters, read with
    prometheus_client's parser."""
    def read() -> str:
        return web.get("/metrics")[1].decode()  # rendered anew at most once a second

    before = read()
    with smtplib.SMTP("127.0.0.1", web.server.smtp_port, timeout=10) as client:
        client.sendmail("someone@remote.test", ["demo@example.test"], b"Subject: m\r\n\r\nx\r\n")
        client.ehlo()
        client.mail("someone@remote.test")
        code, _ = client.rcpt("nobody@example.test")
        assert code == 550
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with imaplib.IMAP4_SSL("127.0.0.1", web.imaps_port, ssl_context=context) as imap, \
            pytest.raises(imaplib.IMAP4.error):
        imap.login("demo@example.test", "wrong")
    wait_for(lambda: web.server.inbox_files(), message="delivery")

    def moved() -> bool:
        after = read()
        return all(metric(after, name, **labels) > metric(before, name, **labels)
                   for name, labels in (
                       ("mailsys_connections_total", {"listener": "smtp"}),
                       ("mailsys_connections_total", {"listener": "imaps"}),
                       ("mailsys_messages_accepted_total", {"listener": "smtp"}),
                       ("mailsys_messages_refused_total", {"listener": "smtp", "code": "550"}),
                       ("mailsys_auth_failures_total", {"protocol": "imap"}),
                       ("mailsys_delivery_attempts_total", {"target": "local",
                                                            "result": "delivered"}),
                       ("mailsys_delivery_latency_seconds_count", {"target": "local"})))

    wait_for(moved, deadline=10.0, interval=0.2, message="the counters to move")
    assert metric(read(), "mailsys_sessions", listener="smtp") == 0
