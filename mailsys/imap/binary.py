"""BINARY (RFC 3516, RFC 9051 §6.4.5): a body part with its Content-Transfer-Encoding undone.

This module owns the ``BINARY[part]`` section syntax, the decoding of a part's content, and
how decoded bytes travel: as a literal8 (``~{n}``) only when they hold a NUL (RFC 3516 §4.2).
"""

from __future__ import annotations

import base64
import binascii
import re

from mailsys.imap.bodystructure import Part, Section, find_part, parse_message
from mailsys.imap.parser import Reader
from mailsys.imap.responses import literal

# RFC 2045 §6.1: the identity encodings need no decoding.
_IDENTITY = frozenset({b"", b"7bit", b"8bit", b"binary"})


class UnknownCTEError(ValueError):
    """A part whose transfer encoding we cannot undo (RFC 3516 §5: NO [UNKNOWN-CTE])."""


def parse_section(reader: Reader) -> Section:
    """``[`` [part numbers joined by "."] ``]``: RFC 9051 §9 section-binary."""
    reader.expect(b"[")
    parts: list[int] = []
    if not reader.accept(b"]"):
        parts.append(reader.nz_number())
        while reader.accept(b"."):
            parts.append(reader.nz_number())
        reader.expect(b"]")
    return Section(tuple(parts))


def content(root: Part, section: Section) -> bytes | None:
    """The decoded content of ``section``; None if the part does not exist.

    BINARY[] is the whole message; a multipart or message/rfc822 part has no encoding of its
    own (RFC 2045 §6.4) and comes as it is.
    """
    if not section.parts:
        return root.data[root.start:root.end]
    part = find_part(root, section.parts)
    if part is None:
        return None
    body = part.body
    if part.multipart or part.message is not None:
        return body
    encoding = (part.field(b"content-transfer-encoding") or b"").strip().lower()
    if encoding in _IDENTITY:
        return body
    if encoding == b"base64":
        try:
            return binascii.a2b_base64(body)
        except binascii.Error:
            raise UnknownCTEError("damaged base64") from None
    if encoding == b"quoted-printable":
        return decode_quoted_printable(body)
    raise UnknownCTEError(encoding.decode("ascii", "replace"))


_QP_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")


def decode_quoted_printable(body: bytes) -> bytes:
    """Undo quoted-printable (RFC 2045 §6.7) on a body in wire form (CRLF line ends).

    Rule 3: white space at the end of an encoded line is transport padding and goes. Rule 5:
    "=" at the end of a line (after that) is a soft line break: the line joins the next.
    Rule 1: "=XX" is the octet XX; any other "=" is kept as it is (§6.7 note 1, robustness).
    """
    lines = body.split(b"\r\n")
    out: list[bytes] = []
    last = len(lines) - 1
    for index, line in enumerate(lines):
        line = line.rstrip(b" \t")
        soft = line.endswith(b"=")
        if soft:
            line = line[:-1]
        if b"=" in line:
            line = _QP_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), line)
        out.append(line)
        if not soft and index != last:
            out.append(b"\r\n")
    return b"".join(out)


def literal8(value: bytes) -> bytes:
    """A literal, or a literal8 when the bytes hold a NUL (RFC 3516 §4.2)."""
    if b"\0" in value:
        return b"~{%d}\r\n" % len(value) + value
    return literal(value)


def seven_bit_form(data: bytes) -> bytes:
    """An APPENDed message whose parts use Content-Transfer-Encoding binary, with those parts
    re-encoded as base64 (RFC 3516 §4.4: a server that does not keep binary content "MUST"
    convert or refuse it). Our store serves every message with CRLF line ends, which would
    change binary octets; base64 keeps them, and BINARY[] decodes them back exactly."""
    root = parse_message(data)
    edits: list[tuple[int, int, bytes]] = []
    _collect_binary(root, edits)
    if not edits:
        return data
    out = bytearray(data)
    for start, end, replacement in sorted(edits, reverse=True):
        out[start:end] = replacement
    return bytes(out)


def _collect_binary(part: Part, edits: list[tuple[int, int, bytes]]) -> None:
    if part.multipart:
        for child in part.children:
            _collect_binary(child, edits)
        return
    if part.message is not None:
        _collect_binary(part.message, edits)
        return
    encoding = (part.field(b"content-transfer-encoding") or b"").strip().lower()
    if encoding != b"binary":
        return
    header = b"".join(
        (b"Content-Transfer-Encoding: base64" if name.lower() == b"content-transfer-encoding"
         else name + b":" + value) + b"\r\n"
        for name, value in part.fields())
    body = base64.encodebytes(part.body).replace(b"\n", b"\r\n")
    edits.append((part.start, part.end, header + b"\r\n" + body))
