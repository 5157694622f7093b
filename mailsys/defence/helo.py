"""The HELO/EHLO name as evidence (RFC 5321 §4.1.1.1, §4.1.3): a client that greets with our
own name or address, or with something that is neither a host name nor an address literal,
is forging or broken. What follows (score or refuse) is the intake policy's business."""

from __future__ import annotations

import functools
import ipaddress
import re

# Host names as seen in the wild: letters, digits, hyphens and underscores (Windows hosts send
# them), dot-separated labels of at most 63 octets; a final dot is tolerated.
_NAME = re.compile(r"^(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                   r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$")


def literal_address(helo: str) -> str | None:
    """The address of an address literal ("[192.0.2.1]", "[IPv6:2001:db8::1]"), or of a bare
    address (sloppy but common); None when ``helo`` is neither."""
    text = helo
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text[:5].upper() == "IPV6:":
            text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def helo_problem(helo: str, our_names: tuple[str, ...],
                 our_addresses: tuple[str, ...]) -> str | None:
    """Why ``helo`` is a bad greeting, or None when it is acceptable (cached: the same
    clients greet the same way)."""
    if not helo[:1].isalpha() or helo[-1:].isdigit() or ":" in helo:
        address = literal_address(helo)  # a name starting with a letter is never one
        if address is not None:
            if address in our_addresses:
                return "HELO names our own address"
            return None
    if not _NAME.match(helo):
        return "HELO is neither a host name nor an address literal"
    if helo.lower().rstrip(".") in {name.lower() for name in our_names}:
        return "HELO names our own host"
    return None
