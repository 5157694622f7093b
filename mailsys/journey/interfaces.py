"""The one seam every room emits journey events through."""

from __future__ import annotations

from typing import Any

from zope.interface import Interface


class IJourneyRecorder(Interface):
    """Where a room reports a step of a message's journey. Never blocks, never raises."""

    def emit(kind: str, queue_id: str | None = None, message_id: str | None = None,
             session: str | None = None, **fields: Any) -> None:
        """Record that ``kind`` happened now, with plain ``fields`` (no body, no secret).

        Fields named ``parent`` (a queue id) with ``relation`` link this message to another
        (a bounce to the message it reports, an alias copy or relay hop to its origin).
        Values are str, int, float, bool, None or tuples/lists of those; pass values that are
        not changed afterwards (the recorder may read them later, in its writer thread).
        """
