"""APPEND (with MULTIAPPEND), COPY and MOVE: messages entering a folder, as a command group
over a ``CommandContext`` (mailsys.imap.context). The blocking work (mailsys.mailbox.transfer)
runs in the store's disk threads; answers carry UIDPLUS's APPENDUID and COPYUID (RFC 4315 §3).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsys.imap.binary import seven_bit_form
from mailsys.imap.context import AUTHED, SELECTED, CommandContext, CommandSpec
from mailsys.imap.flags import FlagError, letters_of, names_of, split_flags
from mailsys.imap.names import canonical
from mailsys.imap.parser import ParseError, Reader, SpooledLiteral
from mailsys.imap.quota import QuotaCommands, quota_refusal
from mailsys.imap.responses import (
    EMPTY_MESSAGE,
    MONTHS,
    READ_ONLY,
    TOO_MANY_TARGET_KEYWORDS,
    TRYCREATE,
    completed,
    number_set,
    untagged,
)
from mailsys.mailbox.folder import Folder, MessageInfo
from mailsys.mailbox.keywords import TooManyKeywordsError, define_keywords, read_keywords
from mailsys.mailbox.store import InvalidFolderNameError
from mailsys.mailbox.transfer import Added, append_file, append_message, copy_messages

log = Logger(namespace="mailsys.imap")

# RFC 3501 §9 date-time: "dd-Mon-yyyy hh:mm:ss +zzzz" (a leading space for one-digit days).
_DATE_TIME = re.compile(
    r"^ ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})$")


class TransferCommands:
    """The commands that put messages into a folder (within the quota's limits)."""

    def __init__(self, ctx: CommandContext, quota: QuotaCommands) -> None:
        self._ctx = ctx
        self._quota = quota

    def commands(self) -> dict[bytes, CommandSpec]:
        """This group's entries of the dispatch table."""
        return {
            b"APPEND": CommandSpec(self.append, AUTHED),
            b"COPY": CommandSpec(self._do_copy, SELECTED, takes_uid=True),
            b"MOVE": CommandSpec(self._do_move, SELECTED, takes_uid=True),
        }

    # --- APPEND ---------------------------------------------------------------------------------

    def _append_item(self, reader: Reader) -> _Appended:
        """One message of APPEND: [flag-list SP] [date-time SP] data."""
        flags: list[str] = []
        if reader.peek_is(b"("):
            flags = [f.decode("utf-8", "replace") for f in reader.flag_list()]
            reader.space()
        date: float | None = None
        if reader.peek_is(b'"'):
            date = parse_date_time(reader.quoted())
            reader.space()
        if reader.data[reader.position:reader.position + 6].upper() == b"UTF8 (":
            # RFC 6855 §4: UTF8 (literal8), a message with UTF-8 header fields.
            reader.position += 6
            if not reader.peek_is(b"~"):
                raise ParseError("UTF8 APPEND data must be a literal8")
            data = reader.message_literal()
            reader.expect(b")")
        else:
            binary = reader.peek_is(b"~")
            data = reader.message_literal()  # a literal, or a literal8 (RFC 3516 §4.4)
            if binary and isinstance(data, bytes):
                data = seven_bit_form(data)
        try:
            letters, keywords = split_flags(flags)
        except FlagError:
            raise ParseError("Invalid flag in APPEND") from None
        return _Appended(data, frozenset(letters), keywords, date)

    def append(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.space()
        name = self._ctx.mailbox_name(reader)
        reader.space()
        messages = [self._append_item(reader)]
        while reader.accept(b" "):
            messages.append(self._append_item(reader))  # RFC 3502 MULTIAPPEND
        reader.end()
        if any(not message.data for message in messages):
            return EMPTY_MESSAGE.to(tag)
        mailbox = self._ctx.user
        try:
            folder = self._ctx.store.folder(mailbox, name)
        except InvalidFolderNameError:
            return TRYCREATE.to(tag)

        def appended(added: Added) -> bytes:
            self._ctx.added_to(canonical(name))
            uids = [new for _, new in added.uids]
            log.info("imap APPEND {user} {folder} uids={uids}", user=mailbox, folder=name,
                     uids=number_set(uids).decode())
            if len(uids) != len(messages):
                return completed(tag, "APPEND")
            # RFC 4315 §3: APPENDUID uidvalidity uid-set (a set for MULTIAPPEND).
            return completed(tag, "APPEND",
                             f"APPENDUID {added.uidvalidity} {number_set(uids).decode()}")

        size = sum(message.size for message in messages)
        store = self._quota.guard(_append, size, len(messages))  # RFC 9208 [OVERQUOTA]
        return self._ctx.store.list_folders(mailbox).addCallback(
            lambda _: self._ctx.run(store, folder, messages)
        ).addCallbacks(appended, lambda failure: _refusal(tag, failure))

    def _do_copy(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        return self._transfer(tag, reader, uid, move=False)

    def _do_move(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        return self._transfer(tag, reader, uid, move=True)

    def _transfer(self, tag: bytes, reader: Reader, uid: bool, *, move: bool
                  ) -> bytes | Deferred[bytes]:
        reader.space()
        numbers = reader.sequence_set()
        reader.space()
        name = self._ctx.mailbox_name(reader)
        reader.end()
        selected = self._ctx.selected
        assert selected is not None
        verb = ("UID " if uid else "") + ("MOVE" if move else "COPY")
        if move and selected.readonly:
            return READ_ONLY.to(tag)
        try:
            target = self._ctx.store.folder(self._ctx.user, name)
        except InvalidFolderNameError:
            return TRYCREATE.to(tag)
        # RFC 6851 §3.3 sets no exception for the selected mailbox: a MOVE into it gives the
        # messages new UIDs (COPYUID) and expunges the old ones, as a COPY and EXPUNGE would.
        targets = selected.targets(numbers, uid)
        if not targets:
            return completed(tag, verb)
        infos = [info for _, info in targets]
        source = selected.view.folder

        def copied(added: Added) -> bytes | Deferred[bytes]:
            self._ctx.added_to(canonical(name))
            code = None
            if added.uids:
                # RFC 4315 §3: COPYUID uidvalidity source-uids target-uids, in pairs.
                code = (f"COPYUID {added.uidvalidity} "
                        f"{number_set([s for s, _ in added.uids]).decode()} "
                        f"{number_set([t for _, t in added.uids]).decode()}")
            if not move:
                return completed(tag, verb, code)
            if code is not None:
                # RFC 6851 §4.3: COPYUID comes in an untagged OK before the EXPUNGEs.
                self._ctx.write(untagged(f"OK [{code}] Moved"))
            moved = {s for s, _ in added.uids}
            for info in infos:
                if info.uid in moved:
                    self._ctx.record("imap.move", info, selected.view.name, to=canonical(name))
            return self._ctx.expunge([info for info in infos if info.uid in moved]).addCallback(
                lambda _: completed(tag, verb))

        # A MOVE within the mailbox takes no more room; a COPY counts against the quota.
        store = _copy if move else self._quota.guard(
            _copy, sum(info.size for info in infos), len(infos))
        return self._ctx.run(store, source, infos, target, list(selected.keywords)).addCallbacks(
            copied, lambda failure: _refusal(tag, failure))


def _refusal(tag: bytes, failure: Failure) -> bytes | Failure:
    """The NO for a target folder that is gone or out of keyword letters, or for a mailbox over
    its quota; else the failure."""
    over = quota_refusal(tag, failure)
    if over is not None:
        return over
    if failure.check(FileNotFoundError):
        return TRYCREATE.to(tag)  # RFC 3501 §6.3.11, §6.4.7
    if failure.check(TooManyKeywordsError):
        return TOO_MANY_TARGET_KEYWORDS.to(tag)
    return failure



def parse_date_time(value: bytes) -> float:
    """An APPEND date-time ("dd-Mon-yyyy hh:mm:ss +zzzz", RFC 3501 §9) as seconds."""
    match = _DATE_TIME.match(value.decode("ascii", "replace"))
    if match is None:
        raise ParseError("Invalid date-time")
    day, month_name, year, hour, minute, second, sign, zone_h, zone_m = match.groups()
    months = [m.upper() for m in MONTHS]
    if month_name.upper() not in months:
        raise ParseError("Invalid date-time")
    try:
        stamp = calendar.timegm((int(year), months.index(month_name.upper()) + 1, int(day),
                                 int(hour), int(minute), int(second)))
    except (ValueError, OverflowError):
        raise ParseError("Invalid date-time") from None
    offset = (int(zone_h) * 60 + int(zone_m)) * 60
    return float(stamp - offset if sign == "+" else stamp + offset)


@dataclass(frozen=True)
class _Appended:
    """One message of an APPEND command, parsed."""

    data: bytes | SpooledLiteral  # a large one is in a temporary file (parser.Framer)
    letters: frozenset[str]
    keywords: list[str]
    date: float | None

    @property
    def size(self) -> int:
        """The message's size as the client sent it, wherever its bytes are."""
        data = self.data
        return data.size if isinstance(data, SpooledLiteral) else len(data)


def _append(folder: Folder, messages: list[_Appended]) -> Added:
    """Disk thread: APPEND into ``folder`` (which must exist), keywords given letters.

    RFC 3502 §6.3.11: the messages of a MULTIAPPEND go in all or none. Keywords get their
    letters before any message is stored; should a later message fail, those already stored
    are deleted again.
    """
    if folder.subfolder and not folder.path.is_dir():
        raise FileNotFoundError(folder.path.name)
    keywords = [k for message in messages for k in message.keywords]
    slots = define_keywords(folder, keywords) if keywords else []
    uids: list[tuple[int, int]] = []
    uidvalidity = 0
    try:
        for message in messages:
            letters = message.letters | letters_of(message.keywords, slots)
            if isinstance(message.data, SpooledLiteral):
                added = append_file(folder, message.data.file, letters, message.date)
            else:
                added = append_message(folder, message.data, letters, message.date)
            uidvalidity = added.uidvalidity
            uids.extend(added.uids)
    except BaseException:
        if uids:
            stored = {new for _, new in uids}
            folder.delete([info for info in folder.sync().messages if info.uid in stored])
        raise
    return Added(uidvalidity, tuple(uids))


def _copy(source: Folder, infos: list[MessageInfo], target: Folder,
          source_keywords: list[str]) -> Added:
    """Disk thread: COPY, carrying keywords over to the target's own letters."""
    if target.subfolder and not target.path.is_dir():
        raise FileNotFoundError(target.path.name)
    used = sorted({letter for info in infos for letter in info.flags if letter.islower()})
    names = [n for n in (source_keywords[ord(c) - 97] if ord(c) - 97 < len(source_keywords)
                         else "" for c in used) if n]
    slots = define_keywords(target, names) if names else read_keywords(target.path)

    def flags_of(info: MessageInfo) -> frozenset[str]:
        kept = {letter for letter in info.flags if not letter.islower()}
        flags = names_of(info.flags, source_keywords)
        return frozenset(kept) | letters_of([f for f in flags if not f.startswith("\\")
                                             and f != "$Forwarded"], slots)

    return copy_messages(source, infos, target, flags_of)


