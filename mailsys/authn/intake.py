"""Mail authentication at intake, as the SMTP server asks for it at the end of DATA: sign what a
user submits (before it is spooled, so the signature covers what is stored and relayed), check
what arrives on port 25 and say what to do with it.

Nothing here knows SMTP sessions: the server hands over the facts of the transaction and the
message, and gets back the message to store and a verdict. A check that breaks never loses the
message: it is accepted as it came, and the break is logged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailsys.authn.checks import AuthnReport, InboundChecks
from mailsys.authn.dkim import DKIMSigner
from mailsys.authn.dmarc import author_domain
from mailsys.authn.policy import Action, AuthnPolicy, Decision, combine, decide
from mailsys.authn.results import strip_authentication_results
from mailsys.replies import Reply

log = Logger()


@dataclass(frozen=True)
class IntakeFacts:
    """What the server knows of the transaction when DATA ends."""

    client_address: str
    helo: str
    sender: str  # the reverse-path; "" for the null sender
    recipients: Sequence[str]
    queue_id: str = ""


@dataclass
class IntakeVerdict:
    """The message to store, what to do with it, and the evidence."""

    message: bytes
    action: Action = "accept"
    reply: Reply | None = None  # for reject and defer
    junk: tuple[str, ...] = ()  # recipients whose copy goes to their Junk folder
    reason: str = ""
    report: AuthnReport | None = None

    def evidence(self) -> dict[str, Any]:
        """JSON-ready: the action and every check's result with the DNS answers it used."""
        data: dict[str, Any] = {"action": self.action, "reason": self.reason,
                                "junk": list(self.junk)}
        if self.report is not None:
            data.update(self.report.evidence())
        return data


@dataclass
class Signing:
    """What signing a submitted message did: the message to store, the From domain, the keys
    that signed it as (d=, s=, a=), or why it went unsigned."""

    message: bytes
    domain: str | None = None
    signatures: list[tuple[str, str, str]] = field(default_factory=list)
    problem: str = ""

    def step(self) -> dict[str, Any]:
        """The journey fields of the signing step (mailsys.journey.steps, ``authn.sign``)."""
        return {"domain": self.domain, "signed": bool(self.signatures),
                "selectors": [s for _, s, _ in self.signatures],
                "algorithms": [a for _, _, a in self.signatures],
                "signing_domains": [d for d, _, _ in self.signatures],
                "problem": self.problem}


@dataclass(frozen=True)
class PolicyTable:
    """The policy of each recipient domain: the default, or the domain's own."""

    default: AuthnPolicy = field(default_factory=AuthnPolicy)
    domains: Mapping[str, AuthnPolicy] = field(default_factory=dict)

    def for_recipient(self, address: str) -> AuthnPolicy:
        domain = address.rpartition("@")[2].lower().removesuffix(".")
        return self.domains.get(domain, self.default)


class MessageAuthentication:
    """Signing for submission listeners, checks and policy for inbound ones."""

    def __init__(self, checks: InboundChecks | None, signer: DKIMSigner | None,
                 policies: PolicyTable | None = None, *, authserv_id: str | None = None) -> None:
        self.checks = checks
        self.signer = signer
        self.policies = policies or PolicyTable()
        # With the checks off, fields claiming our authserv-id are still removed (RFC 8601 §5):
        # a reader that trusts our id must never see a verdict we did not give.
        self.authserv_id = authserv_id or (checks.authserv_id if checks is not None else None)

    # -- submission ------------------------------------------------------------------------------

    def sign(self, message: bytes, queue_id: str = "") -> Deferred[bytes]:
        """``message`` with DKIM-Signature fields on top for its From domain's keys; unsigned
        when the domain has none or signing fails (logged: mail is never held back for it)."""
        return self.signing(message, queue_id).addCallback(lambda signed: signed.message)

    def signing(self, message: bytes, queue_id: str = "") -> Deferred[Signing]:
        """As :meth:`sign`, with what was done: the domain, the keys used, or why none."""
        return Deferred.fromCoroutine(self._sign(message, queue_id))

    async def _sign(self, message: bytes, queue_id: str) -> Signing:
        if self.signer is None:
            return Signing(message, problem="signing is off")
        end = message.find(b"\r\n\r\n")
        domain = author_domain(message if end < 0 else message[:end + 2])
        if domain is None:
            return Signing(message, problem="no single From address to sign for")
        keys = self.signer.keys_for(domain)
        if not keys:
            return Signing(message, domain, problem=f"no DKIM key for {domain}")
        try:
            fields = await self.signer.sign(message, domain)
        except Exception as exc:
            log.failure("{queue_id}: DKIM signing for {domain} failed; sent unsigned",
                        queue_id=queue_id, domain=domain)
            return Signing(message, domain, problem=f"signing failed ({exc.__class__.__name__})")
        return Signing(fields + message, domain,
                       [(k.domain, k.selector, k.algorithm) for k in keys])

    # -- inbound ---------------------------------------------------------------------------------

    def inbound(self, facts: IntakeFacts, message: bytes) -> Deferred[IntakeVerdict]:
        """The checks, the Authentication-Results field and the verdict for a message that
        came to an inbound listener."""
        return Deferred.fromCoroutine(self._inbound(facts, message))

    def unchecked(self, message: bytes) -> bytes | None:
        """With the checks off, ``message`` as it is to be stored: without the fields that claim
        our authserv-id. None while the checks are on."""
        if self.checks is not None:
            return None
        if self.authserv_id is not None:
            message, _ = strip_authentication_results(message, self.authserv_id)
        return message

    async def _inbound(self, facts: IntakeFacts, message: bytes) -> IntakeVerdict:
        unchecked = self.unchecked(message)
        if unchecked is not None:
            return IntakeVerdict(unchecked)
        assert self.checks is not None
        try:
            stored, report = await self.checks.check(facts.client_address, facts.helo,
                                                     facts.sender, message)
        except Exception:
            log.failure("{queue_id}: authentication checks failed; accepted unchecked",
                        queue_id=facts.queue_id)
            return IntakeVerdict(message, reason="checks failed")
        by_recipient: list[tuple[str, Decision]] = []
        for recipient in facts.recipients:
            policy = self.policies.for_recipient(recipient)
            by_recipient.append((recipient, decide(policy, spf=report.spf, dkim=report.dkim,
                                                   dmarc=report.dmarc, iprev=report.iprev)))
        overall = combine([d for _, d in by_recipient])
        verdict = IntakeVerdict(stored, overall.action, overall.reply, reason=overall.reason,
                                report=report)
        if overall.action in ("accept", "junk"):
            # Recipients whose own policy would have refused get their copy in Junk: the
            # message is accepted only for the others' sake.
            verdict.junk = tuple(r for r, d in by_recipient if d.action != "accept")
            verdict.action = "junk" if verdict.junk else "accept"
            if verdict.junk and not verdict.reason:
                verdict.reason = next(d.reason for _, d in by_recipient if d.action != "accept")
        return verdict
