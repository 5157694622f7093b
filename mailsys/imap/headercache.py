"""Message headers kept in memory, so that header searches and header fetches of a mailbox
read each file once per process, not once per command.

Clients search and list by headers again and again (SEARCH SUBJECT, FETCH of ENVELOPE or
HEADER.FIELDS for a message list); Dovecot keeps such data in its index files, we keep the
headers' bytes in a bounded cache keyed by folder, message key and size (a message's bytes never
change under its key; a file edited by hand changes size). Thread-safe: disk threads fill it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from mailsys.mailbox.folder import Folder, MessageInfo, MessageVanishedError
from mailsys.mailbox.wire import to_crlf

MAX_BYTES = 64 * 1024 * 1024


def header_end(data: bytes) -> int:
    """The offset just after the blank line ending the header of wire-form ``data``, or -1."""
    if data.startswith(b"\r\n"):
        return 2
    blank = data.find(b"\r\n\r\n")
    return blank + 4 if blank >= 0 else -1


def _complete(data: bytes) -> bool:
    return (b"\n\n" in data or b"\r\n\r\n" in data or data.startswith(b"\n")
            or data.startswith(b"\r\n"))


class HeaderCache:
    """Message headers (wire form, blank line included), at most ``max_bytes``; the oldest
    entries go first."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        # key -> (header, header.lower()): header searches compare lower-cased bytes
        self._entries: OrderedDict[tuple[str, str, int], tuple[bytes, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def header(self, folder: Folder, info: MessageInfo) -> bytes | None:
        """Disk thread: the header of ``info``, from memory or its file; None if expunged."""
        both = self.header_and_lower(folder, info)
        return None if both is None else both[0]

    def header_and_lower(self, folder: Folder, info: MessageInfo
                         ) -> tuple[bytes, bytes] | None:
        """The header and its lower-cased bytes; None if the message was expunged."""
        key = (os.fspath(folder.path), info.key, info.size)
        cached = self._entries.get(key)  # a plain read: atomic, no lock (eviction is FIFO)
        if cached is not None:
            return cached
        try:
            data = to_crlf(folder.read_prefix(info, _complete))
        except MessageVanishedError:
            return None
        end = header_end(data)
        header = data if end < 0 else data[:end]
        both = (header, header.lower())
        self.put(key, both)
        return both

    def lowers(self, folder: Folder, infos: list[MessageInfo]) -> list[bytes | None]:
        """Disk thread: the lower-cased header of each of ``infos``, None for one expunged;
        the folder's part of the key computed once (a header search walks every message)."""
        path = os.fspath(folder.path)
        entries = self._entries
        out: list[bytes | None] = []
        for info in infos:
            cached = entries.get((path, info.key, info.size))
            if cached is None:
                both = self.header_and_lower(folder, info)
                out.append(None if both is None else both[1])
            else:
                out.append(cached[1])
        return out

    def put(self, key: tuple[str, str, int], both: tuple[bytes, bytes]) -> None:
        size = 2 * len(both[0])
        if size > self.max_bytes // 16:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= 2 * len(previous[0])
            self._entries[key] = both
            self._bytes += size
            while self._bytes > self.max_bytes and self._entries:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= 2 * len(dropped[0])


HEADERS = HeaderCache()
