"""SEARCH: the search keys of RFC 3501 §6.4.4 parsed into a program, and running it.

A program says how much of each message it needs (nothing, the header, the whole message); it
runs in a disk thread, reading a message only when a key about its contents is reached, so
``SEARCH UNSEEN SUBJECT x`` opens only the unseen messages. Strings match case-insensitively
as Unicode (CHARSET UTF-8 or US-ASCII), against header values with RFC 2047 words decoded and
against text parts with their transfer encoding and charset decoded.
"""

from __future__ import annotations

import binascii
import bisect
import calendar
import codecs
import email.header
import email.utils
import itertools
import quopri
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from mailsys.imap.bodystructure import (
    MISSING_DOMAIN,
    Part,
    param,
    parse_addresses,
    parse_message,
    unfold,
)
from mailsys.imap.fetch import Need
from mailsys.imap.headercache import HEADERS
from mailsys.imap.parser import ParseError, Reader, SequenceSet
from mailsys.imap.responses import MONTHS
from mailsys.mailbox.folder import Folder, MessageInfo, MessageVanishedError
from mailsys.mailbox.keywords import letter_of
from mailsys.mailbox.names import DRAFT, FLAGGED, REPLIED, SEEN, TRASHED
from mailsys.mailbox.wire import to_crlf

CHARSETS = ("UTF-8", "US-ASCII")
_FLAG_KEYS = {"ANSWERED": REPLIED, "DELETED": TRASHED, "DRAFT": DRAFT, "FLAGGED": FLAGGED,
              "SEEN": SEEN}
_HEADER_KEYS = {"BCC": b"bcc", "CC": b"cc", "FROM": b"from", "SUBJECT": b"subject", "TO": b"to"}
# How deep parentheses, NOT and OR may nest: RFC 3501 §6.4.4 sets no limit, but every level is a
# stack frame here and in matching; deeper input is a syntax error (BAD), never a RecursionError.
MAX_NESTING = 100


class BadCharsetError(ParseError):
    """CHARSET names a charset we do not search in (RFC 3501 §6.4.4: NO [BADCHARSET])."""


@dataclass(slots=True)
class Candidate:
    """One message as a search sees it; its contents are read (in the disk thread) on demand."""

    seq: int
    info: MessageInfo
    recent: bool
    folder: Folder | None = None
    _part: Part | None = None
    _whole: bool = False

    def header(self) -> bytes | None:
        """The message's header in wire form (from the header cache); None if expunged."""
        both = self.header_and_lower()
        return None if both is None else both[0]

    def header_and_lower(self) -> tuple[bytes, bytes] | None:
        """The header and its lower-cased bytes; None if expunged."""
        if self._part is not None:
            return self._part.header_bytes, self._part.header_bytes.lower()
        if self.folder is None:
            return None
        both = HEADERS.header_and_lower(self.folder, self.info)
        if both is None:
            self.folder = None
        return both

    def message(self, need: Need) -> Part | None:
        """The parsed message (header alone if that is all ``need`` asks); None if expunged."""
        if self._part is not None and (self._whole or need is Need.HEADER):
            return self._part
        if need is Need.HEADER:
            header = self.header()
            if header is None:
                return None
            self._part = parse_message(header)
            return self._part
        if self.folder is None:
            return None
        try:
            raw = self.folder.read_message(self.info)
        except MessageVanishedError:
            self.folder = None
            return None
        self._part = parse_message(to_crlf(raw))
        self._whole = True
        return self._part


@dataclass(frozen=True)
class Context:
    """What every key may consult besides the message."""

    largest_seq: int
    largest_uid: int
    keywords: list[str] = field(default_factory=list)
    saved: frozenset[int] = frozenset()  # the UIDs "$" stands for (RFC 5182)


class Key:
    need = Need.NOTHING

    def match(self, message: Candidate, context: Context) -> bool:
        raise NotImplementedError


