"""The journey web page against the real `twistd -n mailsys`: the whole journey of a message to a
local and a remote recipient (a second instance over the lab DNS) read over IMAP, in `mailsys
trace` and over HTTP alike; live steps over Server-Sent Events; the queue's four operations; and
the page's defences (login everywhere, escaping, cross-site POSTs, other users' mail, paths)."""

from __future__ import annotations

import html
import http.client
import imaplib
import json
import re
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailsys.web.console import STAGES, stage_of
from tests.integration import relay_support
from tests.integration.conftest import MAILSYS, MailServer, make_server, wait_for
from tests.integration.relay_support import LabDNS, relay_section
from tests.integration.test_journey import tls_context
from tests.integration.web_support import (
    ADMIN,
    ADMIN_PASSWORD,
    USER,
    USER_PASSWORD,
    EventStream,
    WebClient,
    csrf_of,
    start_console,
)

lab_dns = relay_support.lab_dns  # the fixture

# Nothing listens on 127.0.0.9: mail for stuck.test is deferred and stays in the queue.
ZONE = {
    "remote.test": {"MX": [[10, "mx1.remote.test"]]},
    "mx1.remote.test": {"A": ["127.0.0.2"]},
    "stuck.test": {"MX": [[10, "mx.stuck.test"]]},
    "mx.stuck.test": {"A": ["127.0.0.9"]},
}


def submit(server: MailServer, msg: EmailMessage, recipients: list[str],
           user: str = ADMIN, password: str = ADMIN_PASSWORD) -> None:
    """Send over 587 with STARTTLS and AUTH, as a mail client does."""
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30) as client:
        client.starttls(context=tls_context(server))
        client.login(user, password)
        client.send_message(msg, user, recipients)


def message(subject: str, message_id: str, sender: str = ADMIN, to: str = ADMIN
            ) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = message_id
    msg.set_content("Hello.\n")
    return msg


def queue_id_of(client: WebClient, message_id: str) -> str:
    found = wait_for(lambda: client.queue_ids(message_id), deadline=20.0,
                     message=f"the message {message_id} in the list")
    assert isinstance(found, list)
    return str(found[-1])  # newest first: a bounce or notice about it would come before it


@pytest.fixture
def console(server_factory: Callable[..., MailServer],
            tmp_path: Path) -> Iterator[tuple[MailServer, WebClient, int]]:
    yield start_console(server_factory, directory=tmp_path)


# -- the test of the issue -----------------------------------------------------------------------

