"""What to do with a message given its authentication results: deliver, deliver to Junk, refuse
(550 5.7.x at the end of DATA) or ask to try again later (451).

The rule that matters most: a DNS failure never becomes a permanent refusal. Where a temperror
could have changed a refusal into an acceptance, the answer is 4xx; where it could not, the
message is accepted and the header says temperror.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mailsys.authn.dkim import DKIMResult
from mailsys.authn.dmarc import DMARCResult
from mailsys.authn.iprev import IprevResult
from mailsys.authn.spf import SPFResult
from mailsys.replies import Reply

Action = Literal["accept", "junk", "defer", "reject"]
CheckPolicy = Literal["none", "junk", "reject"]
DMARCPolicy = Literal["honour", "none", "junk", "reject"]

# RFC 7372 §3: the enhanced codes of each check; RFC 7489 §7.3 / RFC 9989: 5.7.1 for DMARC.
DMARC_REJECT = Reply(550, "5.7.1", "Rejected by the DMARC policy of the sender's domain")
DMARC_DEFER = Reply(451, "4.7.1", "DMARC could not be evaluated (DNS failure); try again later")
SPF_REJECT = Reply(550, "5.7.23", "SPF validation failed")
SPF_DEFER = Reply(451, "4.7.24", "SPF validation error (DNS failure); try again later")
DKIM_REJECT = Reply(550, "5.7.20", "No passing DKIM signature found")
DKIM_DEFER = Reply(451, "4.7.5", "DKIM could not be verified (DNS failure); try again later")
IPREV_REJECT = Reply(550, "5.7.25", "Reverse DNS validation failed")
IPREV_DEFER = Reply(451, "4.7.25", "Reverse DNS validation error (DNS failure); try again later")

_SEVERITY: dict[Action, int] = {"accept": 0, "junk": 1, "defer": 2, "reject": 3}


@dataclass(frozen=True)
class AuthnPolicy:
    """Per check: none (header only), junk or reject; DMARC may also honour the sender's
    published policy (the default)."""

    dmarc: DMARCPolicy = "honour"
    spf: CheckPolicy = "none"
    dkim: CheckPolicy = "none"
    iprev: CheckPolicy = "none"


@dataclass(frozen=True)
class Decision:
    """The action, the reply to give when refusing or deferring, and why (for the log)."""

    action: Action
    reply: Reply | None = None
    reason: str = ""


ACCEPT = Decision("accept")


def decide(
    policy: AuthnPolicy,
    *,
    spf: SPFResult | None = None,
    dkim: Sequence[DKIMResult] = (),
    dmarc: DMARCResult | None = None,
    iprev: IprevResult | None = None,
) -> Decision:
    """The strictest of the per-check decisions."""
    decisions = [_dmarc(policy.dmarc, dmarc, spf, dkim), _spf(policy.spf, spf),
                 _dkim(policy.dkim, dkim), _iprev(policy.iprev, iprev)]
    return max(decisions, key=lambda d: _SEVERITY[d.action])


def combine(decisions: Sequence[Decision]) -> Decision:
    """One decision for a message whose recipients' domains have different policies: refuse
    or defer only when every recipient's policy would; otherwise the most lenient, so one
    domain's strict policy never costs another domain its mail. Junk stays per recipient."""
    if not decisions:
        return ACCEPT
    return min(decisions, key=lambda d: _SEVERITY[d.action])


def _on(setting: CheckPolicy, reject: Reply, why: str) -> Decision:
    if setting == "reject":
        return Decision("reject", reject, why)
    if setting == "junk":
        return Decision("junk", None, why)
    return ACCEPT


def _dmarc(setting: DMARCPolicy, dmarc: DMARCResult | None, spf: SPFResult | None,
           dkim: Sequence[DKIMResult]) -> Decision:
    if dmarc is None or setting == "none":
        return ACCEPT
    if dmarc.result == "temperror":
        # Only where the answer could have been a refusal (our own reject setting, or a record
        # already read that asks for one) is the message deferred; otherwise it is accepted
        # and marked temperror.
        if setting == "reject" or (setting == "honour" and "reject" in dmarc.record.lower()):
            return Decision("defer", DMARC_DEFER, f"dmarc temperror: {dmarc.problem}")
        return ACCEPT
    if dmarc.result != "fail":
        return ACCEPT
    wanted: CheckPolicy
    if setting == "honour":
        wanted = ("reject" if dmarc.policy == "reject"
                  else "junk" if dmarc.policy == "quarantine" else "none")
    else:
        wanted = setting
    why = f"dmarc fail for {dmarc.from_domain} (p={dmarc.policy})"
    decision = _on(wanted, DMARC_REJECT, why)
    if decision.action == "reject" and _dns_failed(spf, dkim):
        # An aligned pass might have been hidden by the DNS failure.
        return Decision("defer", DMARC_DEFER, why + " with a DNS failure in SPF or DKIM")
    return decision


def _dns_failed(spf: SPFResult | None, dkim: Sequence[DKIMResult]) -> bool:
    return ((spf is not None and spf.result == "temperror")
            or any(r.result == "temperror" for r in dkim))


def _spf(setting: CheckPolicy, spf: SPFResult | None) -> Decision:
    if spf is None or setting == "none":
        return ACCEPT
    if spf.result == "temperror":
        return (Decision("defer", SPF_DEFER, f"spf temperror: {spf.problem}")
                if setting == "reject" else ACCEPT)
    if spf.result == "fail" or (setting == "junk" and spf.result == "softfail"):
        return _on(setting, SPF_REJECT, f"spf {spf.result} for {spf.domain}")
    return ACCEPT


def _dkim(setting: CheckPolicy, dkim: Sequence[DKIMResult]) -> Decision:
    if setting == "none" or not dkim or any(r.result == "pass" for r in dkim):
        return ACCEPT
    if any(r.result == "temperror" for r in dkim):
        return (Decision("defer", DKIM_DEFER, "dkim temperror")
                if setting == "reject" else ACCEPT)
    return _on(setting, DKIM_REJECT, "no passing DKIM signature")


def _iprev(setting: CheckPolicy, iprev: IprevResult | None) -> Decision:
    if iprev is None or setting == "none" or iprev.result == "pass":
        return ACCEPT
    if iprev.result == "temperror":
        return (Decision("defer", IPREV_DEFER, f"iprev temperror: {iprev.problem}")
                if setting == "reject" else ACCEPT)
    return _on(setting, IPREV_REJECT, f"iprev {iprev.result} for {iprev.ip}")
