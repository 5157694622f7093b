"""The inbound checks of one message, together: iprev, SPF (MAIL FROM and HELO), DKIM and DMARC,
run concurrently on the shared resolver, summed up in one Authentication-Results field and a
report that keeps every result's evidence for the message's record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsys.authn.dkim import DKIMResult, DKIMVerifier, ThreadRunner
from mailsys.authn.dmarc import DMARCChecker, DMARCResult, author_domain
from mailsys.authn.iprev import IprevChecker, IprevResult
from mailsys.authn.results import authentication_results, strip_authentication_results
from mailsys.authn.spf import SPFChecker, SPFResult
from mailsys.dns import CachingResolver

_log = Logger()
# Past this many seconds a check still waiting (on DNS) counts as temperror, whatever it is
# waiting for: with ten SPF lookups against a dead server, the sum of timeouts would otherwise
# keep the client waiting at the end of DATA for minutes.
DEADLINE = 30.0


def _plain(result: Any) -> dict[str, Any] | None:
    """A result's fields as a dict (strings, numbers, lists of strings): dataclasses.asdict's
    deep copy cost a visible share of a message's CPU."""
    if result is None:
        return None
    return {k: list(v) if isinstance(v, list) else v for k, v in vars(result).items()}


def _logged(failure: Failure) -> None:
    # A check that breaks (a bug, not bad input) leaves its result out; the message goes on.
    _log.failure("authentication check failed", failure)


@dataclass
class AuthnReport:
    """Every result of one message's checks, and the header field written for them."""

    spf: SPFResult | None = None  # the MAIL FROM identity
    helo: SPFResult | None = None  # the HELO identity
    dkim: list[DKIMResult] = field(default_factory=list)
    dmarc: DMARCResult | None = None
    iprev: IprevResult | None = None
    header: bytes = b""
    removed: int = 0  # Authentication-Results fields with our authserv-id taken out
    dkim_checked: bool = False  # DKIM was looked at (an empty ``dkim`` means no signature)

    def evidence(self) -> dict[str, Any]:
        """Plain data (JSON-ready) for the message's record: results with their evidence."""
        return {
            "spf": _plain(self.spf),
            "helo": _plain(self.helo),
            "dkim": [_plain(r) for r in self.dkim],
            "dmarc": _plain(self.dmarc),
            "iprev": _plain(self.iprev),
            "removed_forged_results": self.removed,
        }

    def steps(self) -> list[tuple[str, dict[str, Any]]]:
        """The journey events of these results, in the order the checks are read: iprev, SPF
        (MAIL FROM, then HELO), each DKIM signature (or its absence), DMARC. Each carries
        its evidence (the DNS answers used) for ``mailsys trace`` (mailsys.journey.steps)."""
        steps: list[tuple[str, dict[str, Any]]] = []
        if self.iprev is not None:
            steps.append(("authn.iprev", _plain(self.iprev) or {}))
        for spf in (self.spf, self.helo):
            if spf is not None:
                steps.append(("authn.spf", _plain(spf) or {}))
        if self.dkim:
            steps.extend(("authn.dkim", _plain(r) or {}) for r in self.dkim)
        elif self.dkim_checked:
            steps.append(("authn.dkim", {"result": "none"}))
        if self.dmarc is not None:
            steps.append(("authn.dmarc", _plain(self.dmarc) or {}))
        return steps

    def summary(self) -> str:
        """One line for the log: each method and its result."""
        parts = []
        if self.iprev:
            parts.append(f"iprev={self.iprev.result}")
        if self.spf:
            parts.append(f"spf={self.spf.result}")
        if self.helo:
            parts.append(f"spf.helo={self.helo.result}")
        parts.extend(f"dkim={r.result}:{r.domain}" for r in self.dkim)
        if self.dmarc:
            parts.append(f"dmarc={self.dmarc.result}")
        return " ".join(parts) or "none"


