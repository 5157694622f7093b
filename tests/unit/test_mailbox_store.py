"""The mailbox store: mailboxes and folders, views and refresh, the POP3 lock, notifications."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from mailsys.delivery.maildir import MaildirWriter
from mailsys.envelope import Envelope, Recipient, TargetKind
from mailsys.mailbox import (
    DEFAULT_FOLDERS,
    INBOX,
    InvalidFolderNameError,
    InvalidMailboxNameError,
    MailboxInUseError,
    MailboxStore,
)
from mailsys.mailbox.layout import FOLDER_MARKER
from mailsys.mailbox.names import SEEN
from mailsys.mailbox.store import POP3_LOCK_NAME, folder_directory
from tests.unit.mailbox_support import ImmediatePool, deliver, failure_of, message, result_of

USER = "demo@example.test"


@pytest.fixture
def store(tmp_path: Path) -> MailboxStore:
    return MailboxStore(tmp_path / "maildirs", ImmediatePool())


def test_layout_matches_the_delivery_writer(store: MailboxStore) -> None:
    """The store finds a mailbox where MaildirWriter delivers it."""
    writer = MaildirWriter(store.root, ImmediatePool(), "host")  # type: ignore[arg-type]
    assert store.mailbox_path("Demo@Example.TEST".lower()) == writer.maildir_path(USER)
    assert store.folder_path(USER, "Sent") == writer.maildir_path(USER) / ".Sent"


def test_first_open_creates_inbox_and_default_folders(store: MailboxStore) -> None:
    """A new user's mailbox gets an INBOX and Sent, Drafts, Trash, Junk (Maildir++)."""
    view = result_of(store.open_folder(USER))
    assert view.name == INBOX and view.messages == []
    inbox = store.mailbox_path(USER)
    for sub in ("cur", "new", "tmp"):
        assert (inbox / sub).is_dir()
    for name in DEFAULT_FOLDERS:
        assert (inbox / f".{name}" / "cur").is_dir()
        assert (inbox / f".{name}" / FOLDER_MARKER).is_file()
    assert result_of(store.list_folders(USER)) == [INBOX, *sorted(DEFAULT_FOLDERS)]


def test_deleted_default_folder_is_not_recreated(tmp_path: Path) -> None:
    """Default folders are made once per mailbox: one the user removed stays removed."""
    store = MailboxStore(tmp_path, ImmediatePool())
    result_of(store.open_folder(USER))
    junk = store.folder_path(USER, "Junk")
    for sub in ("cur", "new", "tmp"):
        (junk / sub).rmdir()
    (junk / FOLDER_MARKER).unlink()
    junk.rmdir()
    fresh = MailboxStore(tmp_path, ImmediatePool())
    result_of(fresh.open_folder(USER))
    assert not junk.exists()


def test_existing_mail_is_kept_when_mailbox_initialised(store: MailboxStore) -> None:
    """Mail delivered before the first login is in the INBOX when it is first opened."""
    deliver(store.mailbox_path(USER), message(1))
    view = result_of(store.open_folder(USER))
    assert [info.uid for info in view.messages] == [1]


def test_open_subfolder_and_missing_folder(store: MailboxStore) -> None:
    """A default folder opens; an unknown one fails with FileNotFoundError."""
    view = result_of(store.open_folder(USER, "Sent"))
    assert view.path == store.mailbox_path(USER) / ".Sent"
    failure_of(store.open_folder(USER, "Nope"), FileNotFoundError)


def test_create_folder(store: MailboxStore) -> None:
    """create_folder makes a Maildir++ folder; creating it again fails."""
    result_of(store.create_folder(USER, "Archive.2026"))
    assert "Archive.2026" in result_of(store.list_folders(USER))
    failure_of(store.create_folder(USER, "Archive.2026"), FileExistsError)


