"""The outbound ESMTP client, driven over a StringTransport with a Clock: replies, EHLO/HELO,
pipelining, SIZE, 8BITMIME, SMTPUTF8, DSN, STARTTLS, AUTH, dot-stuffing, flow control, timeouts."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailsys.smtp.client import (
    BytesSource,
    Capabilities,
    ClientTimeouts,
    DotStuffer,
    LocalRefusalError,
    OutboundRecipient,
    ServerReply,
    SMTPClient,
    SMTPConnectionLostError,
    SMTPProtocolError,
    SMTPTimeoutError,
    TLSFailedError,
    Transaction,
    TransactionResult,
)
from mailsys.smtp.message import MessageBuffer
from mailsys.smtp.testing import TLSRecordingTransport

EHLO_FULL = (
    "250-mx.remote.test hello\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n"
    "250-SMTPUTF8\r\n250-DSN\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"
)
EHLO_PLAIN = "250-mx.remote.test\r\n250 ENHANCEDSTATUSCODES\r\n"
MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n"


class Peer:
    """A connected client and the fake server side of its transport."""

    def __init__(self, timeouts: ClientTimeouts | None = None) -> None:
        self.clock = Clock()
        self.client = SMTPClient(self.clock, timeouts)
        self.transport = TLSRecordingTransport(IPv4Address("TCP", "192.0.2.25", 25))
        self.client.makeConnection(self.transport)

    def say(self, text: str) -> None:
        self.client.dataReceived(text.encode())

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return bytes(data)

    def lines(self) -> list[str]:
        return self.sent().decode().splitlines()

    def ready(self, ehlo: str = EHLO_FULL) -> Capabilities:
        self.say("220 mx.remote.test ESMTP\r\n")
        d = self.client.ehlo("mail.example.test")
        assert self.lines() == ["EHLO mail.example.test"]
        self.say(ehlo)
        return result(d)

    def lose(self) -> None:
        self.client.connectionLost(Failure(ConnectionDone()))


def result(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def pending(d: Deferred[Any]) -> bool:
    box: list[Any] = []
    d.addBoth(lambda r: box.append(r) or r)
    return not box


def txn(*recipients: str, **kwargs: Any) -> Transaction:
    return Transaction(
        sender=kwargs.pop("sender", "alice@example.test"),
        recipients=tuple(OutboundRecipient(r) if isinstance(r, str) else r for r in recipients),
        size=kwargs.pop("size", len(MESSAGE)),
        **kwargs,
    )


def unstuff(wire: bytes) -> bytes:
    """What a server makes of DATA text: mailsys's own server-side parser is the oracle."""
    buffer = MessageBuffer(max_size=10**9, max_line_length=10**9, max_received=100)
    rest = buffer.feed_data(wire)
    assert rest == b"", "the end marker must come last, exactly once"
    assert buffer.error is None
    return buffer.message()


# --- replies and EHLO ---------------------------------------------------------------------------


def test_multiline_ehlo_reply_gives_capabilities() -> None:
    """A multi-line EHLO reply becomes upper-case keywords with their parameters."""
    peer = Peer()
    caps = peer.ready()
    assert "PIPELINING" in caps and "starttls" in caps
    assert caps.size_limit == 1_000_000
    assert caps.auth_mechanisms == ("PLAIN", "LOGIN")
    assert caps.esmtp


