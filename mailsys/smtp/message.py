"""Message intake for one SMTP transaction: the DATA and BDAT bytes become one checked message.

``MessageBuffer`` owns the rules for message content as it arrives: only CRLF.CRLF ends DATA
(RFC 5321 §4.1.1.4), dot-stuffing is undone (§4.5.2), bare CR or LF anywhere refuses the message
(§2.3.8), as do a text line longer than the limit (§4.5.3.1.6), a message over the size limit
(RFC 1870) and too many Received fields (a loop, §6.3). After a problem the rest is only
swallowed, never stored, until the end of the data; the caller then sends ``error``. When a
message has several problems the reply names the gravest (bare line ending, then long line, then
loop, then size), so it does not depend on how TCP happened to split the stream.

The work is done with bytes methods on whole regions of complete lines (find, count, split,
replace), never a Python loop per byte, because this is the hot path of every message.
``header_section`` and ``has_field`` look at a finished message's header fields (submission adds
the Date and Message-ID a client left out).
"""

from __future__ import annotations

import functools
import re

from mailsys import replies
from mailsys.replies import Reply

_CRLF = b"\r\n"
# The end-of-data indication: CRLF "." CRLF, where the first CRLF ends the last text line.
_END = b"\r\n.\r\n"
# RFC 5321 §4.5.3.1.6: what a text line may be on the wire, CRLF included.
_RFC_LINE = 1000
# Which refusal wins when a message has several problems (higher wins).
_GRAVITY = {
    replies.MESSAGE_TOO_BIG: 1,
    replies.LOOP_DETECTED: 2,
    replies.DATA_LINE_TOO_LONG: 3,
    replies.BARE_LINE_ENDING: 4,
}


class MessageBuffer:
    """Collects one message from DATA text (``feed_data``) or BDAT chunks (``feed_chunk``).

    Internally ``_pending`` is always a suffix of the stream: normally CRLF followed by the
    current, incomplete line (at the start, a virtual CRLF stands for the end of the DATA command
    line, so a message starting with ".\\r\\n" is empty). ``_take`` checks and stores regions of
    complete lines that begin with that CRLF, which keeps dot-unstuffing and the end-marker
    search one ``replace`` and one ``find`` over the region.
    """

    __slots__ = (
        "_in_headers",
        "_max_line",
        "_max_received",
        "_max_size",
        "_parts",
        "_pending",
        "_received",
        "error",
        "long_lines",
        "octets",
        "size",
    )

    def __init__(self, *, max_size: int, max_line_length: int, max_received: int) -> None:
        self._max_size = max_size
        self._max_line = max_line_length
        self._max_received = max_received
        self._pending = _CRLF
        self._parts: list[bytes] = []
        self._in_headers = True
        self._received = 0
        self.size = 0
        # Octets the client sent for this message so far, as sent (for the log of a session
        # that ends in the middle of one).
        self.octets = 0
        self.error: Reply | None = None
        # A line over RFC 5321's 998 octets was taken (within max_line): a submitted message is
        # then re-encoded before it is signed (mailsys.smtp.linelimit).
        self.long_lines = False

    def feed_data(self, data: bytes) -> bytes | None:
        """Feed DATA text. None while the end is not reached; else the bytes that follow it."""
        self.octets += len(data)
        buf = self._pending + data
        end = buf.find(_END)
        if self.error is replies.BARE_LINE_ENDING:
            # Nothing graver can follow: only the real end marker matters now. A stream suffix
            # of 4 bytes is enough to find a marker that straddles two reads.
            if end >= 0:
                return buf[end + 5:]
            self._pending = buf[-4:]
            return None
        if end >= 0:
            self._take(buf[: end + 2], unstuff=True)
            self._pending = _CRLF
            return buf[end + 5:]
        cut = buf.rfind(_CRLF)  # >= 0: buf starts with CRLF
        if cut > 0:
            self._take(buf[: cut + 2], unstuff=True)
            buf = buf[cut:]
        self._pending = buf
        if len(buf) - 2 >= self._max_line:
            self._overflow(buf)
        return None

    def feed_chunk(self, data: bytes) -> None:
        """Feed the octets of one BDAT chunk (RFC 3030: no dot-stuffing, no end marker)."""
        self.octets += len(data)
        if self.error is replies.BARE_LINE_ENDING:
            return
        buf = self._pending + data
        cut = buf.rfind(_CRLF)
        if cut > 0:
            self._take(buf[: cut + 2], unstuff=False)
            buf = buf[cut:]
        self._pending = buf
        # Each chunk gets its own reply, so find a bare CR or LF in the incomplete last line
        # now rather than with a later chunk (a final CR may still be followed by its LF).
        if b"\n" in buf[2:] or b"\r" in buf[2:-1]:
            self._fail(replies.BARE_LINE_ENDING)
        elif len(buf) - 2 >= self._max_line:
            self._overflow(buf)

    def finish_chunks(self) -> None:
        """After ``BDAT ... LAST``: check the last line, which may lack its CRLF."""
        if self.error is replies.BARE_LINE_ENDING:
            return
        tail = self._pending[2:]
        self._pending = _CRLF
        if not tail:
            return
        if b"\r" in tail or b"\n" in tail:
            self._fail(replies.BARE_LINE_ENDING)
            return
        # A message is lines ending in CRLF (RFC 5322 §2.1); complete the last one.
        self._take(_CRLF + tail + _CRLF, unstuff=False)

    def message(self) -> bytes:
        """The message as received, unstuffed; only meaningful when ``error`` is None."""
        return b"".join(memoryview(part)[2:] for part in self._parts)

    def _take(self, region: bytes, *, unstuff: bool) -> None:
        """Check and keep ``region``: CRLF followed by complete lines each ending in CRLF.

        After a problem the checks for graver problems go on (nothing is stored any more).
        """
        error = self.error
        if error is replies.BARE_LINE_ENDING:
            return
        # No bare CR or LF: every CR and every LF belongs to a CRLF (RFC 5321 §2.3.8).
        crlf = region.count(_CRLF)
        if region.count(b"\r") != crlf or region.count(b"\n") != crlf:
            self._fail(replies.BARE_LINE_ENDING)
            return
        if error is replies.DATA_LINE_TOO_LONG:
            return
        # RFC 5321 §4.5.3.1.6: a text line is at most max_line octets including CRLF.
        limit = self._max_line
        if len(region) > _RFC_LINE and not self.long_lines:
            longest = max(map(len, region.split(_CRLF)))
            if longest > limit - 2:
                self._fail(replies.DATA_LINE_TOO_LONG)
                return
            self.long_lines = longest > _RFC_LINE - 2
        elif len(region) > limit and max(map(len, region.split(_CRLF))) > limit - 2:
            self._fail(replies.DATA_LINE_TOO_LONG)
            return
        if unstuff:
            # RFC 5321 §4.5.2: the first "." of every line is removed. Each line in the region
            # follows a CRLF (the first one the region's leading CRLF).
            region = region.replace(b"\r\n.", _CRLF)
        if self._in_headers:
            self._scan_headers(region)
        if self.error is not None:
            return
        self.size += len(region) - 2
        if self.size > self._max_size:
            self._fail(replies.MESSAGE_TOO_BIG)
            return
        self._parts.append(region)

    def _scan_headers(self, region: bytes) -> None:
        """Count Received fields in the header section (RFC 5321 §6.3 loop detection)."""
        end = region.find(b"\r\n\r\n")
        if end >= 0:
            self._in_headers = False
            region = region[: end + 2]
        self._received += region.lower().count(b"\r\nreceived:")
        if self._received > self._max_received:
            self._fail(replies.LOOP_DETECTED)
            self._in_headers = False  # decided; no need to look further

    def _overflow(self, pending: bytes) -> None:
        """The incomplete line in ``pending`` (CRLF + line) is already too long: refuse it and
        keep only what later checks need, so memory stays bounded."""
        line = pending[2:]
        # A CR at the very end may still be followed by its LF; anything else is bare.
        if b"\n" in line or b"\r" in line[:-1]:
            self._fail(replies.BARE_LINE_ENDING)
            self._pending = pending[-4:]
            return
        self._fail(replies.DATA_LINE_TOO_LONG)
        # Still a line start (CRLF) plus a stand-in for the line, whose last octet is kept: it
        # may be the CR of the line's CRLF. "X" cannot form an end marker or a dot line.
        self._pending = b"\r\nX" + pending[-1:]

    def _fail(self, reply: Reply) -> None:
        current = self.error
        if current is None or _GRAVITY[reply] > _GRAVITY[current]:
            self.error = reply
        self._parts = []


