"""A message's MIME structure as IMAP sees it: parts, ENVELOPE, BODYSTRUCTURE and sections.

``parse_message`` takes a message in wire form (CRLF line ends) and finds its parts by offsets,
never copying or decoding them; every size IMAP reports is then an exact octet count of the wire
form. It accepts anything: a header without a blank line, a multipart without a boundary or
without parts, boundaries that never close, parts nested too deep — each gets a sensible
reading (RFC 2046 §5.1.1, as Dovecot reads them) and nothing raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from mailsys.imap.responses import NIL, nstring, string

MAX_DEPTH = 30  # deeper nesting is read as an opaque leaf
MAX_PARTS = 5000  # per message; the rest of a multipart is ignored
MISSING_DOMAIN = b"MISSING_DOMAIN"  # the host of an address that has none


@dataclass
class Part:
    """One MIME entity: its header and body as offsets into ``data``."""

    data: bytes
    start: int  # the header's first byte
    body_start: int  # the body's first byte (just after the blank line)
    end: int  # just after the body
    header_end: int  # just after the header's last line (before the blank line)
    maintype: bytes = b"text"
    subtype: bytes = b"plain"
    params: list[tuple[bytes, bytes]] = field(default_factory=list)
    children: list[Part] = field(default_factory=list)
    message: Part | None = None  # the encapsulated message of a message/rfc822 part
    _fields: list[tuple[bytes, bytes]] | None = None

    @property
    def multipart(self) -> bool:
        return self.maintype == b"multipart" and bool(self.children)

    @property
    def header_bytes(self) -> bytes:
        """The header with its terminating blank line (what BODY[HEADER] returns)."""
        return self.data[self.start:self.body_start]

    @property
    def body(self) -> bytes:
        return self.data[self.body_start:self.end]

    def fields(self) -> list[tuple[bytes, bytes]]:
        """The header fields as (name, raw value with folding), in order."""
        if self._fields is None:
            self._fields = list(_fields(self.data, self.start, self.header_end))
        return self._fields

    def field(self, name: bytes) -> bytes | None:
        """The first field ``name`` (case-insensitive), unfolded and trimmed, or None."""
        lowered = name.lower()
        for key, value in self.fields():
            if key.lower() == lowered:
                return unfold(value)
        return None


def unfold(value: bytes) -> bytes:
    """A header value with its folding removed (RFC 5322 §2.2.3) and trimmed."""
    return value.replace(b"\r\n", b"").replace(b"\n", b"").strip(b" \t")


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, bytes]]:
    name: bytes | None = None
    value: list[bytes] = []
    for line in data[start:end].split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and name is not None:
            value.append(b"\r\n" + line)
            continue
        if name is not None:
            yield name, b"".join(value)
        colon = line.find(b":")
        if colon <= 0:
            name = None  # not a field: skipped (and so are its continuation lines)
            continue
        name = line[:colon].rstrip(b" \t")
        value = [line[colon + 1:]]
    if name is not None:
        yield name, b"".join(value)


def _split_header(data: bytes, start: int, end: int) -> tuple[int, int]:
    """(header_end, body_start) of the entity at data[start:end]."""
    if data.startswith(b"\r\n", start) and start + 2 <= end:
        return start, start + 2
    blank = data.find(b"\r\n\r\n", start, end)
    if blank < 0:
        return end, end  # no blank line: all header, no body
    return blank + 2, blank + 4


def parse_message(data: bytes) -> Part:
    """The MIME tree of a whole message in wire form."""
    counter = [0]
    return _parse(data, 0, len(data), 0, (b"text", b"plain"), counter)


def _parse(data: bytes, start: int, end: int, depth: int, default: tuple[bytes, bytes],
           counter: list[int]) -> Part:
    counter[0] += 1
    header_end, body_start = _split_header(data, start, end)
    part = Part(data, start, body_start, end, header_end)
    content_type = part.field(b"content-type")
    if content_type is not None:
        maintype, subtype, params = parse_content_type(content_type)
        if maintype is None:
            maintype, subtype = default  # RFC 2045 §5.2: a bad Content-Type means the default
    else:
        (maintype, subtype), params = default, []
    if maintype == b"text" and content_type is None:
        params = [(b"charset", b"us-ascii")]
    part.maintype, part.subtype, part.params = maintype, subtype, params
    if depth >= MAX_DEPTH or counter[0] >= MAX_PARTS:
        if maintype in (b"multipart", b"message"):
            part.maintype, part.subtype = b"application", b"octet-stream"
        return part
    if maintype == b"multipart":
        boundary = param(params, b"boundary")
        if boundary:
            child_default = ((b"message", b"rfc822") if subtype == b"digest"
                             else (b"text", b"plain"))
            for child_start, child_end in _multipart_ranges(data, body_start, end, boundary):
                if counter[0] >= MAX_PARTS:
                    break
                part.children.append(_parse(data, child_start, child_end, depth + 1,
                                            child_default, counter))
        if not part.children:
            # RFC 2046 §5.1.7: an unrecognised multipart is treated as mixed; one without a
            # usable boundary or parts has nothing to split: it is read as plain text.
            part.maintype, part.subtype, part.params = b"text", b"plain", [
                (b"charset", b"us-ascii")]
    elif maintype == b"message" and subtype in (b"rfc822", b"global"):
        part.message = _parse(data, body_start, end, depth + 1, (b"text", b"plain"), counter)
    return part


def _multipart_ranges(data: bytes, start: int, end: int, boundary: bytes
                      ) -> list[tuple[int, int]]:
    """The (start, end) of each body part between ``--boundary`` lines (RFC 2046 §5.1.1).

    The CRLF before a delimiter belongs to the delimiter. A missing close delimiter ends the
    last part at the end of the multipart.
    """
    delimiter = b"--" + boundary
    ranges: list[tuple[int, int]] = []
    current: int | None = None
    position = start
    while True:
        found = data.find(delimiter, position, end)
        if found < 0:
            break
        position = found + 1
        if found == start:
            line_start = found
        elif data.startswith(b"\r\n", found - 2) and found - 2 >= start:
            line_start = found - 2
        else:
            continue
        after = found + len(delimiter)
        closing = data.startswith(b"--", after)
        if closing:
            after += 2
        while after < end and data[after] in (0x20, 0x09):
            after += 1
        if after < end and not data.startswith(b"\r\n", after):
            continue  # "--boundary" followed by more text is not a delimiter line
        if current is not None:
            ranges.append((current, max(current, line_start)))
        if closing:
            return ranges
        current = min(after + 2, end)
        position = current
    if current is not None:
        ranges.append((current, end))
    return ranges


# --- Content-Type and other structured fields -----------------------------------------------


def _tokens(value: bytes) -> Iterator[tuple[str, bytes]]:
    """RFC 2045 tokens: ("quoted", text), ("special", char) and ("token", text); comments go."""
    position = 0
    length = len(value)
    while position < length:
        char = value[position:position + 1]
        if char in (b" ", b"\t", b"\r", b"\n"):
            position += 1
        elif char == b"(":
            depth = 0
            while position < length:
                c = value[position:position + 1]
                if c == b"\\":
                    position += 1
                elif c == b"(":
                    depth += 1
                elif c == b")":
                    depth -= 1
                    if depth == 0:
                        break
                position += 1
            position += 1
        elif char == b'"':
            out = bytearray()
            position += 1
            while position < length and value[position:position + 1] != b'"':
                if value[position:position + 1] == b"\\" and position + 1 < length:
                    position += 1
                out += value[position:position + 1]
                position += 1
            position += 1
            yield "quoted", bytes(out)
        elif char in b";=/,<>@:[]" and char:
            position += 1
            yield "special", char
        else:
            begin = position
            while position < length and value[position:position + 1] not in (
                    b" ", b"\t", b"\r", b"\n", b"(", b'"', b";", b"=", b"/", b",", b"<", b">",
                    b"@", b":", b"[", b"]"):
                position += 1
            yield "token", value[begin:position]


def parse_content_type(value: bytes) -> tuple[bytes | None, bytes, list[tuple[bytes, bytes]]]:
    """(type, subtype, params) lower-cased (params' values kept); type None if malformed."""
    tokens = list(_tokens(value))
    if (len(tokens) < 3 or tokens[0][0] != "token" or tokens[1] != ("special", b"/")
            or tokens[2][0] != "token"):
        return None, b"", _params(tokens)
    return tokens[0][1].lower(), tokens[2][1].lower(), _params(tokens[3:])


def parse_disposition(value: bytes) -> tuple[bytes | None, list[tuple[bytes, bytes]]]:
    tokens = list(_tokens(value))
    if not tokens or tokens[0][0] != "token":
        return None, []
    return tokens[0][1].lower(), _params(tokens[1:])


def _params(tokens: list[tuple[str, bytes]]) -> list[tuple[bytes, bytes]]:
    """``; name=value`` pairs (names lower-cased); anything malformed is skipped."""
    params: list[tuple[bytes, bytes]] = []
    index = 0
    count = len(tokens)
    while index < count:
        if (index + 3 < count and tokens[index] == ("special", b";")
                and tokens[index + 1][0] == "token" and tokens[index + 2] == ("special", b"=")
                and tokens[index + 3][0] in ("token", "quoted")):
            params.append((tokens[index + 1][1].lower(), tokens[index + 3][1]))
            index += 4
            continue
        index += 1
    return params


def param(params: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in params:
        if key == name:
            return value
    return None


# --- ENVELOPE (RFC 3501 §7.4.2) -------------------------------------------------------------


def envelope(part: Part) -> bytes:
    """The ENVELOPE of the message ``part``."""
    def text_field(name: bytes) -> bytes:
        value = part.field(name)
        return nstring(value) if value is not None else NIL

    sender_from = part.field(b"from")
    addresses = {name: part.field(name) for name in (b"sender", b"reply-to")}
    for name in (b"to", b"cc", b"bcc"):
        # A message with several To (or Cc, Bcc) fields breaks RFC 5322 §3.6, but its
        # recipients are all of them: the lists are joined, as Dovecot joins them.
        values = [unfold(value) for key, value in part.fields() if key.lower() == name]
        addresses[name] = b", ".join(v for v in values if v) if values else None
    # RFC 3501 §7.4.2: Sender and Reply-To default to From.
    sender = addresses[b"sender"] if addresses[b"sender"] else sender_from
    reply_to = addresses[b"reply-to"] if addresses[b"reply-to"] else sender_from
    return b"(" + b" ".join([
        text_field(b"date"), text_field(b"subject"), address_list(sender_from),
        address_list(sender), address_list(reply_to), address_list(addresses[b"to"]),
        address_list(addresses[b"cc"]), address_list(addresses[b"bcc"]),
        text_field(b"in-reply-to"), text_field(b"message-id"),
    ]) + b")"


@dataclass(frozen=True)
class Address:
    name: bytes | None
    route: bytes | None
    mailbox: bytes | None
    host: bytes | None

    def render(self) -> bytes:
        return b"(" + b" ".join(nstring(v) for v in (self.name, self.route, self.mailbox,
                                                       self.host)) + b")"


def parse_addresses(value: bytes) -> list[Address]:
    """An RFC 5322 address list as IMAP address structures, groups as start/end markers."""
    tokens = list(_address_tokens(value))
    out: list[Address] = []
    current: list[tuple[str, bytes]] = []
    in_group = False
    for token in tokens:
        kind, text = token
        if kind == "special" and text == b":" and not in_group and b"<" not in [
                t for k, t in current if k == "special"]:
            name = b" ".join(t for k, t in current if k in ("token", "quoted"))
            out.append(Address(None, None, name, None))  # RFC 3501: group start
            current = []
            in_group = True
            continue
        if kind == "special" and text == b";" and in_group:
            if current:
                out.extend(_one_address(current))
            current = []
            out.append(Address(None, None, None, None))  # group end
            in_group = False
            continue
        if kind == "special" and text == b",":
            out.extend(_one_address(current))
            current = []
            continue
        current.append(token)
    if current:
        out.extend(_one_address(current))
    if in_group:
        out.append(Address(None, None, None, None))
    return out


def _address_tokens(value: bytes) -> Iterator[tuple[str, bytes]]:
    """Like _tokens, but comments are kept (a name may hide in one) and "." joins words."""
    position = 0
    length = len(value)
    while position < length:
        char = value[position:position + 1]
        if char in (b" ", b"\t", b"\r", b"\n"):
            position += 1
        elif char == b"(":
            depth = 0
            begin = position
            while position < length:
                c = value[position:position + 1]
                if c == b"\\":
                    position += 1
                elif c == b"(":
                    depth += 1
                elif c == b")":
                    depth -= 1
                    if depth == 0:
                        break
                position += 1
            yield "comment", value[begin + 1:position]
            position += 1
        elif char == b'"':
            out = bytearray()
            position += 1
            while position < length and value[position:position + 1] != b'"':
                if value[position:position + 1] == b"\\" and position + 1 < length:
                    position += 1
                out += value[position:position + 1]
                position += 1
            position += 1
            yield "quoted", bytes(out)
        elif char in b"<>@,;:" and char:
            position += 1
            yield "special", char
        else:
            begin = position
            while position < length and value[position:position + 1] not in (
                    b" ", b"\t", b"\r", b"\n", b"(", b'"', b"<", b">", b"@", b",", b";", b":"):
                position += 1
            yield "token", value[begin:position]


def _one_address(tokens: list[tuple[str, bytes]]) -> list[Address]:
    words = [(k, t) for k, t in tokens if k != "comment"]
    if not words:
        return []
    specials = [t for k, t in words if k == "special"]
    if b"<" in specials:
        lt = words.index(("special", b"<"))
        name_words = [t for k, t in words[:lt] if k in ("token", "quoted")]
        inner = words[lt + 1:]
        if ("special", b">") in inner:
            inner = inner[:inner.index(("special", b">"))]
        route: bytes | None = None
        if b":" in [t for k, t in inner if k == "special"]:
            colon = inner.index(("special", b":"))
            route = b"".join(t for _, t in inner[:colon]) or None
            inner = inner[colon + 1:]
        mailbox, host = _addr_spec(inner)
        name = b" ".join(name_words) if name_words else None
        return [Address(name, route, mailbox, host)]
    mailbox, host = _addr_spec(words)
    comments = [t for k, t in tokens if k == "comment"]
    name = comments[-1] if comments else None
    if mailbox is None and host is None:
        return []
    return [Address(name, None, mailbox, host)]


def _addr_spec(tokens: list[tuple[str, bytes]]) -> tuple[bytes | None, bytes | None]:
    if ("special", b"@") in tokens:
        at = len(tokens) - 1 - tokens[::-1].index(("special", b"@"))
        local = b"".join(t for k, t in tokens[:at] if k in ("token", "quoted"))
        domain = b"".join(t for k, t in tokens[at + 1:] if k in ("token", "quoted"))
        return local or None, domain or MISSING_DOMAIN
    local = b"".join(t for k, t in tokens if k in ("token", "quoted"))
    # A local part alone (no domain): a placeholder host rather than NIL, which would mean a
    # group (RFC 3501 §7.4.2); Dovecot's, so clients see one spelling.
    return (local or None), (MISSING_DOMAIN if local else None)


def address_list(value: bytes | None) -> bytes:
    if value is None:
        return NIL
    addresses = parse_addresses(value)
    if not addresses:
        return NIL
    return b"(" + b"".join(a.render() for a in addresses) + b")"


# --- BODY and BODYSTRUCTURE (RFC 3501 §7.4.2) -----------------------------------------------


def _param_list(params: list[tuple[bytes, bytes]]) -> bytes:
    if not params:
        return NIL
    return b"(" + b" ".join(string(k.upper() if k == b"charset" else k) + b" " + string(v)
                            for k, v in params) + b")"


def _disposition(part: Part) -> bytes:
    value = part.field(b"content-disposition")
    if value is None:
        return NIL
    kind, params = parse_disposition(value)
    if kind is None:
        return NIL
    return b"(" + string(kind) + b" " + _param_list(params) + b")"


def _language(part: Part) -> bytes:
    value = part.field(b"content-language")
    if value is None:
        return NIL
    languages = [t for k, t in _tokens(value) if k == "token"]
    if not languages:
        return NIL
    if len(languages) == 1:
        return string(languages[0])
    return b"(" + b" ".join(string(lang) for lang in languages) + b")"


def body_structure(part: Part, extended: bool = True) -> bytes:
    """BODYSTRUCTURE (``extended``) or BODY of ``part``."""
    if part.multipart:
        out = b"(" + b"".join(body_structure(child, extended) for child in part.children)
        out += b" " + string(part.subtype)
        if extended:
            out += b" " + b" ".join([_param_list(part.params), _disposition(part),
                                     _language(part), nstring(part.field(b"content-location"))])
        return out + b")"
    encoding = part.field(b"content-transfer-encoding")
    params = part.params
    if part.maintype == b"text" and param(params, b"charset") is None:
        # RFC 2045 §5.2: a text part without a charset is us-ascii; say so, as Dovecot does.
        params = [*params, (b"charset", b"us-ascii")]
    fields = [
        string(part.maintype), string(part.subtype), _param_list(params),
        nstring(part.field(b"content-id")), nstring(part.field(b"content-description")),
        string(encoding.upper() if encoding else b"7BIT"), b"%d" % (part.end - part.body_start),
    ]
    if part.message is not None:
        fields += [envelope(part.message), body_structure(part.message, extended),
                   b"%d" % _lines(part)]
    elif part.maintype == b"text":
        fields.append(b"%d" % _lines(part))
    if extended:
        fields += [nstring(part.field(b"content-md5")), _disposition(part), _language(part),
                   nstring(part.field(b"content-location"))]
    return b"(" + b" ".join(fields) + b")"


def _lines(part: Part) -> int:
    return part.data.count(b"\n", part.body_start, part.end)


# --- sections (RFC 3501 §6.4.5 BODY[section]) -----------------------------------------------


@dataclass(frozen=True)
class Section:
    """A section spec: part numbers, then "", HEADER, HEADER.FIELDS(.NOT), TEXT or MIME."""

    parts: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[bytes, ...] = ()

    @property
    def header_only(self) -> bool:
        """True if the top-level header alone answers it."""
        return not self.parts and self.text.startswith("HEADER")


def _subpart(part: Part, as_message: bool, number: int) -> tuple[Part, bool] | None:
    """Part ``number`` below ``part``: (the part, whether it stands for a whole message).

    RFC 3501 §6.4.5: a message's parts are its multipart's children, or else its one part 1
    (the message's own body); a message/rfc822 part's subparts are those of the message it
    encapsulates; a multipart's are its children.
    """
    if not as_message and part.message is not None:
        part, as_message = part.message, True
    if part.multipart:
        if number > len(part.children):
            return None
        return part.children[number - 1], False
    if number != 1:
        return None
    return part, False


def find_part(root: Part, numbers: tuple[int, ...]) -> Part | None:
    """The body part that part numbers ``numbers`` name in the message ``root``, or None."""
    found: tuple[Part, bool] | None = (root, True)
    for number in numbers:
        assert found is not None
        found = _subpart(found[0], found[1], number)
        if found is None:
            return None
    return None if found is None else found[0]


def section_bytes(root: Part, section: Section) -> bytes | None:
    """The bytes of ``section`` of the message ``root``; None if it does not exist."""
    if not section.parts and not section.text:
        return root.data[root.start:root.end]
    part = find_part(root, section.parts) if section.parts else root
    if part is None:
        return None
    if section.text == "MIME":
        return part.header_bytes if section.parts else None
    if not section.text:
        return part.body if part is not root else root.body
    message = part.message if (section.parts and part.message is not None) else part
    if section.text == "HEADER":
        return message.header_bytes
    if section.text == "TEXT":
        return message.body
    wanted = {name.lower() for name in section.fields}
    negate = section.text == "HEADER.FIELDS.NOT"
    out = []
    for name, value in message.fields():
        if (name.lower() in wanted) != negate:
            out.append(name + b":" + value + b"\r\n")
    return b"".join(out) + b"\r\n"