def test_ehlo_refused_falls_back_to_helo() -> None:
    """A server that does not know EHLO (500/502) gets HELO, and no ESMTP parameters."""
    peer = Peer()
    peer.say("220 old.remote.test\r\n")
    d = peer.client.ehlo("mail.example.test")
    peer.sent()
    peer.say("502 5.5.1 what?\r\n")
    assert peer.lines() == ["HELO mail.example.test"]
    peer.say("250 old.remote.test\r\n")
    caps = result(d)
    assert not caps.esmtp and caps.keywords == {}
    sending = peer.client.send(txn("bob@remote.test", size=99), BytesSource(MESSAGE))
    assert peer.lines() == ["MAIL FROM:<alice@example.test>"]  # no SIZE=, one at a time
    peer.say("250 ok\r\n")
    assert peer.lines() == ["RCPT TO:<bob@remote.test>"]
    peer.say("250 ok\r\n")
    assert peer.lines() == ["DATA"]
    peer.say("354 go\r\n")
    assert peer.sent() == MESSAGE + b".\r\n"
    peer.say("250 2.0.0 queued\r\n")
    outcome: TransactionResult = result(sending)
    assert str(outcome.reply_for(0)) == "250 2.0.0 queued"


def test_reply_text_and_enhanced_code() -> None:
    """A reply keeps every line; str() is one line; the enhanced code is parsed."""
    reply = ServerReply(550, ("5.1.1 <bob@remote.test>: unknown", "5.1.1 really"))
    assert reply.enhanced == "5.1.1"
    assert str(reply) == "550 5.1.1 <bob@remote.test>: unknown 5.1.1 really"
    assert reply.is_permanent and not reply.is_temporary
    assert ServerReply(250, ("ok",)).enhanced == ""


