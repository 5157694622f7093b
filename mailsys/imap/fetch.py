"""FETCH: the attributes a client asks for (RFC 3501 §6.4.5), what each needs from the disk, and
the FETCH response of one message (§7.4.2).

Attributes are sorted by what they need: nothing but the UID list (UID, FLAGS, INTERNALDATE,
RFC822.SIZE, MODSEQ — answered from file names, stat and the UID file, no message is opened),
the header (ENVELOPE, HEADER sections: only the start of the file is read) or the whole message.
Bodies are sent in wire form (CRLF), always as literals, so every size is exact whatever bytes a
message holds.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

from mailsys.imap import binary
from mailsys.imap.binary import UnknownCTEError as UnknownCTEError  # for fetchrun
from mailsys.imap.bodystructure import (
    Part,
    Section,
    body_structure,
    envelope,
    parse_message,
    section_bytes,
)
from mailsys.imap.headercache import HEADERS
from mailsys.imap.parser import ParseError, Reader
from mailsys.imap.responses import NIL, astring, internal_date, literal
from mailsys.mailbox.folder import Folder, MessageInfo, MessageVanishedError
from mailsys.mailbox.wire import to_crlf


class Need(enum.IntEnum):
    """How much of a message the disk must give."""

    NOTHING = 0
    HEADER = 1
    WHOLE = 2


_SIMPLE = {
    "UID": Need.NOTHING, "FLAGS": Need.NOTHING, "INTERNALDATE": Need.NOTHING,
    "RFC822.SIZE": Need.NOTHING, "ENVELOPE": Need.HEADER, "RFC822.HEADER": Need.HEADER,
    "BODYSTRUCTURE": Need.WHOLE, "BODY": Need.WHOLE, "RFC822": Need.WHOLE,
    "RFC822.TEXT": Need.WHOLE, "MODSEQ": Need.NOTHING,
}
# RFC 3501 §6.4.5 macros.
_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_NAME = re.compile(rb"[A-Za-z0-9.]+")
_SECTION_TEXT = re.compile(rb"(?i)HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME")


@dataclass(frozen=True)
class FetchItem:
    """One requested attribute; ``section`` is set for BODY[...] / BODY.PEEK[...] and for
    BINARY[...], BINARY.PEEK[...], BINARY.SIZE[...] (RFC 3516; names "BINARY", "BINARY.SIZE")."""

    name: str
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None

    @property
    def need(self) -> Need:
        if self.section is None:
            return _SIMPLE[self.name]
        return Need.HEADER if self.section.header_only else Need.WHOLE

    @property
    def sets_seen(self) -> bool:
        """RFC 3501 §6.4.5: BODY[...], RFC822 and RFC822.TEXT set \\Seen; PEEK does not."""
        if self.section is not None:
            return not self.peek
        return self.name in ("RFC822", "RFC822.TEXT")

    def label(self) -> bytes:
        """The attribute's name in the response (``BODY[1.TEXT]<0>``)."""
        if self.section is None:
            return self.name.encode()
        return self.name.encode() + b"[" + section_label(self.section) + b"]" + (
            b"<%d>" % self.partial[0] if self.partial else b"")


def section_label(section: Section) -> bytes:
    out = ".".join(str(n) for n in section.parts)
    if section.text:
        out = f"{out}.{section.text}" if out else section.text
    label = out.encode()
    if section.fields:
        label += b" (" + b" ".join(astring(f) for f in section.fields) + b")"
    return label


def parse_fetch_items(reader: Reader) -> list[FetchItem]:
    """The attribute list of FETCH: a macro, one attribute, or a parenthesized list."""
    if reader.peek_is(b"("):
        items = reader.paren_list(lambda: _item(reader), allow_empty=False)
    else:
        match = _NAME.match(reader.data, reader.position)
        word = match.group().upper().decode() if match else ""
        if word in _MACROS and not reader.data.startswith(b"[", match.end() if match else 0):
            reader.position = match.end() if match else reader.position
            return [FetchItem(name) for name in _MACROS[word]]
        items = [_item(reader)]
    return items


