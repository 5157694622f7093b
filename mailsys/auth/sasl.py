"""SASL mechanisms shared by the protocols that offer AUTH (POP3, IMAP, SMTP submission).

Only PLAIN (RFC 4616) for now, always over TLS or when the administrator allows plaintext.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass


class SASLError(ValueError):
    """A malformed SASL response; the message is safe to log, not needed by the client."""


@dataclass(frozen=True)
class PlainCredentials:
    """The three fields of a PLAIN response, as UTF-8 text."""

    authzid: str
    authcid: str
    password: str


def decode_base64(data: bytes) -> bytes:
    """Strict base64 of a SASL response line; "=" is the empty response (RFC 4422 §5)."""
    data = data.strip()
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("not base64") from None


def decode_plain(response: bytes) -> PlainCredentials:
    """Parse a decoded PLAIN response: ``authzid NUL authcid NUL passwd`` (RFC 4616 §2)."""
    parts = response.split(b"\0")
    if len(parts) != 3:
        raise SASLError("PLAIN needs exactly two NUL separators")
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        raise SASLError("PLAIN fields must be UTF-8") from None
    if not authcid or not password:
        raise SASLError("PLAIN with an empty user name or password")
    return PlainCredentials(authzid, authcid, password)
