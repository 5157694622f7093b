"""IMAP commands on the mailbox tree: CREATE, DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, LIST
(RFC 3501 §6.3.8 with RFC 5258 LIST-EXTENDED, RFC 6154 SPECIAL-USE, RFC 5819 LIST-STATUS),
LSUB and STATUS.

``MailboxCommands`` is a command group: it works through a ``CommandContext``
(mailsys.imap.context) and registers its commands in the session's dispatch table.
"""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.python.failure import Failure

from mailsys.imap.context import AUTHED, CommandContext, CommandSpec
from mailsys.imap.names import (
    SEPARATOR,
    MailboxNameError,
    decode_name,
    encode_name,
    pattern_regex,
    special_use,
)
from mailsys.imap.parser import ParseError, Reader
from mailsys.imap.responses import (
    ALREADY_EXISTS,
    HAS_CHILDREN,
    INBOX_EXISTS,
    INBOX_UNDELETABLE,
    INVALID_NAME,
    NAME_TOO_LONG,
    NONEXISTENT,
    TARGET_EXISTS,
    completed,
    untagged,
)
from mailsys.mailbox import hierarchy
from mailsys.mailbox.layout import NameTooLongError
from mailsys.mailbox.names import SEEN, TRASHED
from mailsys.mailbox.store import INBOX, FolderView, InvalidFolderNameError

