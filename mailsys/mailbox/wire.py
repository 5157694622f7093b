"""Messages as they go on the wire: CRLF line ends, POP3 dot-stuffing, sizes and TOP.

A Maildir file may end its lines with bare LF (the stored form our delivery and most other
delivery agents write, mailsys.mailbox.layout) or CRLF (a client's message that would not convert
exactly). Clients see CRLF either way, and every size we report is the size with CRLF line ends
(the "wire size"), so that POP3 LIST and IMAP RFC822.SIZE match what is sent.
The encoder here works on any chunking of the file: a "." line or a CRLF split across two chunks
comes out exactly as if the file had been sent in one piece.
"""

from __future__ import annotations

CRLF = b"\r\n"


def wire_size(data: bytes) -> int:
    """The size of ``data`` once every line ends in CRLF and the last line is terminated.

    Each LF not preceded by CR gains a CR; a final unterminated line gains CRLF (a final lone CR
    becomes CRLF), as WireEncoder sends it.
    """
    if not data:
        return 0
    size = len(data) + data.count(b"\n") - data.count(b"\r\n")
    if data.endswith(b"\n"):
        return size
    return size + (1 if data.endswith(b"\r") else 2)


def to_crlf(data: bytes) -> bytes:
    """``data`` with every line ending in CRLF and its last line terminated (whole message).

    The same bytes as a WireEncoder without dot-stuffing fed the whole message, without the
    encoder object (a FETCH of a folder converts thousands of messages).
    """
    if not data:
        return b""
    if data.endswith(b"\r"):
        body, tail = data[:-1], CRLF  # a final lone CR ends the last line
    else:
        body, tail = data, (b"" if data.endswith(b"\n") else CRLF)
    if body.count(b"\n") != body.count(b"\r\n"):
        body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return body + tail if tail else body


class WireEncoder:
    """Turns a message, fed in chunks of any size, into wire form.

    With ``stuff_dots`` (POP3, RFC 1939 §3) a line starting with "." gets one more "."; the
    terminating ".CRLF" is not added here (the protocol adds it). State carried across chunks:
    whether the output is at the start of a line, and a CR held back from the end of a chunk in
    case the next chunk starts with LF.
    """

    def __init__(self, stuff_dots: bool = True) -> None:
        self._stuff = stuff_dots
        self._at_line_start = True
        self._held_cr = False
        self._empty = True

    def feed(self, chunk: bytes) -> bytes:
        """The wire form of ``chunk`` (possibly a little shorter: a trailing CR is held back)."""
        if not chunk:
            return b""
        self._empty = False
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            self._held_cr = True
            chunk = chunk[:-1]
            if not chunk:
                return b""
        lf = chunk.count(b"\n")
        if lf != chunk.count(b"\r\n"):
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._stuff:
            if b"\n." in chunk:
                chunk = chunk.replace(b"\n.", b"\n..")
            if self._at_line_start and chunk.startswith(b"."):
                chunk = b"." + chunk
        self._at_line_start = chunk.endswith(b"\n")
        return chunk

    def finish(self) -> bytes:
        """The end of the message: any held CR, and CRLF if the last line was unterminated."""
        if self._held_cr:
            self._held_cr = False
            self._at_line_start = True
            return CRLF
        if self._empty or self._at_line_start:
            return b""
        self._at_line_start = True
        return CRLF


def encode_pop3(data: bytes) -> bytes:
    """A whole message as a POP3 multi-line body: CRLF, dot-stuffed, with the final ".CRLF"."""
    encoder = WireEncoder(stuff_dots=True)
    return encoder.feed(data) + encoder.finish() + b".\r\n"


def top_lines(data: bytes, body_lines: int) -> bytes | None:
    """The header, the blank line and the first ``body_lines`` lines of the body (RFC 1939 TOP).

    ``data`` may be a prefix of the message; None means more of it is needed to answer. Line
    ends are not converted here.
    """
    # The header ends at the first empty line (RFC 5322 §2.1), with CRLF or bare LF.
    end = _header_end(data)
    if end < 0:
        return None
    position = end
    for _ in range(body_lines):
        lf = data.find(b"\n", position)
        if lf < 0:
            return None
        position = lf + 1
    return data[:position]


def _header_end(data: bytes) -> int:
    """The offset just after the blank line that ends the header, or -1."""
    if data.startswith(b"\r\n"):
        return 2
    if data.startswith(b"\n"):
        return 1
    position = 0
    while True:
        lf = data.find(b"\n", position)
        if lf < 0:
            return -1
        after = lf + 1
        if data.startswith(b"\r\n", after):
            return after + 2
        if data.startswith(b"\n", after):
            return after + 1
        position = after
