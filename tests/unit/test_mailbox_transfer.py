"""Store extensions for IMAP: APPEND and COPY with UIDs, keywords, folder create, rename,
delete and subscriptions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailsys.mailbox.folder import Folder
from mailsys.mailbox.hierarchy import (
    FolderHasChildrenError,
    create_folder_tree,
    delete_folder,
    folder_names,
    read_subscriptions,
    rename_folder,
    set_subscribed,
)
from mailsys.mailbox.keywords import (
    KEYWORDS_NAME,
    TooManyKeywordsError,
    define_keywords,
    keyword_of,
    letter_of,
    read_keywords,
)
from mailsys.mailbox.layout import (
    FLAGGED,
    SEEN,
    NameTooLongError,
    create_maildir,
    parse_name,
    stored_form,
)
from mailsys.mailbox.store import MailboxStore
from mailsys.mailbox.transfer import append_message, copy_messages
from tests.unit.mailbox_support import ImmediatePool, deliver, failure_of, message, result_of

USER = "demo@example.test"


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    create_maildir(path, subfolder=False)
    return path


def test_append_gets_next_uid_flags_and_date(inbox: Path) -> None:
    """APPEND stores LF line ends, the flags and the date, and returns the next UID."""
    folder = Folder(inbox)
    deliver(inbox, message(1))
    folder.sync()
    added = append_message(folder, b"Subject: a\r\n\r\nbody\r\n", frozenset({SEEN}), 1_600_000_000)
    assert added.uids == ((0, 2),)
    info = folder.sync().messages[1]
    assert (info.uid, info.flags, info.internal_date) == (2, {SEEN}, 1_600_000_000)
    assert info.wire_size == len(b"Subject: a\r\n\r\nbody\r\n")
    assert folder.read_message(info) == b"Subject: a\n\nbody\n"


def test_stored_form_keeps_bytes_that_would_not_round_trip() -> None:
    """CRLF becomes LF only when every line end is CRLF."""
    assert stored_form(b"a\r\nb\r\n") == b"a\nb\n"
    assert stored_form(b"a\r\nb\n") == b"a\r\nb\n"
    assert stored_form(b"a\rb\r\n") == b"a\rb\r\n"


def test_append_to_a_never_opened_folder_starts_its_numbering(tmp_path: Path) -> None:
    """The first APPEND to a new folder gets UID 1 without a UID-file rebuild."""
    path = tmp_path / ".New"
    create_maildir(path, subfolder=True)
    added = append_message(Folder(path, subfolder=True), b"x\r\n", frozenset())
    assert added.uids == ((0, 1),)
    assert Folder(path, subfolder=True).sync().rebuilt is None


def test_copy_links_with_fresh_names_and_new_uids(inbox: Path, tmp_path: Path) -> None:
    """COPY hard-links each message under a new name without the source's ,U=."""
    source = Folder(inbox)
    for i in range(3):
        deliver(inbox, message(i), mtime=1_700_000_000 + i)
    infos = list(source.sync().messages)
    target_path = tmp_path / ".Trash"
    create_maildir(target_path, subfolder=True)
    target = Folder(target_path, subfolder=True)
    added = copy_messages(source, infos[1:], target, lambda info: info.flags | {FLAGGED})
    assert added.uids == ((2, 1), (3, 2))
    copies = target.sync().messages
    assert [c.internal_date for c in copies] == [infos[1].internal_date, infos[2].internal_date]
    assert all(c.flags == {FLAGGED} and c.key not in {i.key for i in infos} for c in copies)
    stat = os.stat(target_path / "cur" / copies[0].name)
    assert stat.st_nlink == 2


def test_copy_skips_vanished_messages(inbox: Path, tmp_path: Path) -> None:
    """A message deleted before COPY is left out of the result."""
    source = Folder(inbox)
    deliver(inbox, message(1))
    info = source.sync().messages[0]
    source.delete([info])
    create_maildir(tmp_path / ".T", subfolder=True)
    assert copy_messages(source, [info], Folder(tmp_path / ".T", subfolder=True),
                         lambda i: i.flags).uids == ()


def test_keywords_get_stable_letters(inbox: Path) -> None:
    """Keywords get letters a, b, ... in a Dovecot-format file; 27 do not fit."""
    folder = Folder(inbox)
    assert read_keywords(inbox) == []
    slots = define_keywords(folder, ["$Work", "Later"])
    assert slots == ["$Work", "Later"] and letter_of(slots, "later") == "b"
    assert (inbox / KEYWORDS_NAME).read_text() == "0 $Work\n1 Later\n"
    assert define_keywords(folder, ["$work"]) == slots
    assert keyword_of(slots, "a") == "$Work" and keyword_of(slots, "z") is None
    with pytest.raises(TooManyKeywordsError):
        define_keywords(folder, [f"k{i}" for i in range(30)])
    assert read_keywords(inbox) == slots


