"""SPF (RFC 7208): may this IP address send mail for this domain? check_host() on our async
caching resolver, with every mechanism and modifier, macros, the 10-lookup and 2-void-lookup
limits, and temperror/permerror.

A result keeps its evidence: each DNS answer used, the term that decided, the lookup counts.
Nothing here raises for bad input: a malformed or looping record is a permerror, a DNS failure a
temperror.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from twisted.internet.defer import Deferred
from twisted.names import dns

from mailsys.dns import Answer, CachingResolver, DNSTemporaryError, ip_address, reverse_name
from mailsys.dns.cache import valid_name

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
SPFResultName = Literal["none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"]

# RFC 7208 §4.6.4: at most 10 terms that cause DNS queries, at most 2 of them void.
MAX_LOOKUPS = 10
MAX_VOID_LOOKUPS = 2
# RFC 7208 §4.6.4: an "mx" term looks at most at 10 exchanges, a "ptr" term at 10 names.
MAX_MX = 10
MAX_PTR = 10
# RFC 7208 §7.3: an expanded domain name is cut from the left to 253 octets.
MAX_DOMAIN = 253
# Include and redirect recursion; the lookup limit bounds it first, this is a second fence.
MAX_DEPTH = 20

DEFAULT_EXPLANATION = "See RFC 7208 section 8.4"

_QUALIFIERS: dict[str, SPFResultName] = {
    "+": "pass", "-": "fail", "~": "softfail", "?": "neutral", "": "pass",
}
_MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})

# RFC 7208 §12: the ABNF, piece by piece.
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9\-_.]*)=(.*)", re.S)
_DIRECTIVE = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9]*)(.*)", re.S)
_CIDR4 = r"(?:0|[1-9][0-9]?)"
_CIDR6 = r"(?:0|[1-9][0-9]{0,2})"
_DUAL_CIDR = re.compile(rf"(?::(?P<spec>.+?))?(?:/(?P<c4>{_CIDR4}))?(?://(?P<c6>{_CIDR6}))?",
                        re.S)
_IP4 = re.compile(rf":(?P<net>[0-9]{{1,3}}(?:\.[0-9]{{1,3}}){{3}})(?:/(?P<c>{_CIDR4}))?")
_IP6 = re.compile(rf":(?P<net>[0-9A-Fa-f:.]+)(?:/(?P<c>{_CIDR6}))?")
_MACRO = re.compile(r"%\{(?P<letter>[A-Za-z])(?P<digits>[0-9]*)(?P<reverse>[rR]?)"
                    r"(?P<delims>[.\-+,/_=]*)\}|%%|%_|%-")
_ENDS_WITH_MACRO = re.compile(r"(?:%\{[^}]*\}|%%|%_|%-)\Z")
_TOPLABEL = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9\-]*[A-Za-z0-9]")
_DOMAIN_LETTERS = "slodiphv"
_EXPLAIN_LETTERS = _DOMAIN_LETTERS + "crt"


@dataclass
class SPFResult:
    """The outcome of one check_host(), with what it was based on."""

    result: SPFResultName
    identity: Literal["mailfrom", "helo"]
    domain: str
    sender: str
    ip: str
    mechanism: str = ""  # the term that decided ("ip4:192.0.2.0/24", "-all", "default")
    explanation: str = ""  # RFC 7208 §6.2, for a fail only
    problem: str = ""  # why permerror or temperror
    evidence: list[str] = field(default_factory=list)
    lookups: int = 0
    void_lookups: int = 0


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


@dataclass
class _Mechanism:
    qualifier: str
    name: str
    text: str
    spec: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    cidr4: int = 32
    cidr6: int = 128


@dataclass
class _Record:
    mechanisms: list[_Mechanism]
    redirect: str | None
    exp: str | None


@dataclass
class _Context:
    ip: IP
    sender: str
    local: str
    sender_domain: str
    helo: str
    lookups: int = 0
    voids: int = 0
    evidence: list[str] = field(default_factory=list)
    validated_name: str | None = None


class SPFChecker:
    """check_host() for the MAIL FROM and HELO identities (RFC 7208 §2.3, §2.4, §4)."""

    def __init__(
        self,
        resolver: CachingResolver,
        *,
        receiver: str = "unknown",
        now: Callable[[], float] | None = None,
        default_explanation: str = DEFAULT_EXPLANATION,
        max_lookups: int = MAX_LOOKUPS,
        max_void_lookups: int = MAX_VOID_LOOKUPS,
    ) -> None:
        self._resolver = resolver
        self.receiver = receiver
        self._now = now or (lambda: 0.0)
        self.default_explanation = default_explanation
        self.max_lookups = max_lookups
        self.max_void_lookups = max_void_lookups

    def check_mailfrom(self, ip: str, mailfrom: str, helo: str) -> Deferred[SPFResult]:
        """The MAIL FROM identity; a null reverse-path is checked as postmaster@HELO
        (RFC 7208 §2.4)."""
        sender = mailfrom if mailfrom else f"postmaster@{helo}"
        return self.check_host(ip, sender, helo, "mailfrom")

    def check_helo(self, ip: str, helo: str) -> Deferred[SPFResult]:
        """The HELO identity (RFC 7208 §2.3): the domain of the HELO/EHLO argument."""
        return self.check_host(ip, f"postmaster@{helo}", helo, "helo")

    def check_host(self, ip: str, sender: str, helo: str,
                   identity: Literal["mailfrom", "helo"] = "mailfrom") -> Deferred[SPFResult]:
        """check_host(<ip>, <domain of sender>, <sender>) of RFC 7208 §4."""
        return Deferred.fromCoroutine(self._check(ip, sender, helo, identity))

    async def _check(self, ip_text: str, sender: str, helo: str,
                     identity: Literal["mailfrom", "helo"]) -> SPFResult:
        local, at, domain = sender.rpartition("@")
        if not at:
            local, domain = "", sender
        # RFC 7208 §4.3: no local-part means postmaster.
        local = local or "postmaster"
        domain = domain.lower().removesuffix(".")
        try:
            ip: IP = ip_address(ip_text.strip("[]"))
        except ValueError:
            return SPFResult("permerror", identity, domain, sender, ip_text,
                             problem=f"not an IP address: {ip_text!r}")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # RFC 7208 §5: an IPv4-mapped address is the IPv4 address
        context = _Context(ip, f"{local}@{domain}", local, domain, helo)
        outcome = SPFResult("none", identity, domain, f"{local}@{domain}", str(ip))
        try:
            if not _checkable(domain):
                outcome.problem = "not a fully qualified domain name"
                return outcome
            result, mechanism, explanation = await self._check_host(context, domain, 0)
            outcome.result = result
            outcome.mechanism = mechanism
            outcome.explanation = explanation
        except _PermError as exc:
            outcome.result, outcome.problem = "permerror", str(exc)
        except _TempError as exc:
            outcome.result, outcome.problem = "temperror", str(exc)
        outcome.evidence = context.evidence
        outcome.lookups = context.lookups
        outcome.void_lookups = context.voids
        return outcome

    # -- check_host ------------------------------------------------------------------------------

    async def _check_host(self, context: _Context, domain: str,
                          depth: int) -> tuple[SPFResultName, str, str]:
        if depth > MAX_DEPTH:
            raise _PermError("include or redirect nested too deeply")
        # RFC 7208 §4.3: a malformed domain, or one that does not exist, has no policy.
        if not _checkable(domain):
            return "none", "", ""
        text = await self._record(context, domain)
        if text is None:
            return "none", "", ""
        record = _parse(text)
        for mechanism in record.mechanisms:
            if await self._matches(context, domain, mechanism, depth):
                result = _QUALIFIERS[mechanism.qualifier]
                explanation = ""
                if result == "fail":
                    explanation = await self._explain(context, domain, record.exp)
                return result, mechanism.text, explanation
        if record.redirect is not None:
            # RFC 7208 §6.1: only when no mechanism matched; counts as a lookup; a target
            # without a record is a permerror.
            self._count(context)
            target = await self._expand_domain(context, record.redirect, domain)
            redirected = await self._check_host(context, target, depth + 1)
            if redirected[0] == "none":
                raise _PermError(f"redirect={target} has no SPF record")
            return redirected
        return "neutral", "default", ""  # RFC 7208 §4.7

    async def _record(self, context: _Context, domain: str) -> str | None:
        """The one SPF record of ``domain`` (RFC 7208 §4.4, §4.5), or None."""
        answer = await self._ask(context, domain, dns.TXT)
        found = [text for text in answer.texts()
                 if text[:6].lower() == b"v=spf1" and (len(text) == 6 or text[6:7] == b" ")]
        if not found:
            return None
        if len(found) > 1:
            raise _PermError(f"{domain} has {len(found)} SPF records")
        # Latin-1 maps each octet to one character; anything outside US-ASCII then fails the
        # syntax check as the RFC 7208 §12 ABNF requires.
        return found[0].decode("latin-1")

    def _count(self, context: _Context) -> None:
        context.lookups += 1
        if context.lookups > self.max_lookups:
            raise _PermError(f"more than {self.max_lookups} DNS-querying terms")

    def _void(self, context: _Context, answer: Answer) -> None:
        if answer.void:
            context.voids += 1
            if context.voids > self.max_void_lookups:
                raise _PermError(f"more than {self.max_void_lookups} void lookups")

    async def _ask(self, context: _Context, name: str, type: int) -> Answer:
        try:
            answer = await self._resolver.answer(name, type)
        except DNSTemporaryError as exc:
            context.evidence.append(f"{exc}")
            raise _TempError(str(exc)) from None
        context.evidence.append(answer.describe())
        return answer

    async def _addresses(self, context: _Context, name: str) -> Answer:
        return await self._ask(context, name,
                               dns.A if context.ip.version == 4 else dns.AAAA)

    # -- mechanisms ------------------------------------------------------------------------------

    async def _matches(self, context: _Context, domain: str, mech: _Mechanism,
                       depth: int) -> bool:
        ip = context.ip
        if mech.name == "all":
            return True
        if mech.name in ("ip4", "ip6"):
            assert mech.network is not None
            return ip.version == mech.network.version and ip in mech.network
        self._count(context)
        target = (await self._expand_domain(context, mech.spec, domain)
                  if mech.spec is not None else domain)
        if mech.name == "include":
            result, _, _ = await self._check_host(context, target, depth + 1)
            # RFC 7208 §5.2: the table of include results.
            if result == "none":
                raise _PermError(f"include:{target} has no SPF record")
            return result == "pass"
        if mech.name == "exists":
            # RFC 7208 §5.7: always an A query, whatever the connection's family.
            answer = await self._ask(context, target, dns.A)
            self._void(context, answer)
            return not answer.void
        if mech.name == "a":
            answer = await self._addresses(context, target)
            self._void(context, answer)
            return _in_any(ip, answer.addresses(), mech)
        if mech.name == "mx":
            answer = await self._ask(context, target, dns.MX)
            self._void(context, answer)
            exchanges = [name for _, name in sorted(answer.exchanges()) if name]
            if len(exchanges) > MAX_MX:
                raise _PermError(f"mx:{target} has more than {MAX_MX} exchanges")
            for exchange in exchanges:
                addresses = await self._addresses(context, exchange)
                if _in_any(ip, addresses.addresses(), mech):
                    return True
            return False
        if mech.name == "ptr":
            names = await self._validated_names(context, void_counts=True)
            return any(name == target or name.endswith("." + target) for name in names)
        raise _PermError(f"unknown mechanism {mech.name}")  # pragma: no cover - parse refuses

    async def _validated_names(self, context: _Context, void_counts: bool = False) -> list[str]:
        """The names of the client's PTR records whose addresses include it (RFC 7208 §5.5).

        A DNS error on the PTR query makes no names; one on a name's addresses skips that name.
        """
        try:
            answer = await self._resolver.answer(reverse_name(str(context.ip)), dns.PTR)
        except DNSTemporaryError as exc:
            context.evidence.append(str(exc))
            return []
        context.evidence.append(answer.describe())
        if void_counts:
            self._void(context, answer)
        validated: list[str] = []
        for name in answer.names()[:MAX_PTR]:
            try:
                addresses = await self._addresses(context, name)
            except _TempError:
                continue
            if any(ip_address(a) == context.ip for a in addresses.addresses()):
                validated.append(name)
        return validated

    # -- explanation -----------------------------------------------------------------------------

    async def _explain(self, context: _Context, domain: str, exp: str | None) -> str:
        """RFC 7208 §6.2: the explanation of a fail; any trouble gives the default one."""
        if exp is None:
            return self.default_explanation
        try:
            target = await self._expand_domain(context, exp, domain)
            answer = await self._ask(context, target, dns.TXT)
        except (_PermError, _TempError):
            return self.default_explanation
        texts = answer.texts()
        if len(texts) != 1:
            return self.default_explanation
        try:
            text = texts[0].decode("ascii")
            return await self._expand(context, text, domain, explain=True)
        except (UnicodeDecodeError, _PermError, _TempError):
            return self.default_explanation

    # -- macros (RFC 7208 §7) --------------------------------------------------------------------

    async def _expand_domain(self, context: _Context, spec: str, domain: str) -> str:
        expanded = (await self._expand(context, spec, domain, explain=False)).removesuffix(".")
        # RFC 7208 §7.3: cut whole labels from the left until the name fits.
        while len(expanded) > MAX_DOMAIN and "." in expanded:
            expanded = expanded.split(".", 1)[1]
        return expanded.lower()

    async def _expand(self, context: _Context, text: str, domain: str, explain: bool) -> str:
        out: list[str] = []
        position = 0
        for match in _MACRO.finditer(text):
            out.append(_literal(text[position:match.start()]))
            position = match.end()
            token = match.group(0)
            if token == "%%":
                out.append("%")
            elif token == "%_":
                out.append(" ")
            elif token == "%-":
                out.append("%20")
            else:
                out.append(await self._macro(context, match, domain, explain))
        out.append(_literal(text[position:]))
        return "".join(out)

    async def _macro(self, context: _Context, match: re.Match[str], domain: str,
                     explain: bool) -> str:
        letter = match.group("letter")
        key = letter.lower()
        if key not in (_EXPLAIN_LETTERS if explain else _DOMAIN_LETTERS):
            raise _PermError(f"macro letter {letter!r} not allowed here")
        ip = context.ip
        if key == "s":
            value = context.sender
        elif key == "l":
            value = context.local
        elif key == "o":
            value = context.sender_domain
        elif key == "d":
            value = domain
        elif key == "i":
            value = (str(ip) if ip.version == 4
                     else ".".join(ip.exploded.replace(":", "")))
        elif key == "p":
            value = await self._p_macro(context, domain)
        elif key == "v":
            value = "in-addr" if ip.version == 4 else "ip6"
        elif key == "h":
            value = context.helo
        elif key == "c":
            value = str(ip)
        elif key == "r":
            value = self.receiver
        else:  # "t"
            value = str(int(self._now()))
        digits, reverse, delimiters = (match.group("digits"), match.group("reverse"),
                                       match.group("delims") or ".")
        parts = re.split("[" + re.escape(delimiters) + "]", value)
        if reverse:
            parts.reverse()
        if digits:
            count = int(digits)
            if count == 0:
                raise _PermError("a macro keeps zero labels")  # RFC 7208 §7.3
            parts = parts[-count:]
        value = ".".join(parts)
        if letter.isupper():
            # RFC 7208 §7.3: upper-case macro letters are URL-escaped (RFC 3986 unreserved).
            value = urllib.parse.quote(value, safe="-._~")
        return value

    async def _p_macro(self, context: _Context, domain: str) -> str:
        """The validated domain name of the client (RFC 7208 §7.3): the target domain itself
        or a subdomain if validated, else any validated name, else "unknown"."""
        if context.validated_name is None:
            names = await self._validated_names(context)
            preferred = [n for n in names if n == domain or n.endswith("." + domain)]
            context.validated_name = (preferred or names or ["unknown"])[0]
        return context.validated_name


# -- parsing ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _parse(text: str) -> _Record:
    """A record's terms (RFC 7208 §4.6, §12); any syntax error anywhere is a permerror before
    anything is evaluated (§4.6)."""
    mechanisms: list[_Mechanism] = []
    modifiers: dict[str, str] = {}
    for term in text[6:].split(" "):
        if not term:
            continue  # RFC 7208 §4.6.1: terms are separated by one or more spaces
        modifier = _MODIFIER.fullmatch(term)
        if modifier is not None:
            name, value = modifier.group(1).lower(), modifier.group(2)
            _check_macro_string(value, term)
            if name in ("redirect", "exp"):
                if name in modifiers:
                    raise _PermError(f"{name}= given twice")  # RFC 7208 §6
                _check_domain_spec(value, term)
                modifiers[name] = value
            continue  # RFC 7208 §6: unknown modifiers are ignored
        mechanisms.append(_mechanism(term))
    # RFC 7208 §6.1: redirect is ignored when the record has an "all".
    redirect = (None if any(m.name == "all" for m in mechanisms)
                else modifiers.get("redirect"))
    return _Record(mechanisms, redirect, modifiers.get("exp"))


def _mechanism(term: str) -> _Mechanism:
    directive = _DIRECTIVE.fullmatch(term)
    if directive is None:
        raise _PermError(f"malformed term {term!r}")
    qualifier, name, rest = directive.group(1), directive.group(2).lower(), directive.group(3)
    if name not in _MECHANISMS:
        raise _PermError(f"unknown mechanism {term!r}")
    mech = _Mechanism(qualifier, name, term)
    if name == "all":
        if rest:
            raise _PermError(f"'all' takes no argument: {term!r}")
    elif name in ("include", "exists"):
        if not rest.startswith(":") or len(rest) == 1:
            raise _PermError(f"{name} needs a domain: {term!r}")
        mech.spec = rest[1:]
    elif name == "ptr":
        if rest:
            if not rest.startswith(":") or len(rest) == 1:
                raise _PermError(f"malformed ptr: {term!r}")
            mech.spec = rest[1:]
    elif name in ("a", "mx"):
        dual = _DUAL_CIDR.fullmatch(rest)
        if dual is None:
            raise _PermError(f"malformed {name}: {term!r}")
        mech.spec = dual.group("spec")
        if dual.group("c4") is not None:
            mech.cidr4 = int(dual.group("c4"))
        if dual.group("c6") is not None:
            mech.cidr6 = int(dual.group("c6"))
        if mech.cidr4 > 32 or mech.cidr6 > 128:
            raise _PermError(f"prefix length out of range: {term!r}")
    elif name == "ip4":
        match = _IP4.fullmatch(rest)
        try:
            if match is None:
                raise ValueError(rest)
            prefix = int(match.group("c") or 32)
            if prefix > 32:
                raise ValueError(prefix)
            mech.network = ipaddress.IPv4Network(f"{match.group('net')}/{prefix}", strict=False)
        except ValueError:
            raise _PermError(f"malformed ip4: {term!r}") from None
    else:  # ip6
        match = _IP6.fullmatch(rest)
        try:
            if match is None:
                raise ValueError(rest)
            prefix = int(match.group("c") or 128)
            if prefix > 128:
                raise ValueError(prefix)
            mech.network = ipaddress.IPv6Network(f"{match.group('net')}/{prefix}", strict=False)
        except ValueError:
            raise _PermError(f"malformed ip6: {term!r}") from None
    if mech.spec is not None:
        _check_macro_string(mech.spec, term)
        _check_domain_spec(mech.spec, term)
    return mech


def _check_macro_string(text: str, term: str) -> None:
    """RFC 7208 §7.1: literals are visible US-ASCII other than "%"; "%" starts a macro."""
    rest = _MACRO.sub("", text)
    if any(not 0x21 <= ord(c) <= 0x7E or c == "%" for c in rest):
        raise _PermError(f"invalid character in {term!r}")
    for match in _MACRO.finditer(text):
        letter = match.group("letter")
        if letter is not None and letter.lower() not in _DOMAIN_LETTERS:
            raise _PermError(f"macro letter {letter!r} not allowed in {term!r}")


def _literal(text: str) -> str:
    if "%" in text:
        raise _PermError("a '%' that starts no macro")  # RFC 7208 §7.1
    return text


def _check_domain_spec(spec: str, term: str) -> None:
    """RFC 7208 §7.1: domain-spec = macro-string domain-end; domain-end is "." toplabel ["."]
    or a macro."""
    if _ENDS_WITH_MACRO.search(spec):
        return
    name = spec.removesuffix(".")
    _, dot, toplabel = name.rpartition(".")
    if not dot or not _TOPLABEL.fullmatch(toplabel):
        raise _PermError(f"invalid domain in {term!r}")


def _checkable(domain: str) -> bool:
    """RFC 7208 §4.3: a multi-label domain name with valid labels."""
    return "." in domain and valid_name(domain) and not domain.startswith("[")


@functools.lru_cache(maxsize=4096)
def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


def _in_any(ip: IP, addresses: list[str], mech: _Mechanism) -> bool:
    prefix = mech.cidr4 if ip.version == 4 else mech.cidr6
    for address in addresses:
        network = _network(f"{address}/{prefix}")
        if network.version == ip.version and ip in network:
            return True
    return False