@dataclass
class All(Key):
    keys: list[Key]

    def __post_init__(self) -> None:
        self.need = max((k.need for k in self.keys), default=Need.NOTHING)
        # Cheap keys first: a message that fails on its flags is never opened.
        self.keys = sorted(self.keys, key=lambda k: k.need)

    def match(self, message: Candidate, context: Context) -> bool:
        return all(key.match(message, context) for key in self.keys)


@dataclass
class Or(Key):
    left: Key
    right: Key

    def __post_init__(self) -> None:
        self.need = max(self.left.need, self.right.need)

    def match(self, message: Candidate, context: Context) -> bool:
        return self.left.match(message, context) or self.right.match(message, context)


@dataclass
class Not(Key):
    key: Key

    def __post_init__(self) -> None:
        self.need = self.key.need

    def match(self, message: Candidate, context: Context) -> bool:
        return not self.key.match(message, context)


@dataclass
class Sequence(Key):
    numbers: SequenceSet
    uid: bool

    def match(self, message: Candidate, context: Context) -> bool:
        if self.numbers.saved:
            return message.info.uid in context.saved  # RFC 5182 §2.1: "$" holds UIDs
        if self.uid:
            return self.numbers.contains(message.info.uid, context.largest_uid)
        return self.numbers.contains(message.seq, context.largest_seq)


@dataclass
class Flag(Key):
    letter: str

    def match(self, message: Candidate, context: Context) -> bool:
        return self.letter in message.info.flags


@dataclass
class Keyword(Key):
    name: str

    def match(self, message: Candidate, context: Context) -> bool:
        letter = letter_of(context.keywords, self.name)
        return letter is not None and letter in message.info.flags


@dataclass
class Recent(Key):
    def match(self, message: Candidate, context: Context) -> bool:
        return message.recent


@dataclass
class ModSeq(Key):
    """RFC 7162 §3.1.5: the message's mod-sequence is at least ``value``. Every metadata item
    of a message shares its mod-sequence, so the entry name and type are read and ignored."""

    value: int

    def match(self, message: Candidate, context: Context) -> bool:
        return message.info.modseq >= self.value


def uses_modseq(key: Key) -> bool:
    """True if the program has a MODSEQ key (RFC 7162 §3.1.5: the answer then reports one)."""
    return _has(key, ModSeq)


def uses_size(key: Key) -> bool:
    """True if the program has a LARGER or SMALLER key: the messages' wire sizes must be known
    (FolderView.with_sizes) before it runs."""
    return _has(key, Size)


def _has(key: Key, kind: type[Key]) -> bool:
    if isinstance(key, kind):
        return True
    if isinstance(key, All):
        return any(_has(k, kind) for k in key.keys)
    if isinstance(key, Or):
        return _has(key.left, kind) or _has(key.right, kind)
    if isinstance(key, Not):
        return _has(key.key, kind)
    return False


@dataclass
class Everything(Key):
    def match(self, message: Candidate, context: Context) -> bool:
        return True


@dataclass
class Size(Key):
    larger: bool
    size: int

    def match(self, message: Candidate, context: Context) -> bool:
        size = message.info.wire_size
        assert size is not None  # the command asked FolderView.with_sizes first
        return size > self.size if self.larger else size < self.size


