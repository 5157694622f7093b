"""IMAP responses: the building blocks (strings, literals, lists) and every named answer.

Everything a client is sent is built here or from these pieces, so that quoting is done once
and right (RFC 3501 §4.3: a quoted string cannot hold CR, LF, NUL or 8-bit bytes; those go as
literals whose size is the exact octet count). Every tagged NO and BAD the server gives is named
once below with its response code (RFC 3501 §7.1, RFC 5530), as mailsys.replies names SMTP's
replies; commands refer to the names, never to inline texts. Texts are plain and safe to show:
internal details go to the log, never into a response.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

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


def completed(tag: bytes, verb: str, code: str | None = None) -> bytes:
    """``tag OK [code] VERB completed``: a command done as asked."""
    return tagged(tag, OK, f"{verb} completed", code)


@dataclass(frozen=True)
class Refusal:
    """A tagged NO or BAD with its response code and a client-safe text, named once."""

    status: bytes  # NO or BAD
    code: str | None
    text: str

    def to(self, tag: bytes) -> bytes:
        """The answer to the command tagged ``tag``."""
        return tagged(tag, self.status, self.text, self.code)


class RefusedError(Exception):
    """A well-formed command that cannot be done as asked: answered with ``refusal``.

    Raised while a command's arguments are read (a mailbox name no mailbox can have, RFC 3501
    §5.1).
    """

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.text)
        self.refusal = refusal


# --- mailbox names and mailboxes (RFC 3501 §6.3, RFC 5530 response codes) -----------------------
# RFC 3501 §5.1: a name no mailbox can have (not modified UTF-7, RFC 3501 §5.1.3).
INVALID_NAME = Refusal(NO, "CANNOT", "Invalid mailbox name")
# A name longer than the store can hold (RFC 5530 LIMIT).
NAME_TOO_LONG = Refusal(NO, "LIMIT", "Mailbox name too long")
NONEXISTENT = Refusal(NO, "NONEXISTENT", "No such mailbox")
# RFC 3501 §6.3.11, §6.4.7: TRYCREATE tells the client to CREATE the target and retry.
TRYCREATE = Refusal(NO, "TRYCREATE", "No such mailbox")
INBOX_EXISTS = Refusal(NO, "ALREADYEXISTS", "INBOX always exists")
ALREADY_EXISTS = Refusal(NO, "ALREADYEXISTS", "Mailbox already exists")
TARGET_EXISTS = Refusal(NO, "ALREADYEXISTS", "Target mailbox exists")
INBOX_UNDELETABLE = Refusal(NO, "CANNOT", "The INBOX cannot be deleted")
HAS_CHILDREN = Refusal(NO, "INUSE", "Mailbox has children; delete them first")
READ_ONLY = Refusal(NO, "READ-ONLY", "Mailbox is read-only")

# --- messages ---------------------------------------------------------------------------------
# A FETCH or STORE that named messages another session expunged (RFC 5530, RFC 2180 §4.1.2).
# The words are the ones Dovecot, Zimbra and CommuniGate use, which clients and test tools
# recognise as "retry after NOOP" rather than a failure.
EXPUNGE_ISSUED = Refusal(NO, "EXPUNGEISSUED",
                         "Some of the requested messages no longer exist (they have been deleted)")
# RFC 3516 §5 / RFC 9051 §7.1: a part's encoding is one we cannot undo.
UNKNOWN_CTE = Refusal(NO, "UNKNOWN-CTE", "Unknown Content-Transfer-Encoding")
TOO_MANY_KEYWORDS = Refusal(NO, "LIMIT", "Too many keywords in this mailbox")
TOO_MANY_TARGET_KEYWORDS = Refusal(NO, "LIMIT", "Too many keywords in the target mailbox")
EMPTY_MESSAGE = Refusal(NO, None, "Cannot store an empty message")
BAD_CHARSET = Refusal(NO, "BADCHARSET (UTF-8 US-ASCII)", "Unsupported charset")
# RFC 4469 §7 / RFC 7889: TOOBIG; the literal was not read (or was dropped).
LITERAL_TOO_BIG = Refusal(NO, "TOOBIG", "Literal too large")

# --- quota (RFC 9208) --------------------------------------------------------------------------
NO_QUOTA_ROOT = Refusal(NO, "NONEXISTENT", "No such quota root")
QUOTA_BY_ADMINISTRATOR = Refusal(NO, "NOPERM", "Quotas are set by the administrator")
QUOTA_UNREADABLE = Refusal(NO, "UNAVAILABLE", "Cannot read the quota now, try again")
# RFC 9208 §5.3; a full file system is answered the same way (as Dovecot answers ENOSPC).
OVER_QUOTA = Refusal(NO, "OVERQUOTA", "Mailbox is over its quota")
NO_DISK_SPACE = Refusal(NO, "OVERQUOTA", "Not enough disk space")

# --- login and TLS ------------------------------------------------------------------------------
TLS_ACTIVE = Refusal(BAD, None, "TLS is already active")
TLS_UNAVAILABLE = Refusal(NO, None, "TLS is not available")
# RFC 3501 §6.2.3 / RFC 8314: no passwords in the clear unless allowed.
PRIVACY_REQUIRED = Refusal(NO, "PRIVACYREQUIRED",
                           "Plaintext authentication disallowed without TLS")
UNSUPPORTED_MECHANISM = Refusal(NO, "CANNOT", "Unsupported authentication mechanism")
# RFC 3501 §6.2.2: a cancelled exchange is answered BAD.
AUTH_CANCELLED = Refusal(BAD, None, "Authentication cancelled")
AUTH_MALFORMED = Refusal(BAD, None, "Malformed authentication response")
AUTH_FAILED = Refusal(NO, "AUTHENTICATIONFAILED", "Authentication failed")
LOGIN_BLOCKED = Refusal(NO, "UNAVAILABLE", "Too many failed logins")

# --- commands ------------------------------------------------------------------------------------
MISSING_COMMAND = Refusal(BAD, None, "Missing command")
UID_NEEDS_COMMAND = Refusal(BAD, None, "UID needs a command")
UNKNOWN_UID_COMMAND = Refusal(BAD, None, "Unknown UID command")
UNKNOWN_COMMAND = Refusal(BAD, None, "Unknown command")
SYNTAX_ERROR = Refusal(BAD, None, "Syntax error")  # a ParseError that gave no reason
EXPECTED_DONE = Refusal(BAD, None, "Expected DONE")  # RFC 2177: only DONE ends IDLE
# A failure of ours, logged; RFC 5530 SERVERBUG.
SERVER_BUG = Refusal(NO, "SERVERBUG", "Internal server error")


def wrong_state(tag: bytes, command: bytes, state: str) -> bytes:
    """BAD for a command the session's state does not allow (RFC 3501 §3)."""
    return tagged(tag, BAD, f"{command.decode()} not allowed in the {state} state")


