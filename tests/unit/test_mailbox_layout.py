"""The Maildir on-disk format: paths, unique names, name fields, stored form, the write."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailsys.mailbox.layout import (
    FOLDER_MARKER,
    NAME_MAX,
    InvalidFolderNameError,
    InvalidMailboxNameError,
    NameTooLongError,
    create_maildir,
    delivery_base,
    delivery_unique,
    escape_hostname,
    file_name,
    folder_directory,
    folder_names,
    folder_path,
    format_base,
    locate_message,
    mailbox_path,
    name_prefix,
    new_name,
    parse_name,
    stored_form,
    unique_name,
    write_message,
    write_streamed,
)
from mailsys.mailbox.wire import to_crlf, wire_size

# --- paths ---------------------------------------------------------------------------------------


def test_mailbox_path_is_domain_then_user(tmp_path: Path) -> None:
    """A mailbox lives at root/<domain>/<user>, the domain lowercased, the user as given."""
    assert mailbox_path(tmp_path, "Alice@Example.TEST") == tmp_path / "example.test" / "Alice"


@pytest.mark.parametrize(
    "mailbox",
    ["noat", "@example.test", "alice@", "../x@example.test", "a/b@example.test", "alice@..",
     ".folder@example.test", "alice@ex/ample", "a\0b@example.test",
     "x" * (NAME_MAX + 1) + "@example.test"],
)
def test_unusable_mailbox_names_are_refused(tmp_path: Path, mailbox: str) -> None:
    """Malformed, escaping, hidden or over-long mailbox names name no Maildir."""
    with pytest.raises(InvalidMailboxNameError):
        mailbox_path(tmp_path, mailbox)


def test_folder_directory_is_maildirplusplus() -> None:
    """Maildir++: folder A.B is the directory ".A.B"; INBOX (any case) is the Maildir itself."""
    assert folder_directory("Sent") == ".Sent"
    assert folder_directory("A.B") == ".A.B"
    assert folder_directory("inbox") is None
    assert folder_path(Path("/m"), "A.B") == Path("/m/.A.B")
    assert folder_path(Path("/m"), "INBOX") == Path("/m")


@pytest.mark.parametrize("name", ["", ".A", "A.", "A..B", "a/b", "a\0b", "a\rb", "INBOX.x"])
def test_unusable_folder_names_are_refused(name: str) -> None:
    """Empty levels, slashes, NUL, line ends and names under INBOX are not folders."""
    with pytest.raises(InvalidFolderNameError):
        folder_directory(name)


def test_folder_name_fitting_name_max_is_accepted() -> None:
    """A folder whose directory name is exactly NAME_MAX bytes is fine."""
    name = "x" * (NAME_MAX - 1)
    directory = folder_directory(name)
    assert directory is not None and len(directory.encode()) == NAME_MAX


@pytest.mark.parametrize(
    "name",
    [
        "x" * NAME_MAX,  # one byte over with the leading "."
        "n" * 10_240,  # a 10 KB name
        ".".join(["level"] * 100),  # 100 levels deep: Maildir++ keeps it in one entry
        "é" * 128,  # 128 characters, but 256 bytes in UTF-8 (plus the ".")
    ],
)
def test_folder_name_over_name_max_is_too_long(name: str) -> None:
    """Directory names over NAME_MAX bytes (counted encoded) raise NameTooLongError."""
    with pytest.raises(NameTooLongError):
        folder_directory(name)
    assert issubclass(NameTooLongError, InvalidFolderNameError)


def test_folder_names_lists_dot_directories(tmp_path: Path) -> None:
    """Folders are the "."-directories under the INBOX, sorted; files and cur/ are not."""
    for directory in (".B", ".A", ".A.C", "cur"):
        (tmp_path / directory).mkdir()
    (tmp_path / ".file").touch()
    assert folder_names(tmp_path) == ["A", "A.C", "B"]
    assert folder_names(tmp_path / "missing") == []


def test_create_maildir_makes_parents_subdirs_and_marker(tmp_path: Path) -> None:
    """A Maildir gets cur/ new/ tmp/ and its parents; a subfolder also its maildirfolder file."""
    inbox = tmp_path / "example.test" / "alice"
    create_maildir(inbox)
    assert sorted(os.listdir(inbox)) == ["cur", "new", "tmp"]
    create_maildir(inbox / ".Sent", subfolder=True)
    assert (inbox / ".Sent" / FOLDER_MARKER).is_file()
    create_maildir(inbox / ".Sent", subfolder=True)  # idempotent
    assert sorted(os.listdir(inbox / ".Sent")) == ["cur", FOLDER_MARKER, "new", "tmp"]


# --- unique names --------------------------------------------------------------------------------


def test_host_escapes_follow_the_spec() -> None:
    """'/' and ':' become \\057 and \\072 (cr.yp.to/proto/maildir); '\\' is escaped first."""
    assert escape_hostname("a/b:c") == "a\\057b\\072c"
    assert escape_hostname("a\\057") == "a\\134057"


def test_delivery_base_is_derived_from_queue_id_and_recipient() -> None:
    """The delivered copy's name depends on time, queue id, address and mailbox only."""
    base = delivery_base(1_700_000_000.7, "Q1", "a@x.test", "a@x.test", "mx")
    assert re.fullmatch(r"1700000000\.QQ1R[0-9A-F]{10}\.mx", base)
    assert base == delivery_base(1_700_000_000.2, "Q1", "a@x.test", "a@x.test", "mx")
    assert delivery_unique("Q1", "a@x.test", "a@x.test") != delivery_unique(
        "Q1", "alias@x.test", "a@x.test")
    assert delivery_unique("Q1", "a@x.test", None) != delivery_unique("Q2", "a@x.test", None)


