"""Tests for mailsys.address: RFC 5321 paths, ESMTP parameters, IDNA, SMTPUTF8 and xtext."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailsys import replies
from mailsys.address import (
    AddressError,
    Mailbox,
    decode_xtext,
    encode_xtext,
    normalise_domain,
    parse_mail,
    parse_mailbox,
    parse_rcpt,
)


def refusal(call: object, *args: object, **kwargs: object) -> replies.Reply:
    assert callable(call)
    with pytest.raises(AddressError) as info:
        call(*args, **kwargs)
    return info.value.reply


# --- paths ---------------------------------------------------------------------------------------


def test_simple_sender() -> None:
    """A plain MAIL FROM path gives the mailbox with the domain lower-cased."""
    request = parse_mail("FROM:<Alice.Smith@Example.ORG>")
    assert request.sender == Mailbox("Alice.Smith", "example.org")
    assert str(request.sender) == "Alice.Smith@example.org"


def test_keyword_is_case_insensitive_and_space_after_colon_tolerated() -> None:
    """'from: <x>' is accepted like 'FROM:<x>' (Postfix does the same)."""
    assert parse_mail("from: <a@b.test>").sender == Mailbox("a", "b.test")
    assert parse_rcpt("tO:<a@b.test>").recipient == Mailbox("a", "b.test")


def test_null_reverse_path() -> None:
    """MAIL FROM:<> is the null path (RFC 5321 §4.5.5): sender None."""
    assert parse_mail("FROM:<>").sender is None
    assert parse_mail("FROM:<> SIZE=10").size == 10


def test_null_path_refused_for_rcpt() -> None:
    """RCPT TO:<> is a syntax error."""
    assert refusal(parse_rcpt, "TO:<>") == replies.BAD_RECIPIENT_SYNTAX


def test_source_route_is_ignored() -> None:
    """A source route <@a,@b:user@d> is accepted and dropped (RFC 5321 §4.1.1.3, appendix C)."""
    assert parse_rcpt("TO:<@relay.one,@relay.two:user@Dest.test>").recipient == Mailbox(
        "user", "dest.test"
    )


def test_quoted_local_part_kept_as_given() -> None:
    """A quoted local part, even with '>' and '@' inside, is kept verbatim."""
    request = parse_rcpt('TO:<"john >@ doe"@example.test> NOTIFY=NEVER')
    assert request.recipient == Mailbox('"john >@ doe"', "example.test")
    assert request.notify == ("NEVER",)


def test_quoted_pair_in_local_part() -> None:
    """Backslash pairs are allowed inside a quoted local part."""
    assert parse_rcpt('TO:<"a\\"b"@x.test>').recipient.local_part == '"a\\"b"'


def test_local_part_case_is_kept() -> None:
    """Only the domain is lower-cased; the local part belongs to the receiving host."""
    assert parse_rcpt("TO:<MiXeD@MiXeD.Test>").recipient == Mailbox("MiXeD", "mixed.test")


@pytest.mark.parametrize(
    ("text", "domain"),
    [
        ("TO:<u@[192.0.2.1]>", "[192.0.2.1]"),
        ("TO:<u@[IPv6:2001:DB8:0:0::1]>", "[IPv6:2001:db8::1]"),
        ("TO:<u@[ipv6:::1]>", "[IPv6:::1]"),
        ("TO:<u@[x-tag:some-thing]>", "[x-tag:some-thing]"),
    ],
)
def test_address_literals(text: str, domain: str) -> None:
    """Address literals (RFC 5321 §4.1.3) are accepted and written canonically."""
    assert parse_rcpt(text).recipient.domain == domain


@pytest.mark.parametrize(
    "text",
    ["TO:<u@[192.0.2.256]>", "TO:<u@[IPv6:nonsense]>", "TO:<u@[1.2.3]>", "TO:<u@[]>"],
)
def test_bad_address_literals(text: str) -> None:
    """Malformed address literals are syntax errors."""
    assert refusal(parse_rcpt, text) == replies.BAD_RECIPIENT_SYNTAX


@pytest.mark.parametrize(
    "text",
    [
        "TO:user@example.test",  # no angle brackets
        "TO:<user>",  # no domain
        "TO:<user@>",
        "TO:<@example.test>",
        "TO:<user@example..test>",
        "TO:<user@-example.test>",
        "TO:<user@example.test.>",
        "TO:<us er@example.test>",
        "TO:<user@example.test",
        "TO:<user@example.test>junk",
        "TO:<.user@example.test>",
        "TO:<user.@example.test>",
        "TO:<a@b@c.test>",
        'TO:<"unterminated@example.test>',
    ],
)
def test_malformed_recipient_paths(text: str) -> None:
    """Malformed forward-paths get 501 5.1.3."""
    assert refusal(parse_rcpt, text) == replies.BAD_RECIPIENT_SYNTAX


def test_malformed_sender_path() -> None:
    """A malformed reverse-path gets 501 5.1.7."""
    assert refusal(parse_mail, "FROM:<bad address>") == replies.BAD_SENDER_SYNTAX


def test_missing_from_keyword() -> None:
    """MAIL without FROM: is a plain syntax error."""
    assert refusal(parse_mail, "<a@b.test>") == replies.SYNTAX_ERROR
    assert refusal(parse_rcpt, "FROM:<a@b.test>") == replies.SYNTAX_ERROR


def test_bare_postmaster() -> None:
    """RCPT TO:<Postmaster> without a domain is accepted, case-insensitively (§4.1.1.3)."""
    recipient = parse_rcpt("TO:<PostMaster>").recipient
    assert recipient.is_bare_postmaster
    assert str(recipient) == "postmaster"


def test_bare_postmaster_not_a_sender() -> None:
    """MAIL FROM:<postmaster> without a domain is a syntax error."""
    assert refusal(parse_mail, "FROM:<postmaster>") == replies.BAD_SENDER_SYNTAX


# --- length limits (RFC 5321 §4.5.3.1) -----------------------------------------------------------


def test_local_part_limit() -> None:
    """A local part of 64 octets is accepted; 65 is refused as too long."""
    assert parse_rcpt(f"TO:<{'a' * 64}@x.test>").recipient.local_part == "a" * 64
    assert refusal(parse_rcpt, f"TO:<{'a' * 65}@x.test>") == replies.RECIPIENT_TOO_LONG


def test_path_limit() -> None:
    """A path over 256 octets including brackets is refused."""
    domain = ".".join(["d" * 60] * 4)[:240] + ".test"
    assert len(f"<a@{domain}>") > 240
    local = "b" * (256 - len(f"<@{domain}>"))
    assert parse_rcpt(f"TO:<{local}@{domain}>")
    assert refusal(parse_rcpt, f"TO:<{local}x@{domain}>") == replies.RECIPIENT_TOO_LONG
    assert refusal(parse_mail, f"FROM:<{local}x@{domain}>") == replies.SENDER_TOO_LONG


def test_path_limit_counts_octets() -> None:
    """Non-ASCII characters count by their UTF-8 octets."""
    local = "é" * 33  # 66 octets
    assert refusal(parse_rcpt, f"TO:<{local}@x.test>", smtputf8=True) == replies.RECIPIENT_TOO_LONG


def test_label_limit() -> None:
    """A DNS label over 63 octets is refused."""
    assert refusal(parse_rcpt, f"TO:<a@{'l' * 64}.test>") == replies.BAD_RECIPIENT_SYNTAX


# --- SMTPUTF8 and IDNA ---------------------------------------------------------------------------


def test_non_ascii_needs_smtputf8() -> None:
    """A non-ASCII address without SMTPUTF8 gets 553 5.6.7."""
    assert refusal(parse_mail, "FROM:<jörg@example.test>") == replies.SMTPUTF8_REQUIRED
    assert refusal(parse_rcpt, "TO:<jörg@example.test>") == replies.SMTPUTF8_REQUIRED
    assert refusal(parse_rcpt, "TO:<a@bücher.test>") == replies.SMTPUTF8_REQUIRED


def test_non_ascii_with_smtputf8() -> None:
    """With SMTPUTF8 on MAIL the same addresses are accepted."""
    request = parse_mail("FROM:<jörg@Bücher.test> SMTPUTF8")
    assert request.smtputf8
    assert request.sender == Mailbox("jörg", "xn--bcher-kva.test")
    assert request.sender.needs_smtputf8
    assert parse_rcpt("TO:<用户@例子.test>", smtputf8=True).recipient.local_part == "用户"


def test_idna_u_and_a_labels_normalise_alike() -> None:
    """A U-label domain and its A-label form give the same normalised domain."""
    u = parse_rcpt("TO:<a@BÜCHER.test>", smtputf8=True).recipient
    a = parse_rcpt("TO:<a@XN--BCHER-KVA.test>").recipient
    assert u.domain == a.domain == "xn--bcher-kva.test"
    assert a.domain_unicode == "bücher.test"


def test_normalise_domain() -> None:
    """normalise_domain lower-cases ASCII and encodes IDNs as A-labels."""
    assert normalise_domain("Example.TEST") == "example.test"
    assert normalise_domain("münchen.test") == "xn--mnchen-3ya.test"


def test_parse_mailbox() -> None:
    """parse_mailbox reads a bare local@domain."""
    assert parse_mailbox("Bob@Example.test") == Mailbox("Bob", "example.test")
    with pytest.raises(AddressError):
        parse_mailbox("<bob@example.test>")


# --- MAIL parameters -----------------------------------------------------------------------------


def test_all_mail_parameters() -> None:
    """SIZE, BODY, SMTPUTF8, RET and ENVID are parsed, keywords case-insensitively."""
    request = parse_mail("FROM:<a@b.test> size=1000 Body=8bitmime SMTPUTF8 ret=hdrs ENVID=QQ+2B1")
    assert request.size == 1000
    assert request.body == "8BITMIME"
    assert request.smtputf8
    assert request.ret == "HDRS"
    assert request.envid == "QQ+1"


def test_body_7bit() -> None:
    """BODY=7BIT is accepted."""
    assert parse_mail("FROM:<a@b.test> BODY=7BIT").body == "7BIT"


@pytest.mark.parametrize(
    ("text", "reply"),
    [
        ("FROM:<a@b.test> FOO=1", replies.BAD_PARAMETER),
        ("FROM:<a@b.test> NOTIFY=NEVER", replies.BAD_PARAMETER),  # an RCPT parameter
        ("FROM:<a@b.test> AUTH=<>", replies.BAD_PARAMETER),  # AUTH not offered: auth=False
        ("FROM:<a@b.test> SIZE=1 SIZE=2", replies.DUPLICATE_PARAMETER),
        ("FROM:<a@b.test> size=1 SIZE=1", replies.DUPLICATE_PARAMETER),
        ("FROM:<a@b.test> SIZE=abc", replies.BAD_PARAMETER_VALUE),
        ("FROM:<a@b.test> SIZE=-1", replies.BAD_PARAMETER_VALUE),
        ("FROM:<a@b.test> SIZE=" + "9" * 21, replies.BAD_PARAMETER_VALUE),
        ("FROM:<a@b.test> SIZE", replies.BAD_PARAMETER_VALUE),
        ("FROM:<a@b.test> SIZE=", replies.BAD_PARAMETER_VALUE),
        ("FROM:<a@b.test> BODY=BINARYMIME", replies.BAD_PARAMETER),
        ("FROM:<a@b.test> BODY=9BIT", replies.BAD_PARAMETER),
        ("FROM:<a@b.test> SMTPUTF8=yes", replies.BAD_PARAMETER_VALUE),
        ("FROM:<a@b.test> RET=ALL", replies.BAD_PARAMETER_VALUE),
        ("FROM:<a@b.test> ENVID=bad+zz", replies.BAD_PARAMETER_VALUE),
        ("FROM:<a@b.test> ENVID=" + "x" * 101, replies.BAD_PARAMETER_VALUE),
        ("FROM:<a@b.test> -X=1", replies.BAD_PARAMETER_VALUE),
        ("FROM:<a@b.test> SIZE=1=2", replies.BAD_PARAMETER_VALUE),
    ],
)
def test_bad_mail_parameters(text: str, reply: replies.Reply) -> None:
    """Unknown or duplicated parameters get 555 5.5.4, malformed values 501 5.5.4."""
    assert refusal(parse_mail, text) == reply


def test_parameters_not_allowed_after_helo() -> None:
    """Without EHLO no parameter is known (RFC 5321 §4.1.1.11)."""
    assert refusal(parse_mail, "FROM:<a@b.test> SIZE=1", extended=False) == replies.BAD_PARAMETER
    assert parse_mail("FROM:<a@b.test>", extended=False).size is None


def test_extra_spaces_between_parameters() -> None:
    """Runs of spaces between parameters are tolerated."""
    assert parse_mail("FROM:<a@b.test>  SIZE=5   BODY=7BIT").size == 5


def test_parameter_needs_space_after_path() -> None:
    """Text glued to the path is refused."""
    assert refusal(parse_mail, "FROM:<a@b.test>SIZE=5") == replies.BAD_SENDER_SYNTAX


# --- RCPT parameters -----------------------------------------------------------------------------


def test_notify_list() -> None:
    """NOTIFY takes a comma list, case-insensitively."""
    assert parse_rcpt("TO:<a@b.test> NOTIFY=success,Delay").notify == ("SUCCESS", "DELAY")


@pytest.mark.parametrize(
    "value", ["NEVER,SUCCESS", "SUCCESS,SUCCESS", "ALWAYS", "", "SUCCESS,", "FAILURE,NEVER"]
)
def test_bad_notify(value: str) -> None:
    """NEVER is exclusive; unknown, empty or repeated values are refused."""
    assert refusal(parse_rcpt, f"TO:<a@b.test> NOTIFY={value}").code in (501, 555)


def test_orcpt_decoded() -> None:
    """ORCPT keeps its address type and is xtext-decoded."""
    request = parse_rcpt("TO:<a@b.test> ORCPT=rfc822;Bob+2Bsub+3Dx@B.test")
    assert request.orcpt == "rfc822;Bob+sub=x@B.test"


@pytest.mark.parametrize(
    "value", ["rfc822", "rfc822;", ";a@b.test", "rfc822;a+2", "rfc 822;a@b", "rfc822;a+GGb"]
)
def test_bad_orcpt(value: str) -> None:
    """ORCPT needs addr-type;xtext."""
    assert refusal(parse_rcpt, f"TO:<a@b.test> ORCPT={value}").code in (501, 555)


def test_unknown_rcpt_parameter() -> None:
    """SIZE on RCPT is an unknown parameter."""
    assert refusal(parse_rcpt, "TO:<a@b.test> SIZE=1") == replies.BAD_PARAMETER


def test_duplicate_rcpt_parameter() -> None:
    """A repeated NOTIFY is refused."""
    text = "TO:<a@b.test> NOTIFY=NEVER NOTIFY=NEVER"
    assert refusal(parse_rcpt, text) == replies.DUPLICATE_PARAMETER


# --- xtext ---------------------------------------------------------------------------------------


def test_xtext_decoding() -> None:
    """+HH escapes are decoded (RFC 3461 §4)."""
    assert decode_xtext("a+2Bb+3Dc+20d") == "a+b=c d"
    with pytest.raises(ValueError):
        decode_xtext("a=b")
    with pytest.raises(ValueError):
        decode_xtext("a b")


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127)))
def test_xtext_round_trip(text: str) -> None:
    """encode_xtext output decodes back to the input (ASCII)."""
    encoded = encode_xtext(text)
    assert encoded.isascii() and " " not in encoded and "=" not in encoded
    assert decode_xtext(encoded) == text


@given(st.text(max_size=300))
def test_parser_never_raises_anything_else(text: str) -> None:
    """Any input either parses or raises AddressError carrying a 5xx reply."""
    for call in (
        lambda: parse_mail(text),
        lambda: parse_rcpt(text),
        lambda: parse_mail("FROM:" + text),
        lambda: parse_rcpt("TO:<" + text, smtputf8=True),
    ):
        try:
            call()
        except AddressError as error:
            assert 500 <= error.reply.code < 600


def test_auth_parameter_where_auth_is_offered() -> None:
    """AUTH= (RFC 4954 §5) is accepted with auth=True: <> or an xtext mailbox, decoded."""
    assert parse_mail("FROM:<a@b.test> AUTH=<>", auth=True).auth == "<>"
    assert parse_mail("FROM:<a@b.test> AUTH=a+2Bb@b.test", auth=True).auth == "a+b@b.test"
    assert parse_mail("FROM:<a@b.test>", auth=True).auth is None
    for bad in ("AUTH", "AUTH=a+zz", "AUTH=" + "x" * 300):
        with pytest.raises(AddressError) as caught:
            parse_mail(f"FROM:<a@b.test> {bad}", auth=True)
        assert caught.value.reply == replies.BAD_PARAMETER_VALUE
