"""IMAP response building blocks: strings, literals, lists, flags and the named responses.

Everything a client is sent is built here or from these pieces, so that quoting is done once
and right (RFC 3501 §4.3: a quoted string cannot hold CR, LF, NUL or 8-bit bytes; those go as
literals whose size is the exact octet count). Texts are plain and safe to show: internal
details go to the log, never into a response.
"""

from __future__ import annotations

import re
import time

CRLF = b"\r\n"
# RFC 3501 §7.1: the status responses a tagged answer carries.
OK, NO, BAD = b"OK", b"NO", b"BAD"
NIL = b"NIL"
_SAFE_ATOM = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\\]]+\Z")
_QUOTABLE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*\Z")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def literal(value: bytes) -> bytes:
    """``{n}`` CRLF and the bytes (RFC 3501 §4.3)."""
    return b"{%d}\r\n" % len(value) + value


def quoted(value: bytes) -> bytes:
    """A quoted string; ``value`` must be quotable (see ``string``)."""
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def string(value: bytes) -> bytes:
    """A quoted string when the bytes allow it, else a literal."""
    if len(value) < 1024 and _QUOTABLE.match(value):
        return quoted(value)
    return literal(value)


def nstring(value: bytes | None) -> bytes:
    return NIL if value is None else string(value)


def astring(value: bytes) -> bytes:
    """An atom when the bytes are a plain atom (and not NIL), else a string."""
    if _SAFE_ATOM.match(value) and value.upper() != NIL:
        return value
    return string(value)


def text(value: str) -> bytes:
    """Human-readable text for a response line (CR/LF removed)."""
    return value.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")


def tagged(tag: bytes, status: bytes, message: str, code: str | None = None) -> bytes:
    """``tag OK|NO|BAD [code] text``."""
    coded = f"[{code}] " if code else ""
    return tag + b" " + status + b" " + text(coded + message) + CRLF


def untagged(line: str | bytes) -> bytes:
    return b"* " + (line if isinstance(line, bytes) else text(line)) + CRLF


def internal_date(seconds: float) -> bytes:
    """INTERNALDATE as a quoted date-time, in UTC (RFC 3501 §9 date-time)."""
    t = time.gmtime(seconds)
    return b'"%2d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday, MONTHS[t.tm_mon - 1].encode(), t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def number_set(values: list[int]) -> bytes:
    """Numbers as a compact sequence set, ranges for runs, in the given order (UIDPLUS)."""
    if not values:
        return b""
    out: list[bytes] = []
    start = previous = values[0]
    for value in values[1:]:
        if value == previous + 1:
            previous = value
            continue
        out.append(b"%d" % start if start == previous else b"%d:%d" % (start, previous))
        start = previous = value
    out.append(b"%d" % start if start == previous else b"%d:%d" % (start, previous))
    return b",".join(out)


class RefusedError(Exception):
    """A well-formed command that cannot be done as asked: answered ``NO [code] text``.

    Raised while a command's arguments are read (a mailbox name no mailbox can have, RFC 3501
    §5.1); the text is safe to show the client.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# RFC 3501 §5.1: a name no mailbox can have (not modified UTF-7, RFC 3501 §5.1.3).
INVALID_NAME = ("Invalid mailbox name", "CANNOT")
# A name longer than the store can hold (RFC 5530 LIMIT).
NAME_TOO_LONG = ("Mailbox name too long", "LIMIT")
# A FETCH or STORE that named messages another session expunged (RFC 5530, RFC 2180 §4.1.2).
# The words are the ones Dovecot, Zimbra and CommuniGate use, which clients and test tools
# recognise as "retry after NOOP" rather than a failure.
EXPUNGE_ISSUED = ("Some of the requested messages no longer exist (they have been deleted)",
                  "EXPUNGEISSUED")
