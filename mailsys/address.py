"""Mail addresses as SMTP carries them: RFC 5321 paths, their ESMTP parameters, IDNA and SMTPUTF8.

This module owns the syntax of ``MAIL FROM:<...>`` and ``RCPT TO:<...>`` (RFC 5321 §4.1.2), the
meaning of the parameters we advertise (SIZE, BODY, SMTPUTF8, RET, ENVID, NOTIFY, ORCPT), xtext
(RFC 3461 §4) and the normalised form an address has everywhere else in mailsys: the local part as
the client gave it, the domain lower-cased and in IDNA A-label form. Every refusal is an
``AddressError`` carrying the Reply to send. Nothing here knows sessions or policy.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mailsys import replies
from mailsys.replies import Reply

# RFC 5321 §4.5.3.1.1-3: size limits, in octets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
# RFC 3461 §4.4 and §4.2.
MAX_ENVID = 100
MAX_ORCPT = 500

# --- RFC 5321 §4.1.2 grammar, extended for RFC 6531 (UTF8-non-ascii in atoms, quoted strings and
# sub-domains). Whether non-ASCII is allowed is decided after matching, from the SMTPUTF8 flag.
_UTF8 = "\u0080-\U0010ffff"
_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~\\-"
_ATOM = f"[{_ATEXT}{_UTF8}]+"
_DOT_STRING = f"{_ATOM}(?:\\.{_ATOM})*"
# QcontentSMTP = qtextSMTP / quoted-pairSMTP
_QUOTED = f'"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e{_UTF8}]|\\\\[\\x20-\\x7e])*"'
_LET_DIG = f"[A-Za-z0-9{_UTF8}]"
_SUB_DOMAIN = f"{_LET_DIG}(?:[A-Za-z0-9{_UTF8}-]*{_LET_DIG})?"
_DOMAIN = f"{_SUB_DOMAIN}(?:\\.{_SUB_DOMAIN})*"
# address-literal: checked further by _normalise_literal.
_LITERAL = "\\[[\\x21-\\x5a\\x5e-\\x7e]+\\]"
# A-d-l: a source route, which RFC 5321 §4.1.1.3 and appendix C tell us to accept and ignore.
_ADL = f"@{_DOMAIN}(?:,@{_DOMAIN})*"
_MAILBOX = f"(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})"

_PATH_RE = re.compile(f"<(?:{_ADL}:)?{_MAILBOX}>")
_MAILBOX_RE = re.compile(_MAILBOX)
_POSTMASTER_RE = re.compile("<postmaster>", re.IGNORECASE)
# esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
_KEYWORD_RE = re.compile("[A-Za-z0-9][A-Za-z0-9-]*")
# esmtp-value = 1*(%d33-60 / %d62-126), plus UTF8-non-ascii with SMTPUTF8 (RFC 6531 §3.3)
_VALUE_RE = re.compile(f"[\\x21-\\x3c\\x3e-\\x7e{_UTF8}]+")
# RFC 3461 §4: xtext = *( xchar / hexchar ); hexchar = "+" 2(%x30-39 / %x41-46).
# We accept lower-case hex digits too (liberal in what we accept).
_XTEXT_RE = re.compile(f"(?:[\\x21-\\x2a\\x2c-\\x3c\\x3e-\\x7e{_UTF8}]|\\+[0-9A-Fa-f]{{2}})*")
_HEXCHAR_RE = re.compile("\\+([0-9A-Fa-f]{2})")
_ADDR_TYPE_RE = re.compile(f"[{_ATEXT}]+")

MAIL_PARAMETERS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"})
# RFC 4954 §5: AUTH=, accepted only where the AUTH extension is offered.
MAIL_PARAMETERS_WITH_AUTH = MAIL_PARAMETERS | {"AUTH"}
RCPT_PARAMETERS = frozenset({"NOTIFY", "ORCPT"})
_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


class AddressError(ValueError):
    """A path or parameter the server refuses; ``reply`` is what to tell the client."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(detail or reply.text)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A normalised mailbox ``local_part@domain``.

    ``local_part`` is exactly as the client sent it (quotes included, case kept: RFC 5321 §2.4
    lets only the receiving host interpret it). ``domain`` is lower case, IDNA A-labels for
    internationalised names, and ``[...]`` for address literals. The one mailbox without a domain
    is the bare ``postmaster`` of RFC 5321 §4.1.1.3, which the policy maps to a local domain.
    """

    local_part: str
    domain: str

    def __str__(self) -> str:
        if not self.domain:
            return self.local_part
        return f"{self.local_part}@{self.domain}"

    @property
    def is_bare_postmaster(self) -> bool:
        """True for ``RCPT TO:<postmaster>`` without a domain (RFC 5321 §4.1.1.3)."""
        return not self.domain

    @property
    def needs_smtputf8(self) -> bool:
        """True when the local part is not ASCII (the domain is always kept as A-labels)."""
        return not self.local_part.isascii()

    @property
    def domain_unicode(self) -> str:
        """The domain with U-labels, for display; the A-label form when it does not decode."""
        if "xn--" not in self.domain:
            return self.domain
        try:
            return self.domain.encode("ascii").decode("idna")
        except UnicodeError:
            return self.domain


@dataclass(frozen=True, slots=True)
class MailRequest:
    """A parsed ``MAIL FROM``: the reverse-path (None is the null path ``<>``) and parameters."""

    sender: Mailbox | None
    size: int | None = None  # RFC 1870
    body: str | None = None  # RFC 6152: "7BIT" or "8BITMIME"
    smtputf8: bool = False  # RFC 6531
    ret: str | None = None  # RFC 3461 §4.3: "FULL" or "HDRS"
    envid: str | None = None  # RFC 3461 §4.4, xtext-decoded
    auth: str | None = None  # RFC 4954 §5, xtext-decoded; "<>" when the submitter is unknown


@dataclass(frozen=True, slots=True)
class RcptRequest:
    """A parsed ``RCPT TO``: the forward-path and its DSN parameters (RFC 3461 §4.1-4.2)."""

    recipient: Mailbox
    notify: tuple[str, ...] | None = None  # ("NEVER",) or a subset of SUCCESS, FAILURE, DELAY
    orcpt: str | None = None  # "addr-type;address", the address xtext-decoded


def parse_mail(argument: str, *, extended: bool = True, auth: bool = False) -> MailRequest:
    """Parse what follows ``MAIL `` (``FROM:<path> [params]``).

    ``extended`` is False after HELO: RFC 5321 §4.1.1.11 allows parameters only after EHLO.
    ``auth`` is True where the AUTH extension is offered, which allows the AUTH= parameter.
    """
    path, match, params = _split(argument, "FROM:", replies.BAD_SENDER_SYNTAX, allow_null=True)
    allowed = MAIL_PARAMETERS_WITH_AUTH if auth else MAIL_PARAMETERS
    values = _parameters(params, allowed if extended else frozenset())
    smtputf8 = False
    if "SMTPUTF8" in values:
        if values["SMTPUTF8"] is not None:
            raise AddressError(replies.BAD_PARAMETER_VALUE, "SMTPUTF8 takes no value")
        smtputf8 = True
    _check_ascii(argument, smtputf8)
    sender = None
    if match is not None:
        sender = _path(path, match, replies.BAD_SENDER_SYNTAX, replies.SENDER_TOO_LONG)
    elif path != "<>":
        raise AddressError(replies.BAD_SENDER_SYNTAX, "postmaster is not a sender")
    size = None
    if (value := _valued(values, "SIZE")) is not None:
        # RFC 1870 §3: size-value = 1*20DIGIT
        if not (value.isascii() and value.isdigit() and len(value) <= 20):
            raise AddressError(replies.BAD_PARAMETER_VALUE, "SIZE")
        size = int(value)
    body = None
    if (value := _valued(values, "BODY")) is not None:
        body = value.upper()
        if body not in ("7BIT", "8BITMIME"):  # BINARYMIME (RFC 3030) is not offered
            raise AddressError(replies.BAD_PARAMETER, "BODY")
    ret = None
    if (value := _valued(values, "RET")) is not None:
        ret = value.upper()
        if ret not in ("FULL", "HDRS"):
            raise AddressError(replies.BAD_PARAMETER_VALUE, "RET")
    envid = None
    if (value := _valued(values, "ENVID")) is not None:
        envid = _xtext_value(value, "ENVID")
        if len(envid) > MAX_ENVID:
            raise AddressError(replies.BAD_PARAMETER_VALUE, "ENVID too long")
    submitter = None
    if (value := _valued(values, "AUTH")) is not None:
        # RFC 4954 §5: AUTH=<mailbox> in xtext, or AUTH=<> (the original submitter is unknown).
        # It is only recorded: trusting it is the policy's business, and we do not.
        submitter = _xtext_value(value, "AUTH")
        if len(submitter) > MAX_PATH:
            raise AddressError(replies.BAD_PARAMETER_VALUE, "AUTH too long")
    return MailRequest(sender, size=size, body=body, smtputf8=smtputf8, ret=ret, envid=envid,
                       auth=submitter)


def parse_rcpt(argument: str, *, smtputf8: bool = False, extended: bool = True) -> RcptRequest:
    """Parse what follows ``RCPT `` (``TO:<path> [params]``).

    ``smtputf8`` says whether the transaction's MAIL carried SMTPUTF8 (RFC 6531 §3.4).
    """
    path, match, params = _split(argument, "TO:", replies.BAD_RECIPIENT_SYNTAX, allow_null=False)
    values = _parameters(params, RCPT_PARAMETERS if extended else frozenset())
    _check_ascii(argument, smtputf8)
    if match is None:
        # RFC 5321 §4.1.1.3: "<Postmaster>" without a domain, case-insensitive.
        recipient = Mailbox("postmaster", "")
    else:
        recipient = _path(path, match, replies.BAD_RECIPIENT_SYNTAX, replies.RECIPIENT_TOO_LONG)
    notify = None
    if (value := _valued(values, "NOTIFY")) is not None:
        # RFC 3461 §4.1: "NEVER" / 1#( "SUCCESS" / "FAILURE" / "DELAY" )
        items = tuple(item.upper() for item in value.split(","))
        if items != ("NEVER",) and (
            len(set(items)) != len(items) or not set(items) <= _NOTIFY_VALUES
        ):
            raise AddressError(replies.BAD_PARAMETER_VALUE, "NOTIFY")
        notify = items
    orcpt = None
    if (value := _valued(values, "ORCPT")) is not None:
        # RFC 3461 §4.2: ORCPT=addr-type ";" xtext
        addr_type, semi, encoded = value.partition(";")
        if not semi or not _ADDR_TYPE_RE.fullmatch(addr_type) or not encoded:
            raise AddressError(replies.BAD_PARAMETER_VALUE, "ORCPT")
        decoded = _xtext_value(encoded, "ORCPT")
        if len(decoded) > MAX_ORCPT or not decoded:
            raise AddressError(replies.BAD_PARAMETER_VALUE, "ORCPT")
        orcpt = f"{addr_type};{decoded}"
    return RcptRequest(recipient, notify=notify, orcpt=orcpt)


def parse_mailbox(text: str, *, smtputf8: bool = True) -> Mailbox:
    """Parse and normalise a bare ``local@domain`` (no angle brackets, no parameters)."""
    match = _MAILBOX_RE.fullmatch(text)
    if match is None:
        raise AddressError(replies.BAD_RECIPIENT_SYNTAX, f"not a mailbox: {text!r}")
    _check_ascii(text, smtputf8)
    return _mailbox(match.group("local"), match.group("domain"), replies.BAD_RECIPIENT_SYNTAX,
                    replies.RECIPIENT_TOO_LONG)


def normalise_domain(domain: str) -> str:
    """Lower case and IDNA A-labels; raise AddressError for a domain that cannot be encoded."""
    if domain.isascii():
        ascii_domain = domain.lower()
    else:
        try:
            ascii_domain = domain.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise AddressError(replies.BAD_RECIPIENT_SYNTAX, "bad IDN") from None
    # RFC 1035 §2.3.4: labels are at most 63 octets.
    if any(len(label) > 63 for label in ascii_domain.split(".")):
        raise AddressError(replies.BAD_RECIPIENT_SYNTAX, "label too long")
    return ascii_domain


def decode_xtext(text: str) -> str:
    """Decode RFC 3461 §4 xtext (``+HH`` escapes); raise ValueError when malformed."""
    if _XTEXT_RE.fullmatch(text) is None:
        raise ValueError(f"malformed xtext: {text!r}")
    if "+" not in text:
        return text
    return _HEXCHAR_RE.sub(lambda m: chr(int(m.group(1), 16)), text)


def encode_xtext(text: str) -> str:
    """Encode ``text`` as RFC 3461 §4 xtext: '+', '=' and anything outside 33-126 as ``+HH``."""
    out = []
    for char in text:
        code = ord(char)
        if 33 <= code <= 126 and char not in "+=":
            out.append(char)
        else:
            out.extend(f"+{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


# --- internals ---------------------------------------------------------------------------------


def _split(
    argument: str, prefix: str, syntax: Reply, *, allow_null: bool
) -> tuple[str, re.Match[str] | None, str]:
    """Split ``FROM:<path> params`` into the path text, its match of ``_PATH_RE`` (None for
    ``<>`` and ``<postmaster>``) and the parameter text."""
    if argument[: len(prefix)].upper() != prefix:
        raise AddressError(replies.SYNTAX_ERROR, f"expected {prefix}")
    # RFC 5321 has no space after the colon; many clients send one and Postfix accepts it.
    rest = argument[len(prefix):].lstrip(" ")
    match = None
    if allow_null and rest.startswith("<>"):
        end = 2
    else:
        match = _PATH_RE.match(rest)
        bare = _POSTMASTER_RE.match(rest) if match is None else None
        if match is not None:
            end = match.end()
        elif bare is not None:
            end = bare.end()
        else:
            raise AddressError(syntax, f"bad path {rest[:80]!r}")
    params = rest[end:]
    if params and params[0] != " ":
        raise AddressError(syntax, "junk after path")
    return rest[:end], match, params


def _parameters(text: str, allowed: frozenset[str]) -> dict[str, str | None]:
    """Parse ``esmtp-param *(SP esmtp-param)``: upper-cased keyword -> value (None if bare)."""
    values: dict[str, str | None] = {}
    for token in text.split(" "):
        if not token:  # tolerate runs of spaces
            continue
        keyword, equals, value = token.partition("=")
        if _KEYWORD_RE.fullmatch(keyword) is None:
            raise AddressError(replies.BAD_PARAMETER_VALUE, f"bad parameter {token[:40]!r}")
        keyword = keyword.upper()
        if keyword not in allowed:
            # RFC 5321 §4.1.1.11: an unrecognised parameter gets 555.
            raise AddressError(replies.BAD_PARAMETER, f"unknown parameter {keyword}")
        if keyword in values:
            raise AddressError(replies.DUPLICATE_PARAMETER, f"duplicate parameter {keyword}")
        if equals and _VALUE_RE.fullmatch(value) is None:
            raise AddressError(replies.BAD_PARAMETER_VALUE, f"bad value for {keyword}")
        values[keyword] = value if equals else None
    return values


def _valued(values: dict[str, str | None], keyword: str) -> str | None:
    """The value of ``keyword`` if present; a keyword that needs a value but has none is refused."""
    if keyword not in values:
        return None
    value = values[keyword]
    if value is None:
        raise AddressError(replies.BAD_PARAMETER_VALUE, f"{keyword} needs a value")
    return value


def _xtext_value(value: str, keyword: str) -> str:
    try:
        return decode_xtext(value)
    except ValueError:
        raise AddressError(replies.BAD_PARAMETER_VALUE, f"{keyword} is not xtext") from None


def _check_ascii(text: str, smtputf8: bool) -> None:
    # RFC 6531 §3.4: non-ASCII addresses and parameters need SMTPUTF8 on MAIL.
    if not smtputf8 and not text.isascii():
        raise AddressError(replies.SMTPUTF8_REQUIRED)


def _path(path: str, match: re.Match[str], syntax: Reply, too_long: Reply) -> Mailbox:
    # RFC 5321 §4.5.3.1.3: a path is at most 256 octets including the punctuation.
    if len(path) > MAX_PATH or len(path.encode("utf-8")) > MAX_PATH:
        raise AddressError(too_long)
    return _mailbox(match.group("local"), match.group("domain"), syntax, too_long)


def _mailbox(local: str, domain: str, syntax: Reply, too_long: Reply) -> Mailbox:
    # RFC 5321 §4.5.3.1.1-2: local part at most 64 octets, domain at most 255.
    if len(local.encode("utf-8")) > MAX_LOCAL_PART or len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError(too_long)
    if domain[0] == "[":
        normalised = _normalise_literal(domain, syntax)
    else:
        try:
            normalised = normalise_domain(domain)
        except AddressError:
            raise AddressError(syntax, "bad domain") from None
        if len(normalised) > MAX_DOMAIN:
            raise AddressError(too_long)
    return Mailbox(local, normalised)


def _normalise_literal(literal: str, syntax: Reply) -> str:
    """RFC 5321 §4.1.3: IPv4, ``IPv6:`` or ``tag:content`` literals, in canonical form."""
    inner = literal[1:-1]
    tag, colon, content = inner.partition(":")
    try:
        if not colon:
            return f"[{ipaddress.IPv4Address(inner)}]"
        if tag.upper() == "IPV6":
            return f"[IPv6:{ipaddress.IPv6Address(content).compressed}]"
    except ValueError:
        raise AddressError(syntax, "bad address literal") from None
    # General-address-literal = Standardized-tag ":" 1*dcontent
    if not content or _KEYWORD_RE.fullmatch(tag) is None or tag[-1] == "-":
        raise AddressError(syntax, "bad address literal")
    return literal