@dataclass
class Date(Key):
    """BEFORE/ON/SINCE (INTERNALDATE) and SENTBEFORE/SENTON/SENTSINCE (the Date field), by
    date only, disregarding time and timezone (RFC 3501 §6.4.4)."""

    relation: str  # "BEFORE", "ON" or "SINCE"
    day: int  # days since the epoch
    sent: bool

    def __post_init__(self) -> None:
        self.need = Need.HEADER if self.sent else Need.NOTHING

    def match(self, message: Candidate, context: Context) -> bool:
        if self.sent:
            part = message.message(Need.HEADER)
            value = part.field(b"date") if part is not None else None
            parsed = email.utils.parsedate_tz(value.decode("latin-1")) if value else None
            if parsed is None:
                return False
            day = calendar.timegm((parsed[0], parsed[1], parsed[2], 0, 0, 0)) // 86400
        else:
            day = int(message.info.internal_date // 86400)
        if self.relation == "BEFORE":
            return day < self.day
        if self.relation == "ON":
            return day == self.day
        return day >= self.day


@dataclass
class HeaderContains(Key):
    """A header field contains a string: matched on the raw header bytes, decoding (RFC 2047,
    8-bit) only values that need it."""

    name: bytes
    text: str

    need = Need.HEADER

    def __post_init__(self) -> None:
        self._start = self.name.lower() + b":"
        self._ascii = self.text.isascii()
        self._needle = self.text.encode("ascii", "replace")
        # A plain ASCII header without the string cannot hold it in the field either.
        self.skips_plain_misses = self._ascii and bool(self.text)
        # Each occurrence of the field, its value in group 1: it runs to the first CRLF not
        # followed by SP or HTAB (RFC 5322 §2.2.3 folding); a lone CR is part of it.
        # The same, over plain-ASCII headers joined (run_over): a value of the field that
        # contains the string, to its end at most. Only for a string without CR or LF.
        self.plain_search = (re.compile(rb"\n" + re.escape(self._start)
                                        + rb"(?:[^\r]|\r(?!\n)|\r\n(?=[ \t]))*?"
                                        + re.escape(self._needle))
                             if self.skips_plain_misses and not re.search(rb"[\r\n]",
                                                                          self._needle)
                             else None)
        self.fields = re.compile(rb"(?:\A|\n)" + re.escape(self._start)
                                 + rb"([^\r]*(?:\r(?:(?!\n)|\n(?=[ \t]))[^\r]*)*)")

    def match(self, message: Candidate, context: Context) -> bool:
        both = message.header_and_lower()
        if both is None:
            return False
        header, lower = both
        if (self.skips_plain_misses and self._needle not in lower and lower.isascii()
                and b"=?" not in lower):
            # Nowhere in a plain ASCII header: not in the field either (the common miss, one
            # scan in C instead of walking the fields in Python).
            return False
        for found in self.fields.finditer(lower):
            if not self.text:
                return True
            begin, end = found.span(1)
            value = lower[begin:end]
            if self._ascii and value.isascii() and b"=?" not in value:
                if self._needle in value:
                    return True
            elif self.text in decode_header(header[begin:end]).casefold():
                return True
        return False


@dataclass
class AddressContains(HeaderContains):
    """FROM, TO, CC, BCC: the field's text contains the string, or its addresses do once
    parsed, as ``name <local@domain>`` (RFC 3501 §6.4.4 "contains the specified string"): an
    address whose field text is split by comments, angle brackets or a group still matches
    by its whole address, as in Dovecot."""

    def match(self, message: Candidate, context: Context) -> bool:
        if HeaderContains.match(self, message, context):
            return True
        part = message.message(Need.HEADER)
        if part is None or not self.text:
            return False
        wanted = self.name.lower()
        for name, value in part.fields():
            if name.lower() != wanted:
                continue
            words = []
            for address in parse_addresses(unfold(value)):
                if address.name:
                    words.append(decode_header(address.name))
                if address.mailbox is not None and address.host not in (None, MISSING_DOMAIN):
                    words.append(f"<{address.mailbox.decode('utf-8', 'replace')}@"
                                 f"{address.host.decode('utf-8', 'replace')}>")
                elif address.mailbox is not None:
                    words.append(address.mailbox.decode("utf-8", "replace"))
            if self.text in " ".join(words).casefold():
                return True
        return False


@dataclass
class BodyContains(Key):
    text: str
    with_header: bool  # TEXT: the header too

    need = Need.WHOLE

    def match(self, message: Candidate, context: Context) -> bool:
        part = message.message(Need.WHOLE)
        if part is None:
            return False
        if self.with_header and self.text in decode_header(part.header_bytes).casefold():
            return True
        return any(self.text in chunk.casefold() for chunk in text_of(part))


def decode_header(value: bytes) -> str:
    """A header value as text: unfolded, RFC 2047 words decoded, 8-bit read as UTF-8."""
    raw = value.replace(b"\r\n", b"").replace(b"\n", b"")
    text = raw.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, AssertionError):
        return text


