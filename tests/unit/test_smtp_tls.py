"""Tests for STARTTLS in the SMTP session (RFC 3207) and implicit TLS on 465 (RFC 8314)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailsys import replies
from mailsys.smtp.policy import SubmissionPolicy
from mailsys.smtp.server import ListenerRole
from mailsys.smtp.testing import (
    LOCAL_DOMAIN,
    USERS,
    SessionDriver,
    StaticRouter,
    make_factory,
)


class FakeContexts:
    """A TLSContextSource handing out a marker object (or failing, when told to)."""

    def __init__(self, broken: bool = False) -> None:
        self.context = object()
        self.broken = broken

    def server_context(self) -> object:
        if self.broken:
            raise OSError("certificate unreadable")
        return self.context


def driver_with_tls(role: ListenerRole = ListenerRole.MTA, **kwargs: object) -> SessionDriver:
    driver = SessionDriver(make_factory(role=role, tls=FakeContexts(), **kwargs))  # type: ignore[arg-type]
    driver.lines()
    return driver


def test_starttls_offered_when_possible() -> None:
    """EHLO offers STARTTLS when a TLS context exists and the session is plaintext."""
    assert "250 STARTTLS" in driver_with_tls().send(b"EHLO x\r\n")


def test_starttls_not_offered_without_tls() -> None:
    """Without a TLS context STARTTLS is neither offered nor accepted."""
    driver = SessionDriver(make_factory())
    driver.lines()
    assert not any("STARTTLS" in line for line in driver.send(b"EHLO x\r\n"))
    assert driver.send(b"STARTTLS\r\n") == [str(replies.NOT_IMPLEMENTED)]


def test_starttls_starts_tls_with_the_context() -> None:
    """STARTTLS answers 220, then starts TLS with the source's current context."""
    driver = driver_with_tls()
    driver.send(b"EHLO x\r\n")
    assert driver.send(b"STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]
    tls = driver.factory.tls
    assert isinstance(tls, FakeContexts)
    assert driver.transport.tls_contexts == [tls.context]


def test_plaintext_after_starttls_is_discarded() -> None:
    """Commands pipelined after STARTTLS in plaintext are dropped, not run inside TLS
    (CVE-2011-0411)."""
    driver = driver_with_tls()
    driver.send(b"EHLO x\r\n")
    lines = driver.send(b"STARTTLS\r\nMAIL FROM:<evil@attacker.test>\r\nQUIT\r\n")
    assert lines == ["220 2.0.0 Ready to start TLS"]
    assert not driver.closed
    # Now "inside TLS": the injected MAIL did not happen and EHLO is needed again.
    assert driver.codes(b"RCPT TO:<alice@example.test>\r\n") == [503]
    assert driver.codes(b"MAIL FROM:<a@b.test>\r\n") == [503]


def test_starttls_resets_the_session() -> None:
    """After STARTTLS the transaction and EHLO are forgotten (RFC 3207 §4.2)."""
    driver = driver_with_tls()
    driver.send(b"EHLO x\r\nMAIL FROM:<a@b.test>\r\n")
    driver.send(b"STARTTLS\r\n")
    lines = driver.send(b"EHLO x\r\n")
    assert "250 STARTTLS" not in lines and "250-STARTTLS" not in lines
    assert driver.codes(b"RCPT TO:<alice@example.test>\r\n") == [503]


def test_starttls_twice() -> None:
    """STARTTLS inside TLS gets a clear 503."""
    driver = driver_with_tls()
    driver.send(b"EHLO x\r\nSTARTTLS\r\n")
    driver.send(b"EHLO x\r\n")
    assert driver.send(b"STARTTLS\r\n") == [str(replies.TLS_ALREADY_ACTIVE)]
    assert len(driver.transport.tls_contexts) == 1


def test_tls_protocol_in_received() -> None:
    """A message after STARTTLS is received 'with ESMTPS'."""
    driver = driver_with_tls()
    driver.send(b"EHLO x\r\nSTARTTLS\r\n")
    driver.send(b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert driver.codes(b"x\r\n.\r\n") == [250]
    envelope, message = driver.factory.sink.accepted[0]  # type: ignore[attr-defined]
    assert envelope.protocol == "ESMTPS"
    assert b" with ESMTPS id " in message


def test_starttls_needs_ehlo_and_no_argument() -> None:
    """STARTTLS before EHLO is 503; with an argument it is 501."""
    driver = driver_with_tls()
    assert driver.codes(b"STARTTLS\r\n") == [503]
    driver.send(b"EHLO x\r\n")
    assert driver.codes(b"STARTTLS now\r\n") == [501]
    assert driver.transport.tls_contexts == []


def test_starttls_with_broken_context() -> None:
    """When no TLS context can be had, STARTTLS gets 454 and the session goes on in plaintext."""
    driver = SessionDriver(make_factory(tls=FakeContexts(broken=True)))  # type: ignore[arg-type]
    driver.lines()
    driver.send(b"EHLO x\r\n")
    assert driver.send(b"STARTTLS\r\n") == [str(replies.TLS_UNAVAILABLE)]
    assert driver.codes(b"NOOP\r\n") == [250]


def test_starttls_on_transport_without_tls() -> None:
    """A transport that cannot start TLS makes STARTTLS answer 454."""
    factory = make_factory(tls=FakeContexts())  # type: ignore[arg-type]
    peer = IPv4Address("TCP", "192.0.2.10", 40000)
    transport = StringTransport(peerAddress=peer)
    session = factory.buildProtocol(peer)
    session.makeConnection(transport)
    session.dataReceived(b"EHLO x\r\nSTARTTLS\r\n")
    assert transport.value().endswith(b"454 4.7.0 TLS not available\r\n")


def test_implicit_tls_never_offers_starttls() -> None:
    """On 465 the session is secure from the first byte: no STARTTLS, and STARTTLS is 503."""
    driver = driver_with_tls(role=ListenerRole.SUBMISSIONS)
    assert not any("STARTTLS" in line for line in driver.send(b"EHLO x\r\n"))
    assert driver.send(b"STARTTLS\r\n") == [str(replies.TLS_ALREADY_ACTIVE)]


def test_submission_after_starttls_needs_auth() -> None:
    """On 587, MAIL is refused for lack of TLS first, then for lack of AUTH."""
    router = StaticRouter({LOCAL_DOMAIN}, set(USERS))
    driver = driver_with_tls(role=ListenerRole.SUBMISSION, policy=SubmissionPolicy(router))
    driver.send(b"EHLO x\r\n")
    assert driver.send(b"MAIL FROM:<alice@example.test>\r\n") == [str(replies.TLS_REQUIRED)]
    driver.send(b"STARTTLS\r\n")
    driver.send(b"EHLO x\r\n")
    assert driver.send(b"MAIL FROM:<alice@example.test>\r\n") == [str(replies.AUTH_REQUIRED)]