def _item(reader: Reader) -> FetchItem:
    match = _NAME.match(reader.data, reader.position)
    if match is None:
        raise ParseError("Expected a FETCH attribute")
    reader.position = match.end()
    name = match.group().upper().decode()
    if name in ("BINARY", "BINARY.PEEK", "BINARY.SIZE"):
        # RFC 3516 §4.1; BINARY.SIZE never sets \Seen, so it counts as a peek.
        section = binary.parse_section(reader)
        partial = _partial(reader) if name != "BINARY.SIZE" else None
        return FetchItem("BINARY.SIZE" if name == "BINARY.SIZE" else "BINARY", section,
                         name != "BINARY", partial)
    if name in ("BODY", "BODY.PEEK") and reader.peek_is(b"["):
        section = _section(reader)
        return FetchItem("BODY", section, name == "BODY.PEEK", _partial(reader))
    if name not in _SIMPLE:
        raise ParseError(f"Unknown FETCH attribute {name[:40]}")
    return FetchItem(name)


def _partial(reader: Reader) -> tuple[int, int] | None:
    if not reader.accept(b"<"):
        return None
    origin = reader.number()
    reader.expect(b".")
    count = reader.nz_number()
    reader.expect(b">")
    return (origin, count)


def _section(reader: Reader) -> Section:
    reader.expect(b"[")
    parts: list[int] = []
    text = ""
    fields: tuple[bytes, ...] = ()
    while True:
        if reader.accept(b"]"):
            if parts and reader.data[reader.position - 2:reader.position - 1] == b".":
                raise ParseError("Bad section")
            return Section(tuple(parts), text, fields)
        char = reader.peek()
        if char is not None and 0x30 <= char <= 0x39 and not text:
            if parts and reader.data[reader.position - 1:reader.position] != b".":
                raise ParseError("Bad section")
            parts.append(reader.nz_number())
            if reader.peek_is(b"."):
                reader.position += 1
            continue
        match = _SECTION_TEXT.match(reader.data, reader.position)
        if match is None or text or (
                parts and reader.data[reader.position - 1:reader.position] != b"."):
            raise ParseError("Bad section")
        reader.position = match.end()
        text = match.group().upper().decode()
        if text == "MIME" and not parts:
            raise ParseError("MIME needs a part number")
        if text.startswith("HEADER.FIELDS"):
            reader.space()
            fields = tuple(reader.paren_list(reader.astring, allow_empty=False))


def need_of(items: list[FetchItem]) -> Need:
    return max((item.need for item in items), default=Need.NOTHING)


def load(folder: Folder, infos: list[MessageInfo], need: Need) -> list[bytes | None]:
    """Disk thread: each message (or its header) in wire form; None for one expunged."""
    out: list[bytes | None] = []
    for info in infos:
        if need is not Need.WHOLE:
            out.append(HEADERS.header(folder, info))
            continue
        try:
            raw = folder.read_message(info)
        except MessageVanishedError:
            out.append(None)
            continue
        out.append(to_crlf(raw))
    return out


def render(seq: int, info: MessageInfo, items: list[FetchItem], flags: Callable[[], bytes],
           data: bytes | None, *, with_uid: bool) -> bytes:
    """One ``* seq FETCH (...)`` line; ``data`` is the wire form if any item needs it.

    UnknownCTEError if a BINARY item meets an encoding we cannot undo."""
    out: list[bytes] = []
    if with_uid and not any(item.name == "UID" and item.section is None for item in items):
        out.append(b"UID %d" % info.uid)
    root: Part | None = None
    for item in items:
        name = item.name
        if item.section is None:
            if name == "UID":
                out.append(b"UID %d" % info.uid)
            elif name == "FLAGS":
                out.append(b"FLAGS (" + flags() + b")")
            elif name == "INTERNALDATE":
                out.append(b"INTERNALDATE " + internal_date(info.internal_date))
            elif name == "RFC822.SIZE":
                out.append(b"RFC822.SIZE %d" % wire_size_of(info))
            elif name == "MODSEQ":
                out.append(b"MODSEQ (%d)" % info.modseq)  # RFC 7162 §3.1.4.2
            elif name == "RFC822" and data is not None:
                out.append(b"RFC822 " + literal(data))
            else:
                assert data is not None
                if root is None:
                    root = parse_message(data)
                if name == "ENVELOPE":
                    out.append(b"ENVELOPE " + envelope(root))
                elif name == "BODYSTRUCTURE":
                    out.append(b"BODYSTRUCTURE " + body_structure(root, True))
                elif name == "BODY":
                    out.append(b"BODY " + body_structure(root, False))
                elif name == "RFC822.HEADER":
                    out.append(b"RFC822.HEADER " + literal(root.header_bytes))
                elif name == "RFC822.TEXT":
                    out.append(b"RFC822.TEXT " + literal(root.body))
            continue
        assert data is not None
        section = item.section
        value: bytes | None
        if name in ("BINARY", "BINARY.SIZE"):
            if root is None:
                root = parse_message(data)
            value = binary.content(root, section)  # may raise UnknownCTEError
            if name == "BINARY.SIZE":
                out.append(item.label() + b" %d" % (len(value) if value is not None else 0))
                continue
            if value is not None and item.partial is not None:
                value = value[item.partial[0]:item.partial[0] + item.partial[1]]
            out.append(item.label() + b" " + (NIL if value is None else binary.literal8(value)))
            continue
        if not section.parts and not section.text:
            value = data
        else:
            if root is None:
                root = parse_message(data)
            value = section_bytes(root, section)
        if value is not None and item.partial is not None:
            origin, count = item.partial
            value = value[origin:origin + count]
        out.append(item.label() + b" " + (NIL if value is None else literal(value)))
    return b"* %d FETCH (" % seq + b" ".join(out) + b")\r\n"