def syntax_error(tag: bytes, reason: str) -> bytes:
    """BAD for a command that does not parse, saying where it went wrong."""
    return tagged(tag, BAD, reason) if reason else SYNTAX_ERROR.to(tag)


# --- untagged status lines ------------------------------------------------------------------------
# RFC 3501 §7.1.5: BYE as the greeting refuses the connection; RFC 5530 §3.
BYE_TOO_MANY_CONNECTIONS = untagged("BYE [UNAVAILABLE] Too many connections, try again later")
# RFC 3501 §5.4: an inactivity autologout, announced by an untagged BYE.
BYE_AUTOLOGOUT = untagged("BYE Autologout; idle for too long")
BYE_INTERNAL_ERROR = untagged("BYE Internal server error")
BYE_TOO_MANY_INVALID = untagged("BYE Too many invalid commands")
BYE_LOGGING_OUT = untagged("BYE Logging out")
BYE_LOGIN_BLOCKED = untagged("BYE Too many failed logins; try again later")
BYE_UIDS_RESET = untagged("BYE The mailbox's UIDs were reset; please reconnect")
BYE_MAILBOX_GONE = untagged("BYE The selected mailbox was deleted or renamed")
BAD_MISSING_TAG = untagged("BAD Missing or invalid tag")
# RFC 9051 §7.1: the previous mailbox's updates end here.
OK_CLOSED = untagged("OK [CLOSED] Previous mailbox closed")
