"""The store's shared refresh: one sync, one difference per state and one \\Recent claim batch for
every view a folder change wakes (MailboxStore.refresh_then)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.python.failure import Failure

from mailsys.mailbox.names import SEEN
from mailsys.mailbox.store import FolderView, MailboxStore, Refreshed
from tests.unit.mailbox_support import BatchPool, ImmediatePool, deliver, message, result_of

USER = "demo@example.test"


def _setup(tmp_path: Path, views: int, messages: int = 1
           ) -> tuple[MailboxStore, BatchPool, list[FolderView]]:
    """``views`` views of an INBOX of ``messages`` messages, brought to one shared state."""
    pool = BatchPool()
    store = MailboxStore(tmp_path / "maildirs", pool)  # type: ignore[arg-type]
    for i in range(messages):
        deliver(store.mailbox_path(USER), message(i + 1))
    opened = [result_of(store.open_folder(USER)) for _ in range(views)]
    wake(store, pool, opened)  # one batch: every view now has the same base state
    store.folder(USER).recent_from(opened[0].uidnext, claim=True)  # as a SELECT would
    return store, pool, opened


def wake(store: MailboxStore, pool: BatchPool, views: list[FolderView],
         claims: list[bool | None] | None = None) -> list[Refreshed | Failure]:
    """Refresh ``views`` as a delivery's notification wakes them; their outcomes, in order."""
    outcomes: list[Refreshed | Failure | None] = [None] * len(views)
    unsubscribe = []
    for n, view in enumerate(views):
        def then(outcome: Refreshed | Failure, n: int = n) -> None:
            outcomes[n] = outcome

        def changed(view: FolderView = view, then: Any = then, n: int = n) -> None:
            view.refresh_then(then, claim=True if claims is None else claims[n])

        unsubscribe.append(store.subscribe(USER, "INBOX", changed))
    pool.held = True
    store.notify_changed(USER, "INBOX")
    pool.drain()
    for stop in unsubscribe:
        stop()
    assert all(outcome is not None for outcome in outcomes)
    return outcomes  # type: ignore[return-value]


def changes_of(outcome: Refreshed | Failure) -> Refreshed:
    assert isinstance(outcome, Refreshed), outcome
    return outcome


def test_views_in_one_state_share_the_sync_the_difference_and_one_claim_job(
        tmp_path: Path) -> None:
    """A delivery to a folder 50 views watch: one sync job and one claim job; the difference is
    worked out once and every view gets the same list; only the first read-write view that
    asked sees the message \\Recent."""
    store, pool, views = _setup(tmp_path, 50)
    deliver(store.mailbox_path(USER), message(2))
    outcomes = [changes_of(o) for o in wake(store, pool, views)]
    assert pool.ran == ["work", "recent_from_many"]
    assert all(o.changes is outcomes[0].changes for o in outcomes)
    assert [info.uid for info in outcomes[0].changes.added] == [2]
    assert all(view.messages is views[0].messages for view in views)
    assert [info.uid for info in views[0].messages] == [1, 2]
    assert [o.first_recent for o in outcomes] == [2] + [3] * 49
    assert all(view.uidnext == 3 for view in views)


def test_a_read_only_view_leaves_recent_to_the_next_read_write_one(tmp_path: Path) -> None:
    """A read-only view (EXAMINE) that asks first sees the message \\Recent and leaves it so for
    the first read-write view; a view that claims nothing asks nothing of the disk."""
    store, pool, views = _setup(tmp_path, 3)
    deliver(store.mailbox_path(USER), message(2))
    outcomes = [changes_of(o) for o in wake(store, pool, views, [False, True, True])]
    assert [o.first_recent for o in outcomes] == [2, 2, 3]
    deliver(store.mailbox_path(USER), message(3))
    outcomes = [changes_of(o) for o in wake(store, pool, views, [None, None, None])]
    assert pool.ran == ["work"]
    assert [o.first_recent for o in outcomes] == [4, 4, 4]


def test_a_view_one_refresh_behind_gets_its_own_difference(tmp_path: Path) -> None:
    """Two views, one out of sync (it slept through a delivery): the one in step hears of the
    newest message only, the one behind of both; \\Recent is not given twice."""
    store, pool, (ahead, behind) = _setup(tmp_path, 2)
    deliver(store.mailbox_path(USER), message(2))
    assert changes_of(wake(store, pool, [ahead])[0]).first_recent == 2
    deliver(store.mailbox_path(USER), message(3))
    first, second = (changes_of(o) for o in wake(store, pool, [ahead, behind]))
    assert [info.uid for info in first.changes.added] == [3]
    assert [info.uid for info in second.changes.added] == [2, 3]
    assert (first.first_recent, second.first_recent) == (3, 4)
    assert ahead.messages is behind.messages  # the same state again: one list


