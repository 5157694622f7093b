"""The IMAP command parser: framing of command lines and literals, and the argument reader.

``Framer`` cuts the input stream into whole commands, including literals (RFC 3501 §4.3, with
RFC 7888 LITERAL+ non-synchronizing literals), enforcing the command-length and literal-size
limits; it asks the session to send a continuation request before a synchronizing literal.
``Reader`` then takes a command's arguments apart (RFC 3501 §9 formal syntax). Any input, however
malformed, gives an event or a ParseError, never another exception.
"""

from __future__ import annotations

import enum
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TypeVar

T = TypeVar("T")

# RFC 3501 §9: a literal is "{" number "}" CRLF; RFC 7888: "{" number "+}" is non-synchronizing.
_LITERAL_MARKER = re.compile(rb"\{(\d{1,19})(\+?)\}\Z")
_TAG_CHARS = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\+]+")
# ATOM-CHAR: any CHAR except atom-specials "(" ")" "{" SP CTL "%" "*" DQUOTE "\" "]".
_ATOM = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\\]]+")
# ASTRING-CHAR adds "]" (resp-specials).
_LITERAL = re.compile(rb"(~?)\{(\d{1,19})\+?\}\r\n")
_ASTRING_ATOM = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\]+")
# list-char: ATOM-CHAR / list-wildcards / resp-specials.
_LIST_ATOM = re.compile(rb"[^\x00-\x20\x7f-\xff(){\"\\]+")
_NUMBER = re.compile(rb"\d{1,19}")
_SEQUENCE = re.compile(rb"[0-9*:,]+")
MAX_NUMBER = 2**63 - 1
# A literal larger than this is written to an unlinked temporary file as it arrives instead of
# being held in memory (an APPEND of a large message; only APPEND takes one, see Reader).
SPOOL_THRESHOLD = 1024 * 1024
STAR = -1  # "*" in a sequence set: the largest number in use


class ParseError(ValueError):
    """The command does not follow the syntax; the text is safe to show the client."""


class Rejection(enum.Enum):
    LINE_TOO_LONG = "Command line too long"
    LITERAL_TOO_BIG = "Literal too large"


@dataclass(eq=False)
class SpooledLiteral:
    """A literal's bytes in an unlinked temporary file (rewound once complete)."""

    file: IO[bytes]
    size: int

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class Command:
    """One whole command: its lines (CRLF-joined) with every literal's bytes inline, except
    literals over the spool threshold: they are in ``spooled``, by the offset in ``data``
    where their bytes would have been (there ``data`` holds none of them)."""

    data: bytes
    spooled: dict[int, SpooledLiteral] = field(default_factory=dict)

    def close(self) -> None:
        """Drop the command's temporary files (idempotent)."""
        for literal in self.spooled.values():
            literal.close()


@dataclass(frozen=True)
class ContinueLiteral:
    """Send a continuation request: the client waits for it before a synchronizing literal."""

    size: int


@dataclass(frozen=True)
class Rejected:
    """A command dropped by a limit; ``tag`` is what could be read of its tag (may be b"")."""

    tag: bytes
    reason: Rejection
    synchronizing: bool = True


Event = Command | ContinueLiteral | Rejected


def tag_of(data: bytes) -> bytes:
    """The tag at the start of ``data`` if it is a valid one, else b""."""
    match = _TAG_CHARS.match(data)
    if match is None or match.end() >= len(data) or data[match.end()] != 0x20:
        return b""
    return match.group()