@pytest.mark.parametrize("name", ["", ".x", "a..b", "a/b", "INBOX.x", "x.", "a\nb"])
def test_bad_folder_names_refused(name: str) -> None:
    """Names that are empty, escape the directory or clash with INBOX are refused."""
    with pytest.raises(InvalidFolderNameError):
        folder_directory(name)


@pytest.mark.parametrize("mailbox", ["nobody", "../x@example.test", "a@../..", "@example.test"])
def test_bad_mailbox_names_refused(store: MailboxStore, mailbox: str) -> None:
    """A mailbox name that is not user@domain or would leave the root is refused."""
    with pytest.raises(InvalidMailboxNameError):
        store.mailbox_path(mailbox)
    failure_of(store.open_folder(mailbox), InvalidMailboxNameError)


def test_refresh_reports_added_expunged_and_flags(store: MailboxStore) -> None:
    """refresh() tells a session what others did: new mail, expunges and flag changes."""
    inbox = store.mailbox_path(USER)
    for i in range(3):
        deliver(inbox, message(i))
    mine = result_of(store.open_folder(USER))
    other = result_of(store.open_folder(USER))
    result_of(other.set_flags([(other.messages[0], frozenset({SEEN}))]))
    result_of(other.delete([other.messages[1]]))
    deliver(inbox, message(9))
    changes = result_of(mine.refresh())
    assert [info.uid for info in changes.added] == [4]
    assert changes.expunged == (2,)
    assert [info.uid for info in changes.flags_changed] == [1]
    assert not changes.uidvalidity_changed
    assert [info.uid for info in mine.messages] == [1, 3, 4]


def test_refresh_reports_new_uidvalidity(store: MailboxStore) -> None:
    """If the folder was renumbered, refresh says everything the session knew is void."""
    inbox = store.mailbox_path(USER)
    deliver(inbox, message(1))
    view = result_of(store.open_folder(USER))
    (inbox / "mailsys-uidlist").write_text("mailsys-uidlist 1 4000000000 7\n1 1 1 x\n")
    changes = result_of(view.refresh())
    assert changes.uidvalidity_changed and view.uidvalidity == 4000000000


def test_read_through_view(store: MailboxStore) -> None:
    """A view reads a message's stored bytes."""
    deliver(store.mailbox_path(USER), message(1))
    view = result_of(store.open_folder(USER))
    assert result_of(view.read(view.messages[0])) == message(1)
    with result_of(view.open_message(view.messages[0])) as f:
        assert f.read() == message(1)


def test_pop3_lock_is_exclusive_until_released(store: MailboxStore) -> None:
    """A second POP3 lock on one mailbox fails with MailboxInUseError until the first is gone."""
    lock = result_of(store.lock_mailbox(USER))
    failure_of(store.lock_mailbox(USER), MailboxInUseError)
    lock.release()
    lock.release()  # idempotent
    result_of(store.lock_mailbox(USER)).release()


