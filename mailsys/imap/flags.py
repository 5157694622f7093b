"""IMAP flags and Maildir flag letters, both ways (RFC 3501 §2.3.2).

System flags map to the Maildir letters (\\Seen S, \\Answered R, \\Flagged F, \\Deleted T,
\\Draft D) and $Forwarded to P ("passed"), as mbsync and Dovecot map them; other keywords take
the lower-case letters through the folder's keyword file (mailsys.mailbox.keywords). \\Recent is
a session's own and never stored.
"""

from __future__ import annotations

from collections.abc import Iterable

from mailsys.mailbox.keywords import keyword_of, letter_of
from mailsys.mailbox.names import DRAFT, FLAGGED, PASSED, REPLIED, SEEN, TRASHED

RECENT = "\\Recent"
DELETED_FLAG = "\\Deleted"
SEEN_FLAG = "\\Seen"
SYSTEM = {
    "\\seen": ("\\Seen", SEEN),
    "\\answered": ("\\Answered", REPLIED),
    "\\flagged": ("\\Flagged", FLAGGED),
    "\\deleted": ("\\Deleted", TRASHED),
    "\\draft": ("\\Draft", DRAFT),
    "$forwarded": ("$Forwarded", PASSED),
}
LETTER_NAMES = {letter: name for name, letter in SYSTEM.values()}
# The order FLAGS and PERMANENTFLAGS list them in.
SYSTEM_NAMES = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "$Forwarded")


class FlagError(ValueError):
    """A flag that cannot be stored (an unknown system flag such as \\Foo)."""


def names_of(letters: Iterable[str], keywords: list[str]) -> list[str]:
    """The IMAP flags of a message's Maildir letters (letters nobody defined are left out)."""
    out = []
    for letter in sorted(letters):
        name = LETTER_NAMES.get(letter)
        if name is None and "a" <= letter <= "z":
            name = keyword_of(keywords, letter)
        if name is not None:
            out.append(name)
    return out


def split_flags(flags: Iterable[str]) -> tuple[set[str], list[str]]:
    """(system letters, keywords) of client flags; \\Recent is dropped, \\Foo is FlagError."""
    letters: set[str] = set()
    keywords: list[str] = []
    for flag in flags:
        system = SYSTEM.get(flag.lower())
        if system is not None:
            letters.add(system[1])
        elif flag.lower() == RECENT.lower():
            continue  # RFC 3501 §2.3.2: \Recent cannot be altered by the client
        elif flag.startswith("\\"):
            raise FlagError(flag)
        elif flag not in keywords:
            keywords.append(flag)
    return letters, keywords


def letters_of(flags: Iterable[str], keywords: list[str]) -> frozenset[str]:
    """Maildir letters for client flags; every keyword must already have a letter."""
    letters, names = split_flags(flags)
    for name in names:
        letter = letter_of(keywords, name)
        if letter is not None:
            letters.add(letter)
    return frozenset(letters)


def has_keyword(keywords: list[str], letter: str) -> bool:
    """True if the folder's keyword file maps ``letter`` (a lower-case Maildir letter) to a
    keyword; letters nobody mapped are another program's, which we cannot name."""
    index = ord(letter) - ord("a")
    return 0 <= index < len(keywords) and bool(keywords[index])
