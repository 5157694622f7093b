"""Maildir file names: the unique part, the ``,S=`` ``,W=`` ``,U=`` fields and the ``:2,`` flags.

A message file is named ``unique[,S=size][,W=wiresize][,U=uid]:2,FLAGS`` (cr.yp.to/proto/maildir
for "unique:2,FLAGS"; ``,S=`` and ``,W=`` are the Courier/Dovecot size fields; ``,U=`` carries the
message's UID, as mbsync and OfflineIMAP do). Everything here is pure string work.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# The flags of the Maildir spec ("2," info): each is one ASCII letter, listed in ASCII order.
DRAFT = "D"
FLAGGED = "F"
PASSED = "P"  # resent/forwarded/bounced
REPLIED = "R"
SEEN = "S"
TRASHED = "T"  # marked for deletion (IMAP \Deleted)
SYSTEM_FLAGS = frozenset({DRAFT, FLAGGED, PASSED, REPLIED, SEEN, TRASHED})

_FIELD = re.compile(r"^([SWU])=(\d{1,18})$")
# The names we write ourselves, parsed in one step (the general path handles any other).
_OURS = re.compile(r"^([^,:]+),S=(\d{1,18}),W=(\d{1,18}),U=([1-9]\d{0,17})(?::2,([A-Za-z]*))?$")


# Names are immutable strings and a folder's sync parses every one of them each time it scans:
# the parses of this many names are kept, so a rescan of a large unchanged folder costs one
# dictionary lookup per file instead of a parse (a few MiB for the whole cache).
PARSED_NAMES_KEPT = 65536


@dataclass(frozen=True, slots=True)
class MaildirName:
    """A parsed message file name."""

    base: str  # everything before ":", verbatim (a flag change keeps it byte for byte)
    key: str  # the base without our size/UID fields: the message's identity in its folder
    size: int | None  # ,S=: the file's size in bytes
    wire_size: int | None  # ,W=: the size with CRLF line ends
    uid: int | None  # ,U=: the UID the message had when it was moved into cur/
    flags: frozenset[str]  # the letters after ":2,"

    def with_flags(self, flags: frozenset[str]) -> str:
        """The file name of this message carrying ``flags`` instead (base unchanged)."""
        return f"{self.base}:2,{render_flags(flags)}"


@functools.lru_cache(maxsize=PARSED_NAMES_KEPT)
def parse_name(name: str) -> MaildirName:
    """Split a Maildir file name into its parts; never fails (a foreign name is all key)."""
    ours = _OURS.match(name)
    if ours is not None:
        key, size, wire, uid, letters = ours.groups()
        base = name.partition(":")[0]
        return MaildirName(base, key, int(size), int(wire), int(uid),
                           frozenset(letters) if letters else frozenset())
    base, colon, info = name.partition(":")
    flags: frozenset[str] = frozenset()
    if colon and info.startswith("2,"):
        flags = frozenset(c for c in info[2:] if c.isascii() and c.isalpha())
    size = wire = uid = None
    key_parts: list[str] = []
    tokens = base.split(",")
    key_parts.append(tokens[0])
    for token in tokens[1:]:
        match = _FIELD.match(token)
        if match is None:
            key_parts.append(token)
            continue
        value = int(match.group(2))
        letter = match.group(1)
        if letter == "S":
            size = value
        elif letter == "W":
            wire = value
        else:
            uid = value if value > 0 else None
    return MaildirName(base, ",".join(key_parts), size, wire, uid, flags)


def format_base(key: str, *, size: int, wire_size: int, uid: int) -> str:
    """The base name we give a message when it moves into cur/: key and the three fields."""
    return f"{key},S={size},W={wire_size},U={uid}"


def render_flags(flags: frozenset[str] | set[str]) -> str:
    """Flags as the Maildir spec writes them: letters in ASCII order, each once."""
    return "".join(sorted(flags))
