"""What the IMAP command mixins (mailboxes, messages, transfers) need of their session.

IMAPSession provides all of it. The mixins declare it once here, so that each module is
type-checked on its own and none repeats the list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from mailsys.imap.parser import Reader
from mailsys.mailbox.store import MailboxStore

if TYPE_CHECKING:
    from mailsys.imap.session import Selected


class SessionParts:
    """The session's state and helpers that its command mixins use (IMAPSession has them)."""

    _store: MailboxStore
    _mailbox: str | None  # the logged-in user's mailbox
    _selected: Selected | None
    _enabled: set[str]  # ENABLEd extensions (RFC 5161), upper case
    run: Callable[..., Deferred[Any]]  # blocking work in the store's disk pool
    write: Callable[[bytes], None]
    _notify: Callable[[str], None]  # tell other sessions a folder changed
    _mailbox_name: Callable[[Reader], str]
    _condstore_used: Callable[[], None]  # a CONDSTORE-enabling command was seen
    record: Callable[..., None]  # a step in the journey of a message (mailsys.journey)

    @property
    def rev2(self) -> bool:
        """RFC 9051 behaviour is enabled."""
        raise NotImplementedError

    @property
    def utf8(self) -> bool:
        """Mailbox names travel in UTF-8, not modified UTF-7."""
        raise NotImplementedError

    @property
    def condstore(self) -> bool:
        """CONDSTORE is on for this session (RFC 7162 §3.1)."""
        raise NotImplementedError
