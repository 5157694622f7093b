"""Sessions of the journey web page: tokens, idle and absolute expiry, the bound on their
number, and the Origin check that refuses cross-site POSTs."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from mailsys.web.sessions import (
    COOKIE,
    Sessions,
    cookie_token,
    same_origin,
    same_token,
    set_cookie,
)


def test_a_session_is_found_by_its_token_until_idle_or_too_old() -> None:
    """A session lives while used within IDLE, never beyond LIFETIME, and not after logout."""
    clock = Clock()
    sessions = Sessions(clock, idle=60.0, lifetime=300.0)
    session = sessions.create("demo@example.test")
    assert len(session.token) >= 43 and session.csrf != session.token
    assert sessions.find(session.token) is session
    for _ in range(4):
        clock.advance(59.0)
        assert sessions.find(session.token) is session  # each use restarts the idle time
    clock.advance(70.0)  # 306 s after login
    assert sessions.find(session.token) is None
    idle = sessions.create("demo@example.test")
    clock.advance(61.0)
    assert sessions.find(idle.token) is None
    ended = sessions.create("demo@example.test")
    assert sessions.alive(ended.token)
    sessions.end(ended.token)
    assert sessions.find(ended.token) is None and not sessions.alive(ended.token)
    watched = sessions.create("demo@example.test")
    clock.advance(59.0)
    assert sessions.alive(watched.token)  # alive() is no use: it does not restart idle time
    clock.advance(2.0)
    assert not sessions.alive(watched.token)
    assert sessions.find(None) is None and sessions.find("") is None
    assert sessions.find("not-a-token") is None


def test_sessions_are_bounded_and_a_user_can_be_logged_out_everywhere() -> None:
    """The oldest session goes when the bound is reached; end_all_of ends one user's."""
    sessions = Sessions(Clock(), max_sessions=3)
    first = sessions.create("a@example.test")
    others = [sessions.create("b@example.test") for _ in range(3)]
    assert len(sessions) == 3 and sessions.find(first.token) is None
    sessions.end_all_of("b@example.test")
    assert len(sessions) == 0 and all(sessions.find(s.token) is None for s in others)


def test_token_comparison_needs_both_tokens() -> None:
    """Tokens match only when both are present and equal."""
    assert same_token("abc", "abc")
    assert not same_token("abc", "abd") and not same_token(None, None)
    assert not same_token("", "") and not same_token("abc", None)


def request(**headers: str) -> DummyRequest:
    made = DummyRequest([b""])
    for name, value in headers.items():
        made.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
    return made


def test_same_origin_refuses_other_sites() -> None:
    """Origin (else Referer) must name the Host; "null" and other hosts are refused; a request
    with neither header is left to the CSRF token."""
    assert same_origin(request(host="127.0.0.1:2080", origin="http://127.0.0.1:2080"))
    assert same_origin(request(host="127.0.0.1:2080",
                               referer="http://127.0.0.1:2080/queue?x=1"))
    assert same_origin(request(host="127.0.0.1:2080"))
    assert not same_origin(request(host="127.0.0.1:2080", origin="http://evil.test"))
    assert not same_origin(request(host="127.0.0.1:2080", origin="null"))
    assert not same_origin(request(host="127.0.0.1:2080", origin="http://127.0.0.1:2081"))
    assert not same_origin(request(host="127.0.0.1:2080", referer="http://evil.test/"))
    assert not same_origin(request(origin="http://127.0.0.1:2080"))


def test_cookie_attributes() -> None:
    """The session cookie is HttpOnly, SameSite=Strict, for the whole page; Secure over TLS."""
    plain = Request(DummyChannel(), False)
    set_cookie(plain, COOKIE, "token")
    cookie = plain.cookies[0].decode()
    assert cookie.startswith("mailsys_session=token") and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie and "Path=/" in cookie and "Secure" not in cookie
    secure = Request(DummyChannel(), False)
    secure.isSecure = lambda: True  # type: ignore[method-assign]
    set_cookie(secure, COOKIE, "token")
    assert "Secure" in secure.cookies[0].decode()
    incoming = Request(DummyChannel(), False)
    incoming.received_cookies[COOKIE] = b"abc"
    assert cookie_token(incoming) == "abc"
    assert cookie_token(Request(DummyChannel(), False)) is None