def text_of(part: Part) -> Iterator[str]:
    """The decoded text of every text part below ``part`` (and of encapsulated messages)."""
    if part.multipart:
        for child in part.children:
            yield from text_of(child)
        return
    if part.message is not None:
        yield decode_header(part.message.header_bytes)
        yield from text_of(part.message)
        return
    body = part.body
    encoding = (part.field(b"content-transfer-encoding") or b"").strip().lower()
    try:
        if encoding == b"base64":
            body = binascii.a2b_base64(body)
        elif encoding == b"quoted-printable":
            body = quopri.decodestring(body)
    except (binascii.Error, ValueError):
        pass
    if part.maintype != b"text":
        yield body.decode("utf-8", "replace")
        return
    charset = (param(part.params, b"charset") or b"utf-8").decode("ascii", "replace")
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    yield body.decode(charset, "replace")


# --- parsing ---------------------------------------------------------------------------------


def parse_search(reader: Reader, *, uid: bool, allow_charset: bool = True) -> Key:
    """Everything after SEARCH [RETURN (...)]: [CHARSET x] keys (all must match)."""
    keys: list[Key] = []
    if reader.data[reader.position:reader.position + 8].upper() == b"CHARSET ":
        if not allow_charset:
            # RFC 6855 §3: after ENABLE UTF8=ACCEPT a client must not name a charset.
            raise ParseError("CHARSET is not allowed once UTF-8 is enabled")
        reader.position += 8
        charset = reader.astring().decode("ascii", "replace").upper()
        if charset not in CHARSETS:
            raise BadCharsetError(charset)
        reader.space()
    while True:
        keys.append(_key(reader, uid, 0))
        if reader.at_end():
            break
        reader.space()
    return keys[0] if len(keys) == 1 else All(keys)


def _string(reader: Reader) -> str:
    reader.space()
    return reader.astring().decode("utf-8", "replace").casefold()


def _date(reader: Reader) -> int:
    reader.space()
    value = reader.astring().decode("ascii", "replace")
    day_text, _, rest = value.partition("-")
    month_text, _, year_text = rest.partition("-")
    try:
        month = [m.upper() for m in MONTHS].index(month_text.upper()) + 1
        day, year = int(day_text), int(year_text)
        stamp = calendar.timegm((year, month, day, 0, 0, 0))
        time.gmtime(stamp)
    except (ValueError, OverflowError):
        raise ParseError("Invalid date") from None
    if not 1 <= day <= 31 or len(year_text) != 4:
        raise ParseError("Invalid date")
    return stamp // 86400


def _number(reader: Reader) -> int:
    reader.space()
    return reader.number()


