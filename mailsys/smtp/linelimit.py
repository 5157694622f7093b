"""RFC 5321 §4.5.3.1.6 on the way out: no line we send is longer than 998 octets before its
CRLF, whatever we accepted.

Intake takes longer lines (up to ``smtp.max_line_length``) and stores them as received, as
Postfix does, so that mail from sloppy but real senders is not bounced. When such a message
leaves through the relay it is made to fit here, without losing anything: a header field is
folded at whitespace (RFC 5322 §2.2.3; unfolding gives it back), and a MIME leaf whose body has a
long line is re-encoded as quoted-printable (RFC 2045 §6.7, its lines at most 76 octets), with
its Content-Transfer-Encoding changed to say so. Only when a header line has no whitespace to
fold at is a space inserted (the one change a reader could see).

DKIM (RFC 6376): a signature covers the body as it was signed, so re-encoding breaks one made
over the original. Submitted mail is therefore made to fit before it is signed (what is signed
is what will be sent); inbound mail that is relayed onward (an alias to another domain) and
arrives signed with long lines loses its signature's validity on the next hop, as it would
through Postfix; ARC sealing would be the cure and is not done.

Everything here is CPU work on a whole message: run it in a disk thread.
"""

from __future__ import annotations

import email.policy
import quopri
from email import message_from_bytes
from email.generator import BytesGenerator
from email.message import Message
from io import BytesIO
from typing import IO

# RFC 5321 §4.5.3.1.6: 1000 octets including the CRLF.
MAX_LINE = 998
_CHUNK = 1 << 20

# The generator rewrites nothing it need not: lines end in CRLF and header fields keep the
# folding they came with (max_line_length=0: never refolded).
_POLICY = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)


def has_long_line(data: bytes, limit: int = MAX_LINE) -> bool:
    """True when a line of ``data`` (ended by LF) has more than ``limit`` octets before CRLF."""
    start = 0
    size = len(data)
    while start < size:
        end = data.find(b"\n", start)
        if end < 0:
            end = size
        length = end - start
        if length and data[end - 1:end] == b"\r":
            length -= 1
        if length > limit:
            return True
        start = end + 1
    return False


def file_has_long_line(file: IO[bytes], limit: int = MAX_LINE) -> bool:
    """``has_long_line`` over a file read in chunks (the file position is left at its start)."""
    carried = 0  # octets of the current line seen in earlier chunks
    try:
        while chunk := file.read(_CHUNK):
            start = 0
            while True:
                end = chunk.find(b"\n", start)
                if end < 0:
                    carried += len(chunk) - start
                    if carried > limit + 1:  # + the CR that may end it
                        return True
                    break
                length = carried + end - start
                if length and (chunk[end - 1:end] == b"\r" if end > start else True):
                    length -= 1
                if length > limit:
                    return True
                carried = 0
                start = end + 1
        return carried > limit
    finally:
        file.seek(0)


def fit_lines(message: bytes, limit: int = MAX_LINE) -> bytes:
    """``message`` with every line within ``limit`` octets, its content unchanged as a reader
    sees it; ``message`` itself when it already fits."""
    if not has_long_line(message, limit):
        return message
    header_end = message.find(b"\r\n\r\n")
    if header_end < 0:
        header, body = message, b""
    else:
        header, body = message[: header_end + 2], message[header_end + 2:]
    if has_long_line(header, limit):
        header = _fold_header(header, limit)
        message = header + body
        if not has_long_line(body, limit):
            return message
    parsed = message_from_bytes(message, policy=_POLICY)
    for part in parsed.walk():
        if not part.is_multipart():
            _reencode(part, limit)
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(parsed)
    result = out.getvalue()
    if has_long_line(result, limit):  # pragma: no cover - a structure the parser could not see
        return _hard_wrap(result, limit)
    return result


def _reencode(part: Message, limit: int) -> None:
    raw = part.get_payload(decode=False)
    if not isinstance(raw, str):
        return
    data = raw.encode("utf-8", "surrogateescape")
    if not has_long_line(data, limit):
        return
    encoding = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    if encoding in ("quoted-printable", "base64"):
        decoded = part.get_payload(decode=True)
        assert isinstance(decoded, bytes)
        content = decoded
    else:
        content = data
    # RFC 2045 §6.7: line breaks stay hard line breaks; only the long lines get soft breaks.
    encoded = quopri.encodestring(content.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    del part["Content-Transfer-Encoding"]
    part["Content-Transfer-Encoding"] = "quoted-printable"
    part.set_payload(encoded.decode("ascii"))


def _fold_header(header: bytes, limit: int) -> bytes:
    """Fold each over-long header line at whitespace (RFC 5322 §2.2.3)."""
    lines = header.split(b"\r\n")
    out: list[bytes] = []
    for line in lines:
        while len(line) > limit:
            cut = max(line.rfind(b" ", 1, limit), line.rfind(b"\t", 1, limit))
            if cut <= 0:
                # No whitespace to fold at: a space is inserted (the only visible change).
                out.append(line[:limit])
                line = b" " + line[limit:]
                continue
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return b"\r\n".join(out)


def _hard_wrap(message: bytes, limit: int) -> bytes:
    lines = []
    for line in message.split(b"\r\n"):
        while len(line) > limit:
            lines.append(line[:limit])
            line = line[limit:]
        lines.append(line)
    return b"\r\n".join(lines)