def wire_size_of(info: MessageInfo) -> int:
    """RFC822.SIZE: the message's wire size, which the command made known before rendering
    (FolderView.with_sizes)."""
    assert info.wire_size is not None
    return info.wire_size


Renderer = Callable[[int, MessageInfo, bytes], bytes]
_META: dict[str, tuple[bytes, Callable[[MessageInfo, bytes], int | bytes]]] = {
    "UID": (b"UID %d", lambda info, flags: info.uid),
    "FLAGS": (b"FLAGS (%s)", lambda info, flags: flags),
    "INTERNALDATE": (b"INTERNALDATE %s", lambda info, flags: internal_date(info.internal_date)),
    "RFC822.SIZE": (b"RFC822.SIZE %d", lambda info, flags: wire_size_of(info)),
    "MODSEQ": (b"MODSEQ (%d)", lambda info, flags: info.modseq),
}


def metadata_renderer(items: list[FetchItem], *, with_uid: bool) -> Renderer | None:
    """A fast renderer when every item comes from the UID list alone (the resync of a large
    mailbox: ``UID FETCH 1:* (UID FLAGS)``): one format string per response, given the
    message's flag list. None otherwise."""
    if any(item.section is not None or item.name not in _META for item in items):
        return None
    names = [item.name for item in items]
    if with_uid and "UID" not in names:
        names.insert(0, "UID")
    template = b"* %d FETCH (" + b" ".join(_META[name][0] for name in names) + b")\r\n"
    getters = [_META[name][1] for name in names]
    if names == ["UID", "FLAGS"]:
        def uid_flags(seq: int, info: MessageInfo, flags: bytes) -> bytes:
            return template % (seq, info.uid, flags)
        return uid_flags

    def render(seq: int, info: MessageInfo, flags: bytes) -> bytes:
        return template % (seq, *[get(info, flags) for get in getters])

    return render


BodyRenderer = Callable[[list[bytes], int, MessageInfo, Callable[[MessageInfo], bytes], bytes],
                        None]


def whole_body_renderer(items: list[FetchItem], *, with_uid: bool) -> BodyRenderer | None:
    """A fast renderer when every item is the whole message (``BODY[]``/``BODY.PEEK[]``
    without a partial range) or comes from the UID list: the download of a folder
    (``FETCH 1:* BODY.PEEK[]``). It appends the response's pieces to a list, the message's
    bytes as they are, so that a batch is joined once instead of each message being copied
    into its literal, its item and its line. The bytes are those of ``render``. None
    otherwise."""
    if not any(item.section is not None for item in items):
        return None
    for item in items:
        if item.section is None:
            if item.name not in _META:
                return None
        elif (item.name != "BODY" or item.partial is not None or item.section.parts
              or item.section.text):
            return None
    # Between the pieces of data: the formats of the metadata runs, None for a body.
    names: list[str | None] = [None if item.section is not None else item.name
                               for item in items]
    if with_uid and "UID" not in names:
        names.insert(0, "UID")

    def render_whole(out: list[bytes], seq: int, info: MessageInfo,
                     flags: Callable[[MessageInfo], bytes], data: bytes) -> None:
        head = b"* %d FETCH (" % seq
        for index, name in enumerate(names):
            separator = b" " if index else b""
            if name is None:
                out.append(head + separator + b"BODY[] {%d}\r\n" % len(data))
                out.append(data)
                head = b""
            else:
                pattern, get = _META[name]
                head += separator + pattern % get(info, flags(info) if name == "FLAGS" else b"")
        out.append(head + b")\r\n")

    return render_whole