def test_unique_names_are_fresh_and_well_formed() -> None:
    """APPEND/COPY names are "time.MusecPpidQn.host" and never repeat within a process."""
    first = unique_name("h", now=1_700_000_000.25)
    assert re.fullmatch(rf"1700000000\.M250000P{os.getpid()}Q\d+\.h", first)
    assert len({unique_name("h") for _ in range(100)}) == 100
    assert ":" not in unique_name() and "/" not in unique_name()


def test_name_prefix_ignores_host_and_info() -> None:
    """Copies are the same when "time.unique." match, whatever host, fields or flags follow."""
    assert name_prefix("17.QxR1.old-host,S=1,W=2:2,S") == "17.QxR1."
    assert name_prefix("17.QxR1.new-host") == "17.QxR1."


# --- name fields and flags -----------------------------------------------------------------------


def test_new_name_carries_file_and_wire_size() -> None:
    """Delivered names carry ,S= (bytes on disk) and ,W= (bytes on the wire), no ":2," info."""
    assert new_name("k", b"a\nb\n") == "k,S=4,W=6"
    assert new_name("k", b"a\nb") == "k,S=3,W=6"  # the wire form terminates the last line


def test_cur_name_fields_and_flags_round_trip() -> None:
    """format_base and file_name write what parse_name reads, flags in ASCII order."""
    name = file_name(format_base("k.1", size=10, wire_size=12), frozenset("SRF"))
    assert name == "k.1,S=10,W=12:2,FRS"
    parsed = parse_name(name)
    assert (parsed.key, parsed.size, parsed.wire_size, parsed.uid) == ("k.1", 10, 12, None)
    assert parsed.flags == frozenset("FRS")


def test_without_uid_keeps_sizes_and_flags() -> None:
    """A message leaving its folder drops ,U= and keeps its key, sizes and flags."""
    assert parse_name("k,S=1,W=2,U=9:2,S").without_uid() == "k,S=1,W=2:2,S"
    assert parse_name("k,U=9:2,").without_uid() == "k:2,"


# --- stored form ---------------------------------------------------------------------------------


def test_stored_form_is_lf_when_exact() -> None:
    """CRLF line ends are stored as LF (the header too) when every line end is CRLF."""
    assert stored_form(b"a\r\nb\r\n", b"H: 1\r\n") == b"H: 1\na\nb\n"
    assert stored_form(b"", b"H: 1\r\n") == b"H: 1\n"


def test_stored_form_keeps_bytes_that_would_not_round_trip() -> None:
    """A bare LF or a lone CR keeps the message (and header) as it came."""
    assert stored_form(b"a\r\nb\n", b"H\r\n") == b"H\r\na\r\nb\n"
    assert stored_form(b"a\rb\r\n") == b"a\rb\r\n"