class InboundChecks:
    """Runs the checks for a message received on an inbound (port 25) listener."""

    def __init__(
        self,
        resolver: CachingResolver,
        authserv_id: str,
        *,
        run_in_thread: ThreadRunner = deferToThread,
        now: Callable[[], float] | None = None,
        spf: bool = True,
        dkim: bool = True,
        dmarc: bool = True,
        iprev: bool = True,
        clock: IReactorTime | None = None,
        deadline: float = DEADLINE,
    ) -> None:
        self.authserv_id = authserv_id
        self._clock = clock
        self.deadline = deadline
        self._spf = SPFChecker(resolver, receiver=authserv_id, now=now) if spf or dmarc else None
        self._dkim = DKIMVerifier(resolver, run_in_thread=run_in_thread) if dkim or dmarc else None
        self._dmarc = DMARCChecker(resolver) if dmarc else None
        self._iprev = IprevChecker(resolver) if iprev else None
        self.report_spf = spf
        self.report_dkim = dkim

    def check(self, ip: str, helo: str, mailfrom: str,
              message: bytes) -> Deferred[tuple[bytes, AuthnReport]]:
        """The message as it is to be stored (forged results of ours removed, our field on
        top) and the report. Never fails: bad input gives results, not errors."""
        return Deferred.fromCoroutine(self._check(ip, helo, mailfrom, message))

    async def _check(self, ip: str, helo: str, mailfrom: str,
                     message: bytes) -> tuple[bytes, AuthnReport]:
        message, removed = strip_authentication_results(message, self.authserv_id)
        report = AuthnReport(removed=removed)
        work: list[Deferred[Any]] = []
        late = f"no answer within {self.deadline:g} s"
        sender = mailfrom or f"postmaster@{helo}"
        sender_domain = sender.rpartition("@")[2].lower()
        if self._iprev is not None:
            work.append(self._bounded(self._iprev.check(ip), report, "iprev",
                                      IprevResult("temperror", ip, problem=late)))
        if self._spf is not None:
            work.append(self._bounded(
                self._spf.check_mailfrom(ip, mailfrom, helo), report, "spf",
                SPFResult("temperror", "mailfrom", sender_domain, sender, ip, problem=late)))
            if mailfrom and self.report_spf:
                work.append(self._bounded(
                    self._spf.check_helo(ip, helo), report, "helo",
                    SPFResult("temperror", "helo", helo.lower(), f"postmaster@{helo}", ip,
                              problem=late)))
        if self._dkim is not None:
            report.dkim_checked = True
            # A DKIM verdict that came too late may have been a pass: temperror, so that a
            # DMARC failure defers instead of refusing.
            work.append(self._bounded(self._dkim.verify(message), report, "dkim",
                                      [DKIMResult("temperror", problem=late)]))
        await gatherResults(work, consumeErrors=True)
        if self._dmarc is not None:
            end = message.find(b"\r\n\r\n")
            header = message if end < 0 else message[:end + 2]
            domain = author_domain(header)
            await self._bounded(self._dmarc.check(domain, report.spf, report.dkim), report,
                                "dmarc", DMARCResult("temperror", domain or "", problem=late))
        spf_shown = [r for r in (report.spf, report.helo) if r is not None and self.report_spf]
        report.header = authentication_results(
            self.authserv_id, spf=spf_shown,
            dkim=report.dkim if self.report_dkim else None,
            dmarc=report.dmarc, iprev=report.iprev)
        return report.header + message, report

    def _bounded(self, work: Deferred[Any], report: AuthnReport, name: str,
                 late: Any) -> Deferred[None]:
        """``work``'s result into ``report.<name>``; past the deadline, or if the check
        breaks (a bug, logged), ``late`` instead: a check never holds a message forever."""
        if self._clock is not None:
            work.addTimeout(self.deadline, self._clock)

        def failed(failure: Failure) -> Any:
            if not failure.check(TimeoutError, CancelledError):
                _logged(failure)
            return late

        return work.addErrback(failed).addCallback(lambda r: setattr(report, name, r))