class Framer:
    """Cuts received bytes into commands. Feed it with ``feed``; take events with
    ``next_event`` (commands) or ``next_line`` (IDLE's DONE, SASL responses)."""

    def __init__(self, max_line: int, max_literal: int,
                 spool_threshold: int = SPOOL_THRESHOLD,
                 may_spool: Callable[[], bool] = lambda: True) -> None:
        self.max_line = max_line  # also the limit on a command's text outside its literals
        self.max_literal = max_literal  # the most literal bytes one command may carry
        self.spool_threshold = spool_threshold
        # Whether a literal may go to disk now; when not (before login), a larger one than
        # the threshold is refused as too big instead.
        self.may_spool = may_spool
        self._spooled: dict[int, SpooledLiteral] = {}
        self._spooling: SpooledLiteral | None = None  # the literal being written to a file
        self._buffer = b""
        self._offset = 0
        self._parts: list[bytes] = []
        self._text = 0  # bytes of the command's text so far
        self._literals = 0  # bytes of its literals so far
        self._literal_left = 0
        self._discard_left = 0  # of a rejected non-synchronizing literal
        self._discard_command = False  # the rest of a rejected command's lines
        self._skip_line = False  # an overlong line is being dropped
        self._skipped_tag = b""

    @property
    def pending(self) -> int:
        """Bytes received and not yet taken."""
        return len(self._buffer) - self._offset

    @property
    def in_command(self) -> bool:
        """True while a command is partly received (between its lines and literals)."""
        return bool(self._parts) or self._literal_left > 0

    def feed(self, data: bytes) -> None:
        if self._offset < len(self._buffer):
            self._buffer = self._buffer[self._offset:] + data if self._offset else (
                self._buffer + data)
        else:
            self._buffer = data
        self._offset = 0

    def clear(self) -> int:
        """Drop everything received and not taken (STARTTLS); returns how many bytes."""
        dropped = self.pending
        self._buffer = b""
        self._offset = 0
        self._reset()
        self._literal_left = self._discard_left = 0
        self._discard_command = self._skip_line = False
        return dropped

    def _reset(self, *, keep_spooled: bool = False) -> None:
        self._parts = []
        self._text = 0
        self._literals = 0
        if not keep_spooled:
            for literal in self._spooled.values():
                literal.close()
            if self._spooling is not None:
                self._spooling.close()
        self._spooled = {}
        self._spooling = None

    def _take(self, count: int) -> bytes:
        start = self._offset
        chunk = self._buffer[start:start + count]
        self._offset = start + len(chunk)
        return chunk

    def _line(self) -> bytes | Rejection | None:
        """The next line without its CRLF, None if incomplete, or LINE_TOO_LONG once."""
        buffer = self._buffer
        start = self._offset
        lf = buffer.find(b"\n", start)
        if lf < 0:
            if len(buffer) - start > self.max_line:
                if not self._skip_line:
                    self._skipped_tag = tag_of(self._parts[0] if self._parts else
                                               buffer[start:start + 200])
                self._skip_line = True
                self._buffer = b""
                self._offset = 0
            return None
        self._offset = lf + 1
        if self._skip_line:
            self._skip_line = False
            return Rejection.LINE_TOO_LONG
        end = lf - 1 if lf > start and buffer[lf - 1] == 0x0D else lf
        return buffer[start:end]

    def next_line(self) -> bytes | Rejected | None:
        """A raw line (for IDLE and AUTHENTICATE), or None until one is complete."""
        line = self._line()
        if line is Rejection.LINE_TOO_LONG:
            return Rejected(self._skipped_tag, Rejection.LINE_TOO_LONG)
        if isinstance(line, bytes) and len(line) > self.max_line:
            return Rejected(b"", Rejection.LINE_TOO_LONG)
        return line if isinstance(line, bytes) else None

    def next_event(self) -> Event | None:
        """The next complete command or continuation request, or None until more arrives."""
        while True:
            if self._literal_left:
                chunk = self._take(self._literal_left)
                self._literal_left -= len(chunk)
                spooling = self._spooling
                if spooling is None:
                    self._parts.append(chunk)
                else:
                    # An unlinked file, buffered writes and no fsync: the page cache takes it
                    # at memory speed; the bytes only need to outlive this command.
                    spooling.file.write(chunk)
                    if not self._literal_left:
                        spooling.file.flush()
                        spooling.file.seek(0)
                        self._spooling = None
                if self._literal_left:
                    return None
            if self._discard_left:
                self._discard_left -= len(self._take(self._discard_left))
                if self._discard_left:
                    return None
            line = self._line()
            if line is None:
                return None
            if line is Rejection.LINE_TOO_LONG:
                self._reset()
                self._discard_command = False
                return Rejected(self._skipped_tag, Rejection.LINE_TOO_LONG)
            assert isinstance(line, bytes)
            marker = _LITERAL_MARKER.search(line)
            if self._discard_command:
                # The rest of a command whose non-synchronizing literal was refused.
                if marker is not None and marker.group(2):
                    self._discard_left = int(marker.group(1))
                else:
                    self._discard_command = False
                continue
            self._text += len(line)
            if self._text > self.max_line:
                tag = tag_of(self._parts[0] if self._parts else line)
                self._reset()
                if marker is not None and marker.group(2):
                    self._discard_left = int(marker.group(1))
                    self._discard_command = True
                return Rejected(tag, Rejection.LINE_TOO_LONG, marker is None or
                                not marker.group(2))
            if marker is None:
                self._parts.append(line)
                data = b"".join(self._parts)
                spooled = self._spooled
                self._reset(keep_spooled=True)
                return Command(data, spooled)
            size = int(marker.group(1))
            synchronizing = not marker.group(2)
            self._literals += size
            limit = self.max_literal if self.may_spool() else min(self.max_literal,
                                                                   self.spool_threshold)
            if self._literals > limit:
                tag = tag_of(self._parts[0] if self._parts else line)
                self._reset()
                if not synchronizing:
                    # RFC 7888 §4: the client sends it anyway; read it and throw it away.
                    self._discard_left = size
                    self._discard_command = True
                return Rejected(tag, Rejection.LITERAL_TOO_BIG, synchronizing)
            self._parts.append(line + b"\r\n")
            self._literal_left = size
            if size > self.spool_threshold:
                offset = sum(len(part) for part in self._parts)
                # Closed with its command (Command.close) or when the command is dropped.
                self._spooling = SpooledLiteral(tempfile.TemporaryFile(), size)  # noqa: SIM115
                self._spooled[offset] = self._spooling
            if synchronizing:
                return ContinueLiteral(size)