def test_pop3_lock_respects_other_processes(store: MailboxStore) -> None:
    """A lock held by another process (an flock on the lock file) also refuses the mailbox."""
    result_of(store.open_folder(USER))
    fd = os.open(store.mailbox_path(USER) / POP3_LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        failure_of(store.lock_mailbox(USER), MailboxInUseError)
    finally:
        os.close(fd)
    result_of(store.lock_mailbox(USER)).release()


def test_notify_delivered_wakes_subscribers(store: MailboxStore) -> None:
    """An in-process delivery calls the INBOX's subscribers; unsubscribing stops it."""
    calls: list[str] = []
    unsubscribe = store.subscribe(USER, "inbox", lambda: calls.append("inbox"))
    store.subscribe(USER, "Sent", lambda: calls.append("sent"))
    store.notify_delivered(USER)
    assert calls == ["inbox"]
    unsubscribe()
    store.notify_delivered(USER)
    assert calls == ["inbox"]


def test_writer_hook_notifies_store(tmp_path: Path) -> None:
    """MaildirWriter's on_delivered hook, wired to the store, wakes the mailbox's sessions."""
    from tests.unit.test_spool import ImmediateDiskPool

    pool = ImmediateDiskPool()
    store = MailboxStore(tmp_path / "maildirs", pool)
    writer = MaildirWriter(tmp_path / "maildirs", pool, "host",  # type: ignore[arg-type]
                           on_delivered=store.notify_delivered)
    woken: list[bool] = []
    store.subscribe(USER, INBOX, lambda: woken.append(True))
    spooled = tmp_path / "msg"
    spooled.write_bytes(message(1))
    envelope = Envelope(queue_id="Q1", sender="a@b.test", received_at=1_700_000_000.0,
                        recipients=[])
    recipient = Recipient(address=USER, original=USER, kind=TargetKind.LOCAL, mailbox=USER)
    result_of(writer.deliver(envelope, recipient, spooled))
    assert woken == [True]


def test_poll_notices_changes_by_other_processes(store: MailboxStore) -> None:
    """poll() calls subscribers when a watched folder's directories changed on disk."""
    result_of(store.open_folder(USER))
    calls: list[int] = []
    store.subscribe(USER, INBOX, lambda: calls.append(1))
    result_of(store.poll())  # records the current state
    assert calls == []
    inbox = store.mailbox_path(USER)
    before = os.stat(inbox / "new").st_mtime_ns
    deliver(inbox, message(1))
    os.utime(inbox / "new", ns=(before + 10**9, before + 10**9))
    result_of(store.poll())
    assert calls == [1]
    result_of(store.poll())
    assert calls == [1]


class HeldPool:
    """A disk pool whose jobs wait until the test runs them, in order."""

    def __init__(self) -> None:
        self.jobs: list[tuple[object, Deferred[object]]] = []

    def run(self, func: Callable[..., object], *args: object) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        self.jobs.append((lambda: func(*args), d))
        return d

    def run_next(self) -> None:
        job, d = self.jobs.pop(0)
        d.callback(job())  # type: ignore[operator]


def test_refreshes_of_one_folder_share_a_sync_started_after_they_asked(tmp_path: Path) -> None:
    """Many views refreshing one folder at once cost one sync that starts after their request
    (not the one already running, which may have read the folder before the change)."""
    store = MailboxStore(tmp_path / "maildirs", ImmediatePool())
    views = [result_of(store.open_folder(USER)) for _ in range(50)]
    pool = HeldPool()
    store.pool = pool  # type: ignore[assignment]
    first = views[0].refresh()  # a sync starts
    deliver(store.mailbox_path(USER), message(1))  # then a message arrives
    rest = [view.refresh() for view in views[1:]]
    assert len(pool.jobs) == 1
    pool.run_next()  # the sync that began before the delivery answers the first view only
    assert len(result_of(first).added) in (0, 1)
    assert len(pool.jobs) == 1 and not any(d.called for d in rest)
    pool.run_next()  # one more sync for the other 49
    assert all(len(result_of(d).added) == 1 for d in rest)
    assert pool.jobs == []


def test_recent_claims_of_many_sessions_share_one_disk_job(tmp_path: Path) -> None:
    """Claims on one folder that arrive while a claim batch runs are answered by one more disk
    job, in the order they were asked: only the first read-write session gets \\Recent."""
    store = MailboxStore(tmp_path / "maildirs", ImmediatePool())
    deliver(store.mailbox_path(USER), message(1))
    view = result_of(store.open_folder(USER))
    pool = HeldPool()
    store.pool = pool  # type: ignore[assignment]
    uidnext = view.uidnext
    first = store.recent_from_shared(view.folder, uidnext, claim=False)
    rest = [store.recent_from_shared(view.folder, uidnext, claim=True) for _ in range(20)]
    assert len(pool.jobs) == 1
    pool.run_next()
    assert result_of(first) == 1
    assert len(pool.jobs) == 1
    pool.run_next()
    answers = [result_of(d) for d in rest]
    assert answers == [1] + [uidnext] * 19