def test_journey_to_a_local_and_a_remote_recipient_in_trace_and_over_http(
        server_factory: Callable[..., MailServer], tmp_path: Path, lab_dns: LabDNS) -> None:
    """One message submitted to a local and a remote recipient (a second instance found over
    the lab DNS), then read over IMAP: every step in order, the same in `mailsys trace` and
    over HTTP (JSON and the page)."""
    lab_dns.set(ZONE)
    receiver = make_server(tmp_path / "receiver", interface="127.0.0.2",
                           local_domains=("example.test", "remote.test"),
                           aliases='"someone@remote.test" = ["demo@example.test"]')
    receiver.write_config()
    receiver.start()
    try:
        server, client, imap_port = start_console(
            server_factory, directory=tmp_path,
            relay_config=relay_section(lab_dns, receiver.smtp_port))
        assert client.login().status == 200
        submit(server, message("Two ways", "<two-ways@client.example.test>"),
               [ADMIN, "someone@remote.test"])
        wait_for(lambda: server.inbox_files(), message="local delivery")
        imap = imaplib.IMAP4_SSL("127.0.0.1", imap_port, ssl_context=tls_context(server),
                                 timeout=30)
        imap.login(ADMIN, ADMIN_PASSWORD)
        imap.select("INBOX")
        assert imap.fetch("1", "(BODY[])")[0] == "OK"
        imap.logout()
        queue_id = queue_id_of(client, "<two-ways@client.example.test>")

        def complete(steps: list[dict[str, Any]]) -> bool:
            kinds = [step["kind"] for step in steps]
            relayed = any(s["kind"] == "delivery.attempt" and
                          s["fields"].get("recipient") == "someone@remote.test" and
                          s["fields"].get("status") == "delivered" for s in steps)
            return relayed and "imap.fetch" in kinds

        steps = client.wait_for_steps(queue_id, complete)
        kinds = [step["kind"] for step in steps]
        intake = ["smtp.connect", "smtp.ehlo", "smtp.tls", "smtp.ehlo", "smtp.auth", "smtp.mail",
                  "smtp.rcpt", "smtp.rcpt", "spool.commit", "route", "route", "smtp.data"]
        assert [k for k in kinds if k.startswith(("smtp.", "spool.", "route"))] == intake, kinds

        def first(kind: str, **fields: str) -> int:
            return next(i for i, s in enumerate(steps) if s["kind"] == kind and
                        all(s["fields"].get(k) == v for k, v in fields.items()))

        data = first("smtp.data")
        # The remote recipient: MX answer, the host tried, TLS, its replies, the outcome.
        assert data < first("relay.mx") < first("relay.connect") < first("relay.tls") \
            < first("delivery.attempt", recipient="someone@remote.test", status="delivered")
        assert "mx1.remote.test" in steps[first("relay.mx")]["text"]
        # The local one: the Maildir file, then the reader.
        assert data < first("delivery.maildir", mailbox=ADMIN) < first("imap.fetch")
        routes = {s["fields"]["recipient"]: s["fields"]["target"] for s in steps
                  if s["kind"] == "route"}
        assert routes == {ADMIN: "local", "someone@remote.test": "relay"}
        assert all(step["rule"] for step in steps if step["kind"] != "smtp.close"), \
            [s for s in steps if not s["rule"]]

        # `mailsys trace` shows the very same steps, in the same order.
        done = subprocess.run([MAILSYS, "--config", str(server.config_path), "trace", queue_id,
                               "--json"], capture_output=True, text=True, timeout=60,
                              check=True)
        traced = json.loads(done.stdout)["journeys"][0]["steps"]
        over_http = client.journey_json(queue_id)["journeys"][0]["steps"]
        assert [(s["kind"], s["text"], s["rule"]) for s in traced][:len(steps)] == \
            [(s["kind"], s["text"], s["rule"]) for s in over_http][:len(steps)]
        # The page: every step's words and rule, in the same order within each stage of the
        # diagram (client, our server, queue, next hop or mailbox, reader).
        page = client.get(f"/journey/{queue_id}").body
        shown = [(html.unescape(text), html.unescape(rule)) for text, rule in re.findall(
            r'<span class="text">(.*?)</span></summary>\s*(?:<p class="rule">Rule: (.*?)</p>)?',
            page)]
        order = [key for key, _ in STAGES]
        expected = sorted(over_http, key=lambda s: order.index(stage_of(s["kind"])))
        assert shown == [(s["text"], s["rule"]) for s in expected]
        assert page.count('class="stage reached"') == 5
    finally:
        receiver.kill()


# -- live updates --------------------------------------------------------------------------------

def test_live_steps_arrive_over_server_sent_events(
        console: tuple[MailServer, WebClient, int]) -> None:
    """An event stream opened on a delivered message receives the IMAP read done afterwards,
    and ends at logout."""
    server, client, imap_port = console
    client.login()
    submit(server, message("Live", "<live@client.example.test>"), [ADMIN])
    queue_id = queue_id_of(client, "<live@client.example.test>")
    client.wait_for_steps(queue_id, lambda s: any(x["kind"] == "delivery.maildir" for x in s))
    # after=0: the steps so far are sent first, then each new one as it is recorded.
    stream = EventStream(client, f"/journey/{queue_id}/events?after=0")
    try:
        assert stream.status == 200 and stream.content_type.startswith("text/event-stream")
        stream.events(lambda events: any(e["kind"] == "delivery.maildir" for e in events))
        imap = imaplib.IMAP4_SSL("127.0.0.1", imap_port, ssl_context=tls_context(server),
                                 timeout=30)
        imap.login(ADMIN, ADMIN_PASSWORD)
        imap.select("INBOX")
        imap.fetch("1", "(BODY[])")
        imap.logout()
        events = stream.events(lambda events: any(e["kind"] == "imap.fetch" for e in events))
        fetch = next(e for e in events if e["kind"] == "imap.fetch")
        assert fetch["stage"] == "reader" and fetch["text"].startswith(ADMIN)
        assert "RFC 9051" in fetch["rule"]
        # Logging out ends the live view too.
        assert client.post("/logout", {"csrf": client.csrf()}).status == 200
        assert stream.ended()
    finally:
        stream.close()