@dataclass(frozen=True)
class SequenceSet:
    """A sequence set (RFC 3501 §9 sequence-set): ranges whose ends may be STAR."""

    ranges: tuple[tuple[int, int], ...]
    # RFC 5182 §2.2: "$" stands for the UIDs the last SEARCH RETURN (SAVE) kept; the session
    # resolves it, ``ranges`` is then empty.
    saved: bool = False

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """The ranges with "*" replaced by ``largest`` and each written low to high."""
        out = []
        for low, high in self.ranges:
            low = largest if low == STAR else low
            high = largest if high == STAR else high
            out.append((low, high) if low <= high else (high, low))
        return out

    def contains(self, value: int, largest: int) -> bool:
        return any(low <= value <= high for low, high in self.resolve(largest))

    @property
    def has_star(self) -> bool:
        return any(STAR in pair for pair in self.ranges)


def parse_sequence_set(text: bytes) -> SequenceSet:
    """Parse ``1,3:5,7:*``; ParseError if malformed or a number is 0."""
    ranges = []
    for item in text.split(b","):
        low_text, colon, high_text = item.partition(b":")
        low = _sequence_number(low_text)
        high = _sequence_number(high_text) if colon else low
        ranges.append((low, high))
    return SequenceSet(tuple(ranges))


def _sequence_number(text: bytes) -> int:
    if text == b"*":
        return STAR
    if not text.isdigit() or len(text) > 10:
        raise ParseError("Invalid sequence set")
    value = int(text)
    if not 0 < value < 2**32:
        raise ParseError("Invalid sequence set: numbers are 1 to 4294967295")
    return value


