"""The mailbox store: the Maildir++ read model shared by POP3 and IMAP (UIDs, flags, folders).

- ``store``: MailboxStore (mailbox and folder paths, open_folder → FolderView, folders, the POP3
  lock, change notification) — asynchronous, for protocol sessions.
- ``folder``: Folder, the blocking work on one Maildir folder under its lock (sync, UIDs,
  reading, flags, deletion) — run in DiskPool threads.
- ``layout``: the Maildir on-disk format (paths, unique names, name fields and flags, the stored
  form), shared with local delivery. ``names``: the file-name part of it protocol code reads.
- ``uidlist``: the per-folder UID file.
- ``wire``: CRLF wire form, wire sizes, POP3 dot-stuffing and TOP.
"""

from mailsys.mailbox.folder import MessageInfo, MessageVanishedError, SyncResult
from mailsys.mailbox.store import (
    DEFAULT_FOLDERS,
    INBOX,
    FolderChanges,
    FolderView,
    InvalidFolderNameError,
    InvalidMailboxNameError,
    MailboxInUseError,
    MailboxLock,
    MailboxStore,
    NameTooLongError,
)

__all__ = [
    "DEFAULT_FOLDERS",
    "INBOX",
    "FolderChanges",
    "FolderView",
    "InvalidFolderNameError",
    "InvalidMailboxNameError",
    "MailboxInUseError",
    "MailboxLock",
    "MailboxStore",
    "MessageInfo",
    "MessageVanishedError",
    "NameTooLongError",
    "SyncResult",
]