def test_garbage_reply_is_a_protocol_error() -> None:
    """Something that is not a reply fails what waits and drops the connection."""
    peer = Peer()
    peer.say("HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(SMTPProtocolError):
        result(peer.client.greeting)
    assert peer.transport.disconnecting or peer.transport.disconnected


def test_mixed_codes_in_one_reply_is_a_protocol_error() -> None:
    """The lines of one multi-line reply must share their code."""
    peer = Peer()
    peer.say("220-hello\r\n250 oops\r\n")
    with pytest.raises(SMTPProtocolError):
        result(peer.client.greeting)


def test_reply_split_across_reads() -> None:
    """A reply arriving a byte at a time is still one reply."""
    peer = Peer()
    for byte in b"220-mx\r\n220 ready\r\n":
        peer.client.dataReceived(bytes([byte]))
    assert result(peer.client.greeting) == ServerReply(220, ("mx", "ready"))


# --- a transaction ------------------------------------------------------------------------------


def test_pipelined_transaction_per_recipient_replies() -> None:
    """With PIPELINING, MAIL, every RCPT and DATA go in one write; each recipient gets its own
    reply, the accepted ones the reply to the data."""
    peer = Peer()
    peer.ready()
    d = peer.client.send(txn("a@remote.test", "b@remote.test"), BytesSource(MESSAGE))
    assert peer.lines() == [
        f"MAIL FROM:<alice@example.test> SIZE={len(MESSAGE)}",
        "RCPT TO:<a@remote.test>",
        "RCPT TO:<b@remote.test>",
        "DATA",
    ]
    peer.say("250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n354 go\r\n")
    assert peer.sent() == MESSAGE + b".\r\n"
    assert peer.client.in_transaction
    peer.say("250 2.0.0 Ok: queued as X\r\n")
    outcome: TransactionResult = result(d)
    assert str(outcome.reply_for(0)) == "250 2.0.0 Ok: queued as X"
    assert str(outcome.reply_for(1)) == "550 5.1.1 no such user"
    assert not peer.client.in_transaction and peer.client.messages == 1


def test_mail_refused_decides_every_recipient() -> None:
    """A refused MAIL is the answer for every recipient; the pipelined RCPTs' 503s are not."""
    peer = Peer()
    peer.ready()
    d = peer.client.send(txn("a@remote.test"), BytesSource(MESSAGE))
    peer.sent()
    peer.say("451 4.7.1 greylisted\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
    outcome: TransactionResult = result(d)
    assert str(outcome.reply_for(0)) == "451 4.7.1 greylisted"
    assert not peer.client.in_transaction


def test_all_recipients_refused_with_pipelining_needs_rset() -> None:
    """When every RCPT is refused the server refuses DATA; the transaction stays open until
    RSET (the next message on this connection sends one)."""
    peer = Peer()
    peer.ready()
    d = peer.client.send(txn("a@remote.test"), BytesSource(MESSAGE))
    peer.sent()
    peer.say("250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n")
    outcome: TransactionResult = result(d)
    assert str(outcome.reply_for(0)) == "550 5.1.1 unknown"
    assert peer.sent() == b""  # no message data
    assert peer.client.in_transaction
    reset = peer.client.reset()
    assert peer.lines() == ["RSET"]
    peer.say("250 2.0.0 reset\r\n")
    result(reset)
    assert not peer.client.in_transaction


def test_354_without_recipients_sends_only_the_end() -> None:
    """RFC 2920 §3.1: a server answering 354 with no valid recipient gets an empty message."""
    peer = Peer()
    peer.ready()
    d = peer.client.send(txn("a@remote.test"), BytesSource(MESSAGE))
    peer.sent()
    peer.say("250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n")
    assert peer.sent() == b".\r\n"
    peer.say("554 5.5.1 no valid recipients\r\n")
    outcome: TransactionResult = result(d)
    assert outcome.data is None and str(outcome.reply_for(0)) == "550 5.1.1 unknown"


def test_without_pipelining_no_data_when_every_rcpt_fails() -> None:
    """Without PIPELINING commands go one by one, and DATA is not sent without a recipient."""
    peer = Peer()
    peer.ready(EHLO_PLAIN)
    d = peer.client.send(txn("a@remote.test"), BytesSource(MESSAGE))
    assert peer.lines() == ["MAIL FROM:<alice@example.test>"]
    peer.say("250 ok\r\n")
    assert peer.lines() == ["RCPT TO:<a@remote.test>"]
    peer.say("450 4.2.0 mailbox busy\r\n")
    assert peer.sent() == b""
    assert str(result(d).reply_for(0)) == "450 4.2.0 mailbox busy"


# --- extensions ---------------------------------------------------------------------------------


def test_size_too_big_fails_before_mail() -> None:
    """RFC 1870: a message larger than the server's SIZE is refused before MAIL is sent."""
    peer = Peer()
    peer.ready()
    with pytest.raises(LocalRefusalError) as caught:
        result(peer.client.send(txn("a@remote.test", size=2_000_000), BytesSource(MESSAGE)))
    assert caught.value.reply.code == 552 and caught.value.reply.enhanced == "5.3.4"
    assert "2000000 bytes" in caught.value.reply.text
    assert peer.sent() == b""


def test_8bitmime_used_when_offered_and_required() -> None:
    """BODY=8BITMIME is passed on when offered; without it an 8-bit message fails (5.6.3)."""
    peer = Peer()
    peer.ready()
    peer.client.send(txn("a@remote.test", body="8BITMIME"), BytesSource(MESSAGE))
    assert "BODY=8BITMIME" in peer.lines()[0]
    other = Peer()
    other.ready(EHLO_PLAIN)
    with pytest.raises(LocalRefusalError) as caught:
        result(other.client.send(txn("a@remote.test", body="8BITMIME"), BytesSource(MESSAGE)))
    assert caught.value.reply.enhanced == "5.6.3"
    assert "8BITMIME" in caught.value.reply.text


def test_smtputf8_used_when_offered_and_required() -> None:
    """SMTPUTF8 is passed on when offered; without it such a message fails (5.6.7)."""
    peer = Peer()
    peer.ready()
    peer.client.send(txn("josé@remote.test", sender="zoë@example.test", smtputf8=True),
                     BytesSource(MESSAGE))
    lines = peer.sent().decode("utf-8").splitlines()
    assert lines[0].startswith("MAIL FROM:<zoë@example.test>") and "SMTPUTF8" in lines[0]
    assert lines[1] == "RCPT TO:<josé@remote.test>"
    other = Peer()
    other.ready(EHLO_PLAIN)
    with pytest.raises(LocalRefusalError) as caught:
        result(other.client.send(txn("a@remote.test", smtputf8=True), BytesSource(MESSAGE)))
    assert caught.value.reply.enhanced == "5.6.7"


def test_dsn_parameters_passed_on_when_offered() -> None:
    """RFC 3461: RET, ENVID, NOTIFY and ORCPT go to a server offering DSN, xtext-encoded."""
    peer = Peer()
    peer.ready()
    recipient = OutboundRecipient("a@remote.test", ("SUCCESS", "FAILURE"), "rfc822;A+B=C@x.test")
    peer.client.send(txn(recipient, ret="HDRS", envid="id 1"), BytesSource(MESSAGE))
    mail, rcpt = peer.lines()[:2]
    assert mail.endswith("RET=HDRS ENVID=id+201")
    assert rcpt == "RCPT TO:<a@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2BB+3DC@x.test"
    other = Peer()
    other.ready(EHLO_PLAIN)
    other.client.send(txn(recipient, ret="HDRS", envid="id"), BytesSource(MESSAGE))
    assert other.lines() == ["MAIL FROM:<alice@example.test>"]


# --- STARTTLS and AUTH --------------------------------------------------------------------------


def test_starttls_then_ehlo_again() -> None:
    """RFC 3207: after 220 TLS starts, early plaintext is dropped, EHLO is sent again and the
    TLS parameters are known."""
    peer = Peer()
    peer.ready()
    creator = object()
    d = peer.client.starttls(creator, "mail.example.test")  # type: ignore[arg-type]
    assert peer.lines() == ["STARTTLS"]
    peer.say("220 2.0.0 go ahead\r\n")
    assert peer.transport.tls_contexts == [creator]
    assert peer.lines() == ["EHLO mail.example.test"]
    assert peer.client.capabilities.keywords == {}
    peer.say("250-mx.remote.test\r\n250 PIPELINING\r\n")
    assert result(d).code == 220
    assert "PIPELINING" in peer.client.capabilities
    assert peer.client.tls == "using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"


def test_starttls_refused_is_reported_not_raised() -> None:
    """A refused STARTTLS is the caller's to judge (the policy)."""
    peer = Peer()
    peer.ready()
    d = peer.client.starttls(object(), "mail.example.test")  # type: ignore[arg-type]
    peer.sent()
    peer.say("454 4.7.0 TLS not available\r\n")
    assert result(d).code == 454
    assert peer.client.tls is None


def test_tls_handshake_failure_is_named() -> None:
    """A connection lost during the handshake fails with TLSFailedError and the reason."""
    from OpenSSL import SSL

    peer = Peer()
    peer.ready()
    d = peer.client.starttls(object(), "mail.example.test")  # type: ignore[arg-type]
    peer.sent()
    peer.say("220 go\r\n")
    error = SSL.Error([("SSL routines", "", "certificate verify failed")])
    peer.client.connectionLost(Failure(error))
    with pytest.raises(TLSFailedError, match="certificate verify failed"):
        result(d)


def test_auth_plain_with_initial_response() -> None:
    """AUTH PLAIN sends the credentials as the initial response (RFC 4954 §4)."""
    peer = Peer()
    peer.ready()
    d = peer.client.authenticate("user@example.test", "secret")
    (line,) = peer.lines()
    assert line == "AUTH PLAIN " + base64.b64encode(b"\0user@example.test\0secret").decode()
    peer.say("235 2.7.0 ok\r\n")
    assert result(d).code == 235


def test_auth_login_exchange() -> None:
    """Without PLAIN, LOGIN: user name and password each after a 334."""
    peer = Peer()
    peer.ready("250-mx\r\n250 AUTH LOGIN\r\n")
    d = peer.client.authenticate("user", "secret")
    assert peer.lines() == ["AUTH LOGIN"]
    peer.say("334 VXNlcm5hbWU6\r\n")
    assert peer.lines() == [base64.b64encode(b"user").decode()]
    peer.say("334 UGFzc3dvcmQ6\r\n")
    assert peer.lines() == [base64.b64encode(b"secret").decode()]
    peer.say("535 5.7.8 no\r\n")
    assert result(d).code == 535


# --- dot-stuffing -------------------------------------------------------------------------------


def big_message_with_dots() -> bytes:
    """A "." line at the very start and at byte 16384 and 32768 (twisted.mail's chunk size)."""
    body = bytearray(b".\r\n")
    for mark in (16384, 32768):
        while len(body) < mark:
            line = b"x" * min(70, mark - len(body) - 2) + b"\r\n"
            if len(body) + len(line) > mark:
                line = b"y" * (mark - len(body) - 2) + b"\r\n" if mark - len(body) >= 2 else b""
            body += line or b"\r\n"
        assert len(body) == mark
        body += b".\r\n..two\r\n.x\r\n"
    return bytes(body) + b"the end\r\n"


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 16384, 16383, 65536])
def test_dot_lines_survive_any_chunking(chunk: int) -> None:
    """However the message is cut, every "." line is stuffed and only the end marker ends it."""
    original = big_message_with_dots()
    stuffer = DotStuffer()
    wire = b"".join(stuffer.feed(original[i : i + chunk]) for i in range(0, len(original), chunk))
    wire += stuffer.finish()
    assert unstuff(wire) == original


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b".", b"\r\n", b"\r", b"\n", b"a", b".\r\n", b"\r\n."]),
                max_size=40), st.integers(min_value=1, max_value=9))
