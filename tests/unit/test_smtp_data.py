"""Tests for message intake in the SMTP session: DATA, BDAT, smuggling, limits, Received, spool."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from mailsys import replies
from mailsys.envelope import TargetKind
from mailsys.smtp.server import ListenerRole
from mailsys.smtp.testing import MemorySink, SessionDriver, SinkMode, make_factory

START = b"EHLO client.test\r\nMAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"


def in_data(**kwargs: object) -> SessionDriver:
    """A session that has just been answered 354."""
    driver = SessionDriver(make_factory(**kwargs))  # type: ignore[arg-type]
    driver.lines()
    lines = driver.send(START + b"DATA\r\n")
    assert lines[-1].startswith("354 ")
    return driver


def in_transaction(**kwargs: object) -> SessionDriver:
    """A session with MAIL and one RCPT accepted (for BDAT)."""
    driver = SessionDriver(make_factory(**kwargs))  # type: ignore[arg-type]
    driver.lines()
    assert driver.send(START)[-1] == "250 2.1.5 Recipient ok"
    return driver


def bdat(chunk: bytes, last: bool = False) -> bytes:
    """A BDAT command with its chunk."""
    return b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk


def stored(driver: SessionDriver) -> list[bytes]:
    """The bodies accepted by the sink, without our Received field."""
    sink = driver.factory.sink
    assert isinstance(sink, MemorySink)
    return [message.split(b"\r\n", 3)[3] for _, message in sink.accepted]


def still_usable(driver: SessionDriver) -> None:
    """A whole clean transaction still works on this session."""
    count = len(stored(driver))
    assert driver.codes(b"RSET\r\n" + START[len(b"EHLO client.test\r\n"):] + b"DATA\r\n"
                        b"ok\r\n.\r\n") == [250, 250, 250, 354, 250]
    assert stored(driver)[count:] == [b"ok\r\n"]


# --- DATA ----------------------------------------------------------------------------------------


def test_message_queued() -> None:
    """A message ends at CRLF.CRLF and is acknowledged with its queue id."""
    driver = in_data()
    assert driver.send(b"Subject: hi\r\n\r\nHello\r\n.\r\n") == ["250 2.0.0 Ok: queued as TEST0001"]
    assert stored(driver) == [b"Subject: hi\r\n\r\nHello\r\n"]


def test_message_split_across_many_reads() -> None:
    """The end marker and lines may be split anywhere between reads."""
    driver = in_data()
    data = b"Subject: hi\r\n\r\n..one\r\ntwo\r\n.\r\n"
    for index in range(len(data)):
        assert driver.send(data[index : index + 1]) == ([] if index < len(data) - 1 else
                                                         ["250 2.0.0 Ok: queued as TEST0001"])
    assert stored(driver) == [b"Subject: hi\r\n\r\n.one\r\ntwo\r\n"]


def test_empty_message() -> None:
    """A message that ends at once is an empty message."""
    driver = in_data()
    assert driver.codes(b".\r\n") == [250]
    assert stored(driver) == [b""]


def test_dot_unstuffing() -> None:
    """The leading dot of every line is removed (RFC 5321 §4.5.2)."""
    driver = in_data()
    driver.send(b"..\r\n...x\r\n.y\r\na.b\r\n..\r\n.\r\n")
    assert stored(driver) == [b".\r\n..x\r\ny\r\na.b\r\n.\r\n"]


def test_envelope_of_a_message() -> None:
    """The Envelope records what the session agreed and when."""
    clock = Clock()
    clock.advance(1_700_000_000)
    driver = in_data(clock=clock)
    driver.send(b"x\r\n.\r\n")
    sink = driver.factory.sink
    assert isinstance(sink, MemorySink)
    envelope, message = sink.accepted[0]
    assert envelope.queue_id == "TEST0001"
    assert envelope.sender == "sender@remote.test"
    assert envelope.received_at == 1_700_000_000
    assert envelope.size == len(message)
    assert envelope.client_address == "192.0.2.10"
    assert envelope.client_helo == "client.test"
    assert envelope.protocol == "ESMTP"
    (recipient,) = envelope.recipients
    assert (recipient.address, recipient.original, recipient.kind, recipient.mailbox) == (
        "alice@example.test", "alice@example.test", TargetKind.LOCAL, "alice@example.test")


def test_received_header() -> None:
    """The Received field names the client, us, the protocol, the queue id, the recipient and
    the date (RFC 5321 §4.4)."""
    clock = Clock()
    clock.advance(1_700_000_000)
    driver = in_data(clock=clock)
    driver.send(b"x\r\n.\r\n")
    _, message = driver.factory.sink.accepted[0]  # type: ignore[attr-defined]
    assert message == (
        b"Received: from client.test ([192.0.2.10])\r\n"
        b"\tby mx.example.test (mailsys) with ESMTP id TEST0001\r\n"
        b"\tfor <alice@example.test>; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        b"x\r\n"
    )


def test_received_header_with_two_recipients_has_no_for() -> None:
    """With more than one recipient the Received field has no 'for' clause."""
    driver = in_transaction()
    driver.send(b"RCPT TO:<bob@example.test>\r\nDATA\r\nx\r\n.\r\n")
    _, message = driver.factory.sink.accepted[0]  # type: ignore[attr-defined]
    header = message.split(b"\r\n\t")
    assert b"for <" not in message
    assert header[1].startswith(b"by mx.example.test (mailsys) with ESMTP id TEST0001; ")


def test_received_header_helo_protocol_and_ipv6() -> None:
    """After HELO the protocol is SMTP; an IPv6 client is written as an IPv6 literal."""
    driver = SessionDriver(make_factory(), client="2001:db8::7")
    driver.send(b"HELO old.client\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n"
                b"DATA\r\nx\r\n.\r\n")
    envelope, message = driver.factory.sink.accepted[0]  # type: ignore[attr-defined]
    assert message.startswith(b"Received: from old.client ([IPv6:2001:db8::7])\r\n"
                              b"\tby mx.example.test (mailsys) with SMTP id ")
    assert envelope.protocol == "SMTP"


def test_submission_privacy_leaves_port_25_alone() -> None:
    """[submission] hide_client_address does not hide the client of port 25 (MTA) sessions."""
    driver = in_data(hide_client_address=True)
    driver.send(b"x\r\n.\r\n")
    _, message = driver.factory.sink.accepted[0]  # type: ignore[attr-defined]
    assert message.startswith(b"Received: from ")
    assert b"192.0.2.10" in message


def test_received_header_on_implicit_tls() -> None:
    """On 465 the session is TLS from the start: protocol ESMTPS."""
    driver = SessionDriver(make_factory(role=ListenerRole.SUBMISSIONS))
    driver.send(START + b"DATA\r\nx\r\n.\r\n")
    envelope, _ = driver.factory.sink.accepted[0]  # type: ignore[attr-defined]
    assert envelope.protocol == "ESMTPS"


def test_eight_bit_body_accepted_without_8bitmime() -> None:
    """8-bit bytes in a message declared 7BIT (or undeclared) are accepted, like Postfix."""
    driver = SessionDriver(make_factory())
    driver.send(b"EHLO x\r\nMAIL FROM:<a@b.test> BODY=7BIT\r\nRCPT TO:<alice@example.test>\r\n"
                b"DATA\r\n")
    assert driver.codes("Grüße\r\n.\r\n".encode("latin-1")) == [250]


def test_several_messages_in_one_session() -> None:
    """After a message a new transaction starts cleanly."""
    driver = in_data()
    driver.send(b"one\r\n.\r\n")
    still_usable(driver)
    assert len(stored(driver)) == 2


# --- smuggling (only CRLF.CRLF ends DATA) --------------------------------------------------------

SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n.\n"]


@pytest.mark.parametrize("sequence", SMUGGLING)
def test_smuggling_sequence_does_not_end_data(sequence: bytes) -> None:
    """A fake end of data neither ends the message nor lets what follows run as commands; the
    whole message is refused for its bare line ending at the real end (550 5.6.11)."""
    driver = in_data()
    smuggled = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nevil\r\n")
    lines = driver.send(b"Subject: first\r\n\r\nhello" + sequence + smuggled)
    assert lines == []  # nothing ended, nothing was executed
    assert driver.send(b".\r\n") == [str(replies.BARE_LINE_ENDING)]
    assert driver.factory.sink.submitted == []  # type: ignore[attr-defined]
    still_usable(driver)


@pytest.mark.parametrize("sequence", SMUGGLING)
def test_smuggling_sequence_split_anywhere(sequence: bytes) -> None:
    """Wherever the reads split the stream, a smuggling sequence ends nothing."""
    data = b"hello" + sequence + b"NOOP\r\nQUIT\r\n.\r\n"
    for cut in range(1, len(data)):
        driver = in_data()
        assert driver.send(data[:cut]) + driver.send(data[cut:]) == [
            str(replies.BARE_LINE_ENDING)
        ]
        assert not driver.closed


@pytest.mark.parametrize(
    "body",
    [b"bare\nlf\r\n", b"bare\rcr\r\n", b"cr at end\r", b"x\r\r\n", b"\n", b"a\n\r\n",
     b"header: x\n\r\n"],
)
def test_bare_line_endings_refuse_the_message(body: bytes) -> None:
    """A bare CR or LF anywhere in the body refuses the message; the session stays usable."""
    driver = in_data()
    assert driver.send(body + b"\r\n.\r\n") == [str(replies.BARE_LINE_ENDING)]
    assert stored(driver) == []
    still_usable(driver)


def test_crlf_split_between_reads_is_not_bare() -> None:
    """A CR at the end of one read and its LF at the start of the next is one CRLF."""
    driver = in_data()
    assert driver.send(b"line one\r") == []
    assert driver.codes(b"\nline two\r\n.\r\n") == [250]
    assert stored(driver) == [b"line one\r\nline two\r\n"]


# --- line and size limits ----------------------------------------------------------------------


def test_line_over_998_octets_accepted_as_received() -> None:
    """A 20,000-byte line (over RFC 5321's 1000 but within smtp.max_line_length, 64 KiB by
    default) is accepted and stored as it came."""
    driver = in_data()
    body = b"Subject: x\r\n\r\n" + b"A" * 20_000 + b"\r\nend\r\n"
    assert driver.codes(body + b".\r\n") == [250]
    assert stored(driver) == [body]


def test_long_line_then_commands_inside_data() -> None:
    """A 100,000-byte line (over the 64 KiB bound) followed by command-like lines: nothing runs
    as a command; the message is refused once at its real end (550 5.6.0), then the session
    goes on."""
    driver = in_data()
    body = (b"Subject: x\r\n\r\n" + b"A" * 100_000 + b"\r\nMAIL FROM:<evil@attacker.test>\r\n"
            b"RCPT TO:<bob@example.test>\r\nDATA\r\nQUIT\r\n")
    assert driver.send(body) == []
    assert driver.send(b".\r\n") == [str(replies.DATA_LINE_TOO_LONG)]
    assert not driver.closed
    still_usable(driver)


def test_long_line_arriving_in_small_pieces() -> None:
    """An over-long line fed 100 bytes at a time is refused the same way."""
    driver = in_data(max_line_length=1000)
    data = b"B" * 20_000 + b"\r\nQUIT\r\n.\r\n"
    lines = []
    for start in range(0, len(data), 100):
        lines += driver.send(data[start : start + 100])
    assert lines == [str(replies.DATA_LINE_TOO_LONG)]


def test_line_length_limit_is_exact() -> None:
    """A line of max_line_length octets with CRLF is accepted; one more octet is refused."""
    driver = in_data(max_line_length=100)
    assert driver.codes(b"x" * 98 + b"\r\n.\r\n") == [250]
    driver = in_data(max_line_length=100)
    assert driver.codes(b"x" * 99 + b"\r\n.\r\n") == [550]


def test_line_limit_counts_before_unstuffing() -> None:
    """The limit applies to the line as sent, dot-stuffing included."""
    driver = in_data(max_line_length=100)
    assert driver.codes(b"." + b"x" * 97 + b"\r\n.\r\n") == [250]


def test_message_too_big() -> None:
    """A message over max_message_size is swallowed to its end, then 552 5.3.4; none kept."""
    driver = in_data(max_message_size=1000)
    lines = driver.send(b"x" * 500 + b"\r\n")
    lines += driver.send(b"y" * 500 + b"\r\nQUIT\r\n")
    assert lines == []
    assert driver.send(b".\r\n") == [str(replies.MESSAGE_TOO_BIG)]
    assert driver.factory.sink.submitted == []  # type: ignore[attr-defined]
    still_usable(driver)


def test_message_size_limit_is_exact() -> None:
    """A message of exactly max_message_size octets is accepted."""
    driver = in_data(max_message_size=100)
    assert driver.codes(b"z" * 98 + b"\r\n.\r\n") == [250]


def test_received_loop_detection() -> None:
    """More than max_received_headers Received fields in the header section is a loop
    (554 5.4.6); Received lines in the body do not count."""
    driver = in_data(max_received_headers=3)
    headers = b"Received: from a\r\nRECEIVED: from b\r\nreceived:from c\r\n"
    assert driver.codes(headers + b"Subject: x\r\n\r\nReceived: body\r\n" * 3 + b".\r\n") == [250]
    driver = in_data(max_received_headers=3)
    assert driver.send(headers + b"Received: from d\r\n\tfolded\r\n\r\nbody\r\n.\r\n") == [
        str(replies.LOOP_DETECTED)
    ]
    assert driver.factory.sink.submitted == []  # type: ignore[attr-defined]


def test_received_fields_split_across_reads() -> None:
    """Received fields are counted wherever the reads split the header section."""
    driver = in_data(max_received_headers=2)
    for _ in range(3):
        driver.send(b"Received: x\r")
        driver.send(b"\n")
    assert driver.send(b"\r\nbody\r\n.\r\n") == [str(replies.LOOP_DETECTED)]


# --- the spool -------------------------------------------------------------------------------


def test_spool_failure() -> None:
    """When the sink fails the client gets 451 4.3.0 with no detail; the session goes on."""
    driver = in_data(sink=MemorySink(SinkMode.FAIL))
    assert driver.send(b"x\r\n.\r\n") == [str(replies.SPOOL_FAILED)]
    assert driver.codes(b"MAIL FROM:<a@b.test>\r\n") == [250]


def test_reply_waits_for_the_spool() -> None:
    """250 comes only when the sink's Deferred fires; pipelined commands wait behind it."""
    sink = MemorySink(SinkMode.HOLD)
    driver = in_data(sink=sink)
    assert driver.send(b"x\r\n.\r\nNOOP\r\nQUIT\r\n") == []
    assert not driver.closed
    sink.held[0].callback(None)
    assert driver.lines() == ["250 2.0.0 Ok: queued as TEST0001", "250 2.0.0 Ok", "221 2.0.0 Bye"]
    assert driver.closed


