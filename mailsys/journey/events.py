"""What a journey event is, and the one interface every room emits it through.

An event is a kind (``smtp.rcpt``, ``spool.commit``, ``delivery.maildir`` ...), the time it
happened, the keys that tie it to a message (queue id, Message-ID, the SMTP session and its
transaction) and a few plain fields (addresses, replies, sizes, host names). Never a message body,
never a password or a SASL exchange: :func:`clean_fields` drops such fields whatever the emitter
passed, so a mistake in one room cannot put a secret on disk.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zope.interface import implementer

from mailsys.journey.interfaces import IJourneyRecorder

# Field names a recorder refuses to keep, whatever their value: secrets and message content.
# RFC 4954 §4: the SASL responses carry the credentials themselves (PLAIN is the password).
_FORBIDDEN_NAME = re.compile(r"(^|_)pass(word|wd|phrase)?($|_)|secret|sasl|credential|body|content",
                             re.IGNORECASE)
# Bounds on one event, so a hostile peer's 1000-octet command repeated cannot swell the store.
# RFC 5321 §4.5.3.1.4-5: a command line is at most 512 octets, a reply line 512.
MAX_FIELDS = 32
MAX_TEXT = 1000
MAX_ITEMS = 50

# The fields whose values are mail addresses: the store indexes them for ``mailsys trace ADDRESS``.
ADDRESS_FIELDS = ("sender", "recipient", "original", "user", "mailbox", "recipients", "targets")
_ADDRESS_NAMES = frozenset(ADDRESS_FIELDS)

FieldValue = str | int | float | bool | None | list[Any] | dict[str, Any]


@dataclass(frozen=True)
class JourneyEvent:
    """One step of a message's journey, as recorded."""

    at: float
    kind: str
    queue_id: str | None = None
    message_id: str | None = None
    # The SMTP (or POP3/IMAP) session the event belongs to, and within an SMTP session the
    # transaction number: before DATA there is no queue id yet, so these tie MAIL and RCPT
    # (refused ones too) to the message that the transaction finally queued.
    session: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    # The store's row id: orders events of the same instant; None before the event is stored.
    id: int | None = None

    @property
    def txn(self) -> int | None:
        """The SMTP transaction number within the session (None for session-level events)."""
        value = self.fields.get("txn")
        return value if isinstance(value, int) else None


@implementer(IJourneyRecorder)
class NullRecorder:
    """Recording is off: every event is dropped at once."""

    def emit(self, kind: str, queue_id: str | None = None, message_id: str | None = None,
             session: str | None = None, **fields: Any) -> None:
        pass


@implementer(IJourneyRecorder)
class MemoryRecorder:
    """Keeps events in a list: for tests that check what a room emits."""

    def __init__(self, now: Callable[[], float] = lambda: 0.0) -> None:
        self._now = now
        self.events: list[JourneyEvent] = []

    def emit(self, kind: str, queue_id: str | None = None, message_id: str | None = None,
             session: str | None = None, **fields: Any) -> None:
        self.events.append(JourneyEvent(self._now(), kind, queue_id,
                                        normalize_message_id(message_id), session,
                                        clean_fields(fields)))

    def kinds(self) -> list[str]:
        """The kinds emitted so far, in order."""
        return [event.kind for event in self.events]


NULL_RECORDER = NullRecorder()


def normalize_message_id(value: str | None) -> str | None:
    """A Message-ID without its angle brackets and surrounding space (RFC 5322 §3.6.4)."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text[:MAX_TEXT] or None


def clean_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` made safe to store: no secret or content fields, bounded sizes, plain types.

    A dict that is clean already is returned as it is (an emitter's keyword arguments are a
    new dict each time, so nobody else holds it).
    """
    # This runs for every event in the writer thread, holding the GIL the reactor needs: the
    # common case (names seen before and allowed, short text and numbers) is one pass that
    # builds nothing.
    if type(fields) is dict and _safe_names(tuple(fields)):
        for value in fields.values():
            kind = type(value)
            if kind is str:
                if len(value) > MAX_TEXT:
                    break
            elif kind is list:
                # Lists of addresses, routes, hosts: kept as they are when already plain.
                if not _plain_list(value):
                    break
            elif not (value is None or kind is int or kind is bool or kind is float):
                break
        else:
            return fields
    return _clean_slowly(fields)


# The name tuples of fields seen before, and whether every name in them is kept as it is.
_SAFE_NAMES: dict[tuple[Any, ...], bool] = {}


def _safe_names(names: tuple[Any, ...]) -> bool:
    """Whether a dict with these names (in this order) keeps every name as it is."""
    safe = _SAFE_NAMES.get(names)
    if safe is None:
        safe = len(names) <= MAX_FIELDS and all(
            type(name) is str and _allowed_name(name) == name for name in names)
        if len(_SAFE_NAMES) < 4096:  # emitters use a few dozen shapes; odd ones are not kept
            _SAFE_NAMES[names] = safe
    return safe


