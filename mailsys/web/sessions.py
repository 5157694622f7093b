"""Logged-in sessions of the web page and their protection against cross-site requests.

A session is a random token (``secrets``, 256 bits) in a cookie that is HttpOnly (no script
reads it), SameSite=Strict (a browser never sends it with a request another site starts, RFC
6265bis §5.4.7) and Secure when the page is served over TLS. The server keeps what the token
stands for in memory: a restart logs everybody out, which is the safe direction. Each session has
its own CSRF token, carried by every form and compared in constant time on every POST, and a POST
whose Origin (or, without one, Referer) names another site is refused before that.

Sessions end after ``IDLE`` seconds without a request, ``LIFETIME`` after login, or at logout;
at most ``MAX_SESSIONS`` live at once (the oldest goes first), so a flood of logins cannot
grow memory without bound.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

COOKIE = b"mailsys_session"
# The login form's own token: before login there is no session to hold a CSRF token, so the
# form and a cookie carry the same random value (the double-submit pattern).
LOGIN_COOKIE = b"mailsys_login"
IDLE = 30 * 60.0
LIFETIME = 12 * 3600.0
MAX_SESSIONS = 1000


@dataclass
class WebSession:
    """One logged-in browser."""

    token: str
    mailbox: str
    csrf: str
    started: float
    seen: float


class Sessions:
    """The live sessions, by token."""

    def __init__(self, clock: IReactorTime, *, idle: float = IDLE, lifetime: float = LIFETIME,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self._idle = idle
        self._lifetime = lifetime
        self._max = max_sessions
        self._sessions: OrderedDict[str, WebSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, mailbox: str) -> WebSession:
        """A new session for ``mailbox`` (after a successful login)."""
        now = self._clock.seconds()
        while len(self._sessions) >= self._max:
            self._sessions.popitem(last=False)
        session = WebSession(secrets.token_urlsafe(32), mailbox, secrets.token_urlsafe(32),
                             now, now)
        self._sessions[session.token] = session
        return session

    def find(self, token: str | None) -> WebSession | None:
        """The live session of ``token``, its idle time restarted; None if there is none."""
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        now = self._clock.seconds()
        if now - session.seen > self._idle or now - session.started > self._lifetime:
            del self._sessions[token]
            return None
        session.seen = now
        return session

    def alive(self, token: str) -> bool:
        """True if the session of ``token`` has not ended, without counting this as a use (an
        open live view does not keep a session alive by itself)."""
        session = self._sessions.get(token)
        if session is None:
            return False
        now = self._clock.seconds()
        return now - session.seen <= self._idle and now - session.started <= self._lifetime

    def end(self, token: str | None) -> None:
        """Forget the session of ``token`` (logout)."""
        if token:
            self._sessions.pop(token, None)

    def end_all_of(self, mailbox: str) -> None:
        """Forget every session of ``mailbox`` (the user is gone)."""
        for token in [t for t, s in self._sessions.items() if s.mailbox == mailbox]:
            del self._sessions[token]


def cookie_token(request: Request, name: bytes = COOKIE) -> str | None:
    """The value of the cookie ``name`` in ``request``, if any."""
    value = request.getCookie(name)
    return value.decode("ascii", "replace") if value else None


def set_cookie(request: Request, name: bytes, value: str, *, max_age: int | None = None) -> None:
    """Set a cookie with the attributes every cookie of the page carries."""
    request.addCookie(name, value.encode("ascii"), path=b"/", httpOnly=True,
                      secure=bool(request.isSecure()), sameSite="strict",
                      max_age=None if max_age is None else str(max_age).encode())


def clear_cookie(request: Request, name: bytes) -> None:
    """Tell the browser to forget the cookie ``name``."""
    set_cookie(request, name, "", max_age=0)


def same_token(expected: str | None, given: str | None) -> bool:
    """True if both tokens are present and equal (compared in constant time)."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def same_origin(request: Request) -> bool:
    """False if the request says it comes from a page of another site (Origin, else Referer).

    Browsers send Origin with every POST (Fetch standard); a request with neither header is not
    a browser's cross-site request, and the CSRF token still has to match.
    """
    host = request.getHeader(b"host")
    origin = request.getHeader(b"origin") or request.getHeader(b"referer")
    if origin is None:
        return True
    if host is None or origin == b"null":
        return False
    try:
        return urlsplit(origin.decode("ascii")).netloc.lower() == host.decode("ascii").lower()
    except (UnicodeDecodeError, ValueError):
        return False