def test_spool_answer_after_disconnect() -> None:
    """If the client leaves while the spool works, the late answer is dropped quietly."""
    sink = MemorySink(SinkMode.HOLD)
    driver = in_data(sink=sink)
    driver.send(b"x\r\n.\r\n")
    driver.lose()
    sink.held[0].callback(None)
    assert driver.lines() == []


# --- BDAT (RFC 3030) -------------------------------------------------------------------------


def test_bdat_chunks() -> None:
    """Each chunk gets 250; LAST queues the message, bytes kept exactly (no unstuffing)."""
    driver = in_transaction()
    assert driver.send(bdat(b"Subject: x\r\n\r\n")) == [str(replies.CHUNK_OK)]
    assert driver.send(bdat(b"..dots\r\n.\r")) == [str(replies.CHUNK_OK)]
    assert driver.send(bdat(b"\nz\n", last=True)) == [str(replies.BARE_LINE_ENDING)]
    driver = in_transaction()
    lines = driver.send(bdat(b"Subject: x\r\n\r\n") + bdat(b"..dots\r\n.\r")
                        + bdat(b"\nz\r\n", last=True))
    assert lines == [str(replies.CHUNK_OK)] * 2 + ["250 2.0.0 Ok: queued as TEST0001"]
    assert stored(driver) == [b"Subject: x\r\n\r\n..dots\r\n.\r\nz\r\n"]


