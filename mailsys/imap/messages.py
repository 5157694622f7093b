"""FETCH, STORE, SEARCH and EXPUNGE (and their UID forms): the commands on the messages of the
selected mailbox, as a command group over a ``CommandContext`` (mailsys.imap.context).

FETCH runs through mailsys.imap.fetchrun, SEARCH through mailsys.imap.search; STORE changes
flags against each file's current name under the folder's lock, conditionally with
UNCHANGEDSINCE (RFC 7162 §3.1.3).
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.python.failure import Failure

from mailsys.imap import esearch
from mailsys.imap import fetch as fetching
from mailsys.imap import search as searching
from mailsys.imap.context import SELECTED, CommandContext, CommandSpec, Selected
from mailsys.imap.fetchrun import FetchRun
from mailsys.imap.flags import FlagError, has_keyword, letters_of, split_flags
from mailsys.imap.parser import ParseError, Reader, SequenceSet
from mailsys.imap.responses import (
    EXPUNGE_ISSUED,
    OK,
    READ_ONLY,
    TOO_MANY_KEYWORDS,
    UNKNOWN_CTE,
    completed,
    number_set,
    tagged,
    untagged,
)
from mailsys.mailbox.folder import FlagChange, FlagResult, MessageInfo
from mailsys.mailbox.keywords import TooManyKeywordsError, define_keywords
from mailsys.mailbox.names import TRASHED

# SEARCH hands the disk threads this many messages at a time when it reads whole messages, and
# fifty times as many when headers (cached after the first search) are enough.
SEARCH_BATCH = 1000


class MessageCommands:
    """The commands on the selected mailbox's messages."""

    def __init__(self, ctx: CommandContext) -> None:
        self._ctx = ctx

    def commands(self) -> dict[bytes, CommandSpec]:
        """This group's entries of the dispatch table (all in the selected state)."""
        return {
            b"EXPUNGE": CommandSpec(self._do_expunge, SELECTED, takes_uid=True),
            b"SEARCH": CommandSpec(self._do_search, SELECTED, updates=False, takes_uid=True),
            b"FETCH": CommandSpec(self._do_fetch, SELECTED, updates=False, takes_uid=True),
            b"STORE": CommandSpec(self._do_store, SELECTED, updates=False, takes_uid=True),
        }

    def _targets(self, numbers: SequenceSet, uid: bool) -> list[tuple[int, MessageInfo]]:
        """(sequence number, message) in the selected mailbox (see Selected.targets)."""
        selected = self._ctx.selected
        assert selected is not None
        return selected.targets(numbers, uid)

    def _do_fetch(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.space()
        numbers = reader.sequence_set()
        reader.space()
        items = fetching.parse_fetch_items(reader)
        changed_since = None
        if reader.accept(b" "):
            changed_since = _modifier(reader, b"CHANGEDSINCE")  # RFC 7162 §3.1.4.1
        reader.end()
        selected = self._ctx.selected
        assert selected is not None
        modseq = fetching.FetchItem("MODSEQ")
        if changed_since is not None and modseq not in items:
            items = [*items, modseq]  # RFC 7162 §3.1.4.1: MODSEQ is implied
        if modseq in items:
            self._ctx.condstore_used()
        targets = self._targets(numbers, uid)
        if changed_since is not None:
            targets = [(n, info) for n, info in targets if info.modseq > changed_since]
        verb = "UID FETCH" if uid else "FETCH"
        if not targets:
            return completed(tag, verb)
        if (any(item.name == "RFC822.SIZE" for item in items)
                and any(info.wire_size is None for _, info in targets)):
            # The wire sizes a folder opened cold does not know yet: read for these messages
            # only, once (the folder records them).
            numbers_of = [n for n, _ in targets]
            return selected.view.with_sizes([info for _, info in targets]).addCallback(
                lambda infos: self._fetch(tag, selected, list(zip(numbers_of, infos,
                                                                  strict=True)),
                                          items, uid, verb))
        return self._fetch(tag, selected, targets, items, uid, verb)

    def _fetch(self, tag: bytes, selected: Selected, targets: list[tuple[int, MessageInfo]],
               items: list[fetching.FetchItem], uid: bool, verb: str) -> Deferred[bytes]:
        run = FetchRun(self._ctx, selected, targets, items, with_uid=uid,
                       report_modseq=self._ctx.condstore)

        def done(complete: bool) -> bytes:
            if run.unknown_cte:
                # RFC 3516 §5 / RFC 9051 §7.1: the part's encoding is one we cannot undo.
                return UNKNOWN_CTE.to(tag)
            if complete:
                return completed(tag, verb)
            # RFC 2180 §4.1.2: FETCH responses for the messages that remain, and a tagged NO
            # for the ones another session expunged (not yet reported: RFC 3501 §7.4.1 allows
            # no EXPUNGE during FETCH); RFC 5530 EXPUNGEISSUED says why.
            return EXPUNGE_ISSUED.to(tag)

        return run.start().addCallback(done)

    def _do_store(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        reader.space()
        numbers = reader.sequence_set()
        reader.space()
        unchanged_since = None
        if reader.peek_is(b"("):
            unchanged_since = _modifier(reader, b"UNCHANGEDSINCE")  # RFC 7162 §3.1.3
            reader.space()
        action = reader.atom().upper()
        mode = action.lstrip(b"+-")
        if mode not in (b"FLAGS", b"FLAGS.SILENT") or action[:1] == action[1:2] == b"+":
            raise ParseError("Expected FLAGS, +FLAGS or -FLAGS")
        operation = action[:1] if action[:1] in (b"+", b"-") else b""
        silent = mode.endswith(b".SILENT")
        reader.space()
        if reader.peek_is(b"("):
            raw = reader.flag_list()
        else:
            raw = [reader.flag()]
            while reader.accept(b" "):
                raw.append(reader.flag())
        reader.end()
        selected = self._ctx.selected
        assert selected is not None
        verb = "UID STORE" if uid else "STORE"
        if selected.readonly:
            return READ_ONLY.to(tag)
        try:
            letters, keywords = split_flags(f.decode("utf-8", "replace") for f in raw)
        except FlagError:
            raise ParseError("Invalid flag") from None
        if unchanged_since is not None:
            self._ctx.condstore_used()
        targets = self._targets(numbers, uid)
        if not targets:
            return completed(tag, verb)
        view = selected.view

        def apply(keyword_slots: list[str]) -> Deferred[bytes]:
            if keyword_slots != selected.keywords:
                selected.keywords = keyword_slots
                selected.flag_cache.clear()
                names = selected.flag_names()
                self._ctx.write(untagged(b"FLAGS (" + names + b")")
                           + untagged(b"OK [PERMANENTFLAGS (" + names + b" \\*)] Flags"))
            wanted = frozenset(letters) | letters_of(keywords, selected.keywords)
            slots = list(selected.keywords)

            # Worked out against the flags each file has when it is renamed (under the
            # folder's lock), not the session's possibly older view: another session's
            # change made meanwhile is kept (RFC 3501 §6.4.6).
            def change(current: frozenset[str]) -> frozenset[str]:
                if operation == b"+":
                    return current | wanted
                if operation == b"-":
                    return current - wanted
                # Letters nobody maps (another client's) are kept: we cannot show them.
                return wanted | frozenset(letter for letter in current if letter.islower()
                                          and not has_keyword(slots, letter))

            changes: list[tuple[MessageInfo, FlagChange]] = [(info, change)
                                                             for _, info in targets]

            def stored(result: FlagResult) -> bytes:
                before = {info.uid: info for _, info in targets}
                if any(new.modseq != before[new.uid].modseq for new in result.updated):
                    self._ctx.notify(view.name)
                for new in result.updated:
                    if new.flags != before[new.uid].flags:
                        self._ctx.record("imap.flags", new, view.name,
                                    operation=action.replace(b".SILENT", b"").decode(),
                                    flags=[f.decode("utf-8", "replace") for f in raw])
                present = {info.uid: info for info in result.updated}
                refused = {info.uid: info for info in result.modified}
                lines = []
                for _, info in targets:
                    now = present.get(info.uid)
                    position = selected.position(info.uid)
                    if position is None:
                        continue
                    if now is None:
                        current = refused.get(info.uid)
                        if current is not None and (current.modseq != info.modseq
                                                    or current.flags != info.flags):
                            # Changed since the session last said: the view now has the
                            # current state, so the client hears of it here.
                            lines.append(self._ctx.flags_response(position + 1, current, uid=True))
                        continue
                    if not silent:
                        lines.append(self._ctx.flags_response(position + 1, now, uid=uid))
                    elif self._ctx.condstore and now.modseq != info.modseq:
                        # RFC 7162 §3.1.3: even .SILENT tells the new mod-sequence.
                        lines.append(b"* %d FETCH (UID %d MODSEQ (%d))\r\n" % (
                            position + 1, now.uid, now.modseq))
                self._ctx.write(b"".join(lines))
                if refused:
                    # RFC 7162 §3.1.3: the messages that failed UNCHANGEDSINCE, as UIDs for
                    # UID STORE and as sequence numbers for STORE.
                    numbers = sorted(info.uid if uid else n for n, info in targets
                                     if info.uid in refused)
                    return tagged(tag, OK, "Conditional STORE failed",
                                  f"MODIFIED {number_set(numbers).decode()}")
                if len(present) < len(targets):
                    # RFC 3501 §6.4.6 "NO - store error", RFC 5530 EXPUNGEISSUED: the others
                    # were changed and reported; the expunge itself comes after the command.
                    return EXPUNGE_ISSUED.to(tag)
                return completed(tag, verb)

            return view.store_flags(changes, unchanged_since=unchanged_since).addCallback(
                stored)

        def failed(failure: Failure) -> bytes | Failure:
            if failure.check(TooManyKeywordsError):
                return TOO_MANY_KEYWORDS.to(tag)
            return failure

        if keywords and any(_letter(selected.keywords, k) is None for k in keywords):
            d: Deferred[list[str]] = self._ctx.run(define_keywords, view.folder, keywords)
        else:
            d = succeed(selected.keywords)
        applied: Deferred[Any] = d.addCallback(apply)
        return cast(Deferred[bytes], applied.addErrback(failed))

    def _do_search(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        selected = self._ctx.selected
        assert selected is not None
        # RFC 5182 §2.1: a SEARCH that asked to SAVE and failed leaves "$" empty.
        saving = b"SAVE" in reader.data[:reader.data.find(b")") + 1].upper()
        try:
            reader.space()
            returns = esearch.parse_return(reader)
            saving = returns is not None and "SAVE" in returns
            key = searching.parse_search(reader, uid=uid,
                                         allow_charset="UTF8=ACCEPT" not in self._ctx.enabled)
        except ParseError:
            if saving:
                selected.saved = frozenset()
            raise
        if returns is None and self._ctx.rev2:
            returns = esearch.DEFAULT  # RFC 9051 §6.4.4: the answer is always ESEARCH
        with_modseq = searching.uses_modseq(key)
        if with_modseq:
            self._ctx.condstore_used()
        if searching.uses_size(key) and any(info.wire_size is None
                                            for info in selected.view.messages):
            # LARGER/SMALLER compare wire sizes, which a folder opened cold may not know yet.
            return selected.view.with_sizes(selected.view.messages).addCallback(
                lambda _: self._search(tag, selected, key, returns, uid, with_modseq))
        return self._search(tag, selected, key, returns, uid, with_modseq)

    def _search(self, tag: bytes, selected: Selected, key: searching.Key,
                returns: frozenset[str] | None, uid: bool,
                with_modseq: bool) -> bytes | Deferred[bytes]:
        messages = selected.view.messages
        recent = selected.recent
        need = key.need
        folder = selected.view.folder if need is not fetching.Need.NOTHING else None
        context = searching.Context(len(messages), messages[-1].uid if messages else 0,
                                    list(selected.keywords), selected.saved)

        def answer(found: list[searching.Candidate]) -> bytes:
            numbers = [c.info.uid if uid else c.seq for c in found]
            modseqs = {n: c.info.modseq for n, c in zip(numbers, found, strict=True)}
            if returns is None:
                # RFC 7162 §3.1.6: with a MODSEQ key, the highest mod-sequence of the matches.
                tail = (b" (MODSEQ %d)" % max(modseqs.values())
                        if with_modseq and numbers else b"")
                self._ctx.write(b"* SEARCH" + b"".join(b" %d" % n for n in numbers) + tail
                                + b"\r\n")
            else:
                if "SAVE" in returns:
                    selected.saved = esearch.saved(returns, [c.info.uid for c in found])
                if esearch.wants_response(returns):
                    highest = (max(modseqs[n] for n in esearch.reported(returns, numbers))
                               if with_modseq and numbers else None)
                    self._ctx.write(esearch.response(tag, returns, numbers, uid=uid,
                                                     modseq=highest))
            return completed(tag, "UID SEARCH" if uid else "SEARCH")

        if need is fetching.Need.NOTHING:
            return answer(searching.run(key, [searching.Candidate(seq, info, info.uid in recent)
                                              for seq, info in enumerate(messages, 1)], context))
        # Header searches mostly hit the header cache: one disk-thread call. Body searches read
        # every file: several calls, so that the disk threads work in parallel. Candidates are
        # built in the disk thread, from a copy of the view's list and of the recent set.
        batch = SEARCH_BATCH if need is fetching.Need.WHOLE else 50 * SEARCH_BATCH
        recent_now = frozenset(recent)
        d: Deferred[list[list[searching.Candidate]]] = gatherResults(
            [self._ctx.run(searching.run_over, key, messages[i:i + batch], i + 1, recent_now,
                           folder, context)
             for i in range(0, len(messages), batch)])
        return d.addCallback(lambda parts: answer([c for part in parts for c in part]))

    def _do_expunge(self, tag: bytes, reader: Reader, uid: bool) -> bytes | Deferred[bytes]:
        numbers = None
        if uid:
            reader.space()
            numbers = reader.sequence_set()  # RFC 4315 §2.1 UID EXPUNGE
        reader.end()
        selected = self._ctx.selected
        assert selected is not None
        if selected.readonly:
            return READ_ONLY.to(tag)
        candidates = (selected.view.messages if numbers is None else
                      [info for _, info in self._targets(numbers, uid=True)])
        doomed = [info for info in candidates if TRASHED in info.flags]
        folder = selected.view.name

        def expunged(_: None) -> bytes:
            for info in doomed:
                self._ctx.record("imap.expunge", info, folder)
            return completed(tag, "EXPUNGE")

        return self._ctx.expunge(doomed).addCallback(expunged)


def _modifier(reader: Reader, name: bytes) -> int:
    """A one-modifier list ``(NAME n)`` (RFC 4466 fetch/store modifiers; RFC 7162 §3.1.3 and
    §3.1.4.1 define UNCHANGEDSINCE and CHANGEDSINCE, whose value may be 0)."""
    reader.expect(b"(")
    if reader.atom().upper() != name:
        raise ParseError(f"Expected {name.decode()}")
    reader.space()
    value = reader.number()
    reader.expect(b")")
    return value



def _letter(keywords: list[str], name: str) -> str | None:
    from mailsys.mailbox.keywords import letter_of

    return letter_of(keywords, name)


