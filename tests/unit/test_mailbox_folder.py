"""The blocking Maildir folder: UIDs, the UID file and its rebuild, new/ → cur/, flags, deletion."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from mailsys.mailbox import folder as folder_module
from mailsys.mailbox.folder import (
    RECENT_NAME,
    Folder,
    MessageVanishedError,
    new_uidvalidity,
)
from mailsys.mailbox.layout import create_maildir
from mailsys.mailbox.names import SEEN, parse_name
from mailsys.mailbox.uidlist import (
    UIDLIST_NAME,
    UIDVALIDITY_NAME,
    parse_uidlist,
    render_uidlist,
    write_state,
)
from tests.unit.mailbox_support import WallClock, deliver, forget_folder_caches, message


@pytest.fixture
def clock() -> WallClock:
    return WallClock()


@pytest.fixture
def folder(tmp_path: Path, clock: WallClock) -> Folder:
    create_maildir(tmp_path / "inbox", subfolder=False)
    return Folder(tmp_path / "inbox", clock=clock)


def uids_and_keys(folder: Folder) -> list[tuple[int, str]]:
    return [(info.uid, info.key) for info in folder.sync().messages]


def test_new_messages_get_ascending_uids_and_move_to_cur(folder: Folder) -> None:
    """New messages get UIDs 1.. in delivery order and are moved to cur/ with U=, S=, W=."""
    names = [deliver(folder.path, message(i), mtime=1_700_000_000 + i) for i in range(3)]
    result = folder.sync()
    assert [info.uid for info in result.messages] == [1, 2, 3]
    assert [info.key for info in result.messages] == names
    assert all(info.recent for info in result.messages)
    assert os.listdir(folder.path / "new") == []
    for info in result.messages:
        parsed = parse_name(info.name)
        assert (parsed.uid, parsed.size, parsed.wire_size) == (info.uid, info.size, info.wire_size)
        assert (folder.path / "cur" / info.name).is_file()
    assert result.uidnext == 4
    assert result.rebuilt is None


def test_second_sync_is_stable_and_not_recent(folder: Folder) -> None:
    """A second sync keeps UIDs and UIDVALIDITY and reports nothing as recent."""
    deliver(folder.path, message(1))
    first = folder.sync()
    second = folder.sync()
    assert second.uidvalidity == first.uidvalidity
    assert [(m.uid, m.key) for m in second.messages] == [(m.uid, m.key) for m in first.messages]
    assert not any(m.recent for m in second.messages)


def test_later_delivery_gets_next_uid(folder: Folder) -> None:
    """A message delivered after a sync gets the next UID; earlier ones keep theirs."""
    deliver(folder.path, message(1))
    folder.sync()
    key = deliver(folder.path, message(2))
    result = folder.sync()
    assert [(m.uid, m.recent) for m in result.messages] == [(1, False), (2, True)]
    assert result.messages[1].key == key


def test_wire_size_of_lf_file(folder: Folder) -> None:
    """A message stored with bare LF reports its size with CRLF line ends."""
    deliver(folder.path, b"Subject: x\n\nline\n")
    (info,) = folder.sync().messages
    assert info.size == 17
    assert info.wire_size == 20


def test_uid_file_written_atomically_with_entries(folder: Folder) -> None:
    """The UID file lists every message with its UID, size and wire size."""
    key = deliver(folder.path, message(1))
    result = folder.sync()
    uids = parse_uidlist((folder.path / UIDLIST_NAME).read_text())
    assert uids.uidvalidity == result.uidvalidity and uids.uidnext == 2
    assert uids.entries[key].uid == 1
    assert not [p for p in os.listdir(folder.path) if p.endswith(".tmp")]


def test_uid_file_rewritten_by_another_process_is_read_again(folder: Folder) -> None:
    """A UID file replaced behind this process's back is parsed anew, not taken as remembered."""
    deliver(folder.path, message(1))
    first = folder.sync()
    uids = parse_uidlist((folder.path / UIDLIST_NAME).read_text())
    uids.uidnext = 40  # another server numbered (and expunged) messages meanwhile
    write_state(folder.path, uids, floor=False)
    deliver(folder.path, message(2))
    second = folder.sync()
    assert second.uidvalidity == first.uidvalidity
    assert [m.uid for m in second.messages] == [1, 40]