# -- the queue -----------------------------------------------------------------------------------

def queue_list(server: MailServer) -> str:
    done = subprocess.run([MAILSYS, "--config", str(server.config_path), "queue", "list"],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def test_queue_page_holds_releases_flushes_and_deletes(
        server_factory: Callable[..., MailServer], tmp_path: Path, lab_dns: LabDNS) -> None:
    """The queue page shows a deferred message; hold, release, flush and delete act on it as
    `mailsys queue` does, and a non-admin user is refused the page."""
    lab_dns.set(ZONE)
    relay = f"""
[relay]
dns_servers = ["{lab_dns.server}"]
port = 25
retry_schedule = [600.0]
connect_timeout = 2.0
"""
    server, client, _ = start_console(server_factory, directory=tmp_path, imap=False,
                                      relay_config=relay)
    client.login()
    submit(server, message("Stuck", "<stuck@client.example.test>"), ["someone@stuck.test"])
    queue_id = queue_id_of(client, "<stuck@client.example.test>")
    client.wait_for_steps(queue_id, lambda steps: any(
        s["kind"] == "delivery.attempt" and s["fields"].get("status") == "deferred"
        for s in steps))
    page = client.get("/queue")
    assert page.status == 200 and queue_id in page.body and "deferred" in page.body
    csrf = csrf_of(page.body)

    def act(action: str) -> str:
        answer = client.post("/queue", {"csrf": csrf, "action": action, "queue_id": queue_id})
        assert answer.status == 200, answer.body
        return answer.body

    assert f"{queue_id}: held" in act("hold")
    assert "(held)" in queue_list(server)
    assert f"{queue_id}: released" in act("release")
    assert "(held)" not in queue_list(server)
    assert f"{queue_id}: due now" in act("flush")
    assert f"{queue_id}: deleted" in act("delete")
    # An attempt the flush started is answered first; then the message is gone.
    wait_for(lambda: queue_id not in queue_list(server), message="the message deleted")
    assert client.post("/queue", {"csrf": csrf, "action": "flush"}).status == 200
    gone = client.post("/queue", {"csrf": csrf, "action": "hold", "queue_id": queue_id})
    assert gone.status == 409 and "no message" in gone.body
    bad = client.post("/queue", {"csrf": csrf, "action": "remove-all", "queue_id": queue_id})
    assert bad.status == 400
    user = WebClient(client.port)
    user.login(USER, USER_PASSWORD)
    assert user.get("/queue").status == 403
    assert user.post("/queue", {"csrf": user.csrf(), "action": "flush"}).status == 403


# -- security ------------------------------------------------------------------------------------

PROTECTED_PAGES = ["/", "/messages", "/messages?q=demo%40example.test", "/queue",
                   "/journey/ABC123", "/journey/ABC123/"]
PROTECTED_API = ["/api/journey/ABC123", "/journey/ABC123/events"]


def test_every_page_refuses_an_anonymous_request(
        console: tuple[MailServer, WebClient, int]) -> None:
    """Pages redirect to /login, the API and the event stream answer 401, every POST 401; the
    health, metrics and autoconfig pages stay public."""
    _, client, _ = console
    anonymous = WebClient(client.port, follow=False)
    for path in PROTECTED_PAGES:
        answer = anonymous.get(path)
        assert answer.status == 303, (path, answer)
        assert answer.headers["Location"].startswith("/login?next="), path
    for path in PROTECTED_API:
        assert anonymous.get(path).status == 401, path
    for path in ["/queue", "/logout", "/messages"]:
        assert anonymous.post(path, {"action": "flush"}).status == 401, path
    assert anonymous.get("/livez").status == 200
    assert anonymous.get("/metrics").status == 200
    assert anonymous.get("/login").status == 200
    assert anonymous.get("/static/style.css").status == 200
    # A forged or stale session cookie is no session.
    forged = WebClient(client.port, follow=False)
    forged.get("/login")
    connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
    connection.request("GET", "/messages", headers={"Cookie": "mailsys_session=" + "A" * 43})
    assert connection.getresponse().status == 303
    connection.close()


def test_login_cookie_attributes_logout_and_wrong_password(
        console: tuple[MailServer, WebClient, int]) -> None:
    """The session cookie is HttpOnly and SameSite=Strict; a wrong password is refused; logout
    ends the session on the server."""
    _, client, _ = console
    raw = WebClient(client.port, follow=False)
    form = raw.get("/login")
    wrong = raw.post("/login", {"user": ADMIN, "password": "nope", "csrf": csrf_of(form.body)})
    assert wrong.status == 403 and "Wrong user name or password" in wrong.body
    answer = raw.post("/login", {"user": ADMIN, "password": ADMIN_PASSWORD,
                                 "csrf": csrf_of(form.body), "next": "//evil.test/"})
    assert answer.status == 303 and answer.headers["Location"] == "/messages"
    cookie = login_cookie_header(client.port)
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower(), cookie
    assert "Secure" not in cookie  # plain HTTP on loopback here; Secure over TLS
    session = raw.cookie_header()
    page = raw.get("/messages")
    assert page.status == 200 and "demo@example.test (administrator)" in page.body
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert raw.post("/logout", {"csrf": csrf_of(page.body)}).status == 303
    connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
    connection.request("GET", "/messages", headers={"Cookie": session})
    assert connection.getresponse().status == 303  # the old cookie no longer opens anything
    connection.close()


def login_cookie_header(port: int) -> str:
    """The Set-Cookie header of the session cookie a successful login gives."""
    fresh = WebClient(port, follow=False)
    token = csrf_of(fresh.get("/login").body)
    login_cookie = next(c.value for c in fresh.jar if c.name == "mailsys_login")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/login",
                       body=f"user={ADMIN}&password={ADMIN_PASSWORD}&csrf={token}",
                       headers={"Cookie": f"mailsys_login={login_cookie}",
                                "Content-Type": "application/x-www-form-urlencoded"})
    response = connection.getresponse()
    headers = response.getheaders()
    connection.close()
    return next(value for name, value in headers if name.lower() == "set-cookie"
                and value.startswith("mailsys_session="))