def test_stuffing_round_trips(pieces: list[bytes], chunk: int) -> None:
    """Stuffed then unstuffed, any CRLF message comes back byte-identical."""
    original = b"".join(pieces).replace(b"\r\n", b"\n").replace(b"\r", b"").replace(b"\n", b"\r\n")
    stuffer = DotStuffer()
    wire = b"".join(stuffer.feed(original[i : i + chunk]) for i in range(0, len(original), chunk))
    wire += stuffer.finish()
    expected = original if original.endswith(b"\r\n") or not original else original + b"\r\n"
    assert unstuff(wire) == expected


def test_message_streamed_through_the_client_is_stuffed() -> None:
    """The client sends the source in chunks, stuffed across chunk boundaries."""
    original = big_message_with_dots()
    peer = Peer()
    peer.ready()
    d = peer.client.send(txn("a@remote.test", size=len(original)),
                         BytesSource(original, chunk_size=16384))
    peer.sent()
    peer.say("250 ok\r\n250 ok\r\n354 go\r\n")
    wire = peer.sent()
    assert unstuff(wire) == original
    peer.say("250 2.0.0 ok\r\n")
    assert result(d).data.code == 250


# --- flow control and failures ------------------------------------------------------------------


class SlowSource:
    """A source whose reads the test answers."""

    def __init__(self) -> None:
        self.reads: list[Deferred[bytes]] = []
        self.closed = False

    def read(self, size: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.reads.append(d)
        return d

    def close(self) -> None:
        self.closed = True


def start_data(peer: Peer, source: Any) -> Deferred[TransactionResult]:
    peer.ready()
    d = peer.client.send(txn("a@remote.test"), source)
    peer.sent()
    peer.say("250 ok\r\n250 ok\r\n354 go\r\n")
    return d


def test_paused_transport_stops_reading() -> None:
    """While the transport is paused no further chunk is read; resuming continues."""
    peer = Peer()
    source = SlowSource()
    d = start_data(peer, source)
    assert peer.transport.producer is peer.client
    source.reads[0].callback(b"line one\r\n")
    peer.client.pauseProducing()
    assert len(source.reads) == 2
    source.reads[1].callback(b"line two\r\n")
    assert len(source.reads) == 2  # waiting for resume
    peer.client.resumeProducing()
    assert len(source.reads) == 3
    source.reads[2].callback(b"")
    assert peer.sent() == b"line one\r\nline two\r\n.\r\n"
    peer.say("250 ok\r\n")
    assert result(d).data.code == 250 and source.closed
    assert peer.transport.producer is None


def test_stalled_data_times_out() -> None:
    """RFC 5321 §4.5.3.2.5: no progress for 3 minutes while sending data gives up."""
    peer = Peer()
    source = SlowSource()
    d = start_data(peer, source)
    source.reads[0].callback(b"x\r\n")
    peer.client.pauseProducing()
    source.reads[1].callback(b"y\r\n")
    peer.clock.advance(179)
    assert pending(d)
    peer.clock.advance(1)
    with pytest.raises(SMTPTimeoutError, match="message data"):
        result(d)


def test_source_error_never_ends_the_message() -> None:
    """A read error mid-message drops the connection without the end marker."""
    peer = Peer()
    source = SlowSource()
    d = start_data(peer, source)
    source.reads[0].callback(b"part\r\n")
    source.reads[1].errback(OSError("disk gone"))
    assert b".\r\n" not in peer.sent()
    assert peer.transport.disconnecting or peer.transport.disconnected
    with pytest.raises(Exception, match="reading the message"):
        result(d)
    assert source.closed


@pytest.mark.parametrize(("stage", "seconds"), [("greeting", 300), ("EHLO", 300),
                                                ("MAIL", 300), ("DATA", 120),
                                                ("end of data", 600)])
def test_reply_timeouts(stage: str, seconds: int) -> None:
    """Each reply is waited for as long as RFC 5321 §4.5.3.2 says, then the session is given
    up and the connection dropped."""
    peer = Peer()
    if stage == "greeting":
        d: Deferred[Any] = peer.client.greeting
    else:
        peer.say("220 mx\r\n")
        d = peer.client.ehlo("mail.example.test")
        if stage != "EHLO":
            peer.say("250-mx\r\n250 PIPELINING\r\n")
            d = peer.client.send(txn("a@remote.test"), BytesSource(MESSAGE))
            if stage == "DATA":
                peer.say("250 ok\r\n250 ok\r\n")
            elif stage == "end of data":
                peer.say("250 ok\r\n250 ok\r\n354 go\r\n")
    peer.clock.advance(seconds - 1)
    assert pending(d)
    peer.clock.advance(1)
    with pytest.raises(SMTPTimeoutError, match=stage):
        result(d)
    assert peer.transport.disconnecting or peer.transport.disconnected


def test_connection_lost_fails_what_waits() -> None:
    """A closed connection fails every outstanding reply with SMTPConnectionLostError."""
    peer = Peer()
    peer.ready()
    d = peer.client.send(txn("a@remote.test"), BytesSource(MESSAGE))
    peer.lose()
    with pytest.raises(SMTPConnectionLostError):
        result(d)
    assert not peer.client.connected
    with pytest.raises(SMTPConnectionLostError):
        result(peer.client.command("NOOP"))


def test_unsolicited_421_then_close() -> None:
    """A 421 nobody asked for names the reason the connection then closes with."""
    peer = Peer()
    peer.ready()
    peer.say("421 4.4.2 idle too long\r\n")
    peer.lose()
    with pytest.raises(SMTPConnectionLostError, match="idle too long"):
        result(peer.client.command("NOOP"))


def test_quit_closes() -> None:
    """QUIT, then the connection is closed whatever the answer."""
    peer = Peer()
    peer.ready()
    d = peer.client.quit()
    assert peer.lines() == ["QUIT"]
    peer.say("221 bye\r\n")
    result(d)
    assert peer.transport.disconnecting


def test_failed_source_read_before_data_is_closed() -> None:
    """The source is closed even when the transaction ends before the data."""
    peer = Peer()
    peer.ready()
    source = BytesSource(MESSAGE)
    d = peer.client.send(txn("a@remote.test"), source)
    peer.say("550 5.7.1 no\r\n503 no\r\n503 no\r\n")
    result(d)
    assert source.closed