def _key(reader: Reader, uid: bool, depth: int) -> Key:
    if depth > MAX_NESTING:
        raise ParseError("Search keys nested too deeply")
    if reader.accept(b"("):
        keys = [_key(reader, uid, depth + 1)]
        while not reader.accept(b")"):
            reader.space()
            keys.append(_key(reader, uid, depth + 1))
        return All(keys)
    char = reader.peek()
    if char is not None and (0x30 <= char <= 0x39 or char in (0x2A, 0x24)):
        return Sequence(reader.sequence_set(), uid=False)
    name = reader.atom().upper().decode("ascii", "replace")
    if name == "ALL":
        return Everything()
    if name in _FLAG_KEYS:
        return Flag(_FLAG_KEYS[name])
    if name.startswith("UN") and name[2:] in _FLAG_KEYS:
        return Not(Flag(_FLAG_KEYS[name[2:]]))
    if name == "RECENT":
        return Recent()
    if name == "NEW":
        return All([Recent(), Not(Flag(SEEN))])
    if name == "OLD":
        return Not(Recent())
    if name in ("KEYWORD", "UNKEYWORD"):
        reader.space()
        keyword = Keyword(reader.atom().decode("utf-8", "replace"))
        return keyword if name == "KEYWORD" else Not(keyword)
    if name == "SUBJECT":
        return HeaderContains(b"subject", _string(reader))
    if name in _HEADER_KEYS:
        return AddressContains(_HEADER_KEYS[name], _string(reader))
    if name == "HEADER":
        reader.space()
        field_name = reader.astring()
        return HeaderContains(field_name, _string(reader))
    if name in ("BODY", "TEXT"):
        return BodyContains(_string(reader), with_header=name == "TEXT")
    if name in ("BEFORE", "ON", "SINCE"):
        return Date(name, _date(reader), sent=False)
    if name in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        return Date(name[4:], _date(reader), sent=True)
    if name in ("LARGER", "SMALLER"):
        return Size(name == "LARGER", _number(reader))
    if name == "UID":
        reader.space()
        return Sequence(reader.sequence_set(), uid=True)
    if name == "MODSEQ":
        # RFC 7162 §3.1.5: MODSEQ [entry-name SP entry-type-req SP] mod-sequence-valzer
        reader.space()
        if reader.peek_is(b'"'):
            reader.quoted()
            reader.space()
            if reader.atom().lower() not in (b"priv", b"shared", b"all"):
                raise ParseError("Expected priv, shared or all")
            reader.space()
        return ModSeq(reader.number())
    if name == "NOT":
        reader.space()
        return Not(_key(reader, uid, depth + 1))
    if name == "OR":
        reader.space()
        left = _key(reader, uid, depth + 1)
        reader.space()
        return Or(left, _key(reader, uid, depth + 1))
    raise ParseError(f"Unknown search key {name[:40]}")


def run(key: Key, candidates: list[Candidate], context: Context) -> list[Candidate]:
    """The candidates ``key`` matches (disk thread when the key needs message contents)."""
    return [c for c in candidates if key.match(c, context)]


_SEPARATOR = b"\r\n\n"


def run_over(key: Key, messages: list[MessageInfo], first_seq: int, recent: frozenset[int],
             folder: Folder | None, context: Context) -> list[Candidate]:
    """Disk thread: the matches of ``key`` among ``messages``, numbered from ``first_seq``.

    A plain-ASCII search of one header field (SEARCH SUBJECT x, the common header search)
    over headers that are all plain ASCII without encoded words (most folders) is one
    pattern search of their cached lower-cased forms joined, so that Python work is done
    per match, not per message; any other search runs over a candidate per message.
    """
    if type(key) is HeaderContains and key.skips_plain_misses and folder is not None:
        lowers = HEADERS.lowers(folder, messages)
        # An expunged message contributes nothing; every header is preceded by a separator
        # that ends any value before it ("\r\n" then no SP/HTAB) and starts a line ("\n").
        blob = _SEPARATOR + _SEPARATOR.join([lower or b"" for lower in lowers])
        if blob.isascii() and b"=?" not in blob and key.plain_search is not None:
            starts = list(itertools.accumulate(
                (len(_SEPARATOR) + len(lower or b"") for lower in lowers), initial=0))
            hits = sorted({bisect.bisect_right(starts, m.start()) - 1
                           for m in key.plain_search.finditer(blob)})
            return [Candidate(first_seq + i, messages[i], messages[i].uid in recent, folder)
                    for i in hits]
    return run(key, [Candidate(seq, info, info.uid in recent, folder)
                     for seq, info in enumerate(messages, first_seq)], context)