def test_bdat_chunk_containing_end_marker() -> None:
    """CRLF.CRLF inside a chunk ends nothing and nothing in it runs as a command."""
    driver = in_transaction()
    chunk = b"a\r\n.\r\nQUIT\r\n"
    assert driver.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk) == [
        "250 2.0.0 Ok: queued as TEST0001"
    ]
    assert stored(driver) == [chunk]
    assert not driver.closed


def test_bdat_zero_last() -> None:
    """BDAT 0 LAST ends a chunked message; alone it sends an empty one."""
    driver = in_transaction()
    assert driver.codes(bdat(b"ab\r\n") + b"BDAT 0 LAST\r\n") == [250, 250]
    assert stored(driver) == [b"ab\r\n"]
    driver = in_transaction()
    assert driver.codes(b"BDAT 0 LAST\r\n") == [250]
    assert stored(driver) == [b""]


def test_bdat_data_split_across_reads() -> None:
    """Chunk data may arrive one byte at a time, and the next command straight after it."""
    driver = in_transaction()
    data = bdat(b"ab\r\ncd\r\n", last=True) + b"NOOP\r\n"
    lines: list[str] = []
    for index in range(len(data)):
        lines += driver.send(data[index : index + 1])
    assert lines == ["250 2.0.0 Ok: queued as TEST0001", "250 2.0.0 Ok"]
    assert stored(driver) == [b"ab\r\ncd\r\n"]


