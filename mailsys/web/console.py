"""The journey web page: login, recent messages and their search, one message's journey as a
timeline with live updates (Server-Sent Events), and the queue with flush, hold, release, delete.

    GET  /login, POST /login      a mailsys user's name and password (the mail protocols' portal,
                                  throttle and thread hashing: mailsys.auth.login)
    POST /logout
    GET  /messages?q=&since=&until=   recent messages; q is a queue id, Message-ID or address
    GET  /journey/<queue id>          the timeline, each step expandable to its evidence
    GET  /journey/<queue id>/events   text/event-stream of the steps recorded from now on
    GET  /api/journey/<queue id>      the journey as JSON (the document of `mailsys trace --json`)
    GET  /queue, POST /queue          administrators only: the queue and its four operations
    GET  /static/<name>               the style sheet and the one script (live updates)

No page but /login and /static is served without a session: a page answers with a redirect to
/login, the API and the event stream with 401. A user marked admin sees every message; any other
user only those they sent (as the submission account) or received (as the mailbox owner). Every
POST carries the session's CSRF token and must not come from another site. Store reads run in
disk threads; the reactor thread only renders.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, FileSystemLoader, Template
from markupsafe import Markup, escape
from twisted.cred.portal import Portal
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from mailsys.auth.login import LoginFlow, LoginLimiter, Refusal
from mailsys.auth.portal import MailUser
from mailsys.auth.users import UserStore
from mailsys.diskio import DiskRunner
from mailsys.envelope import Envelope
from mailsys.journey import reading
from mailsys.journey.reading import JourneyReader, StepView
from mailsys.journey.trace import Journey, offset_text, render_json, safe
from mailsys.queue.commands import age, recipient_line
from mailsys.queue.control import ACTIONS, QueueControl, apply_command, list_envelopes
from mailsys.web.sessions import (
    COOKIE,
    LOGIN_COOKIE,
    Sessions,
    WebSession,
    clear_cookie,
    cookie_token,
    same_origin,
    same_token,
    set_cookie,
)

log = Logger(namespace="mailsys.web")

_HTML = b"text/html; charset=utf-8"
_JSON = b"application/json; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"
# Queue ids are letters and digits (mailsys.queue.spool); anything else in the path is not one,
# so "..", "%2f" and the like never reach a file name or a query.
_QUEUE_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")
_TEMPLATES = Path(__file__).parent / "templates"
_STATIC = Path(__file__).parent / "static"
# Served by name only: the only files this page reads from disk, read once at start.
_STATIC_FILES = {b"style.css": b"text/css; charset=utf-8",
                 b"journey.js": b"text/javascript; charset=utf-8"}
# A search field longer than an address or Message-ID can be is cut here.
MAX_QUERY = 512
# How often an open event stream looks for new steps, and says it is alive.
POLL_INTERVAL = 0.5
KEEPALIVE_INTERVAL = 15.0
# Event streams open at once; more are refused with 503 (each polls the store).
MAX_STREAMS = 32
# A stream is closed after this long; the browser's EventSource reconnects by itself and goes
# on after the Last-Event-ID it saw, so a forgotten tab does not hold a stream for days.
STREAM_LIFETIME = 600.0
_SECURITY_HEADERS = {
    # Scripts, styles and images only from this page (no inline script: an injected one would
    # not run even if escaping failed); no framing (clickjacking); forms post only here.
    b"content-security-policy": b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                b"img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                                b"frame-ancestors 'none'; base-uri 'none'",
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"same-origin",
    b"cache-control": b"no-store",
}
# The stages of the diagram a student follows, and the kinds of step that belong to each.
STAGES = (("client", "Client"), ("server", "Our server"), ("queue", "Queue"),
          ("next", "Next hop or mailbox"), ("reader", "Reader"))
_STAGE_OF = {
    "smtp.connect": "client", "smtp.tls": "client", "smtp.ehlo": "client",
    "smtp.auth": "client", "smtp.mail": "server", "smtp.rcpt": "server",
    "smtp.data": "server", "smtp.close": "server", "authn": "server",
    "spool.commit": "queue", "route": "queue", "dsn.created": "queue",
    "relay.mx": "next", "relay.connect": "next", "relay.tls": "next", "relay.reply": "next",
    "delivery.attempt": "next", "delivery.maildir": "next",
    "pop3.retr": "reader", "pop3.dele": "reader", "imap.fetch": "reader",
    "imap.flags": "reader", "imap.move": "reader", "imap.expunge": "reader",
}


def stage_of(kind: str) -> str:
    """The diagram stage a step of ``kind`` belongs to."""
    return _STAGE_OF.get(kind, _STAGE_OF.get(kind.partition(".")[0], "server"))


def _visible(value: Any) -> Any:
    # Every value a template prints passes here before autoescaping: control characters (a
    # header's ESC, NUL or CR) become visible \xNN escapes instead of reaching the browser.
    # Markup is already escaped text made here (the evidence's JSON, whose values have every
    # control character escaped by json.dumps, and whose line breaks are its layout).
    if isinstance(value, str) and not isinstance(value, Markup):
        return safe(value)
    return value


@dataclass
class Console:
    """What the page needs from the rest of the server."""

    users: UserStore
    portal: Portal | None
    throttle: LoginLimiter | None
    disk: DiskRunner
    reactor: Any
    journey_path: Path | None  # None: recording is off
    spool: Path
    queue: QueueControl | None
    sessions: Sessions = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = Sessions(self.reactor)


class ConsolePages:
    """The pages above; ``render`` answers a request whose path is one of them, else None."""

    def __init__(self, console: Console) -> None:
        self._c = console
        self._reader = JourneyReader(console.journey_path) if console.journey_path else None
        environment = Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=True,
                                  finalize=_visible, trim_blocks=True, lstrip_blocks=True)
        environment.filters["offset"] = offset_text
        environment.filters["when"] = _when
        environment.filters["urlpart"] = lambda value: quote(str(value), safe="")
        environment.filters["json"] = lambda value: escape(_json_text(value))
        self._templates: dict[str, Template] = {
            name: environment.get_template(f"{name}.html")
            for name in ("login", "messages", "journey", "queue", "error")}
        self._static = {name: (_STATIC / name.decode()).read_bytes() for name in _STATIC_FILES}
        self.streams = 0

    # -- dispatch --------------------------------------------------------------------------------

    def render(self, request: Request) -> bytes | int | None:
        """The answer to ``request`` if its path is one of these pages, else None."""
        path = request.path or b""
        parts = path.split(b"/")[1:]
        if path == b"/login":
            self._headers(request)
            return self._login(request)
        if len(parts) == 2 and parts[0] == b"static":
            return self._static_file(request, parts[1])
        if path in (b"/", b"/messages", b"/logout", b"/queue") or \
                (parts[:1] == [b"journey"] and len(parts) in (2, 3)) or \
                (parts[:2] == [b"api", b"journey"] and len(parts) == 3):
            self._headers(request)
            session = self._session(request)
            api = parts[:1] == [b"api"] or parts[-1:] == [b"events"]
            if session is None:
                return self._anonymous(request, api)
            return self._route(request, session, parts)
        return None

    def _route(self, request: Request, session: WebSession, parts: list[bytes]) -> bytes | int:
        path = request.path or b""
        admin = self._c.users.is_admin(session.mailbox)
        post = request.method == b"POST"
        if post and not self._csrf_ok(request, session.csrf):
            return self._error(request, 403, "This form was not sent from this page "
                               "(cross-site request refused). Reload the page and try again.")
        if path == b"/":
            return _redirect(request, b"/messages")
        if path == b"/logout":
            if not post:
                return self._method_not_allowed(request, b"POST")
            self._c.sessions.end(session.token)
            clear_cookie(request, COOKIE)
            return _redirect(request, b"/login")
        if path == b"/messages":
            return self._messages(request, session, admin)
        if path == b"/queue":
            if not admin:
                return self._error(request, 403, "The queue is for administrators.",
                                   session=session)
            return self._queue_action(request, session) if post else \
                self._queue(request, session, admin)
        if post:
            return self._method_not_allowed(request, b"GET")
        queue_id = parts[-1] if parts[0] == b"api" else parts[1]
        text = queue_id.decode("ascii", "replace")
        if not _QUEUE_ID.match(text):
            return self._error(request, 404, "No such message.", session=session,
                               api=parts[0] == b"api")
        viewer = None if admin else session.mailbox
        if parts[0] == b"api":
            return self._api_journey(request, text, viewer)
        if len(parts) == 3:
            if parts[2] != b"events":
                return self._error(request, 404, "No such page.", session=session)
            return self._events(request, text, viewer, session.token)
        return self._journey(request, session, admin, text)

    # -- sessions and protection -----------------------------------------------------------------

    def _headers(self, request: Request) -> None:
        for name, value in _SECURITY_HEADERS.items():
            request.setHeader(name, value)

    def _session(self, request: Request) -> WebSession | None:
        session = self._c.sessions.find(cookie_token(request))
        if session is not None and not self._c.users.exists(session.mailbox):
            self._c.sessions.end_all_of(session.mailbox)  # the user was deleted meanwhile
            return None
        return session

    def _anonymous(self, request: Request, api: bool) -> bytes:
        if api or request.method != b"GET":
            request.setResponseCode(401)
            request.setHeader(b"content-type", _TEXT)
            return b"log in first\n"
        target = request.uri or b"/messages"
        return _redirect(request, b"/login?" + urlencode({"next": target}).encode())

    def _csrf_ok(self, request: Request, expected: str | None) -> bool:
        return same_origin(request) and same_token(expected, _arg(request, b"csrf"))

    # -- login -----------------------------------------------------------------------------------

    def _login(self, request: Request) -> bytes | int:
        following = _local_target(_arg(request, b"next"))
        if request.method == b"GET":
            return self._login_form(request, following, "")
        if request.method != b"POST":
            return self._method_not_allowed(request, b"GET, POST")
        if not self._csrf_ok(request, cookie_token(request, LOGIN_COOKIE)):
            request.setResponseCode(403)
            return self._login_form(request, following, "This form was not sent from this "
                                    "page (cross-site request refused). Please try again.")
        user = (_arg(request, b"user") or "").strip()
        password = _arg(request, b"password") or ""
        client = getattr(request.getClientAddress(), "host", "") or ""
        flow = LoginFlow(self._c.portal, self._c.throttle, self._c.reactor, client, "web")
        d = flow.attempt(user, password)

        def answer(outcome: MailUser | Refusal) -> None:
            if _gone(request):
                return
            if isinstance(outcome, MailUser):
                session = self._c.sessions.create(outcome.mailbox)
                set_cookie(request, COOKIE, session.token)
                clear_cookie(request, LOGIN_COOKIE)
                log.info("web login of {user} from [{client}]", user=outcome.mailbox,
                         client=client)
                _finish(request, _redirect(request, following.encode()))
                return
            request.setResponseCode(403)
            message = ("Too many failed logins from your address: wait a while."
                       if outcome is Refusal.BLOCKED else "Wrong user name or password.")
            _finish(request, self._login_form(request, following, message, user))

        def failed(failure: Failure) -> None:
            log.failure("web login failed", failure)
            if not _gone(request):
                request.setResponseCode(503)
                _finish(request, self._login_form(request, following,
                                                  "Logins cannot be checked right now."))

        request.notifyFinish().addErrback(lambda _: flow.cancel())
        d.addCallbacks(answer, failed)
        return NOT_DONE_YET

    def _login_form(self, request: Request, following: str, message: str,
                    user: str = "") -> bytes:
        token = cookie_token(request, LOGIN_COOKIE)
        if not token or len(token) < 32:
            token = secrets.token_urlsafe(32)
            set_cookie(request, LOGIN_COOKIE, token)
        return self._page(request, "login", csrf=token, next=following, message=message,
                          user=user)

    # -- messages --------------------------------------------------------------------------------

    def _messages(self, request: Request, session: WebSession, admin: bool) -> bytes | int:
        query = (_arg(request, b"q") or "").strip()[:MAX_QUERY]
        since_text = (_arg(request, b"since") or "").strip()
        until_text = (_arg(request, b"until") or "").strip()
        problems: list[str] = []
        since = _moment(since_text, "since", problems)
        until = _moment(until_text, "until", problems)
        context: dict[str, Any] = {"q": query, "since": since_text, "until": until_text,
                                   "problems": problems, "recording": self._reader is not None}
        if problems or self._reader is None:
            if problems:
                request.setResponseCode(400)
            return self._page(request, "messages", session=session, admin=admin,
                              rows=[], **context)
        viewer = None if admin else session.mailbox
        d = self._c.disk.run(self._reader.call, reading.search, query, since, until, viewer,
                             empty=[])

        def show(rows: list[reading.MessageSummary]) -> None:
            if not _gone(request):
                _finish(request, self._page(request, "messages", session=session, admin=admin,
                                            rows=rows, **context))

        d.addCallbacks(show, lambda failure: self._failed(request, failure, session))
        return NOT_DONE_YET

    # -- one journey -----------------------------------------------------------------------------

    def _journey(self, request: Request, session: WebSession, admin: bool,
                 queue_id: str) -> bytes | int:
        if self._reader is None:
            return self._error(request, 404, "Recording is off: [journey] enabled = false.",
                               session=session)
        viewer = None if admin else session.mailbox
        d = self._c.disk.run(self._reader.call, reading.journey, queue_id, viewer, empty=None)

        def show(journeys: list[Journey] | None) -> None:
            if _gone(request):
                return
            if journeys is None:
                _finish(request, self._error(request, 404, "No such message.",
                                             session=session))
                return
            main = journeys[0]
            lines = reading.steps(main)
            summary = reading.summarize(queue_id, main.events)
            stages = [(key, label, [line for line in lines if stage_of(line.kind) == key])
                      for key, label in STAGES]
            last = max([e.id or 0 for e in main.events] or [0])
            _finish(request, self._page(
                request, "journey", session=session, admin=admin, journey=main,
                summary=summary, stages=stages, lines=lines, linked=journeys[1:],
                started=main.started, last_event=last, stage_of=stage_of))

        d.addCallbacks(show, lambda failure: self._failed(request, failure, session))
        return NOT_DONE_YET

    def _api_journey(self, request: Request, queue_id: str, viewer: str | None) -> bytes | int:
        if self._reader is None:
            return self._error(request, 404, "recording is off", api=True)
        d = self._c.disk.run(self._reader.call, reading.journey, queue_id, viewer, empty=None)

        def show(journeys: list[Journey] | None) -> None:
            if _gone(request):
                return
            if journeys is None:
                _finish(request, self._error(request, 404, "no such message", api=True))
                return
            out = io.StringIO()
            render_json(queue_id, journeys, 0, out)
            request.setHeader(b"content-type", _JSON)
            _finish(request, out.getvalue().encode())

        d.addCallbacks(show, lambda failure: self._failed(request, failure, None, api=True))
        return NOT_DONE_YET

    def _events(self, request: Request, queue_id: str, viewer: str | None,
                token: str) -> bytes | int:
        """Server-Sent Events (HTML Living Standard §9.2): one ``step`` event per new step,
        its id the event's, so a reconnecting browser resumes after Last-Event-ID. The stream
        ends when the session does (logout, expiry) and after STREAM_LIFETIME."""
        if self._reader is None:
            return self._error(request, 404, "recording is off", api=True)
        if self.streams >= MAX_STREAMS:
            request.setResponseCode(503)
            request.setHeader(b"retry-after", b"5")
            request.setHeader(b"content-type", _TEXT)
            return b"too many live views open\n"
        reader = self._reader
        last_id = (request.getHeader(b"last-event-id") or b"").strip()
        after = int(last_id) if last_id.isdigit() else None
        if after is None:
            text = _arg(request, b"after") or ""
            after = int(text) if text.isdigit() else 0
        state = {"after": after, "busy": False, "quiet": 0.0, "started": False}
        self.streams += 1
        clock = self._c.reactor

        opened = clock.seconds()

        def poll() -> None:
            if state["busy"] or _gone(request):
                return
            if state["started"] and (not self._c.sessions.alive(token) or
                                     clock.seconds() - opened > STREAM_LIFETIME):
                request.finish()
                return
            state["busy"] = True
            d = self._c.disk.run(reader.call, reading.steps_after, queue_id,
                                 state["after"], viewer, empty=([], state["after"]))
            d.addCallbacks(send, broken)

        def send(result: tuple[list[StepView], int] | None) -> None:
            state["busy"] = False
            if _gone(request):
                return
            if result is None:
                if not state["started"]:
                    request.setResponseCode(404)
                    request.setHeader(b"content-type", _TEXT)
                    _finish(request, b"no such message\n")
                else:
                    request.finish()
                return
            start_stream()
            fresh, last = result
            chunks = []
            for line in fresh:
                data = json.dumps({"id": line.event_id, "offset": offset_text(line.offset),
                                   "kind": line.kind, "stage": stage_of(line.kind),
                                   "text": safe(line.text), "rule": safe(line.rule),
                                   "fields": _json_text(line.fields)}, ensure_ascii=True)
                chunks.append(f"id: {line.event_id}\nevent: step\ndata: {data}\n\n")
            state["after"] = last
            now = clock.seconds()
            if not chunks and now - state["quiet"] >= KEEPALIVE_INTERVAL:
                chunks.append(": alive\n\n")  # a comment line keeps proxies from closing it
            if chunks:
                state["quiet"] = now
                request.write("".join(chunks).encode("ascii"))

        def start_stream() -> None:
            if not state["started"]:
                state["started"] = True
                request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
                request.setHeader(b"x-accel-buffering", b"no")
                request.write(b"retry: 2000\n\n")
                state["quiet"] = clock.seconds()

        def broken(failure: Failure) -> None:
            state["busy"] = False
            log.failure("journey stream of {queue_id}", failure, queue_id=queue_id)
            if not _gone(request):
                request.finish()

        loop = LoopingCall(poll)
        loop.clock = clock

        def closed(_: object) -> None:
            self.streams -= 1
            if loop.running:
                loop.stop()

        request.notifyFinish().addBoth(closed)
        loop.start(POLL_INTERVAL, now=True)
        return NOT_DONE_YET

    # -- the queue -------------------------------------------------------------------------------

    def _queue(self, request: Request, session: WebSession, admin: bool,
               outcome: tuple[bool, str] | None = None) -> int:
        d = self._c.disk.run(list_envelopes, self._c.spool)

        def show(envelopes: list[Envelope]) -> None:
            if _gone(request):
                return
            now = time.time()
            rows = [{"envelope": e, "age": age(now - e.received_at),
                     "recipients": [recipient_line(r, now) for r in e.recipients]}
                    for e in envelopes]
            _finish(request, self._page(request, "queue", session=session, admin=admin,
                                        rows=rows, outcome=outcome, actions=ACTIONS,
                                        running=self._c.queue is not None))

        d.addCallbacks(show, lambda failure: self._failed(request, failure, session))
        return NOT_DONE_YET

    def _queue_action(self, request: Request, session: WebSession) -> bytes | int:
        action = _arg(request, b"action") or ""
        queue_id = _arg(request, b"queue_id") or None
        if action not in ACTIONS or (queue_id is not None and not _QUEUE_ID.match(queue_id)) \
                or (queue_id is None and action != "flush") or self._c.queue is None:
            request.setResponseCode(400)
            return self._queue(request, session, True, (False, "Not a queue operation."))
        command = json.dumps({"action": action, "queue_id": queue_id}).encode()
        log.info("web: {user} asked to {action} {queue_id}", user=session.mailbox,
                 action=action, queue_id=queue_id or "the whole queue")
        d = apply_command(self._c.queue, command)

        def done(outcome: Any) -> None:
            if not _gone(request):
                if not outcome.ok:
                    request.setResponseCode(409)
                self._queue(request, session, True, (outcome.ok, outcome.message))

        d.addCallback(done)
        return NOT_DONE_YET

    # -- pieces ----------------------------------------------------------------------------------

    def _static_file(self, request: Request, name: bytes) -> bytes | None:
        kind = _STATIC_FILES.get(name)
        if kind is None:
            return None
        request.setHeader(b"content-type", kind)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"max-age=300")
        return self._static[name]

    def _page(self, request: Request, name: str, session: WebSession | None = None,
              **context: Any) -> bytes:
        request.setHeader(b"content-type", _HTML)
        csrf = context.pop("csrf", None) or (session.csrf if session else "")
        return self._templates[name].render(session=session, csrf=csrf,
                                            **context).encode("utf-8")

    def _error(self, request: Request, code: int, message: str,
               session: WebSession | None = None, api: bool = False) -> bytes:
        request.setResponseCode(code)
        if api:
            request.setHeader(b"content-type", _TEXT)
            return message.encode() + b"\n"
        return self._page(request, "error", session=session, message=message, code=code,
                          admin=bool(session and self._c.users.is_admin(session.mailbox)))

    def _method_not_allowed(self, request: Request, allowed: bytes) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"allow", allowed)
        request.setHeader(b"content-type", _TEXT)
        return b"method not allowed\n"

    def _failed(self, request: Request, failure: Failure, session: WebSession | None,
                api: bool = False) -> None:
        log.failure("web page {path}", failure, path=(request.path or b"").decode("latin-1"))
        if not _gone(request):
            _finish(request, self._error(request, 500, "Something went wrong; the server's "
                                         "log has the details.", session=session, api=api))


def _arg(request: Request, name: bytes) -> str | None:
    values: list[bytes] | None = (request.args or {}).get(name)
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


def _local_target(value: str | None) -> str:
    """Where to go after login: a path of this page only (never another site: "//x", "/\\x")."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")) or \
            any(ord(c) < 0x21 or ord(c) == 0x7f for c in value) or len(value) > 2048:
        return "/messages"
    return value


def _moment(text: str, name: str, problems: list[str]) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        problems.append(f"{name}: {text[:64]!r} is not a date and time (2026-12-07T05:30)")
        return None


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=1, ensure_ascii=True, sort_keys=True, default=str)


def _redirect(request: Request, target: bytes) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"location", target)
    request.setHeader(b"content-type", _TEXT)
    return b"see " + target + b"\n"


def _gone(request: Request) -> bool:
    return bool(request.finished or getattr(request, "_disconnected", False))


def _finish(request: Request, body: bytes) -> None:
    request.write(body)
    request.finish()