def test_an_expunge_in_between_is_reported_to_the_others_not_to_its_session(
        tmp_path: Path) -> None:
    """A view that expunged a message itself no longer holds a sync's list: it is compared in
    full and hears only of the new message; the views in the shared state hear of both."""
    store, pool, views = _setup(tmp_path, 3, messages=2)
    mine = views[0]
    result_of(mine.delete([mine.messages[0]]))
    deliver(store.mailbox_path(USER), message(3))
    outcomes = [changes_of(o) for o in wake(store, pool, views)]
    assert outcomes[0].changes.expunged == ()
    assert [info.uid for info in outcomes[0].changes.added] == [3]
    for other in outcomes[1:]:
        assert other.changes.expunged == (1,)
        assert [info.uid for info in other.changes.added] == [3]
    assert outcomes[1].changes is outcomes[2].changes
    assert [info.uid for info in mine.messages] == [2, 3] == [i.uid for i in views[1].messages]


def test_a_flag_change_of_ones_own_is_not_reported_back(tmp_path: Path) -> None:
    """A view whose session stored flags is compared in full: its own change is no news; the
    other views hear of it with the new mod-sequence (RFC 7162 §3.1)."""
    store, pool, views = _setup(tmp_path, 3)
    mine = views[0]
    result_of(mine.set_flags([(mine.messages[0], frozenset({SEEN}))]))
    modseq = mine.messages[0].modseq
    outcomes = [changes_of(o) for o in wake(store, pool, views)]
    assert not outcomes[0].changes.any
    for other in outcomes[1:]:
        (changed,) = other.changes.flags_changed
        assert changed.flags == frozenset({SEEN}) and changed.modseq == modseq
    assert views[1].highest_modseq == mine.highest_modseq


def test_nothing_changed_is_no_change(tmp_path: Path) -> None:
    """A wake-up with nothing new on disk reports nothing and claims nothing."""
    store, pool, views = _setup(tmp_path, 2)
    outcomes = [changes_of(o) for o in wake(store, pool, views)]
    assert not any(o.changes.any for o in outcomes)
    assert pool.ran == ["work"]


def test_new_uidvalidity_voids_every_view_without_a_claim(tmp_path: Path) -> None:
    """A renumbered folder: every view is told its UIDs are void; nothing is claimed."""
    store, pool, views = _setup(tmp_path, 2)
    inbox = store.mailbox_path(USER)
    (inbox / "mailsys-uidlist").write_text("mailsys-uidlist 1 4000000000 7\n1 1 1 x\n")
    outcomes = [changes_of(o) for o in wake(store, pool, views)]
    assert all(o.changes.uidvalidity_changed for o in outcomes)
    assert pool.ran == ["work"]
    assert all(view.uidvalidity == 4000000000 for view in views)


def test_a_folder_gone_fails_every_view_and_one_failing_session_stops_no_other(
        tmp_path: Path) -> None:
    """A folder deleted meanwhile fails each waiting view's refresh with FileNotFoundError;
    a session whose callback raises does not keep the others from theirs."""
    pool = BatchPool()
    store = MailboxStore(tmp_path / "maildirs", pool)  # type: ignore[arg-type]
    result_of(store.open_folder(USER))
    result_of(store.create_folder(USER, "Work"))
    views = [result_of(store.open_folder(USER, "Work")) for _ in range(3)]
    for sub in ("cur", "new", "tmp"):
        (store.folder_path(USER, "Work") / sub).rmdir()
    for leftover in store.folder_path(USER, "Work").iterdir():
        leftover.unlink()
    store.folder_path(USER, "Work").rmdir()
    seen: list[Any] = []

    def broken(outcome: Refreshed | Failure) -> None:
        raise RuntimeError("session bug")

    pool.held = True
    views[0].refresh_then(broken, claim=True)  # starts a sync
    for view in views[1:]:
        view.refresh_then(seen.append, claim=True)  # the next one
    assert pool.drain() == ["work", "work"]
    assert len(seen) == 2
    assert all(isinstance(f, Failure) and f.check(FileNotFoundError) for f in seen)


def test_refresh_keeps_its_deferred(tmp_path: Path) -> None:
    """FolderView.refresh() still fires with the changes (no claim is made for it)."""
    store = MailboxStore(tmp_path / "maildirs", ImmediatePool())
    view = result_of(store.open_folder(USER))
    deliver(store.mailbox_path(USER), message(1))
    changes = result_of(view.refresh())
    assert [info.uid for info in changes.added] == [1]