def test_subject_with_script_and_control_characters_is_shown_escaped(
        console: tuple[MailServer, WebClient, int]) -> None:
    """A Subject of <script>alert(1)</script> and control characters in a header reach the
    list and the journey page as text: HTML-escaped, control characters as \\xNN."""
    server, client, _ = console
    client.login()
    raw = (b"From: demo@example.test\r\nTo: demo@example.test\r\n"
           b"Subject: <script>alert(1)</script> \x1b[31mred\x07\r\n"
           b"Message-ID: <evil\x1b@client.example.test>\r\n\r\nHello.\r\n")
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30) as smtp:
        smtp.starttls(context=tls_context(server))
        smtp.login(ADMIN, ADMIN_PASSWORD)
        smtp.sendmail(ADMIN, [ADMIN], raw)
    wait_for(lambda: server.inbox_files(), message="delivery")
    listing = wait_for(lambda: (lambda b: b if "alert(1)" in b else None)(
        client.get("/messages").body), message="the message in the list")
    assert isinstance(listing, str)
    queue_id = re.findall(r'href="/journey/([A-Za-z0-9]+)"', listing)[0]
    page = client.get(f"/journey/{queue_id}").body
    for body in (listing, page):
        assert "<script>alert(1)" not in body
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
        assert "\x1b" not in body and "\x07" not in body
        assert "\\x1b[31mred\\x07" in body
        # The only scripts are the page's own file.
        assert re.findall(r"<script[^>]*>", body) in ([], ['<script src="/static/journey.js" '
                                                          'defer>'])