def header_section(message: bytes) -> bytes:
    """The header section of ``message``: its lines up to the first empty one (RFC 5322 §2.1).

    A message without an empty line is all header; one starting with an empty line has none.
    """
    if message.startswith(_CRLF):
        return b""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


@functools.lru_cache(maxsize=16)
def _field_pattern(name: bytes) -> re.Pattern[bytes]:
    # RFC 5322 §2.2: a field name at the start of a line, then ":"; §4.5 (obsolete syntax) also
    # allows white space before the colon. Folded continuation lines start with white space.
    return re.compile(rb"(?:^|\r\n)" + re.escape(name) + rb"[ \t]*:", re.IGNORECASE)


def has_field(header: bytes, name: bytes) -> bool:
    """True if the header section ``header`` has a field called ``name`` (case-insensitive)."""
    return _field_pattern(name).search(header) is not None


def field_value(header: bytes, name: bytes) -> bytes | None:
    """The unfolded value of the first field called ``name`` in ``header``, or None."""
    match = _field_pattern(name).search(header)
    if match is None:
        return None
    start = stop = match.end()
    while True:
        crlf = header.find(b"\r\n", stop)
        if crlf < 0:
            stop = len(header)
            break
        # RFC 5322 §2.2.3: a folded field goes on over lines that begin with white space.
        if header[crlf + 2 : crlf + 3] in (b" ", b"\t"):
            stop = crlf + 2
            continue
        stop = crlf
        break
    return header[start:stop].replace(b"\r\n", b"").strip()


def message_id_of(header: bytes) -> str | None:
    """The Message-ID of a header section, without its angle brackets (RFC 5322 §3.6.4)."""
    value = field_value(header, b"Message-ID")
    if not value:
        return None
    start = value.find(b"<")
    end = value.find(b">", start + 1)
    if start >= 0 and end > start:
        value = value[start + 1 : end]
    return value.decode("utf-8", "replace").strip() or None
