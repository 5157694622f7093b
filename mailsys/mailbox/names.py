"""Maildir file names and flag letters, for the protocol code that reads them.

The rules themselves live in mailsys.mailbox.layout, the one owner of the Maildir format; this
module names the part of it that POP3, IMAP and the folder read model import.
"""

from __future__ import annotations

from mailsys.mailbox.layout import (
    DRAFT,
    FLAGGED,
    PARSED_NAMES_KEPT,
    PASSED,
    REPLIED,
    SEEN,
    SYSTEM_FLAGS,
    TRASHED,
    MaildirName,
    file_name,
    format_base,
    parse_name,
    render_flags,
)

__all__ = [
    "DRAFT",
    "FLAGGED",
    "PARSED_NAMES_KEPT",
    "PASSED",
    "REPLIED",
    "SEEN",
    "SYSTEM_FLAGS",
    "TRASHED",
    "MaildirName",
    "file_name",
    "format_base",
    "parse_name",
    "render_flags",
]