def test_create_rename_delete_folders(inbox: Path) -> None:
    """CREATE makes parents; RENAME moves subfolders with their UIDs; DELETE needs no children."""
    create_folder_tree(inbox, "A.B.C")
    assert folder_names(inbox) == ["A", "A.B", "A.B.C"]
    with pytest.raises(FileExistsError):
        create_folder_tree(inbox, "A.B")
    deliver(inbox / ".A.B", message(1))
    validity = Folder(inbox / ".A.B", subfolder=True).sync().uidvalidity
    rename_folder(inbox, "A", "Z")
    assert folder_names(inbox) == ["Z", "Z.B", "Z.B.C"]
    assert Folder(inbox / ".Z.B", subfolder=True).sync().uidvalidity == validity
    with pytest.raises(FolderHasChildrenError):
        delete_folder(inbox, "Z.B")
    delete_folder(inbox, "Z.B.C")
    with pytest.raises(FileNotFoundError):
        delete_folder(inbox, "Z.B.C")
    with pytest.raises(ValueError):
        delete_folder(inbox, "INBOX")
    assert folder_names(inbox) == ["Z", "Z.B"]
    assert os.listdir(inbox / "tmp") == []


@pytest.mark.parametrize("name", ["n" * 10_240, ".".join(["level"] * 100)])
def test_create_of_a_too_long_name_is_refused_before_the_disk(inbox: Path, name: str) -> None:
    """CREATE of a 10 KB name or one 100 levels deep raises NameTooLongError, creating nothing."""
    before = sorted(os.listdir(inbox))
    with pytest.raises(NameTooLongError):
        create_folder_tree(inbox, name)
    assert sorted(os.listdir(inbox)) == before


def test_rename_that_would_make_a_child_too_long_moves_nothing(inbox: Path) -> None:
    """RENAME is refused with NameTooLongError if any subfolder's new name would not fit."""
    child = "A." + "c" * 240
    create_folder_tree(inbox, child)
    with pytest.raises(NameTooLongError):
        rename_folder(inbox, "A", "B" * 20)
    assert folder_names(inbox) == ["A", child]
    with pytest.raises(NameTooLongError):
        rename_folder(inbox, "A", "B" * 300)
    assert folder_names(inbox) == ["A", child]


def test_rename_inbox_moves_messages_out(inbox: Path) -> None:
    """RENAME INBOX moves every message to the new folder without its old UID."""
    for i in range(2):
        deliver(inbox, message(i))
    Folder(inbox).sync()
    deliver(inbox, message(3))
    rename_folder(inbox, "INBOX", "Old")
    assert Folder(inbox).sync().messages == ()
    moved = Folder(inbox / ".Old", subfolder=True).sync()
    assert len(moved.messages) == 3 and moved.rebuilt is None
    assert all(parse_name(info.name).uid == info.uid for info in moved.messages)


def test_subscriptions_default_to_all(inbox: Path) -> None:
    """Without a subscription file every folder counts; changes are kept."""
    create_folder_tree(inbox, "Sent")
    assert read_subscriptions(inbox) is None
    set_subscribed(inbox, "Sent", False)
    assert read_subscriptions(inbox) == ["INBOX"]
    set_subscribed(inbox, "Gone", True)
    assert read_subscriptions(inbox) == ["INBOX", "Gone"]


def test_refresh_of_a_deleted_folder_fails_without_recreating_it(tmp_path: Path) -> None:
    """A session's view of a folder deleted meanwhile fails to refresh; nothing is recreated."""
    store = MailboxStore(tmp_path, ImmediatePool())
    view = result_of(store.open_folder(USER, "Junk"))
    delete_folder(store.mailbox_path(USER), "Junk")
    failure_of(view.refresh(), FileNotFoundError)
    assert not store.folder_path(USER, "Junk").exists()


def _age(path: Path, seconds: float = 10.0) -> None:
    """Make the folder's directories and UID file look untouched for ``seconds``."""
    past = os.stat(path / "cur").st_mtime - seconds
    for name in ("cur", "new", "mailsys-uidlist"):
        os.utime(path / name, (past, past))


def test_settled_folder_is_not_scanned_again(inbox: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    """A sync of a folder unchanged since a settled sync lists no directory; a change is seen."""
    for i in range(3):
        deliver(inbox, message(i))
    folder = Folder(inbox)
    folder.sync()
    _age(inbox)
    first = folder.sync()  # scans, finds nothing to do, remembers the settled state
    scans: list[object] = []
    real_scandir = os.scandir

    def spy(path: object) -> object:
        scans.append(path)
        return real_scandir(path)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "scandir", spy)
    assert Folder(inbox).sync() == first
    assert scans == []
    deliver(inbox, message(9))
    assert len(Folder(inbox).sync().messages) == 4
    assert scans


def test_recent_change_is_not_trusted(inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after a change the folder is scanned every time (mtimes may be coarse)."""
    deliver(inbox, message(1))
    folder = Folder(inbox)
    folder.sync()
    folder.sync()
    scans: list[object] = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: scans.append(p) or real_scandir(p))
    folder.sync()
    assert scans
