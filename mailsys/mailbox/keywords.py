"""IMAP keywords of one folder: which Maildir flag letter (a-z) stands for which keyword.

Maildir has no room for keywords in a file name beyond its flag letters, so, as Dovecot does, the
lower-case letters are keywords and a per-folder file maps them: ``dovecot-keywords`` holds one
``<index> <keyword>`` line per keyword, letter ``a`` being index 0. We use Dovecot's file name
and format, so a Maildir moved between Dovecot and mailsys keeps its keywords. A folder has at
most 26 keywords; letters are never reassigned while the file exists. Blocking; disk threads.
"""

from __future__ import annotations

import os
import string
import threading
from collections.abc import Iterable
from pathlib import Path

from mailsys.diskio import fsync_directory
from mailsys.mailbox.folder import Folder

KEYWORDS_NAME = "dovecot-keywords"
LETTERS = string.ascii_lowercase
MAX_KEYWORDS = len(LETTERS)


class TooManyKeywordsError(Exception):
    """The folder already has a keyword for every letter a-z."""


def read_keywords(directory: Path) -> list[str]:
    """The folder's keywords, index i being letter a+i ("" for a gap); [] if there is no file."""
    try:
        text = (directory / KEYWORDS_NAME).read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return []
    slots: list[str] = [""] * MAX_KEYWORDS
    for line in text.split("\n"):
        index, _, name = line.partition(" ")
        if not index.isdigit() or not name or int(index) >= MAX_KEYWORDS:
            continue  # a damaged line loses one keyword, never the others
        if name not in slots:
            slots[int(index)] = name
    while slots and not slots[-1]:
        slots.pop()
    return slots


def _write(directory: Path, slots: list[str]) -> None:
    data = "".join(f"{i} {name}\n" for i, name in enumerate(slots) if name)
    tmp = directory / f"{KEYWORDS_NAME}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data.encode("utf-8", "surrogateescape"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / KEYWORDS_NAME)
    fsync_directory(directory)


def define_keywords(folder: Folder, names: Iterable[str]) -> list[str]:
    """Make sure every keyword in ``names`` has a letter (under the folder's lock).

    Returns the folder's keywords afterwards; TooManyKeywordsError when the letters run out
    (nothing is written then). Keywords compare case-insensitively (RFC 3501 §2.3.2 atoms).
    """
    wanted = list(names)
    with folder.locked():
        slots = read_keywords(folder.path)
        known = {name.lower() for name in slots if name}
        added = False
        for name in wanted:
            if name.lower() in known:
                continue
            try:
                index = slots.index("")
            except ValueError:
                if len(slots) >= MAX_KEYWORDS:
                    raise TooManyKeywordsError(name) from None
                slots.append("")
                index = len(slots) - 1
            slots[index] = name
            known.add(name.lower())
            added = True
        if added:
            _write(folder.path, slots)
        return slots


def letter_of(slots: list[str], name: str) -> str | None:
    """The flag letter of keyword ``name`` in ``slots``, or None."""
    lowered = name.lower()
    for index, slot in enumerate(slots):
        if slot and slot.lower() == lowered:
            return LETTERS[index]
    return None


def keyword_of(slots: list[str], letter: str) -> str | None:
    """The keyword of flag letter ``letter`` (a-z), or None if it names none."""
    index = ord(letter) - ord("a")
    if 0 <= index < len(slots) and slots[index]:
        return slots[index]
    return None