class Reader:
    """Reads a command's arguments in order; every method raises ParseError on bad syntax."""

    def __init__(self, data: bytes, position: int = 0,
                 spooled: dict[int, SpooledLiteral] | None = None) -> None:
        self.data = data
        self.position = position
        self.spooled = spooled or {}

    def at_end(self) -> bool:
        return self.position >= len(self.data)

    def peek(self) -> int | None:
        return self.data[self.position] if self.position < len(self.data) else None

    def peek_is(self, char: bytes) -> bool:
        return self.data.startswith(char, self.position)

    def expect(self, char: bytes) -> None:
        if not self.data.startswith(char, self.position):
            raise ParseError(f"Expected {char.decode('ascii', 'replace')!r}")
        self.position += len(char)

    def accept(self, char: bytes) -> bool:
        if self.data.startswith(char, self.position):
            self.position += len(char)
            return True
        return False

    def space(self) -> None:
        self.expect(b" ")

    def end(self) -> None:
        if not self.at_end():
            raise ParseError("Unexpected extra arguments")

    def _match(self, pattern: re.Pattern[bytes], what: str) -> bytes:
        match = pattern.match(self.data, self.position)
        if match is None:
            raise ParseError(f"Expected {what}")
        self.position = match.end()
        return match.group()

    def tag(self) -> bytes:
        return self._match(_TAG_CHARS, "a tag")

    def atom(self) -> bytes:
        return self._match(_ATOM, "an atom")

    def number(self) -> int:
        value = int(self._match(_NUMBER, "a number"))
        if value > MAX_NUMBER:
            raise ParseError("Number too large")
        return value

    def nz_number(self) -> int:
        value = self.number()
        if value == 0:
            raise ParseError("Expected a non-zero number")
        return value

    def quoted(self) -> bytes:
        self.expect(b'"')
        out = bytearray()
        data = self.data
        position = self.position
        while True:
            if position >= len(data):
                raise ParseError("Unterminated quoted string")
            char = data[position]
            if char == 0x22:
                self.position = position + 1
                return bytes(out)
            if char == 0x5C:
                position += 1
                if position >= len(data) or data[position] not in (0x22, 0x5C):
                    raise ParseError("Bad escape in a quoted string")
                char = data[position]
            elif char in (0x0A, 0x0D, 0x00):
                raise ParseError("CR, LF or NUL in a quoted string")
            out.append(char)
            position += 1

    def literal(self) -> bytes:
        """A literal ``{n}`` (or ``{n+}``), or a literal8 ``~{n}`` (RFC 3516 §4.4)."""
        match = _LITERAL.match(self.data, self.position)
        if match is None:
            raise ParseError("Expected a literal")
        size = int(match.group(2))
        start = match.end()
        if start in self.spooled:
            raise ParseError("Literal too large for this command")
        if start + size > len(self.data):
            raise ParseError("Literal shorter than announced")
        value = self.data[start:start + size]
        if not match.group(1) and b"\x00" in value:
            # RFC 3501 §9: a literal is CHAR8s, never NUL; binary data needs a literal8.
            raise ParseError("NUL in a literal (binary data needs a literal8, ~{n})")
        self.position = start + size
        return value

    def _at_literal(self) -> bool:
        """A literal or literal8 starts here ("~" alone is an atom character, RFC 3501 §9)."""
        return self.peek_is(b"{") or self.peek_is(b"~{")

    def message_literal(self) -> bytes | SpooledLiteral:
        """An APPEND message: a literal or literal8, which may have been spooled to a file."""
        match = _LITERAL.match(self.data, self.position)
        if match is not None and match.end() in self.spooled:
            self.position = match.end()
            return self.spooled[match.end()]
        return self.literal()

    def string(self) -> bytes:
        if self.peek() == 0x22:
            return self.quoted()
        if self._at_literal():
            return self.literal()
        raise ParseError("Expected a string")

    def astring(self) -> bytes:
        if self.peek() == 0x22 or self._at_literal():
            return self.string()
        return self._match(_ASTRING_ATOM, "an atom or string")

    def nstring(self) -> bytes | None:
        if self.data[self.position:self.position + 3].upper() == b"NIL":
            self.position += 3
            return None
        return self.string()

    def list_mailbox(self) -> bytes:
        """A LIST pattern: an atom that may hold "%" and "*", or a string."""
        if self.peek() == 0x22 or self._at_literal():
            return self.string()
        return self._match(_LIST_ATOM, "a mailbox pattern")

    def sequence_set(self) -> SequenceSet:
        """A sequence set, or "$" (RFC 5182 SEARCHRES) as ``SequenceSet((), saved=True)``."""
        if self.accept(b"$"):
            return SequenceSet((), saved=True)
        return parse_sequence_set(self._match(_SEQUENCE, "a sequence set"))

    def paren_list(self, item: Callable[[], T], *, allow_empty: bool = True) -> list[T]:
        """``(item SP item ...)``."""
        self.expect(b"(")
        items: list[T] = []
        if self.accept(b")"):
            if not allow_empty:
                raise ParseError("Empty list")
            return items
        while True:
            items.append(item())
            if self.accept(b")"):
                return items
            self.space()

    def flag(self) -> bytes:
        """A flag: "\\" atom (system or extension flag) or a keyword atom."""
        if self.accept(b"\\"):
            if self.accept(b"*"):
                return b"\\*"
            return b"\\" + self.atom()
        return self.atom()

    def flag_list(self) -> list[bytes]:
        return self.paren_list(self.flag)