def test_bdat_last_line_without_crlf() -> None:
    """A chunked message whose last line lacks CRLF gets one."""
    driver = in_transaction()
    assert driver.codes(b"BDAT 5 LAST\r\nab\r\nc") == [250]
    assert stored(driver) == [b"ab\r\nc\r\n"]


def test_bdat_size_exceeded_then_refused_until_rset() -> None:
    """A chunk that exceeds the size gets 552; further BDAT gets 503 until RSET or MAIL."""
    driver = in_transaction(max_message_size=10)
    assert driver.send(bdat(b"1234567\n")) == [str(replies.BARE_LINE_ENDING)]
    driver = in_transaction()
    assert driver.send(bdat(b"12\r3")) == [str(replies.BARE_LINE_ENDING)]
    driver = in_transaction()
    assert driver.send(bdat(b"123\r") + bdat(b"\n", last=True)) == [
        str(replies.CHUNK_OK), "250 2.0.0 Ok: queued as TEST0001"]
    driver = in_transaction(max_message_size=10)
    assert driver.send(b"BDAT 12\r\n1234567890\r\n") == [str(replies.MESSAGE_TOO_BIG)]
    assert driver.send(b"BDAT 4 LAST\r\nab\r\n") == [str(replies.CHUNK_AFTER_FAILURE)]
    assert driver.codes(b"DATA\r\n") == [503]
    assert driver.codes(b"RSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n"
                        b"BDAT 4 LAST\r\nab\r\n") == [250, 250, 250, 250]
    assert driver.factory.sink.submitted[0][1].endswith(b"\r\nab\r\n")  # type: ignore[attr-defined]


