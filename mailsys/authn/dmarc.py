"""DMARC (RFC 9989): does the author's domain (RFC 5322.From) stand behind this message, through
an aligned SPF or DKIM pass, and what does its owner ask us to do if not?

Policy discovery and the Organizational Domain both come from the DNS tree walk of RFC 9989
§4.10, never from a public-suffix list. The result keeps the record used, where it was found,
which identifiers aligned and the DNS answers asked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Literal

from twisted.internet.defer import Deferred
from twisted.names import dns

from mailsys.authn.dkim import DKIMResult
from mailsys.authn.spf import SPFResult
from mailsys.dns import CachingResolver, DNSTemporaryError
from mailsys.dns.cache import valid_name

DMARCResultName = Literal["none", "pass", "fail", "temperror", "permerror"]
Disposition = Literal["none", "quarantine", "reject"]

# RFC 9989 §4.10.1: a walk never asks more than 8 names (long names jump to 7 labels).
MAX_WALK_LABELS = 7
_POLICIES: tuple[Disposition, ...] = ("none", "quarantine", "reject")
# One address, bare or in angle brackets after a plain display name; anything else (quotes,
# comments, groups, lists) goes to email.utils' parser.
_SIMPLE_FROM = re.compile(r'\s*(?:[^<>"@,;:\\()]*<\s*)?'
                          r'[^<>"@,;:\\()\s]+@([^<>"@,;:\\()\s]+)\s*>?\s*')
# A host name of two or more labels (RFC 1035 §2.3.1, with RFC 1123's leading digits).
_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")


@dataclass(frozen=True)
class DMARCRecord:
    """A parsed DMARC policy record (RFC 9989 §4.7)."""

    domain: str  # where it was found
    text: str
    p: Disposition | None
    sp: Disposition | None
    np: Disposition | None
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"
    psd: Literal["y", "n", "u"] = "u"
    testing: bool = False  # t=y


@dataclass
class DMARCResult:
    """The outcome of one DMARC evaluation, with what it was based on."""

    result: DMARCResultName
    from_domain: str
    policy: Disposition = "none"  # what the domain owner asks for a failing message
    record: str = ""
    record_domain: str = ""
    organizational_domain: str = ""
    spf_aligned: bool = False
    dkim_aligned: bool = False
    aligned_dkim_domain: str = ""
    problem: str = ""
    evidence: list[str] = field(default_factory=list)


class _TemporaryError(Exception):
    pass


def parse_record(domain: str, text: str) -> DMARCRecord | None:
    """The record in ``text``, or None when it is not a DMARC record (RFC 9989 §4.7: v=DMARC1
    first; unknown tags ignored; a tag with an invalid value is as if absent)."""
    tags: dict[str, str] = {}
    parts = [p.strip() for p in text.split(";")]
    if not parts or re.fullmatch(r"v\s*=\s*DMARC1", parts[0]) is None:
        return None
    for part in parts[1:]:
        name, equals, value = part.partition("=")
        if equals:
            tags.setdefault(name.strip().lower(), value.strip())

    def policy(tag: str) -> Disposition | None:
        value = tags.get(tag, "").lower()
        for known in _POLICIES:
            if value == known:
                return known
        return None

    adkim: Literal["r", "s"] = "s" if tags.get("adkim", "").lower() == "s" else "r"
    aspf: Literal["r", "s"] = "s" if tags.get("aspf", "").lower() == "s" else "r"
    psd_value = tags.get("psd", "u").lower()
    psd: Literal["y", "n", "u"] = "y" if psd_value == "y" else "n" if psd_value == "n" else "u"
    return DMARCRecord(domain, text, policy("p"), policy("sp"), policy("np"), adkim, aspf, psd,
                       tags.get("t", "").lower() == "y")


def author_domain(header: bytes) -> str | None:
    """The domain of the one author in the From field of ``header`` (the header section), or
    None when there is not exactly one From with one address (RFC 9989 §4.4)."""
    text = header.decode("utf-8", "replace")
    text = re.sub(r"\r?\n[ \t]", " ", text)
    froms = [m.group(1) for m in re.finditer(r"^from[ \t]*:(.*)$", text,
                                             re.IGNORECASE | re.MULTILINE)]
    if len(froms) != 1:
        return None
    simple = _SIMPLE_FROM.fullmatch(froms[0])
    if simple is not None:  # "Name <a@b>" or "a@b": the common case, without the full parser
        domains = {simple.group(1).lower().removesuffix(".")}
    else:
        addresses = [a for _, a in getaddresses([froms[0]]) if a]
        domains = {a.rpartition("@")[2].strip().lower().removesuffix(".") for a in addresses}
    if len(domains) != 1:
        return None
    domain = domains.pop()
    if not _DOMAIN.fullmatch(domain) or not valid_name(domain):
        return None
    return domain


class DMARCChecker:
    """Evaluates DMARC for a message's author domain from its SPF and DKIM results."""

    def __init__(self, resolver: CachingResolver) -> None:
        self._resolver = resolver

    def check(self, from_domain: str | None, spf: SPFResult | None,
              dkim: Sequence[DKIMResult]) -> Deferred[DMARCResult]:
        """DMARC for ``from_domain`` (None: the message had no single author domain)."""
        return Deferred.fromCoroutine(self._check(from_domain, spf, dkim))

    async def _check(self, from_domain: str | None, spf: SPFResult | None,
                     dkim: Sequence[DKIMResult]) -> DMARCResult:
        if from_domain is None:
            return DMARCResult("permerror", "", problem="not exactly one author domain in From")
        domain = from_domain.lower().removesuffix(".")
        outcome = DMARCResult("none", domain)
        try:
            record = await self._policy_record(domain, outcome.evidence)
            if record is None:
                outcome.problem = "no DMARC record"
                return outcome
            outcome.record, outcome.record_domain = record.text, record.domain
            outcome.spf_aligned = await self._spf_aligned(outcome, spf, record)
            for result in dkim:
                if result.result == "pass" and await self._aligned(
                        outcome, result.domain, record.adkim):
                    outcome.dkim_aligned = True
                    outcome.aligned_dkim_domain = result.domain
                    break
            if outcome.spf_aligned or outcome.dkim_aligned:
                outcome.result = "pass"
                return outcome
            outcome.result = "fail"
            outcome.policy = await self._disposition(domain, record, outcome.evidence)
        except _TemporaryError as exc:
            outcome.result, outcome.problem = "temperror", str(exc)
        finally:
            outcome.evidence[:] = list(dict.fromkeys(outcome.evidence))  # the walks overlap
        return outcome

    # -- RFC 9989 §4.10: the tree walk --------------------------------------------------------

    async def _records(self, domain: str, evidence: list[str]) -> list[DMARCRecord]:
        name = f"_dmarc.{domain}"
        try:
            answer = await self._resolver.answer(name, dns.TXT)
        except DNSTemporaryError as exc:
            evidence.append(str(exc))
            raise _TemporaryError(f"DMARC record lookup: {exc.reason}") from None
        evidence.append(answer.describe())
        found = []
        for text in answer.texts():
            record = parse_record(domain, text.decode("utf-8", "replace"))
            if record is not None:
                found.append(record)
        # RFC 9989 §4.10.1 step 2: several records at one name are all discarded.
        return found if len(found) == 1 else []

    @staticmethod
    def _walk(domain: str) -> list[str]:
        """The names the tree walk asks after ``domain`` itself, in order (RFC 9989 §4.10.1
        steps 4-8): a name of 8 or more labels jumps to its last 7, then one label at a time."""
        labels = domain.split(".")
        labels = labels[-MAX_WALK_LABELS:] if len(labels) > MAX_WALK_LABELS else labels[1:]
        names = []
        while labels:
            names.append(".".join(labels))
            labels = labels[1:]
        return names

    async def _policy_record(self, domain: str, evidence: list[str]) -> DMARCRecord | None:
        """The policy record: the From domain's own, else the first found walking up
        (RFC 9989 §4.10.1); a psd=n record at the From domain stops the walk."""
        own = await self._records(domain, evidence)
        if own:
            return own[0]
        for name in self._walk(domain):
            found = await self._records(name, evidence)
            if found:
                return found[0]
        return None

    async def _organizational(self, domain: str, evidence: list[str]) -> str:
        """The Organizational Domain of ``domain`` (RFC 9989 §4.10.2): walking up, a psd=n
        record names it; a psd=y record names the domain one label below it; otherwise the
        record with the fewest labels; without any record, the domain itself."""
        chain = [domain, *self._walk(domain)]
        best: str | None = None
        below: str | None = None
        for name in chain:
            found = await self._records(name, evidence)
            if found:
                record = found[0]
                if record.psd == "n":
                    return name
                if record.psd == "y":
                    return below or name
                best = name
            below = name
        return best or domain

    async def _aligned(self, outcome: DMARCResult, other: str, mode: str) -> bool:
        """Identifier alignment (RFC 9989 §4.4): strict is equality; relaxed is the same
        Organizational Domain, walked for only when the names differ."""
        other = other.lower().removesuffix(".")
        if not other:
            return False
        if other == outcome.from_domain:
            return True
        if mode == "s":
            return False
        if not outcome.organizational_domain:
            outcome.organizational_domain = await self._organizational(outcome.from_domain,
                                                                       outcome.evidence)
        found = await self._organizational(other, outcome.evidence)
        return found == outcome.organizational_domain

    async def _spf_aligned(self, outcome: DMARCResult, spf: SPFResult | None,
                           record: DMARCRecord) -> bool:
        if spf is None or spf.result != "pass" or spf.identity != "mailfrom":
            return False
        return await self._aligned(outcome, spf.domain, record.aspf)

    async def _disposition(self, domain: str, record: DMARCRecord,
                           evidence: list[str]) -> Disposition:
        """What the owner asks for a failing message (RFC 9989 §4.7): p at the author domain
        itself; for a subdomain sp, or np when the subdomain does not exist; t=y lowers the
        request one step (reject to quarantine, quarantine to none)."""
        if record.domain == domain:
            policy = record.p
        elif await self._nonexistent(domain, evidence):
            policy = record.np or record.sp or record.p
        else:
            policy = record.sp or record.p
        chosen: Disposition = policy or "none"
        if record.testing:
            chosen = _POLICIES[max(0, _POLICIES.index(chosen) - 1)]
        return chosen

    async def _nonexistent(self, domain: str, evidence: list[str]) -> bool:
        """RFC 9989 §3.2.9: a name with no A, AAAA or MX records that does not exist."""
        for kind in (dns.A, dns.AAAA, dns.MX):
            try:
                answer = await self._resolver.answer(domain, kind)
            except DNSTemporaryError as exc:
                evidence.append(str(exc))
                raise _TemporaryError(f"existence of {domain}: {exc.reason}") from None
            evidence.append(answer.describe())
            if answer.exists:
                return False
        return True