def test_unchanged_uid_file_is_not_parsed_again(folder: Folder,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync that finds the UID file as this process last wrote it does not read it again."""
    deliver(folder.path, message(1))
    folder.sync()
    reads: list[Path] = []
    original = folder_module.read_uidlist
    monkeypatch.setattr(folder_module, "read_uidlist",
                        lambda path: reads.append(path) or original(path))
    deliver(folder.path, message(2))
    assert [m.uid for m in folder.sync().messages] == [1, 2]
    assert [m.uid for m in folder.sync().messages] == [1, 2]
    assert reads == []


def test_lost_uid_file_keeps_uids_and_uidvalidity(folder: Folder) -> None:
    """Without its UID file the folder is rebuilt from the names: same UIDs, same UIDVALIDITY."""
    for i in range(4):
        deliver(folder.path, message(i))
    before = folder.sync()
    (folder.path / UIDLIST_NAME).unlink()
    after = folder.sync()
    assert after.rebuilt is not None and not after.new_uidvalidity
    assert after.uidvalidity == before.uidvalidity
    assert [(m.uid, m.key) for m in after.messages] == [(m.uid, m.key) for m in before.messages]
    assert after.uidnext == before.uidnext


def test_corrupt_uid_file_keeps_uids(folder: Folder) -> None:
    """A UID file with an unreadable header is rebuilt without changing any UID."""
    for i in range(3):
        deliver(folder.path, message(i))
    before = folder.sync()
    (folder.path / UIDLIST_NAME).write_bytes(b"\x00garbage\nmore garbage")
    after = folder.sync()
    assert after.rebuilt is not None
    assert after.uidvalidity == before.uidvalidity
    assert [(m.uid, m.key) for m in after.messages] == [(m.uid, m.key) for m in before.messages]


def test_damaged_lines_are_dropped_and_uids_kept(folder: Folder) -> None:
    """Damaged lines in a readable UID file are dropped; every UID is still kept."""
    for i in range(3):
        deliver(folder.path, message(i))
    before = folder.sync()
    path = folder.path / UIDLIST_NAME
    lines = path.read_text().split("\n")
    lines[2] = "not a line"
    path.write_text("\n".join(lines))
    after = folder.sync()
    assert after.rebuilt is not None and "damaged" in after.rebuilt
    assert [(m.uid, m.key) for m in after.messages] == [(m.uid, m.key) for m in before.messages]


def test_expunged_top_uid_never_reused_after_loss(folder: Folder) -> None:
    """After the highest message is deleted and the UID file lost, its UID is not given again."""
    for i in range(3):
        deliver(folder.path, message(i))
    messages = folder.sync().messages
    assert folder.delete([messages[2]]) == [3]
    assert (folder.path / UIDVALIDITY_NAME).read_text().split()[:2] == [
        str(folder.sync().uidvalidity), "4"]
    (folder.path / UIDLIST_NAME).unlink()
    deliver(folder.path, message(9))
    after = folder.sync()
    assert [m.uid for m in after.messages] == [1, 2, 4]


def test_lost_everything_gives_new_higher_uidvalidity(folder: Folder, clock: WallClock) -> None:
    """With the UID file, the side file and every U= gone, the folder gets a new UIDVALIDITY."""
    for i in range(2):
        deliver(folder.path, message(i))
    before = folder.sync()
    for name in os.listdir(folder.path / "cur"):
        os.rename(folder.path / "cur" / name, folder.path / "cur" / parse_name(name).key)
    (folder.path / UIDLIST_NAME).unlink()
    (folder.path / UIDVALIDITY_NAME).unlink()
    clock.now += 10
    after = folder.sync()
    assert after.new_uidvalidity and after.rebuilt is not None
    assert after.uidvalidity > before.uidvalidity
    assert sorted(m.uid for m in after.messages) == [1, 2]
    assert all(parse_name(m.name).uid == m.uid for m in after.messages)


def test_side_file_alone_with_lost_list_keeps_uidvalidity(folder: Folder) -> None:
    """Messages whose names lost U= get new UIDs above UIDNEXT; UIDVALIDITY stays."""
    deliver(folder.path, message(1))
    before = folder.sync()
    (info,) = before.messages
    os.rename(folder.path / "cur" / info.name, folder.path / "cur" / info.key)
    (folder.path / UIDLIST_NAME).unlink()
    after = folder.sync()
    assert after.uidvalidity == before.uidvalidity
    assert [m.uid for m in after.messages] == [2]


def test_foreign_file_in_cur_gets_uid_and_name_fields(folder: Folder) -> None:
    """A message another program put in cur/ gets a UID and our fields in its name."""
    deliver(folder.path, message(1))
    folder.sync()
    (folder.path / "cur" / "999.foreign.host:2,S").write_bytes(b"Subject: f\n\nx\n")
    result = folder.sync()
    foreign = next(m for m in result.messages if m.key == "999.foreign.host")
    assert foreign.uid == 2 and foreign.flags == frozenset("S")
    assert parse_name(foreign.name).uid == 2


def test_copied_file_with_stale_uid_gets_a_new_one(folder: Folder) -> None:
    """A file copied in with a U= that belongs to another message gets its own UID."""
    deliver(folder.path, message(1))
    (info,) = folder.sync().messages
    (folder.path / "cur" / f"copy.host,U={info.uid}:2,").write_bytes(b"x\r\n")
    result = folder.sync()
    assert sorted((m.key, m.uid) for m in result.messages) == sorted(
        [(info.key, 1), ("copy.host", 2)])


def test_two_files_with_one_key_are_both_kept(folder: Folder) -> None:
    """Two files sharing a unique name (a broken Maildir) are kept as two messages."""
    deliver(folder.path, message(1), name="same.key")
    (folder.path / "cur" / "same.key:2,S").write_bytes(b"other\r\n")
    result = folder.sync()
    assert len(result.messages) == 2
    assert len({m.key for m in result.messages}) == 2


def test_set_flags_renames_and_survives_resync(folder: Folder) -> None:
    """Flags are kept in the name's info; UIDs do not change with them."""
    deliver(folder.path, message(1))
    (info,) = folder.sync().messages
    (updated,) = folder.set_flags([(info, frozenset({SEEN, "F"}))])
    assert updated.name.endswith(":2,FS")
    (again,) = folder.sync().messages
    assert again.flags == frozenset("FS") and again.uid == info.uid


def test_read_after_rename_by_another_session(folder: Folder) -> None:
    """A message renamed by another session (flags) is still read through its key."""
    deliver(folder.path, message(1))
    (info,) = folder.sync().messages
    other = Folder(folder.path)
    other.set_flags([(info, frozenset({SEEN}))])
    assert folder.read_message(info) == message(1)


def test_read_deleted_message_raises(folder: Folder) -> None:
    """Reading a message another session deleted raises MessageVanishedError."""
    deliver(folder.path, message(1))
    (info,) = folder.sync().messages
    Folder(folder.path).delete([info])
    with pytest.raises(MessageVanishedError):
        folder.read_message(info)


def test_delete_removes_files_and_lines(folder: Folder) -> None:
    """Deleted messages leave the directory and the UID file; others keep their UIDs."""
    for i in range(3):
        deliver(folder.path, message(i))
    messages = folder.sync().messages
    assert folder.delete([messages[0]]) == [1]
    result = folder.sync()
    assert [m.uid for m in result.messages] == [2, 3]
    assert len(parse_uidlist((folder.path / UIDLIST_NAME).read_text()).entries) == 2


def test_edited_file_gets_wire_size_recomputed(folder: Folder) -> None:
    """A file whose size changed under its name gets a fresh wire size."""
    deliver(folder.path, message(1))
    (info,) = folder.sync().messages
    (folder.path / "cur" / info.name).write_bytes(b"a\nb\n")
    (again,) = folder.sync().messages
    assert again.uid == info.uid and again.wire_size == 6


def test_names_seen_before_are_trusted_until_a_fresh_scan(folder: Folder) -> None:
    """A name this process has scanned is not looked at again: an edit in place (against the
    Maildir rules) shows only once the scan memory is gone, as after a restart."""
    deliver(folder.path, message(1))
    folder.sync()
    (info,) = folder.sync().messages  # its name in cur/ is now remembered
    (folder.path / "cur" / info.name).write_bytes(b"a\nb\n")
    (same,) = folder.sync().messages
    assert same.wire_size == info.wire_size
    forget_folder_caches()
    (again,) = folder.sync().messages
    assert again.uid == info.uid and again.wire_size == 6


def test_read_prefix_stops_early(folder: Folder) -> None:
    """read_prefix returns once the predicate accepts what was read."""
    deliver(folder.path, b"A: 1\r\n\r\n" + b"x" * 600_000)
    (info,) = folder.sync().messages
    data = folder.read_prefix(info, lambda prefix: b"\r\n\r\n" in prefix)
    assert len(data) < 600_000


def test_concurrent_sessions_never_share_a_uid(tmp_path: Path) -> None:
    """Two sessions syncing one folder at the same time while mail arrives agree on every UID."""
    path = tmp_path / "inbox"
    create_maildir(path, subfolder=False)
    seen: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def session() -> None:
        folder = Folder(path)
        try:
            for _ in range(20):
                seen.append({m.key: m.uid for m in folder.sync().messages})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def delivery() -> None:
        for i in range(40):
            deliver(path, message(i))

    threads = [threading.Thread(target=f) for f in (session, session, delivery)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    final = {m.key: m.uid for m in Folder(path).sync().messages}
    assert len(final) == 40 and sorted(final.values()) == list(range(1, 41))
    for snapshot in seen:
        for key, uid in snapshot.items():
            assert final[key] == uid


def test_new_uidvalidity_always_grows() -> None:
    """A new UIDVALIDITY is above the previous one even if the clock went back."""
    assert new_uidvalidity(None, 1_800_000_000.5) == 1_800_000_000
    assert new_uidvalidity(1_900_000_000, 1_800_000_000.0) == 1_900_000_001


def test_settle_time_follows_the_file_systems_time_stamps() -> None:
    """Stamps with nanoseconds are trusted after SETTLE_SECONDS_FINE; whole seconds need
    SETTLE_SECONDS, since such a file system cannot tell two changes in one second apart."""
    fine = (1_800_000_000_123_456_789, 1_800_000_000_987_654_321, 1_800_000_001_000_000_001)
    coarse = (1_800_000_000_000_000_000, 1_800_000_001_000_000_000, 1_800_000_001_000_000_000)
    assert folder_module._settle_ns((*fine, 1, 2, 3, 4)) == int(
        folder_module.SETTLE_SECONDS_FINE * 1e9)
    assert folder_module._settle_ns((*coarse, 1, 2, 3, 4)) == int(
        folder_module.SETTLE_SECONDS * 1e9)


def test_wire_size_reads_a_file_larger_than_its_scan_said(folder: Folder) -> None:
    """A file that grew between the scan and the read is measured whole."""
    body = b"a\n" * 100_000
    (folder.path / "new" / "grown").write_bytes(body)
    item = folder_module._Found("new", "grown", parse_name("grown"), 10, 0.0)
    assert folder._wire_size(item) == 300_000


def test_recent_from_is_taken_once_and_never_recreates_a_deleted_folder(tmp_path: Path) -> None:
    """\\Recent (RFC 3501 §2.3.2): the first claim gets every new UID, the next none; a folder
    without the record (numbered by an older server) starts with nothing recent; asking about
    a deleted subfolder does not create it again."""
    inbox = tmp_path / "inbox"
    deliver(inbox, message(1))
    folder = Folder(inbox)
    result = folder.sync()
    assert folder.recent_from(result.uidnext, claim=False) == 1
    assert folder.recent_from(result.uidnext, claim=True) == 1
    assert folder.recent_from(result.uidnext, claim=True) == result.uidnext
    (inbox / RECENT_NAME).unlink()
    assert folder.recent_from(5, claim=False) == 5
    gone = Folder(inbox / ".Gone", subfolder=True)
    assert gone.recent_from(1, claim=True) == 1 and not gone.path.exists()


def test_recent_claims_in_one_batch_answer_as_one_after_the_other(tmp_path: Path) -> None:
    """recent_from_many gives each request what recent_from would have given it in that order:
    a read-only session leaves the message recent, the first read-write one takes it, the rest
    see nothing recent; the record is written once."""
    inbox = tmp_path / "inbox"
    deliver(inbox, message(1))
    folder = Folder(inbox)
    result = folder.sync()
    uidnext = result.uidnext
    answers = folder.recent_from_many([(uidnext, False), (uidnext, True), (uidnext, True)])
    assert answers == [1, 1, uidnext]
    assert folder.recent_from(uidnext, claim=False) == uidnext
    (inbox / RECENT_NAME).unlink()
    assert folder.recent_from_many([(5, False), (5, True)]) == [5, 5]
    gone = Folder(inbox / ".Gone", subfolder=True)
    assert gone.recent_from_many([(1, True)]) == [1] and not gone.path.exists()


def test_new_folders_of_a_mailbox_get_ever_greater_uidvalidity(tmp_path: Path) -> None:
    """Folders numbered within the same second get distinct, growing UIDVALIDITY values, so a
    folder deleted and created again never reuses one (RFC 3501 §2.3.1.1)."""
    inbox = tmp_path / "inbox"
    values = []
    for name in ("INBOX", ".A", ".A", ".B"):
        path = inbox if name == "INBOX" else inbox / name
        if path.exists() and name != "INBOX":
            shutil.rmtree(path)
        deliver(path, message(1))
        folder = Folder(path, subfolder=name != "INBOX", clock=lambda: 1_700_000_000.0)
        values.append(folder.sync().uidvalidity)
    assert values == sorted(values) and len(set(values)) == 4


def test_sync_without_sizes_reads_no_message_file(folder: Folder,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """sync(sizes=False) numbers new messages without opening their files: names without
    ,W= keep no wire size (None, "-" in the UID file), names with ,W= keep theirs."""
    plain = deliver(folder.path, b"Subject: x\n\nline\n", mtime=1_700_000_001)
    deliver(folder.path, b"Subject: y\n\nline\n", mtime=1_700_000_002,
            name="1700000002.Mfixed.host,S=17,W=20")
    sized = "1700000002.Mfixed.host"
    opened: list[str] = []
    real_open = os.open

    def watch(path: str, *args: object, **kwargs: object) -> int:
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(folder_module.os, "open", watch)
    result = folder.sync(sizes=False)
    monkeypatch.undo()
    assert not [p for p in opened if "/new/" in p or "/cur/" in p]
    assert [(m.key, m.wire_size) for m in result.messages] == [(plain, None), (sized, 20)]
    assert not result.sizes_known
    assert ",W=" not in result.messages[0].name and ",S=17," in result.messages[0].name
    assert parse_name(result.messages[0].name).uid == 1
    line = (folder.path / UIDLIST_NAME).read_text().splitlines()[1]
    assert line.split(" ")[:3] == ["1", "17", "-"]


def test_sizes_read_later_are_recorded_once(folder: Folder) -> None:
    """wire_sizes() reads the files of unsized messages and records the sizes in the UID file:
    a later sync (even in a new process) knows them without reading, UIDs and mod-sequences
    unchanged."""
    deliver(folder.path, b"Subject: x\n\nline\n")
    deliver(folder.path, message(2))
    cold = folder.sync(sizes=False)
    assert folder.wire_sizes(cold.messages) == {1: 20, 2: len(message(2))}
    forget_folder_caches()
    again = folder.sync(sizes=False)
    assert [m.wire_size for m in again.messages] == [20, len(message(2))]
    assert again.sizes_known and again.highest_modseq == cold.highest_modseq
    assert [(m.uid, m.modseq) for m in again.messages] == [(m.uid, m.modseq)
                                                            for m in cold.messages]


def test_sync_with_sizes_fills_what_a_cold_sync_left(folder: Folder) -> None:
    """A sync that needs sizes (POP3) after one that did not (IMAP SELECT) reads the missing
    ones instead of returning the remembered result, and records them."""
    deliver(folder.path, b"a\nb\n")
    assert folder.sync(sizes=False).messages[0].wire_size is None
    (info,) = folder.sync().messages
    assert info.wire_size == 6
    assert parse_uidlist((folder.path / UIDLIST_NAME).read_text()).entries[
        info.key].wire_size == 6


def test_rebuild_keeps_sizes_unknown_until_asked(folder: Folder) -> None:
    """A lost UID file is rebuilt from the names (UIDs kept) without reading the files; the
    sizes come back when asked for."""
    deliver(folder.path, b"a\nb\n")
    first = folder.sync(sizes=False)
    (folder.path / UIDLIST_NAME).unlink()
    forget_folder_caches()
    rebuilt = folder.sync(sizes=False)
    assert rebuilt.rebuilt is not None
    assert [(m.uid, m.wire_size) for m in rebuilt.messages] == [(first.messages[0].uid, None)]
    assert folder.sync().messages[0].wire_size == 6


def test_uid_file_round_trips_an_unknown_wire_size() -> None:
    """A "-" wire size parses as None and renders back as "-"; other lines are unchanged."""
    text = ("mailsys-uidlist 2 7 3 5\n"
            "1 17 - 4 - k.1\n"
            "2 10 12 5 S k.2\n")
    uids = parse_uidlist(text)
    assert uids.damaged_lines == 0
    assert (uids.entries["k.1"].wire_size, uids.entries["k.2"].wire_size) == (None, 12)
    assert render_uidlist(uids).decode() == text
