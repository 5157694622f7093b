"""Faults a teacher injects into one lab domain (`mailsys lab fault DOMAIN FAULT`), and the lab
server's side of them.

The fault of a domain lives in ``DIR/DOMAIN/fault.json``. ``down``, ``tls-broken`` and
``dns-servfail`` are carried out by the `lab` command itself (the server stopped, restarted with a
certificate no lab client trusts for its name, the domain's names answered with SERVFAIL by the
lab DNS). The others are answered by the server's SMTP intake through ``FaultPolicy``, a wrapper
around the listener's policy that a server has only when its configuration names the file
(``[lab] faults``):

- ``tempfail``: MAIL FROM gets 451 4.3.2 on port 25's listener, so senders queue and retry;
- ``reject``: MAIL FROM gets 550 5.7.1, so senders bounce;
- ``greylist``: the first RCPT of each (client address, recipient) is answered 451 4.7.1, a
  retry after GREYLIST_DELAY is accepted (real greylisting also keys on the sender; the policy
  is shared by the listener's sessions and sees no sender at RCPT);
- ``slow``: MAIL and RCPT are answered SLOW_DELAY seconds late.

On port 25's listener of a lab server, a recipient ``fail-NNN@DOMAIN`` (NNN a 4xx or 5xx code)
is refused at RCPT with that code, whatever the fault, as mox's localserve does: mail submitted
elsewhere for it meets the refusal in relay, so the sender's server retries or bounces.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from mailsys import replies
from mailsys.address import Mailbox
from mailsys.diskio import DiskRunner
from mailsys.replies import Reply
from mailsys.routing import Destination
from mailsys.smtp.policy import Policy, RecipientRejected, SessionInfo

FAULTS = ("down", "tempfail", "reject", "greylist", "slow", "tls-broken", "dns-servfail",
          "clear")
# Faults the intake answers; the others are the `lab` command's.
INTAKE_FAULTS = ("tempfail", "reject", "greylist", "slow")
GREYLIST_DELAY = 15.0  # seconds; real greylisting waits minutes, a class cannot
SLOW_DELAY = 8.0  # seconds added to each MAIL and RCPT answer
FAULT_POLL_INTERVAL = 1.0
_CHOSEN = re.compile(r"^fail-([45]\d\d)$", re.IGNORECASE)


@dataclass(frozen=True)
class Fault:
    """The fault in effect, and since when (real time)."""

    name: str = "clear"
    since: float = 0.0


def read_fault(path: Path) -> Fault:
    """The fault in ``path``; none when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
        name = str(data["fault"])
        return Fault(name if name in FAULTS else "clear", float(data.get("since", 0.0)))
    except (OSError, ValueError, KeyError, TypeError):
        return Fault()


def write_fault(path: Path, name: str, now: float | None = None) -> None:
    """Record ``name`` atomically: the server never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fault": name, "since": time.time() if now is None else now})
                   + "\n")
    os.replace(tmp, path)


def chosen_reply(recipient: Mailbox) -> Reply | None:
    """The reply a ``fail-NNN@`` recipient asks for, else None."""
    match = _CHOSEN.match(recipient.local_part) if recipient.local_part else None
    return replies.lab_chosen(int(match.group(1))) if match else None


class FaultFollower:
    """The fault of this server, read from its file in a disk thread each FAULT_POLL_INTERVAL
    (``refresh``); the policy reads only memory."""

    def __init__(self, path: Path, disk: DiskRunner) -> None:
        self.path = path
        self.fault = Fault()
        self._disk = disk

    def refresh(self) -> Deferred[None]:
        def got(fault: Fault) -> None:
            self.fault = fault

        return self._disk.run(read_fault, self.path).addCallback(got)


class FaultPolicy:
    """A listener's policy with the lab's faults and ``fail-NNN@`` recipients in front, both on
    port 25's listener only (``inbound``); other listeners pass straight through."""

    def __init__(self, inner: Policy, faults: FaultFollower, clock: IReactorTime, *,
                 inbound: bool) -> None:
        self._inner = inner
        self._faults = faults
        self._clock = clock
        self._inbound = inbound
        self._first_seen: dict[tuple[str, str], float] = {}

    @property
    def requires_tls_before_mail(self) -> bool:
        return self._inner.requires_tls_before_mail

    @property
    def requires_auth(self) -> bool:
        return self._inner.requires_auth

    def _fault(self) -> str:
        return self._faults.fault.name if self._inbound else "clear"

    def _later(self, result: Deferred[Any]) -> Deferred[Any]:
        if self._fault() != "slow":
            return result
        return deferLater(self._clock, SLOW_DELAY, lambda: result)

    def check_sender(self, session: SessionInfo, sender: Mailbox | None) -> Deferred[Reply | None]:
        fault = self._fault()
        if fault == "tempfail":
            return succeed(replies.LAB_TEMPFAIL)
        if fault == "reject":
            return succeed(replies.LAB_REJECT)
        return self._later(self._inner.check_sender(session, sender))

    def check_recipient(self, session: SessionInfo,
                        recipient: Mailbox) -> Deferred[list[Destination]]:
        chosen = chosen_reply(recipient) if self._inbound else None
        if chosen is not None:
            return fail(RecipientRejected(chosen))
        if self._fault() == "greylist" and self._greylisted(session, recipient):
            return fail(RecipientRejected(replies.LAB_GREYLISTED))
        return self._later(self._inner.check_recipient(session, recipient))

    def _greylisted(self, session: SessionInfo, recipient: Mailbox) -> bool:
        """True while this pair was first seen less than GREYLIST_DELAY ago."""
        now = self._clock.seconds()
        key = (session.client_address, str(recipient).lower())
        first = self._first_seen.setdefault(key, now)
        return now - first < GREYLIST_DELAY
