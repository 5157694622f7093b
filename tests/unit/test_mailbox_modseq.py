"""Mod-sequences of a folder (RFC 7162 §3.1): kept in the UID file, strictly growing on every
flag change, arrival and expunge, also for other programs' renames, and never going backwards
when the UID file is lost or damaged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailsys.mailbox import folder as folder_module
from mailsys.mailbox.folder import Folder, MessageInfo, adding
from mailsys.mailbox.layout import create_maildir
from mailsys.mailbox.names import FLAGGED, SEEN, parse_name
from mailsys.mailbox.uidlist import (
    JOURNAL_NAME,
    UIDLIST_NAME,
    UIDVALIDITY_NAME,
    CorruptUidListError,
    parse_uidlist,
    read_uidlist,
    read_uidvalidity_floor,
)
from tests.unit.mailbox_support import WallClock, deliver, forget_folder_caches, message


@pytest.fixture
def folder(tmp_path: Path) -> Folder:
    create_maildir(tmp_path / "inbox", subfolder=False)
    return Folder(tmp_path / "inbox", clock=WallClock())


def restarted(folder: Folder) -> Folder:
    """The same folder as a new process sees it: nothing remembered in memory."""
    forget_folder_caches()
    return Folder(folder.path, clock=WallClock())


def recorded(folder: Folder) -> dict[str, tuple[int, frozenset[str] | None]]:
    """What the UID file and its journal record, as a restarted server would read them."""
    uids = read_uidlist(folder.path)
    assert uids is not None
    return {key: (entry.modseq, entry.flags) for key, entry in uids.entries.items()}


def rename_flags(folder: Folder, info: MessageInfo, flags: str) -> None:
    """Change a message's flags as another Maildir program (mbsync, an MDA) would."""
    (name,) = [n for n in os.listdir(folder.path / "cur") if parse_name(n).key == info.key]
    os.rename(folder.path / "cur" / name,
              folder.path / "cur" / parse_name(name).with_flags(frozenset(flags)))


def test_new_messages_get_growing_modseqs(folder: Folder) -> None:
    """Each new message takes the next mod-sequence; HIGHESTMODSEQ is the highest."""
    for i in range(3):
        deliver(folder.path, message(i), mtime=1_700_000_000 + i)
    first = folder.sync()
    modseqs = [info.modseq for info in first.messages]
    assert modseqs == sorted(set(modseqs)) and modseqs[0] >= 1
    assert first.highest_modseq == modseqs[-1]
    deliver(folder.path, message(9))
    second = folder.sync()
    assert second.messages[-1].modseq > first.highest_modseq
    assert second.highest_modseq == second.messages[-1].modseq


def test_modseqs_and_flags_survive_a_restart(folder: Folder) -> None:
    """Mod-sequences and HIGHESTMODSEQ are read back unchanged from the UID file."""
    for i in range(2):
        deliver(folder.path, message(i))
    info = folder.sync().messages[0]
    (updated,) = folder.set_flags([(info, frozenset({SEEN}))])
    before = folder.sync()
    after = restarted(folder).sync()
    assert [(m.uid, m.modseq, m.flags) for m in after.messages] == [
        (m.uid, m.modseq, m.flags) for m in before.messages]
    assert after.highest_modseq == before.highest_modseq == updated.modseq
    assert recorded(folder)[info.key] == (updated.modseq, frozenset({SEEN}))


def test_every_flag_change_takes_a_higher_modseq(folder: Folder) -> None:
    """set_flags gives each changed message a new, strictly higher mod-sequence."""
    for i in range(2):
        deliver(folder.path, message(i))
    one, two = folder.sync().messages
    highest = folder.sync().highest_modseq
    (a,) = folder.set_flags([(one, frozenset({SEEN}))])
    (b,) = folder.set_flags([(two, frozenset({FLAGGED}))])
    (c,) = folder.set_flags([(a, frozenset())])
    assert highest < a.modseq < b.modseq < c.modseq
    assert folder.sync().highest_modseq == c.modseq


def test_unchanged_flags_keep_their_modseq(folder: Folder) -> None:
    """Storing the flags a message already has changes nothing, its mod-sequence included."""
    deliver(folder.path, message(1))
    (info,) = folder.sync().messages
    result = folder.store_flags([(info, info.flags)])
    assert result.updated == (info,) and result.highest_modseq == info.modseq