# RFC 3501 §6.3.10, RFC 9051 (DELETED, SIZE), RFC 7162 §3.1.7 (HIGHESTMODSEQ).
# RFC 5258 §3 selection and return options (with RFC 6154 SPECIAL-USE, RFC 5819 STATUS).
_SELECTION_OPTIONS = frozenset({b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH", b"SPECIAL-USE"})
_RECURSIVE_BASES = frozenset({b"SUBSCRIBED", b"SPECIAL-USE"})
_RETURN_OPTIONS = frozenset({b"SUBSCRIBED", b"CHILDREN", b"STATUS", b"SPECIAL-USE"})
STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE",
                "HIGHESTMODSEQ")


class MailboxCommands:
    """The mailbox-tree commands of an IMAP session."""

    def __init__(self, ctx: CommandContext) -> None:
        self._ctx = ctx

    def commands(self) -> dict[bytes, CommandSpec]:
        """This group's entries of the dispatch table (all in the authenticated states)."""
        return {
            b"CREATE": CommandSpec(self._do_create, AUTHED),
            b"DELETE": CommandSpec(self._do_delete, AUTHED),
            b"RENAME": CommandSpec(self._do_rename, AUTHED),
            b"SUBSCRIBE": CommandSpec(self._do_subscribe, AUTHED),
            b"UNSUBSCRIBE": CommandSpec(self._do_unsubscribe, AUTHED),
            b"LIST": CommandSpec(self._do_list, AUTHED),
            b"LSUB": CommandSpec(self._do_lsub, AUTHED),
            b"STATUS": CommandSpec(self._do_status, AUTHED),
        }

    def _do_create(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.space()
        name = self._ctx.mailbox_name(reader)
        reader.end()
        if name == INBOX:
            return INBOX_EXISTS.to(tag)
        inbox = self._ctx.inbox()

        def created(_: object) -> bytes:
            return completed(tag, "CREATE")

        def failed(failure: Failure) -> bytes | Failure:
            if failure.check(FileExistsError):
                return ALREADY_EXISTS.to(tag)
            if failure.check(NameTooLongError):
                return NAME_TOO_LONG.to(tag)
            if failure.check(InvalidFolderNameError):
                return INVALID_NAME.to(tag)
            return failure

        return self._ctx.store.list_folders(self._ctx.user).addCallback(
            lambda _: self._ctx.run(hierarchy.create_folder_tree, inbox, name)).addCallbacks(
            created, failed)

    def _do_delete(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.space()
        name = self._ctx.mailbox_name(reader)
        reader.end()
        if name == INBOX:
            return INBOX_UNDELETABLE.to(tag)
        if self._ctx.selected is not None and self._ctx.selected.view.name == name:
            self._ctx.deselect()

        def deleted(_: object) -> bytes:
            self._ctx.notify(name)
            return completed(tag, "DELETE")

        def failed(failure: Failure) -> bytes | Failure:
            if failure.check(FileNotFoundError, InvalidFolderNameError):
                return NONEXISTENT.to(tag)
            if failure.check(hierarchy.FolderHasChildrenError):
                return HAS_CHILDREN.to(tag)
            return failure

        return self._ctx.run(hierarchy.delete_folder, self._ctx.inbox(), name).addCallbacks(
            deleted, failed)

    def _do_rename(self, tag: bytes, reader: Reader, uid: bool) -> Deferred[bytes]:
        reader.space()
        old = self._ctx.mailbox_name(reader)
        reader.space()
        new = self._ctx.mailbox_name(reader)
        reader.end()
        selected = self._ctx.selected
        if selected is not None and (selected.view.name == old or
                                     selected.view.name.startswith(old + SEPARATOR)):
            self._ctx.deselect()

        def renamed(_: object) -> bytes:
            self._ctx.notify(old)
            return completed(tag, "RENAME")

        def failed(failure: Failure) -> bytes | Failure:
            if failure.check(FileExistsError):
                return TARGET_EXISTS.to(tag)
            if failure.check(FileNotFoundError):
                return NONEXISTENT.to(tag)
            if failure.check(NameTooLongError):
                # RFC 5530 LIMIT: a child's name, grown by the new prefix, would not fit.
                return NAME_TOO_LONG.to(tag)
            if failure.check(InvalidFolderNameError):
                return INVALID_NAME.to(tag)
            return failure

        return self._ctx.run(hierarchy.rename_folder, self._ctx.inbox(), old, new).addCallbacks(
            renamed, failed)

    def _do_subscribe(self, tag: bytes, reader: Reader, uid: bool) -> Deferred[bytes]:
        return self._subscription(tag, reader, True)

    def _do_unsubscribe(self, tag: bytes, reader: Reader, uid: bool) -> Deferred[bytes]:
        return self._subscription(tag, reader, False)

    def _subscription(self, tag: bytes, reader: Reader, subscribe: bool) -> Deferred[bytes]:
        reader.space()
        name = self._ctx.mailbox_name(reader)
        reader.end()
        verb = "SUBSCRIBE" if subscribe else "UNSUBSCRIBE"
        inbox = self._ctx.inbox()
        # Listing first creates a new user's mailbox, where the subscriptions file goes.
        return self._ctx.store.list_folders(self._ctx.user).addCallback(
            lambda _: self._ctx.run(hierarchy.set_subscribed, inbox, name, subscribe)).addCallback(
            lambda _: completed(tag, verb))

    def _do_list(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        # RFC 3501 §6.3.8, with RFC 5258 LIST-EXTENDED, RFC 6154 and RFC 5819 LIST-STATUS.
        reader.space()
        selection: list[bytes] = []
        if reader.peek_is(b"("):
            selection = [s.upper() for s in reader.paren_list(reader.atom)]
            reader.space()
            unknown = set(selection) - _SELECTION_OPTIONS
            if unknown:
                # RFC 5258 §3: an unknown selection option is a syntax error.
                raise ParseError("Unknown LIST selection option")
            if b"RECURSIVEMATCH" in selection and not set(selection) & _RECURSIVE_BASES:
                # RFC 5258 §3: RECURSIVEMATCH never stands alone (or with REMOTE only).
                raise ParseError("RECURSIVEMATCH needs another selection option")
        reference = self._pattern(reader.astring())
        reader.space()
        if reader.peek_is(b"("):
            patterns = [self._pattern(p) for p in reader.paren_list(reader.list_mailbox,
                                                                     allow_empty=False)]
        else:
            patterns = [self._pattern(reader.list_mailbox())]
        returns: set[bytes] = set()
        status_items: list[str] = []
        if reader.accept(b" "):
            if reader.atom().upper() != b"RETURN":
                raise ParseError("Expected RETURN")
            reader.space()
            reader.expect(b"(")
            while not reader.accept(b")"):
                option = reader.atom().upper()
                if option not in _RETURN_OPTIONS:
                    raise ParseError("Unknown LIST return option")  # RFC 5258 §3
                returns.add(option)
                if option == b"STATUS":
                    reader.space()
                    status_items = self._status_items(reader)
                reader.accept(b" ")
        reader.end()
        if patterns == [""] and not selection:
            # RFC 3501 §6.3.8: the hierarchy delimiter and root.
            self._ctx.write(untagged(f'LIST (\\Noselect) "{SEPARATOR}" ""'))
            return completed(tag, "LIST")
        subscribed_only = b"SUBSCRIBED" in selection
        want_subscribed = subscribed_only or b"SUBSCRIBED" in returns
        special_only = b"SPECIAL-USE" in selection
        regexes = [pattern_regex(reference, pattern) for pattern in patterns]
        return self._listing(tag, "LIST", regexes, want_subscribed, subscribed_only,
                             special_only, status_items,
                             recursive=b"RECURSIVEMATCH" in selection and subscribed_only)

    def _do_lsub(self, tag: bytes, reader: Reader, uid: bool) -> Deferred[bytes]:
        reader.space()
        reference = self._pattern(reader.astring())
        reader.space()
        pattern = self._pattern(reader.list_mailbox())
        reader.end()
        return self._listing(tag, "LSUB", [pattern_regex(reference, pattern)], True, True,
                             False, [], recursive=True)

    def _pattern(self, raw: bytes) -> str:
        try:
            return decode_name(raw, utf8=self._ctx.utf8)
        except MailboxNameError:
            # Not modified UTF-7: a pattern no mailbox name matches, still well-formed.
            return raw.decode("utf-8", "replace")

    def _listing(self, tag: bytes, verb: str, regexes: list[re.Pattern[str]],
                 want_subscribed: bool, subscribed_only: bool, special_only: bool,
                 status_items: list[str], *, recursive: bool = False) -> Deferred[bytes]:
        inbox = self._ctx.inbox()

        def listed(names: list[str]) -> Deferred[bytes]:
            if want_subscribed:
                return self._ctx.run(hierarchy.read_subscriptions, inbox).addCallback(
                    lambda subs: answer(names, set(names) if subs is None else set(subs)))
            return answer(names, set())

        def answer(names: list[str], subscribed: set[str]) -> Deferred[bytes]:
            existing = set(names)
            everything = set(existing)
            for name in names:
                levels = name.split(SEPARATOR)
                for depth in range(1, len(levels)):
                    everything.add(SEPARATOR.join(levels[:depth]))
            if subscribed_only:
                everything |= subscribed
            # RFC 3501 §6.3.9 (LSUB) and RFC 5258 §3.5 (RECURSIVEMATCH): a subscribed name the
            # pattern does not match shows through its nearest ancestor that it does match
            # (LSUB: as \Noselect unless subscribed itself; LIST: with CHILDINFO).
            parents: set[str] = set()
            if recursive:
                for name in subscribed:
                    if any(regex.match(name) for regex in regexes):
                        continue
                    levels = name.split(SEPARATOR)
                    for depth in range(len(levels) - 1, 0, -1):
                        ancestor = SEPARATOR.join(levels[:depth])
                        if any(regex.match(ancestor) for regex in regexes):
                            parents.add(ancestor)
                            everything.add(ancestor)
                            break
            ordered = sorted(everything, key=lambda n: (n != INBOX, n))
            lines: list[bytes] = []
            statuses: list[str] = []
            for name in ordered:
                if not any(regex.match(name) for regex in regexes):
                    continue
                if subscribed_only and name not in subscribed and name not in parents:
                    continue
                use = special_use(name)
                if special_only and use is None:
                    continue
                attributes = []
                if verb == "LSUB" and name not in subscribed:
                    attributes.append("\\Noselect")
                elif name not in existing:
                    # RFC 9051 §7.3.1 (RFC 5258 §3): a name with no mailbox is \NonExistent;
                    # rev1 clients know an unselectable parent as \Noselect.
                    attributes.append("\\NonExistent" if subscribed_only or self._ctx.rev2
                                      else "\\Noselect")
                if verb == "LIST":
                    prefix = name + SEPARATOR
                    children = any(other.startswith(prefix) for other in everything)
                    attributes.append("\\HasChildren" if children else "\\HasNoChildren")
                    if use is not None:
                        attributes.append(use)
                    if want_subscribed and name in subscribed:
                        attributes.append("\\Subscribed")
                extended = (b' ("CHILDINFO" ("SUBSCRIBED"))' if verb == "LIST" and name in parents
                            else b"")
                lines.append(b"* " + verb.encode() + b" (" + " ".join(attributes).encode()
                             + b') "' + SEPARATOR.encode() + b'" '
                             + encode_name(name, utf8=self._ctx.utf8) + extended + b"\r\n")
                if status_items and name in existing:
                    statuses.append(name)
                    lines.append(b"")  # where its STATUS goes
            if not status_items:
                self._ctx.write(b"".join(lines))
                return succeed(completed(tag, verb))
            return self._list_statuses(lines, statuses, status_items).addCallback(
                lambda _: completed(tag, verb))

        return self._ctx.store.list_folders(self._ctx.user).addCallback(listed)

    def _list_statuses(self, lines: list[bytes], names: list[str], items: list[str]
                       ) -> Deferred[None]:
        """Write the LIST lines, each followed by its STATUS (RFC 5819), in order."""
        slots = [i for i, line in enumerate(lines) if line == b""]
        queries = [self._status_line(name, items).addErrback(lambda _: b"")
                   for name in names]
        d: Deferred[list[bytes]] = gatherResults(queries)

        def done(results: list[bytes]) -> None:
            for slot, line in zip(slots, results, strict=True):
                lines[slot] = line
            self._ctx.write(b"".join(lines))

        return d.addCallback(done)

    def _status_items(self, reader: Reader) -> list[str]:
        items = [item.upper().decode("ascii", "replace")
                 for item in reader.paren_list(reader.atom, allow_empty=False)]
        for item in items:
            if item not in STATUS_ITEMS:
                raise ParseError(f"Unknown STATUS item {item[:20]}")
        if "HIGHESTMODSEQ" in items:
            self._ctx.condstore_used()  # RFC 7162 §3.1: a CONDSTORE-enabling command
        return items

    def _do_status(self, tag: bytes, reader: Reader, uid: bool) -> Deferred[bytes]:
        reader.space()
        name = self._ctx.mailbox_name(reader)
        reader.space()
        items = self._status_items(reader)
        reader.end()

        def failed(failure: Failure) -> bytes | Failure:
            if failure.check(FileNotFoundError, InvalidFolderNameError):
                return NONEXISTENT.to(tag)
            return failure

        def answer(line: bytes) -> bytes:
            self._ctx.write(line)
            return completed(tag, "STATUS")

        return self._status_line(name, items).addCallbacks(answer, failed)

    def _status_line(self, name: str, items: list[str]) -> Deferred[bytes]:

        def render(view: FolderView, recent: int) -> bytes:
            messages = view.messages
            values = {
                "MESSAGES": len(messages), "RECENT": recent, "UIDNEXT": view.uidnext,
                "UIDVALIDITY": view.uidvalidity,
                "UNSEEN": sum(1 for info in messages if SEEN not in info.flags),
                "DELETED": sum(1 for info in messages if TRASHED in info.flags),
                "SIZE": sum(info.wire_size or 0 for info in messages),  # known: see below
                "HIGHESTMODSEQ": view.highest_modseq,
            }
            body = " ".join(f"{item} {values[item]}" for item in items)
            return (b"* STATUS " + encode_name(name, utf8=self._ctx.utf8) + b" ("
                    + body.encode() + b")\r\n")

        selected = self._ctx.selected
        if selected is not None and selected.view.name == name:
            view = selected.view
            if "SIZE" in items and any(info.wire_size is None for info in view.messages):
                # RFC 8438 SIZE: the selected folder was opened without reading sizes.
                return view.with_sizes(view.messages).addCallback(
                    lambda _: render(view, len(selected.recent)))
            return succeed(render(selected.view, len(selected.recent)))

        def opened(view: FolderView) -> bytes | Deferred[bytes]:
            if "RECENT" not in items:
                return render(view, 0)
            # RFC 3501 §6.3.10: the messages with \Recent, which STATUS does not take.
            return self._ctx.run(
                lambda: view.folder.recent_from(view.uidnext, claim=False)).addCallback(
                lambda first: render(view, sum(1 for info in view.messages
                                               if info.uid >= first)))

        return self._ctx.store.open_folder(self._ctx.user, name,
                                           sizes="SIZE" in items).addCallback(opened)