def test_mail_after_failed_bdat_starts_over() -> None:
    """After a failed chunk a new MAIL starts a new transaction (RFC 3030 §2)."""
    driver = in_transaction(max_message_size=10)
    driver.send(b"BDAT 12\r\n1234567890\r\n")
    assert driver.codes(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n"
                        b"BDAT 4 LAST\r\nok\r\n") == [250, 250, 250]


def test_bdat_long_line_and_loop() -> None:
    """BDAT applies the line limit and loop detection like DATA."""
    driver = in_transaction(max_line_length=50)
    assert driver.codes(b"BDAT 62 LAST\r\n" + b"x" * 60 + b"\r\n") == [550]
    driver = in_transaction(max_received_headers=1)
    chunk = b"Received: a\r\nReceived: b\r\n\r\nx\r\n"
    assert driver.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk) == [str(replies.LOOP_DETECTED)]


def test_bdat_out_of_sequence_still_reads_the_chunk() -> None:
    """BDAT without a transaction is refused after its octets are read, so they never run as
    commands."""
    driver = SessionDriver(make_factory())
    driver.lines()
    driver.send(b"EHLO x\r\n")
    assert driver.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n") == [str(replies.NEED_MAIL), "250 2.0.0 Ok"]
    assert not driver.closed
    driver.send(b"MAIL FROM:<a@b.test>\r\n")
    assert driver.send(b"BDAT 6 LAST\r\nQUIT\r\n") == [str(replies.NO_VALID_RECIPIENTS)]
    assert not driver.closed


@pytest.mark.parametrize(
    "command",
    [b"BDAT\r\n", b"BDAT x\r\n", b"BDAT -1\r\n", b"BDAT 1 FIRST\r\n", b"BDAT 1 LAST x\r\n"],
)
def test_bdat_syntax(command: bytes) -> None:
    """A malformed BDAT is a syntax error."""
    assert in_transaction().codes(command) == [501]


def test_rcpt_and_data_after_bdat_are_out_of_sequence() -> None:
    """Once BDAT started a message, RCPT and DATA are out of sequence."""
    driver = in_transaction()
    data = b"BDAT 4\r\nab\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    assert driver.codes(data) == [250, 503, 503]
    assert driver.codes(b"BDAT 0 LAST\r\n") == [250]


def test_received_header_keeps_utf8_with_smtputf8() -> None:
    """With SMTPUTF8 the Received 'for' clause keeps a UTF-8 address (RFC 6532); without,
    non-ASCII HELO text is replaced."""
    from mailsys.smtp.policy import InboundPolicy
    from mailsys.smtp.testing import StaticRouter

    router = StaticRouter({"example.test"}, {"jörg@example.test", "alice@example.test"})
    driver = SessionDriver(make_factory(policy=InboundPolicy(router)))
    driver.send("EHLO clïent\r\nMAIL FROM:<a@b.test> SMTPUTF8\r\nRCPT TO:<jörg@example.test>\r\n"
                "DATA\r\nx\r\n.\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n"
                "DATA\r\ny\r\n.\r\n".encode())
    first, second = (m for _, m in driver.factory.sink.accepted)  # type: ignore[attr-defined]
    assert "from clïent ".encode() in first and "for <jörg@example.test>".encode() in first
    assert b"from cl?ent " in second