def test_expunge_grows_highestmodseq(folder: Folder) -> None:
    """Deleting a message raises HIGHESTMODSEQ though no message carries the new value."""
    for i in range(2):
        deliver(folder.path, message(i))
    result = folder.sync()
    folder.delete([result.messages[1]])
    after = folder.sync()
    assert after.highest_modseq > result.highest_modseq
    assert after.highest_modseq > max(info.modseq for info in after.messages)


def test_expunge_by_another_program_grows_highestmodseq(folder: Folder) -> None:
    """A message file removed behind our back also raises HIGHESTMODSEQ at the next sync."""
    for i in range(2):
        deliver(folder.path, message(i))
    result = folder.sync()
    os.unlink(folder.path / "cur" / result.messages[0].name)
    assert folder.sync().highest_modseq > result.highest_modseq


def test_rename_by_another_program_gets_a_new_modseq(folder: Folder) -> None:
    """A flag change made by renaming the file outside mailsys gets a new mod-sequence."""
    for i in range(2):
        deliver(folder.path, message(i))
    before = folder.sync()
    rename_flags(folder, before.messages[0], "S")
    after = restarted(folder).sync()
    changed, same = after.messages
    assert changed.flags == frozenset({SEEN})
    assert changed.modseq > before.highest_modseq == after.highest_modseq - 1
    assert same.modseq == before.messages[1].modseq


def test_flag_change_by_function_sees_the_current_flags(folder: Folder) -> None:
    """A change given as a function is applied to the flags the file has at that moment."""
    deliver(folder.path, message(1))
    (stale,) = folder.sync().messages
    folder.set_flags([(stale, frozenset({FLAGGED}))])  # another session's change
    (updated,) = folder.set_flags([(stale, adding({SEEN}))])
    assert updated.flags == frozenset({FLAGGED, SEEN})
    assert folder.sync().messages[0].flags == frozenset({FLAGGED, SEEN})


def test_unchangedsince_refuses_a_message_changed_since(folder: Folder) -> None:
    """store_flags with unchanged_since leaves alone a message whose modseq is higher."""
    for i in range(2):
        deliver(folder.path, message(i))
    one, two = folder.sync().messages
    known = folder.sync().highest_modseq
    (other,) = folder.set_flags([(one, frozenset({FLAGGED}))])  # another session's change
    result = folder.store_flags([(one, frozenset({SEEN})), (two, frozenset({SEEN}))],
                                unchanged_since=known)
    assert [info.uid for info in result.modified] == [one.uid]
    assert result.modified[0].flags == frozenset({FLAGGED})
    assert result.modified[0].modseq == other.modseq
    assert [(info.uid, info.flags) for info in result.updated] == [(two.uid, frozenset({SEEN}))]
    assert folder.sync().messages[0].flags == frozenset({FLAGGED})


def test_unchangedsince_sees_an_unsynced_rename(folder: Folder) -> None:
    """A rename by another program not yet synced counts as a change for UNCHANGEDSINCE."""
    deliver(folder.path, message(1))
    (info,) = folder.sync().messages
    known = folder.sync().highest_modseq
    rename_flags(folder, info, "F")
    result = folder.store_flags([(info, frozenset({SEEN}))], unchanged_since=known)
    assert [m.flags for m in result.modified] == [frozenset({FLAGGED})]
    assert result.modified[0].modseq > known and not result.updated
    assert folder.sync().messages[0].modseq == result.modified[0].modseq


def test_version_1_uid_file_is_upgraded(folder: Folder) -> None:
    """A version 1 UID file keeps its UIDs; its messages get mod-sequences and flags."""
    for i in range(2):
        deliver(folder.path, message(i))
    before = folder.sync()
    lines = [f"mailsys-uidlist 1 {before.uidvalidity} {before.uidnext}\n"]
    lines += [f"{m.uid} {m.size} {m.wire_size} {m.key}\n" for m in before.messages]
    (folder.path / UIDLIST_NAME).write_text("".join(lines))
    after = restarted(folder).sync()
    assert after.rebuilt is None and after.uidvalidity == before.uidvalidity
    assert [(m.uid, m.key) for m in after.messages] == [(m.uid, m.key) for m in before.messages]
    assert all(m.modseq >= 1 for m in after.messages)
    assert (folder.path / UIDLIST_NAME).read_text().startswith("mailsys-uidlist 2 ")