def _plain_list(items: list[Any]) -> bool:
    """Whether ``_clean_value`` would keep the list ``items`` as it is (the common case)."""
    if len(items) > MAX_ITEMS:
        return False
    for item in items:
        kind = type(item)
        if kind is str:
            if len(item) > MAX_TEXT:
                return False
        elif kind is dict:
            if not _safe_names(tuple(item)):
                return False
            for value in item.values():
                kind = type(value)
                if kind is str:
                    if len(value) > MAX_TEXT:
                        return False
                elif not (value is None or kind is int or kind is bool or kind is float):
                    return False
        elif not (item is None or kind is int or kind is bool or kind is float):
            return False
    return True


def _clean_slowly(fields: Mapping[str, Any]) -> dict[str, Any]:
    cleaned: dict[str, Any] = {}
    names = _NAMES
    items = fields.items()
    if len(fields) > MAX_FIELDS:
        items = dict(list(items)[:MAX_FIELDS]).items()
        cleaned["truncated"] = True
    for name, value in items:
        key = names.get(name, _UNKNOWN) if type(name) is str else None
        if key is _UNKNOWN:
            key = _learn_name(name)
        if key is None:
            continue
        kind = type(value)
        if kind is str:
            if len(value) > MAX_TEXT:
                value = value[:MAX_TEXT]
        elif not (value is None or kind is int or kind is bool or kind is float):
            value = _clean_value(value, depth=0)
        cleaned[key] = value
    return cleaned


# Field name -> the name stored, or None for a name that may hold a secret or content.
_NAMES: dict[str, str | None] = {}
_UNKNOWN = ""


def _learn_name(name: str) -> str | None:
    key = _allowed_name(name)
    if len(_NAMES) < 4096:  # emitters use a few dozen names; a flood of odd ones is not kept
        _NAMES[name] = key
    return key


def _allowed_name(name: str) -> str | None:
    """``name`` as stored (at most 64 characters), or None if it may name a secret or content."""
    if not name or _FORBIDDEN_NAME.search(name):
        return None
    return name[:64]


def _clean_value(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, bytes):
        return value[:MAX_TEXT].decode("utf-8", "replace")
    if depth < 2 and isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_clean_value(item, depth + 1) for item in list(items)[:MAX_ITEMS]]
    if depth < 2 and isinstance(value, Mapping):
        return {str(k)[:64]: _clean_value(v, depth + 1)
                for k, v in list(value.items())[:MAX_FIELDS]
                if _allowed_name(str(k)) is not None}
    return str(value)[:MAX_TEXT]


def addresses_of(fields: Mapping[str, Any]) -> set[str]:
    """The mail addresses named by ``fields`` (lower-cased), for the address index."""
    found: set[str] = set()
    names = _ADDRESS_NAMES
    # Over the event's few fields rather than every address field name: most events name
    # one address or none, and this runs for each of them in the writer thread.
    for name, value in fields.items():
        if value is None or name not in names:
            continue
        for item in value if isinstance(value, list) else (value,):
            if isinstance(item, str) and "@" in item:
                found.add(item.strip().strip("<>").lower())
    return found


_SESSION_PREFIX = f"{random.getrandbits(32):08x}"
_session_numbers = itertools.count(1)


def new_session_id() -> str:
    """An id for a session, unique across processes and restarts: random prefix, counter."""
    return f"{_SESSION_PREFIX}{next(_session_numbers):x}"


class SessionJourney:
    """The journey events of one session: its id and transaction number added to each.

    A protocol session holds one and calls :meth:`emit` as it goes; :meth:`begin_transaction`
    at each MAIL FROM starts the numbering under which MAIL, RCPT and DATA of that message are
    tied together until the message has a queue id (RFC 5321 §3.3: a transaction is MAIL,
    RCPT..., DATA).
    """

    __slots__ = ("_count", "_recorder", "session", "txn")

    def __init__(self, recorder: IJourneyRecorder, session: str | None = None) -> None:
        self._recorder = recorder
        self.session = session or new_session_id()
        self.txn: int | None = None
        self._count = 0

    @property
    def recording(self) -> bool:
        """False when recording is off: a caller may skip preparing costly fields."""
        return not isinstance(self._recorder, NullRecorder)

    def begin_transaction(self) -> int:
        """Start the next transaction of the session and return its number."""
        self._count += 1
        self.txn = self._count
        return self._count

    def end_transaction(self) -> None:
        """The transaction is over (queued, RSET, or refused): later events are the session's."""
        self.txn = None

    def emit(self, kind: str, queue_id: str | None = None, message_id: str | None = None,
             **fields: Any) -> None:
        """Record ``kind`` for this session (and its open transaction, if any)."""
        if self.txn is not None:
            fields["txn"] = self.txn
        self._recorder.emit(kind, queue_id, message_id, self.session, **fields)
