"""The folder tree of one mailbox: renaming and deleting folders, and subscriptions (blocking).

Maildir++ keeps every folder as a flat directory ``.A.B`` under the INBOX, so renaming ``A``
renames ``.A`` and each ``.A.*``. UID files and keyword files move with their directories, so
a renamed folder keeps its UIDVALIDITY and UIDs (RFC 3501 §6.3.5). A deleted folder is first
renamed out of the tree (into the INBOX's tmp/), so no session can recreate it by syncing, then
removed. Subscriptions (RFC 3501 §6.3.6) are a small file in the INBOX; without it every folder
counts as subscribed. Everything here blocks; call it in the DiskPool.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from pathlib import Path

from mailsys.diskio import fsync_directory
from mailsys.mailbox.folder import Folder
from mailsys.mailbox.keywords import KEYWORDS_NAME
from mailsys.mailbox.layout import (
    HIERARCHY_SEPARATOR,
    INBOX,
    create_maildir,
    folder_directory,
    folder_names,
    folder_path,
    parse_name,
)

# folder_names is the layout's listing, named here too as the tree's callers have used it.
__all__ = [
    "SUBSCRIPTIONS_NAME",
    "FolderHasChildrenError",
    "create_folder_tree",
    "delete_folder",
    "folder_names",
    "read_subscriptions",
    "rename_folder",
    "set_subscribed",
]

SUBSCRIPTIONS_NAME = "mailsys-subscriptions"


class FolderHasChildrenError(Exception):
    """DELETE of a folder that has subfolders (delete those first, as Dovecot asks)."""


def _children(inbox: Path, name: str) -> list[str]:
    prefix = name + HIERARCHY_SEPARATOR
    return [other for other in folder_names(inbox) if other.startswith(prefix)]


def delete_folder(inbox: Path, name: str) -> None:
    """Delete folder ``name`` and its messages. FileNotFoundError if there is none,
    FolderHasChildrenError if it has subfolders; the INBOX cannot be deleted (ValueError)."""
    directory = folder_directory(name)
    if directory is None:
        raise ValueError("the INBOX cannot be deleted")
    if not (inbox / directory).is_dir():
        raise FileNotFoundError(name)
    if _children(inbox, name):
        raise FolderHasChildrenError(name)
    (inbox / "tmp").mkdir(exist_ok=True)
    doomed = inbox / "tmp" / f"deleted-folder.{secrets.token_hex(8)}"
    os.rename(inbox / directory, doomed)
    fsync_directory(inbox)
    shutil.rmtree(doomed, ignore_errors=True)


def rename_folder(inbox: Path, old: str, new: str) -> None:
    """Rename ``old`` (and its subfolders) to ``new``; FileExistsError if a target exists,
    FileNotFoundError if ``old`` does not. Renaming the INBOX moves its messages into a new
    folder and leaves the INBOX empty (RFC 3501 §6.3.5)."""
    new_directory = folder_directory(new)
    if new_directory is None:
        raise FileExistsError("INBOX always exists")
    old_directory = folder_directory(old)
    if old_directory is None:
        _rename_inbox(inbox, new_directory)
        return
    if not (inbox / old_directory).is_dir():
        raise FileNotFoundError(old)
    moves = [(old, new)] + [(child, new + child[len(old):]) for child in _children(inbox, old)]
    # Every target's path first: an invalid or too long one (a child's name grows with the
    # new prefix) raises InvalidFolderNameError or NameTooLongError before anything moves.
    paths = [(folder_path(inbox, source), folder_path(inbox, target)) for source, target in moves]
    for (_, target), (_, target_path) in zip(moves, paths, strict=True):
        if target_path.exists():
            raise FileExistsError(target)
    for source_path, target_path in paths:
        os.rename(source_path, target_path)
    fsync_directory(inbox)


def _rename_inbox(inbox: Path, new_directory: str) -> None:
    target = inbox / new_directory
    if target.exists():
        raise FileExistsError(new_directory[1:])
    create_maildir(target, subfolder=True)
    Folder(target, subfolder=True).sync()  # its numbering starts before any message arrives
    keywords = inbox / KEYWORDS_NAME
    if keywords.exists():
        shutil.copyfile(keywords, target / KEYWORDS_NAME)
    for sub in ("new", "cur"):
        for name in os.listdir(inbox / sub):
            if name.startswith("."):
                continue
            parsed = parse_name(name)
            moved = name
            if sub == "cur" and parsed.uid is not None:
                # The INBOX's UID means nothing in the new folder: drop ,U= (keep the sizes).
                moved = parsed.without_uid()
            try:
                os.rename(inbox / sub / name, target / sub / moved)
            except FileNotFoundError:
                continue
        fsync_directory(target / sub)


# --- subscriptions -------------------------------------------------------------------------------


def read_subscriptions(inbox: Path) -> list[str] | None:
    """The subscribed folder names, or None when the user never changed them (all subscribed)."""
    try:
        text = (inbox / SUBSCRIPTIONS_NAME).read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return None
    return [line for line in text.split("\n") if line]


def set_subscribed(inbox: Path, name: str, subscribed: bool) -> None:
    """Subscribe or unsubscribe ``name`` (it need not exist: RFC 3501 §6.3.6)."""
    with _subscription_lock:
        current = read_subscriptions(inbox)
        if current is None:
            current = [INBOX, *folder_names(inbox)]
        names = [n for n in current if n != name]
        if subscribed:
            names.append(name)
        data = "".join(f"{n}\n" for n in names).encode("utf-8", "surrogateescape")
        tmp = inbox / f"{SUBSCRIPTIONS_NAME}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, inbox / SUBSCRIPTIONS_NAME)


_subscription_lock = threading.Lock()


def create_folder_tree(inbox: Path, name: str) -> None:
    """Create folder ``name`` and any missing parents (RFC 3501 §6.3.3: the server creates the
    hierarchy a name implies). FileExistsError if ``name`` itself exists; InvalidFolderNameError
    (NameTooLongError when it would not fit a directory entry) before the disk is touched."""
    directory = folder_directory(name)
    if directory is None or (inbox / directory).exists():
        raise FileExistsError(name)
    levels = name.split(HIERARCHY_SEPARATOR)
    for depth in range(1, len(levels) + 1):
        create_maildir(folder_path(inbox, HIERARCHY_SEPARATOR.join(levels[:depth])),
                       subfolder=True)
