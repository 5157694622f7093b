r"""Answering one FETCH: messages read in batches in disk threads, responses written as the
client reads them (a push producer), \Seen set where RFC 3501 §6.4.5 says so.

A batch is at most FETCH_BATCH_BYTES or FETCH_BATCH_COUNT messages, and one batch is read ahead
while the previous one is written. Metadata-only fetches (UID, FLAGS, sizes, dates) read no file
and use one format string per response.
"""

from __future__ import annotations

import functools

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsys.imap import fetch as fetching
from mailsys.imap.context import CommandContext, Selected
from mailsys.mailbox.folder import MessageInfo, adding
from mailsys.mailbox.names import SEEN

_ADD_SEEN = adding({SEEN})  # RFC 3501 §6.4.5: BODY[] sets \Seen, keeping the other flags


FETCH_BATCH_BYTES = 1024 * 1024
FETCH_BATCH_COUNT = 500


@implementer(IPushProducer)
class FetchRun:
    """Answers one FETCH: reads messages in batches in disk threads (one batch ahead) and
    writes their responses, pausing while the client is slow to read (a push producer)."""

    def __init__(self, ctx: CommandContext, selected: Selected,
                 targets: list[tuple[int, MessageInfo]], items: list[fetching.FetchItem],
                 *, with_uid: bool, report_modseq: bool = False) -> None:
        self._ctx = ctx
        self._selected = selected
        self._items = items
        self._with_uid = with_uid
        self._need = fetching.need_of(items)
        self._set_seen = not selected.readonly and any(item.sets_seen for item in items)
        self._read_item = next((item.label().decode("utf-8", "replace") for item in items
                                if item.sets_seen), "")
        # RFC 3501 §6.4.5: a \Seen change is reported with FLAGS; RFC 7162 §3.1: with
        # CONDSTORE on, with UID and MODSEQ too.
        reported = ["UID", "FLAGS", "MODSEQ"] if report_modseq else ["FLAGS"]
        present = {item.name for item in items if item.section is None}
        self._with_flags = [*items, *(fetching.FetchItem(name) for name in reported
                                      if name not in present)]
        self._fast = fetching.metadata_renderer(items, with_uid=with_uid)
        self._whole = fetching.whole_body_renderer(items, with_uid=with_uid)
        self._batches = self._split(targets)
        self._loaded: dict[int, list[bytes | None]] = {}
        self._next_read = 0
        self._next_write = 0
        self._reading = False
        self._writing = False
        self._paused = False
        self._finished = False
        self._complete = True
        self._seen_changed = False
        self.unknown_cte = False  # a BINARY item met an encoding we cannot undo (RFC 3516)
        self._done: Deferred[bool] = Deferred()

    def _split(self, targets: list[tuple[int, MessageInfo]]
               ) -> list[list[tuple[int, MessageInfo]]]:
        if self._need is fetching.Need.NOTHING and not self._set_seen:
            return [targets[i:i + 5000] for i in range(0, len(targets), 5000)]
        batches: list[list[tuple[int, MessageInfo]]] = []
        current: list[tuple[int, MessageInfo]] = []
        size = 0
        for target in targets:
            current.append(target)
            size += target[1].size if self._need is fetching.Need.WHOLE else 1024
            if size >= FETCH_BATCH_BYTES or len(current) >= FETCH_BATCH_COUNT:
                batches.append(current)
                current, size = [], 0
        if current:
            batches.append(current)
        return batches

    def start(self) -> Deferred[bool]:
        self._ctx.consumer().registerProducer(self, True)
        self._pump()
        return self._done

    def _pump(self) -> None:
        if self._finished:
            return
        if self._next_write >= len(self._batches):
            self._finish()
            return
        if (not self._reading and not self._paused and self._next_read < len(self._batches)
                and self._next_read <= self._next_write + 1):
            index = self._next_read
            self._next_read += 1
            if self._need is fetching.Need.NOTHING:
                self._loaded[index] = [None] * len(self._batches[index])
            else:
                self._reading = True
                infos = [info for _, info in self._batches[index]]
                self._ctx.run(fetching.load, self._selected.view.folder, infos,
                                  self._need).addCallbacks(
                    lambda data, i=index: self._arrived(i, data), self._failed)
        if (not self._writing and not self._paused
                and self._next_write in self._loaded):
            self._write_batch(self._next_write)

    def _arrived(self, index: int, data: list[bytes | None]) -> None:
        self._reading = False
        self._loaded[index] = data
        self._pump()

    def _failed(self, failure: Failure) -> None:
        self._reading = self._writing = False
        if not self._finished:
            self._finished = True
            self._ctx.consumer().unregisterProducer()
            self._done.errback(failure)

    def _write_batch(self, index: int) -> None:
        batch = self._batches[index]
        data = self._loaded.pop(index)
        self._next_write += 1
        if self._fast is not None and not self._set_seen:
            self._emit_fast(batch)
            self._pump()
            return
        present = [(seq, info, body) for (seq, info), body in zip(batch, data, strict=True)
                   if body is not None or self._need is fetching.Need.NOTHING]
        if len(present) < len(batch):
            self._complete = False
        if not self._set_seen:
            if self._whole is not None:
                self._emit_whole(present)
            else:
                self._emit(present, set())
            self._pump()
            return
        changes = [(info, _ADD_SEEN) for _, info, _ in present if SEEN not in info.flags]
        if not changes:
            self._emit(present, set())
            self._pump()
            return
        self._writing = True

        def stored(updated: list[MessageInfo]) -> None:
            self._writing = False
            self._seen_changed = True
            now = {info.uid: info for info in updated}
            # The journey: the first FETCH of each body (RFC 3501 §6.4.5: it sets \Seen).
            for info in updated:
                self._ctx.record("imap.fetch", info, self._selected.view.name,
                                     item=self._read_item)
            self._emit([(seq, now.get(info.uid, info), body) for seq, info, body in present],
                       set(now))
            self._pump()

        self._selected.view.set_flags(changes).addCallbacks(stored, self._failed)

    def _emit(self, present: list[tuple[int, MessageInfo, bytes | None]],
              newly_seen: set[int]) -> None:
        selected = self._selected
        out = []
        for seq, info, body in present:
            items = self._items
            if info.uid in newly_seen:
                items = self._with_flags  # the \Seen change is reported
            try:
                out.append(fetching.render(seq, info, items,
                                           functools.partial(selected.flags, info), body,
                                           with_uid=self._with_uid))
            except fetching.UnknownCTEError:
                self.unknown_cte = True  # the session answers NO [UNKNOWN-CTE]
        self._ctx.write(b"".join(out))

    def _emit_whole(self, present: list[tuple[int, MessageInfo, bytes | None]]) -> None:
        """Whole-message responses without \\Seen changes: the pieces of the batch joined
        once (see fetching.whole_body_renderer)."""
        whole = self._whole
        assert whole is not None
        flags = self._selected.flags
        out: list[bytes] = []
        for seq, info, body in present:
            assert body is not None  # Need.WHOLE: the expunged are not present
            whole(out, seq, info, flags, body)
        self._ctx.write(b"".join(out))

    def _emit_fast(self, batch: list[tuple[int, MessageInfo]]) -> None:
        """Metadata-only responses: one format string each, flag lists looked up once per
        distinct flag set (a resync of a large mailbox repeats a handful of them)."""
        fast = self._fast
        assert fast is not None
        selected = self._selected
        recent = selected.recent
        lists: dict[frozenset[str], bytes] = {}
        out = []
        for seq, info in batch:
            if recent and info.uid in recent:
                flags = selected.flags(info)
            else:
                cached = lists.get(info.flags)
                flags = cached if cached is not None else lists.setdefault(
                    info.flags, selected.flags(info))
            out.append(fast(seq, info, flags))
        self._ctx.write(b"".join(out))

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._ctx.consumer().unregisterProducer()
        if self._seen_changed:
            self._ctx.notify(self._selected.view.name)
        self._done.callback(self._complete)

    # IPushProducer (a zope interface, hence no @override).
    def pauseProducing(self) -> None:  # noqa: N802
        self._paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:  # noqa: N802
        self._finished = True