def test_cross_site_post_is_refused(console: tuple[MailServer, WebClient, int]) -> None:
    """A POST from another site's page (Origin), without the CSRF token or with another
    session's token is refused with 403 and changes nothing; the login form too."""
    _, client, _ = console
    client.login()
    csrf = client.csrf()
    evil = {"Origin": "http://evil.test"}
    answer = client.post("/queue", {"csrf": csrf, "action": "flush"}, headers=evil)
    assert answer.status == 403 and "cross-site" in answer.body
    assert client.post("/queue", {"action": "flush"}).status == 403
    assert client.post("/queue", {"action": "flush", "csrf": "x" * 43}).status == 403
    assert client.post("/logout", {"csrf": "wrong"}).status == 403
    assert client.get("/messages").status == 200  # still logged in
    other = WebClient(client.port)
    other.login()
    assert client.post("/queue", {"action": "flush", "csrf": other.csrf()}).status == 403
    assert client.post("/queue", {"csrf": csrf, "action": "flush"},
                       headers={"Origin": f"http://127.0.0.1:{client.port}"}).status == 200
    stranger = WebClient(client.port, follow=False)
    form = stranger.get("/login")
    forged = stranger.post("/login", {"user": ADMIN, "password": ADMIN_PASSWORD,
                                      "csrf": csrf_of(form.body)}, headers=evil)
    assert forged.status == 403
    fresh = WebClient(client.port, follow=False)  # no login cookie: the token alone is not enough
    assert fresh.post("/login", {"user": ADMIN, "password": ADMIN_PASSWORD,
                                 "csrf": csrf_of(form.body)}).status == 403


def test_a_user_who_is_not_an_admin_sees_only_their_own_mail(
        console: tuple[MailServer, WebClient, int]) -> None:
    """second@ sees what they sent and what they received, not demo's own mail: not in the
    list, not by search, not by queue id, not as JSON, not as a stream."""
    server, client, _ = console
    client.login()
    submit(server, message("Private", "<private@client.example.test>"), [ADMIN])
    submit(server, message("To second", "<to-second@client.example.test>", to=USER), [USER])
    submit(server, message("From second", "<from-second@client.example.test>", sender=USER),
           [ADMIN], user=USER, password=USER_PASSWORD)
    private = queue_id_of(client, "<private@client.example.test>")
    received = queue_id_of(client, "<to-second@client.example.test>")
    sent = queue_id_of(client, "<from-second@client.example.test>")
    client.wait_for_steps(received, lambda s: any(x["kind"] == "delivery.maildir" for x in s))
    user = WebClient(client.port)
    assert user.login(USER, USER_PASSWORD).status == 200
    page = user.get("/messages")
    assert "second@example.test</span>" in page.body and "(administrator)" not in page.body
    shown = user.queue_ids()
    assert received in shown and sent in shown and private not in shown
    for query in (ADMIN, private, "<private@client.example.test>", "private@client.example.test"):
        assert private not in user.queue_ids(query), query
    assert user.get(f"/journey/{private}").status == 404
    assert user.get(f"/api/journey/{private}").status == 404
    stream = EventStream(user, f"/journey/{private}/events")
    assert stream.status == 404
    stream.close()
    assert user.get(f"/journey/{received}").status == 200
    assert user.get(f"/journey/{sent}").status == 200
    assert len(client.queue_ids()) >= 3  # the administrator sees them all


TRAVERSALS = ["/journey/..%2F..%2F..%2Fetc%2Fpasswd", "/journey/../../etc/passwd",
              "/journey/%2e%2e", "/api/journey/..%2fusers", "/journey/ABC/..%2f..%2fevents",
              "/static/..%2F..%2Fpyproject.toml", "/static/../../pyproject.toml",
              "/static/%2e%2e/console.py", "/journey/ABC%00", "/static/style.css%00.js"]


def test_path_traversal_in_any_url_parameter_fails(
        console: tuple[MailServer, WebClient, int]) -> None:
    """Paths and parameters made of "..", encoded slashes or NUL name no file and no journey;
    the login's next= never leaves the page."""
    _, client, _ = console
    client.login()
    for path in TRAVERSALS:
        connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
        connection.request("GET", path, headers={"Cookie": client.cookie_header()})
        response = connection.getresponse()
        body = response.read()
        connection.close()
        assert response.status in (400, 404), (path, response.status)
        assert b"root:" not in body and b"[project]" not in body and b"{ARGON2ID}" not in body
    for query in ("../../../etc/passwd", "..%2f..%2fvar%2fusers", "%2Fetc%2Fpasswd%00"):
        page = client.get("/messages?q=" + query.replace("/", "%2F"))
        assert page.status == 200 and "root:" not in page.body and "ARGON2ID" not in page.body
    assert client.get("/messages?since=..%2F..%2Fetc").status == 400
    anonymous = WebClient(client.port, follow=False)
    form = anonymous.get("/login?next=//evil.test/x")
    assert 'value="/messages"' in form.body and "evil.test" not in form.body