def test_version_1_file_written_by_an_older_server_never_lowers_highestmodseq(
        folder: Folder) -> None:
    """A version 1 file beside a side file with a mod-sequence ceiling (an older server rewrote
    it after a newer one ran) resumes at that ceiling, above every value already given out."""
    for i in range(2):
        deliver(folder.path, message(i))
    first = folder.sync()
    (info, _) = first.messages
    folder.set_flags([(info, frozenset({SEEN}))])
    before = folder.sync()
    ceiling = read_uidvalidity_floor(folder.path).modseq_ceiling  # type: ignore[union-attr]
    assert ceiling is not None and ceiling > before.highest_modseq
    lines = [f"mailsys-uidlist 1 {before.uidvalidity} {before.uidnext}\n"]
    lines += [f"{m.uid} {m.size} {m.wire_size} {m.key}\n" for m in before.messages]
    (folder.path / UIDLIST_NAME).write_text("".join(lines))
    after = restarted(folder).sync()
    assert after.highest_modseq >= ceiling > before.highest_modseq


def test_lost_uid_file_resumes_above_every_modseq_seen(folder: Folder) -> None:
    """Without its UID file the folder keeps its UIDs and its mod-sequences start higher."""
    for i in range(3):
        deliver(folder.path, message(i))
    info = folder.sync().messages[0]
    folder.set_flags([(info, frozenset({SEEN}))])
    before = folder.sync()
    (folder.path / UIDLIST_NAME).unlink()
    after = restarted(folder).sync()
    assert after.rebuilt is not None and after.uidvalidity == before.uidvalidity
    assert [(m.uid, m.flags) for m in after.messages] == [
        (m.uid, m.flags) for m in before.messages]
    assert min(m.modseq for m in after.messages) > before.highest_modseq


def test_corrupt_uid_file_resumes_above_every_modseq_seen(folder: Folder) -> None:
    """An unreadable UID file is rebuilt with mod-sequences above any given before."""
    for i in range(2):
        deliver(folder.path, message(i))
    before = folder.sync()
    (folder.path / UIDLIST_NAME).write_bytes(b"mailsys-uidlist 2 garbage\n")
    after = restarted(folder).sync()
    assert after.rebuilt is not None
    assert after.highest_modseq > before.highest_modseq
    assert min(m.modseq for m in after.messages) > before.highest_modseq


def test_damaged_line_keeps_the_other_modseqs(folder: Folder) -> None:
    """A damaged line costs only its own message's mod-sequence, which is given anew."""
    for i in range(3):
        deliver(folder.path, message(i))
    before = folder.sync()
    lines = (folder.path / UIDLIST_NAME).read_text().split("\n")
    lines[2] = "not a line"
    (folder.path / UIDLIST_NAME).write_text("\n".join(lines))
    after = restarted(folder).sync()
    assert after.rebuilt is not None
    assert [m.modseq for m in after.messages][::2] == [m.modseq for m in before.messages][::2]
    assert after.messages[1].modseq > before.highest_modseq


def test_lost_uid_and_side_files_fall_back_to_the_clock(folder: Folder) -> None:
    """With both files lost, mod-sequences restart from the clock, far above any counter."""
    for i in range(2):
        deliver(folder.path, message(i))
    before = folder.sync()
    (folder.path / UIDLIST_NAME).unlink()
    (folder.path / UIDVALIDITY_NAME).unlink()
    after = restarted(folder).sync()
    assert [m.uid for m in after.messages] == [m.uid for m in before.messages]
    assert min(m.modseq for m in after.messages) > 1_800_000_000 * 1_000_000


