"""SEARCH's result options: ESEARCH (RFC 4731, RFC 9051 §6.4.4 and §7.3.4) and SEARCHRES (RFC 5182).

This module owns ``RETURN (MIN MAX ALL COUNT SAVE)``: parsing the options, choosing what SAVE
keeps for "$", and writing the ``* ESEARCH`` response. Running the search is mailsys.imap.search.
"""

from __future__ import annotations

from mailsys.imap.parser import ParseError, Reader
from mailsys.imap.responses import number_set, quoted

OPTIONS = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})
# RFC 9051 §6.4.4: an IMAP4rev2 SEARCH without RETURN answers as RETURN (ALL).
DEFAULT = frozenset({"ALL"})


def parse_return(reader: Reader) -> frozenset[str] | None:
    """``RETURN (opt ...) SP`` at the reader's position, or None if the command has none.

    RFC 4731 §3.1: an empty list means ALL.
    """
    if reader.data[reader.position:reader.position + 7].upper() != b"RETURN ":
        return None
    reader.position += 7
    raw = reader.paren_list(reader.atom)
    reader.space()
    options = frozenset(option.upper().decode("ascii", "replace") for option in raw)
    unknown = sorted(options - OPTIONS)
    if unknown:
        raise ParseError(f"Unknown SEARCH RETURN option {unknown[0][:20]}")
    return options or DEFAULT


def saved(options: frozenset[str], uids: list[int]) -> frozenset[int]:
    """The UIDs SAVE keeps: all matches, or only the lowest and/or highest when SAVE comes
    with MIN and/or MAX and neither ALL nor COUNT (RFC 5182 §2.4)."""
    if not uids or options & {"ALL", "COUNT"} or not options & {"MIN", "MAX"}:
        return frozenset(uids)
    kept = set()
    if "MIN" in options:
        kept.add(min(uids))
    if "MAX" in options:
        kept.add(max(uids))
    return frozenset(kept)


def wants_response(options: frozenset[str]) -> bool:
    """RFC 5182 §2.1: with SAVE as the only option no ESEARCH response is sent."""
    return options != {"SAVE"}


def response(tag: bytes, options: frozenset[str], numbers: list[int], *, uid: bool,
             modseq: int | None = None) -> bytes:
    """``* ESEARCH (TAG "t") [UID] MIN n MAX n COUNT n ALL set [MODSEQ m]`` (RFC 4731 §3.1: MIN,
    MAX and ALL are left out when nothing matched; COUNT is then 0). ``modseq`` is given for a
    search with a MODSEQ key that matched something (RFC 7162 §3.1.5, see ``reported``)."""
    out = [b"* ESEARCH (TAG " + quoted(tag) + b")"]
    if uid:
        out.append(b"UID")
    ordered = sorted(numbers)
    if ordered and "MIN" in options:
        out.append(b"MIN %d" % ordered[0])
    if ordered and "MAX" in options:
        out.append(b"MAX %d" % ordered[-1])
    if ordered and "ALL" in options:
        out.append(b"ALL " + number_set(ordered))
    if "COUNT" in options:
        out.append(b"COUNT %d" % len(ordered))
    if modseq is not None and ordered:
        out.append(b"MODSEQ %d" % modseq)
    return b" ".join(out) + b"\r\n"


def reported(options: frozenset[str], numbers: list[int]) -> list[int]:
    """The matches whose highest mod-sequence an ESEARCH answer reports (RFC 7162 §3.1.5 with
    RFC 4731): all of them with ALL or COUNT, else only the MIN and/or MAX message."""
    if not numbers or options & {"ALL", "COUNT"} or not options & {"MIN", "MAX"}:
        return numbers
    kept = []
    if "MIN" in options:
        kept.append(min(numbers))
    if "MAX" in options:
        kept.append(max(numbers))
    return kept