@given(st.lists(st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b),
                max_size=8))
def test_stored_form_round_trips_to_the_wire(lines: list[bytes]) -> None:
    """A CRLF message's stored form gives back exactly its bytes on the wire, sized by ,W=."""
    message = b"".join(line + b"\r\n" for line in lines)
    stored = stored_form(message)
    assert to_crlf(stored) == message
    assert wire_size(stored) == len(message)


# --- the write -----------------------------------------------------------------------------------


def test_write_message_goes_through_tmp(tmp_path: Path) -> None:
    """A written message is in its sub-directory with the given mtime; tmp/ is left empty."""
    create_maildir(tmp_path)
    write_message(tmp_path, "cur", "k:2,S", b"data", mtime=1_600_000_000)
    assert (tmp_path / "cur" / "k:2,S").read_bytes() == b"data"
    assert os.stat(tmp_path / "cur" / "k:2,S").st_mtime == 1_600_000_000
    assert os.listdir(tmp_path / "tmp") == []


def test_write_message_replaces_a_leftover_temp_file(tmp_path: Path) -> None:
    """A tmp/ file of the same name from an interrupted try is replaced, not appended to."""
    create_maildir(tmp_path)
    (tmp_path / "tmp" / "n").write_bytes(b"x" * 1000)
    write_message(tmp_path, "new", "n", b"ok")
    assert (tmp_path / "new" / "n").read_bytes() == b"ok"


def test_write_message_creates_a_missing_maildir_only_when_asked(tmp_path: Path) -> None:
    """An INBOX's first delivery creates it; a folder deleted meanwhile is not recreated."""
    with pytest.raises(FileNotFoundError):
        write_message(tmp_path / ".Gone", "cur", "n", b"x")
    assert not (tmp_path / ".Gone").exists()
    write_message(tmp_path / "d" / "u", "new", "n", b"x", create=True)
    assert (tmp_path / "d" / "u" / "new" / "n").read_bytes() == b"x"


def test_locate_message_follows_a_rename(tmp_path: Path) -> None:
    """A message renamed by a flag change (or still in new/) is found again by its key."""
    create_maildir(tmp_path)
    (tmp_path / "cur" / "k,S=1,W=1:2,S").write_bytes(b"x")
    (tmp_path / "new" / "m,S=1,W=1").write_bytes(b"y")
    assert locate_message(tmp_path, "k,S=1,W=1:2,S", "k") == f"{tmp_path}/cur/k,S=1,W=1:2,S"
    assert locate_message(tmp_path, "k,S=1,W=1:2,", "k") == f"{tmp_path}/cur/k,S=1,W=1:2,S"
    assert locate_message(tmp_path, "m:2,", "m") == f"{tmp_path}/new/m,S=1,W=1"
    assert locate_message(tmp_path, "gone:2,", "gone") is None


def test_write_streamed_names_the_file_after_the_last_chunk(tmp_path: Path) -> None:
    """A streamed message is renamed into place under the name asked for once every chunk is
    written (its size fields known only then), and nothing is left in tmp/."""
    create_maildir(tmp_path)
    seen: list[int] = []

    def chunks() -> Iterator[bytes]:
        for part in (b"Subject: a\n", b"\n", b"body\n"):
            seen.append(len(part))
            yield part

    name = write_streamed(tmp_path, "cur", "key1", chunks(),
                          lambda: f"key1,S={sum(seen)}:2,", mtime=1_000_000.0)
    assert name == "key1,S=17:2,"
    assert (tmp_path / "cur" / name).read_bytes() == b"Subject: a\n\nbody\n"
    assert (tmp_path / "cur" / name).stat().st_mtime == 1_000_000.0
    assert os.listdir(tmp_path / "tmp") == []


def test_write_streamed_that_fails_leaves_nothing(tmp_path: Path) -> None:
    """A source that breaks off mid-way leaves neither a tmp/ file nor a message."""
    create_maildir(tmp_path)

    def chunks() -> Iterator[bytes]:
        yield b"Subject: a\n"
        raise OSError("source gone")

    with pytest.raises(OSError, match="source gone"):
        write_streamed(tmp_path, "cur", "key2", chunks(), lambda: "key2:2,")
    assert os.listdir(tmp_path / "tmp") == [] and os.listdir(tmp_path / "cur") == []