def test_side_file_ceiling_moves_ahead_of_highestmodseq(folder: Folder,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The side file's ceiling is always above HIGHESTMODSEQ, raised when it is reached."""
    monkeypatch.setattr(folder_module, "MODSEQ_RESERVE", 3)
    deliver(folder.path, message(1))
    (info,) = folder.sync().messages
    for flags in ("S", "F", "", "S", "F", ""):
        (info,) = folder.set_flags([(info, frozenset(flags))])
        floor = read_uidvalidity_floor(folder.path)
        assert floor is not None and floor.modseq_ceiling is not None
        assert floor.modseq_ceiling > folder.sync().highest_modseq


def test_version_2_header_needs_a_positive_highestmodseq() -> None:
    """A version 2 header with HIGHESTMODSEQ 0 cannot be trusted."""
    with pytest.raises(CorruptUidListError):
        parse_uidlist("mailsys-uidlist 2 5 1 0\n")
    uids = parse_uidlist("mailsys-uidlist 2 5 3 9\n1 4 5 9 - a b\n2 4 5 10 S c\n")
    assert uids.entries["a b"].flags == frozenset() and uids.damaged_lines == 1


# --- the UID file's journal of flag changes ------------------------------------------------------


def test_a_flag_change_is_a_journal_line_not_a_rewrite(folder: Folder) -> None:
    """A STORE appends to the journal; the UID file itself keeps its bytes."""
    for i in range(3):
        deliver(folder.path, message(i))
    info = folder.sync().messages[1]
    before = (folder.path / UIDLIST_NAME).read_bytes()
    (updated,) = folder.set_flags([(info, frozenset({SEEN}))])
    assert (folder.path / UIDLIST_NAME).read_bytes() == before
    journal = (folder.path / JOURNAL_NAME).read_text()
    assert journal == f"{updated.modseq} S {info.key}\n"
    again = restarted(folder).sync()
    assert again.messages[1].flags == frozenset({SEEN})
    assert again.messages[1].modseq == again.highest_modseq == updated.modseq


def test_a_rewrite_folds_the_journal_in_and_removes_it(folder: Folder) -> None:
    """A sync that rewrites the UID file (a new message) carries the journal's changes over."""
    deliver(folder.path, message(1))
    (info,) = folder.sync().messages
    (updated,) = folder.set_flags([(info, frozenset({FLAGGED}))])
    deliver(folder.path, message(2))
    result = folder.sync()
    assert not (folder.path / JOURNAL_NAME).exists()
    assert recorded(folder)[info.key] == (updated.modseq, frozenset({FLAGGED}))
    assert result.highest_modseq > updated.modseq


def test_a_journal_outliving_its_rewrite_changes_nothing(folder: Folder) -> None:
    """A crash between the rewrite and the journal's removal leaves lines already folded in:
    read again, they are older than the file's and change nothing."""
    deliver(folder.path, message(1))
    (info,) = folder.sync().messages
    folder.set_flags([(info, frozenset({FLAGGED}))])
    stale = (folder.path / JOURNAL_NAME).read_bytes()
    (now,) = folder.set_flags([(info, frozenset())])  # folded in below by the rewrite
    deliver(folder.path, message(2))
    folder.sync()
    (folder.path / JOURNAL_NAME).write_bytes(stale)
    assert recorded(folder)[info.key] == (now.modseq, frozenset())
    assert restarted(folder).sync().messages[0].flags == frozenset()


def test_a_journal_line_cut_short_is_ignored(folder: Folder) -> None:
    """The last line without its newline was never acknowledged to anyone: it is dropped."""
    deliver(folder.path, message(1))
    (info,) = folder.sync().messages
    (updated,) = folder.set_flags([(info, frozenset({SEEN}))])
    with (folder.path / JOURNAL_NAME).open("a") as journal:
        journal.write(f"{updated.modseq + 1} F {info.key}")
    assert recorded(folder)[info.key] == (updated.modseq, frozenset({SEEN}))


def test_a_long_journal_is_folded_into_the_file(folder: Folder,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the journal outgrows its limit the next STORE rewrites the UID file instead."""
    monkeypatch.setattr(folder_module, "JOURNAL_MIN_COMPACT", 40)
    deliver(folder.path, message(1))
    (info,) = folder.sync().messages
    for flags in ({SEEN}, {FLAGGED}, set(), {SEEN}):
        (info,) = folder.set_flags([(info, frozenset(flags))])
        assert recorded(folder)[info.key] == (info.modseq, frozenset(flags))
    journal = folder.path / JOURNAL_NAME
    assert not journal.exists() or len(journal.read_bytes()) <= 80


def test_a_store_after_a_cut_short_journal_line_is_kept(folder: Folder) -> None:
    """A fragment left by a failed append does not swallow the next STORE: that one rewrites
    the UID file, so its mod-sequence is what any reader finds."""
    for i in range(2):
        deliver(folder.path, message(i))
    one, two = folder.sync().messages
    (first,) = folder.set_flags([(one, frozenset({SEEN}))])
    with (folder.path / JOURNAL_NAME).open("a") as journal:
        journal.write(f"{first.modseq + 1} F {one.key}"[:7])
    (second,) = folder.set_flags([(two, frozenset({FLAGGED}))])
    assert not (folder.path / JOURNAL_NAME).exists()
    assert recorded(folder)[two.key] == (second.modseq, frozenset({FLAGGED}))
    assert restarted(folder).sync().highest_modseq == second.modseq
