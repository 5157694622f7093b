"""Mailbox names as IMAP shows them: modified UTF-7 (RFC 3501 §5.1.3) or UTF-8 (RFC 9051 §5.1,
RFC 6855 §3), LIST patterns, SPECIAL-USE.

The mailbox store names folders in Unicode with "." between levels (Maildir++); clients see
those names in modified UTF-7, or in UTF-8 once they enable IMAP4rev2 or UTF8=ACCEPT, match
them with LIST's ``*`` and ``%`` wildcards (RFC 3501 §6.3.8)
and learn the role of Sent, Drafts, Trash and Junk from RFC 6154 attributes.
"""

from __future__ import annotations

import base64
import re

from mailsys.imap.responses import literal, quoted
from mailsys.mailbox.store import HIERARCHY_SEPARATOR, INBOX

SEPARATOR = HIERARCHY_SEPARATOR
# RFC 6154 §2: the attribute each default folder carries.
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk"}


class MailboxNameError(ValueError):
    """A mailbox name that is not valid modified UTF-7."""


def encode_mutf7(name: str) -> str:
    """``name`` in modified UTF-7: printable ASCII as itself ("&" as "&-"), the rest in
    "&" + modified BASE64 of UTF-16BE + "-" (RFC 3501 §5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be", "surrogatepass")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


_SHIFT = re.compile(r"&([A-Za-z0-9+,]*)-")


def decode_mutf7(text: str) -> str:
    """The Unicode name of modified UTF-7 ``text``; MailboxNameError if it is malformed."""
    if any(not 0x20 <= ord(c) <= 0x7E for c in text):
        raise MailboxNameError("mailbox names are 7-bit (modified UTF-7)")
    out: list[str] = []
    position = 0
    while True:
        amp = text.find("&", position)
        if amp < 0:
            out.append(text[position:])
            return "".join(out)
        out.append(text[position:amp])
        match = _SHIFT.match(text, amp)
        if match is None:
            raise MailboxNameError("unterminated '&' in a mailbox name")
        encoded = match.group(1)
        if not encoded:
            out.append("&")
        else:
            padded = encoded.replace(",", "/") + "=" * (-len(encoded) % 4)
            try:
                raw = base64.b64decode(padded, validate=True)
                out.append(raw.decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                raise MailboxNameError("bad modified BASE64 in a mailbox name") from None
        position = match.end()


_QUOTABLE_UTF8 = re.compile(r"[^\x00-\x1f\x7f]*\Z")


def decode_name(raw: bytes, *, utf8: bool) -> str:
    """A client's mailbox name (or LIST pattern) as Unicode; MailboxNameError if malformed.

    In UTF-8 mode "&" is an ordinary character: RFC 9051 §5.1 and RFC 6855 §3 leave modified
    UTF-7 behind.
    """
    try:
        if utf8:
            return raw.decode("utf-8")
        return decode_mutf7(raw.decode("ascii"))
    except UnicodeDecodeError:
        raise MailboxNameError("mailbox name is not valid text") from None


def encode_name(name: str, *, utf8: bool) -> bytes:
    """A mailbox name as a response carries it: a quoted string (UTF-8 allowed in quoted
    strings once UTF-8 is enabled, RFC 9051 §9 QUOTED-CHAR), else a literal."""
    if not utf8:
        return quoted(encode_mutf7(name).encode("ascii"))
    if _QUOTABLE_UTF8.match(name) and len(name) < 1024:
        return quoted(name.encode("utf-8", "surrogateescape"))
    return literal(name.encode("utf-8", "surrogateescape"))


def canonical(name: str) -> str:
    """The store's name for a client's mailbox name: "INBOX" in any case is the INBOX, a
    trailing separator is dropped (RFC 3501 §6.3.3)."""
    if name.upper() == INBOX:
        return INBOX
    return name[:-1] if name.endswith(SEPARATOR) and len(name) > 1 else name


def pattern_regex(reference: str, pattern: str) -> re.Pattern[str]:
    """A regex for LIST's reference + pattern: ``*`` matches anything, ``%`` anything but the
    separator (RFC 3501 §6.3.8). "INBOX" matches case-insensitively."""
    full = reference + pattern if not pattern.startswith(SEPARATOR) or not reference else (
        reference.rstrip(SEPARATOR) + pattern)
    parts = []
    for char in full:
        if char == "*":
            parts.append(".*")
        elif char == "%":
            parts.append(f"[^{re.escape(SEPARATOR)}]*")
        else:
            parts.append(re.escape(char))
    body = "".join(parts)
    if full[:5].upper() == INBOX and (len(full) == 5 or full[5] in "*%" + SEPARATOR):
        body = "(?i:INBOX)" + "".join(parts[5:])
    return re.compile(body + r"\Z", re.DOTALL)


def special_use(name: str) -> str | None:
    """The RFC 6154 attribute of folder ``name``, if it is one of the default folders."""
    return SPECIAL_USE.get(name)
