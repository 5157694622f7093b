"""The intake policy chain: what the SMTP session asks at connect, HELO, MAIL, RCPT and the end
of DATA, answered with accept (None) or a named Reply.

``IntakeDefence`` is one listener's defences, built from ``[defence]`` (and rebuilt when the
configuration is read again: the lists live there). ``ClientDefence`` is one connection's view:
it starts the DNS list and reverse-DNS lookups at connect, so by MAIL their answers are usually
there (cached answers cost nothing), and it keeps what later steps need. Each decision that is
not a plain accept is a journey event ("defence") and a log line, and what let the mail through
unchecked (a DNS list that timed out, a filter that was down) is written into the message as
``X-Mailsys-Defence`` so that a reader of the message sees it was not checked.

Order at MAIL: exempt networks skip everything; a blocked network or sender is refused; an
allowed network, sender or DNS-allowlisted client skips the rest; then the rate of messages;
then HELO, reverse DNS and the DNS lists add to one score (or refuse, by policy). Submission
(authenticated) has only its per-user message and recipient rates.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsys import replies
from mailsys.authn.iprev import IprevChecker, IprevResult
from mailsys.config import DefenceSection
from mailsys.defence.dnsbl import DNSLists, ListResult, parse_zones
from mailsys.defence.helo import helo_problem
from mailsys.defence.lists import Access, AccessLists, in_networks
from mailsys.defence.ratelimit import Buckets, client_network
from mailsys.dns.cache import CachingResolver
from mailsys.replies import Reply

log = Logger(namespace="mailsys.defence")

MARK_FIELD = b"X-Mailsys-Defence"
HOUR = 3600.0


class Emit(Protocol):
    """Where a client's decisions go: the session's journey (mailsys.journey.SessionJourney)."""

    def __call__(self, kind: str, queue_id: str | None = None, message_id: str | None = None,
                 **fields: Any) -> None: ...


@dataclass(frozen=True)
class MessageVerdict:
    """The end of DATA: a refusal, or header fields to add and whether the copy goes to Junk."""

    reply: Reply | None = None
    fields: bytes = b""
    junk: bool = False
    marks: tuple[str, ...] = ()  # checks that could not be made (written into the message)


ACCEPT = MessageVerdict()


class ContentFilter(Protocol):
    """A spam filter (mailsys.defence.spamfilter.RspamdFilter)."""

    def check(self, message: bytes, details: MessageDetails) -> Deferred[MessageVerdict]:
        """The verdict on ``message``; never fails (trouble is the configured failure verdict)."""


class TripletGate(Protocol):
    """Greylisting (mailsys.defence.greylist.Greylist)."""

    def check(self, client: str, sender: str, recipient: str) -> bool:
        """True when the triplet may pass now; False: greylisted (try later)."""


@dataclass(frozen=True)
class MessageDetails:
    """What the spam filter is told besides the message (rspamd's request headers)."""

    client_address: str
    helo: str
    sender: str
    recipients: tuple[str, ...]
    queue_id: str
    user: str | None = None


@dataclass
class _Rates:
    connections: Buckets
    messages: Buckets
    recipients: Buckets
    unknown: Buckets
    user_messages: Buckets
    user_recipients: Buckets


class IntakeDefence:
    """One listener's defences; ``client`` makes a connection's view."""

    def __init__(self, section: DefenceSection, clock: IReactorTime, *,
                 resolver: CachingResolver | None, hostname: str, inbound: bool,
                 greylist: TripletGate | None = None,
                 content_filter: ContentFilter | None = None) -> None:
        self._clock = clock
        self._resolver = resolver
        self.hostname = hostname
        self.inbound = inbound
        self.greylist = greylist
        self.content_filter = content_filter
        self.rates = self._rates(section)
        self.reconfigure(section)

    def _rates(self, section: DefenceSection) -> _Rates:
        clock, bound = self._clock, section.max_clients_tracked
        return _Rates(
            connections=Buckets(clock, section.connections_per_minute, 60.0, max_entries=bound),
            messages=Buckets(clock, section.messages_per_hour, HOUR, max_entries=bound),
            recipients=Buckets(clock, section.recipients_per_hour, HOUR, max_entries=bound),
            unknown=Buckets(clock, section.failed_recipients_per_hour, HOUR, max_entries=bound),
            user_messages=Buckets(clock, section.submission_messages_per_hour, HOUR,
                                  max_entries=bound),
            user_recipients=Buckets(clock, section.submission_recipients_per_hour, HOUR,
                                    max_entries=bound),
        )

    def reconfigure(self, section: DefenceSection) -> None:
        """Take a new ``[defence]`` section (the configuration was read again): new lists and
        policies at once; the counts so far are kept, with the new limits."""
        self.section = section
        self.enabled = section.enabled
        self.exempt = tuple(ipaddress.ip_network(n) for n in section.exempt_networks)
        self.access = AccessLists(allow_networks=section.allow_networks,
                                  block_networks=section.block_networks,
                                  allow_senders=section.allow_senders,
                                  block_senders=section.block_senders)
        self.dns_lists: DNSLists | None = None
        if self._resolver is not None and (section.dnsbl or section.dnswl):
            self.dns_lists = DNSLists(self._resolver, self._clock, parse_zones(section.dnsbl),
                                      section.dnswl, timeout=section.dnsbl_timeout)
        self.iprev: IprevChecker | None = None
        if self._resolver is not None and section.fcrdns != "none":
            self.iprev = IprevChecker(self._resolver)
        rates = self.rates
        for buckets, limit in ((rates.connections, section.connections_per_minute),
                               (rates.messages, section.messages_per_hour),
                               (rates.recipients, section.recipients_per_hour),
                               (rates.unknown, section.failed_recipients_per_hour),
                               (rates.user_messages, section.submission_messages_per_hour),
                               (rates.user_recipients, section.submission_recipients_per_hour)):
            buckets.set_limit(limit, section.max_clients_tracked)

    def client(self, address: str, emit: Emit, *,
               local_address: Callable[[], str] = str) -> ClientDefence:
        """The defences of one connection from ``address``; ``local_address`` says the
        address it reached (asked only when a HELO is an address literal)."""
        return ClientDefence(self, address, emit, local_address)


@dataclass(slots=True, eq=False)
class ClientDefence:
    """One connection's defences (see the module docstring for the order of checks)."""

    defence: IntakeDefence
    address: str
    emit: Emit
    local_address: Callable[[], str] = str
    network: str = ""
    exempt: bool = False
    allowed: bool = False  # an allowlist let the client skip the other checks
    blocked: bool = False
    helo: str = ""
    marks: list[str] = field(default_factory=list)
    _lists: Deferred[ListResult] | None = None
    _list_result: ListResult | None = None
    _iprev: Deferred[IprevResult] | None = None
    _iprev_result: IprevResult | None = None
    _scored: bool = False
    _transaction_allowed: bool = False
    _sender: str = ""
    _unknown: bool = False  # a recipient of this session was unknown: watch the harvest limit

    def __post_init__(self) -> None:
        defence = self.defence
        section = defence.section
        self.network = client_network(self.address, section.ipv4_prefix, section.ipv6_prefix)
        self.exempt = not defence.enabled or in_networks(self.address, defence.exempt)

    # --- steps --------------------------------------------------------------------------------

    def connected(self) -> Reply | None:
        """At connect: a refusal (421, the session closes) or None, and the lookups started."""
        defence = self.defence
        if self.exempt:
            return None
        rates = defence.rates
        if not rates.connections.hit(self.network):
            return self._refuse("ratelimit", "connections per minute", replies.RATE_CONNECTIONS)
        if not defence.inbound:
            return None
        if rates.unknown.over(self.network):
            return self._refuse("harvest", "unknown recipients per hour",
                                replies.RATE_UNKNOWN_RECIPIENTS)
        access = defence.access.client(self.address)
        if access is Access.BLOCK:
            self.blocked = True
            return None  # refused at MAIL: a 554 greeting leaves some clients retrying at once
        if access is Access.ALLOW:
            self.allowed = True
            self.decided("lists", "allow", "client network allowlisted")
            return None
        lists = defence.dns_lists
        if lists is not None:
            known = lists.cached(self.address)
            if known is not None:
                self._lists_answered(known)  # a client seen before: no lookup, no Deferred
            else:
                self._lists = lists.check(self.address)
                self._lists.addCallback(self._lists_answered)
        if defence.iprev is not None:
            self._iprev = defence.iprev.check(self.address)
            self._iprev.addCallbacks(self._iprev_answered, self._iprev_failed)
        return None

    def greeted(self, helo: str) -> None:
        """HELO or EHLO: the name is judged at MAIL, with the rest."""
        self.helo = helo

    def mail(self, sender: str, user: str | None) -> Reply | Deferred[Reply | None] | None:
        """MAIL FROM: a refusal or None (maybe later, when a DNS answer is awaited)."""
        defence = self.defence
        self._sender = sender
        self._transaction_allowed = False
        if user is not None:
            # Messages are counted at MAIL, as attempts (Postfix's anvil counts them so too).
            if not defence.rates.user_messages.hit(user):
                return self._refuse("ratelimit", "messages per hour of " + user,
                                    replies.RATE_USER_MESSAGES)
            return None
        if self.exempt or not defence.inbound:
            return None
        if self.blocked:
            return self._refuse("lists", "client network blocked", replies.CLIENT_BLOCKED)
        access = defence.access.sender(sender)
        if access is Access.BLOCK:
            return self._refuse("lists", "sender blocked", replies.SENDER_BLOCKED)
        if access is Access.ALLOW:
            self._transaction_allowed = True
            self.decided("lists", "allow", "sender allowlisted")
            return None
        if self.allowed:
            return None
        if not defence.rates.messages.hit(self.network):
            return self._refuse("ratelimit", "messages per hour", replies.RATE_MESSAGES)
        if self._scored:
            return self._score_refusal()
        waiting: list[Deferred[Any]] = []
        if self._lists is not None and self._list_result is None:
            waiting.append(self._lists)
        if self._iprev is not None and self._iprev_result is None:
            waiting.append(self._iprev)
        if not waiting:
            return self._score_refusal()
        return _all(waiting).addCallback(lambda _: self._score_refusal())

    def recipient(self, recipient: str, user: str | None) -> Reply | None:
        """RCPT TO, before the recipient is looked up: rates, harvest, greylisting."""
        defence = self.defence
        rates = defence.rates
        if user is not None:
            if not rates.user_recipients.hit(user):
                return self._refuse("ratelimit", "recipients per hour of " + user,
                                    replies.RATE_USER_RECIPIENTS)
            return None
        if self.exempt or not defence.inbound:
            return None
        # Over the limit at connect: refused then; so only a session with unknown recipients
        # of its own (or beside others of its network) can have crossed it since.
        if self._unknown and rates.unknown.over(self.network):
            return self._refuse("harvest", "unknown recipients per hour",
                                replies.RATE_UNKNOWN_RECIPIENTS)
        if self.allowed or self._transaction_allowed:
            return None
        if not rates.recipients.hit(self.network):
            return self._refuse("ratelimit", "recipients per hour", replies.RATE_RECIPIENTS)
        greylist = defence.greylist
        if greylist is not None and not greylist.check(self.address, self._sender, recipient):
            return self._refuse("greylist", "first delivery attempt", replies.GREYLISTED)
        return None

    def recipient_unknown(self) -> None:
        """A RCPT was refused as unknown: counted towards the harvest limit."""
        if self.exempt or not self.defence.inbound:
            return
        self._unknown = True
        if not self.defence.rates.unknown.hit(self.network):
            self.decided("harvest", "limit", "unknown recipients per hour")

    def message(self, message: bytes, details: Callable[[], MessageDetails],
                user: str | None) -> MessageVerdict | Deferred[MessageVerdict]:
        """The end of DATA: ask the spam filter (``details`` made only then), add the marks."""
        defence = self.defence
        if user is not None or self.exempt or not defence.inbound:
            return ACCEPT
        content_filter = defence.content_filter
        if content_filter is None or self.allowed or self._transaction_allowed:
            return self._marked(ACCEPT) if self.marks else ACCEPT
        return content_filter.check(message, details()).addCallback(self._filtered)

    # --- decisions ----------------------------------------------------------------------------

    def _filtered(self, verdict: MessageVerdict) -> MessageVerdict:
        for _ in verdict.marks:
            self.decided("spamfilter", "unchecked", "content filter unavailable",
                         **({"reply": str(verdict.reply)} if verdict.reply else {}))
        if verdict.reply is not None and not verdict.marks:
            self.decided("spamfilter", "refuse", "content filter", reply=str(verdict.reply))
        elif verdict.junk:
            self.decided("spamfilter", "junk", "content filter")
        return self._marked(verdict)

    def _marked(self, verdict: MessageVerdict) -> MessageVerdict:
        """The verdict with the session's marks (a DNS list that timed out) and this message's
        own (a filter that was down) written into the message."""
        marks = self.marks + [m for m in verdict.marks if m not in self.marks]
        if not marks:
            return verdict
        field_ = MARK_FIELD + b": " + "; ".join(marks).encode("ascii", "replace") + b"\r\n"
        return MessageVerdict(verdict.reply, field_ + verdict.fields, verdict.junk)

    def mark(self, text: str) -> None:
        """Note in the message that a check could not be made."""
        if text not in self.marks:
            self.marks.append(text)

    def _lists_answered(self, result: ListResult) -> ListResult:
        self._list_result = result
        for zone in result.failed:
            self.mark(f"dnsbl={zone} timeout")
            self.decided("dnsbl", "unchecked", f"{zone} gave no answer in time")
        if result.allowed_by is not None:
            self.allowed = True
            self.decided("dnswl", "allow", f"listed by {result.allowed_by}")
        return result

    def _iprev_answered(self, result: IprevResult) -> IprevResult:
        self._iprev_result = result
        return result

    def _iprev_failed(self, failure: Failure) -> None:
        log.failure("reverse DNS of {client} failed", failure, client=self.address)
        self._iprev_result = IprevResult("temperror", self.address, problem="lookup failed")

    def _score_refusal(self) -> Reply | None:
        """HELO, reverse DNS and DNS lists together: a refusal or None."""
        if self.allowed:
            return None
        self._scored = True
        section = self.defence.section
        score = 0.0
        reasons: list[str] = []
        if section.helo != "none" and self.helo:
            helo = self.helo
            # Our own address matters only for an address literal (or a bare address).
            local = self.local_address() if helo[:1] in "[0123456789" or ":" in helo else ""
            problem = helo_problem(helo, (self.defence.hostname,), (local,) if local else ())
            if problem is not None:
                if section.helo == "reject":
                    return self._refuse("helo", problem,
                                        replies.HELO_REJECTED.with_text(
                                            f"{replies.HELO_REJECTED.text}: {problem}"))
                score += section.helo_weight
                reasons.append(problem)
        iprev = self._iprev_result
        if (iprev is not None and iprev.result in ("fail", "permerror")
                and section.fcrdns != "none"):
            if section.fcrdns == "reject":
                return self._refuse("fcrdns", iprev.problem or "no confirmed name",
                                    replies.NO_REVERSE_DNS)
            score += section.fcrdns_weight
            reasons.append("no forward-confirmed reverse DNS")
        elif iprev is not None and iprev.result == "temperror":
            self.mark("fcrdns=temperror")
        lists = self._list_result
        if lists is not None and lists.score:
            score += lists.score
            reasons.append("listed by " + ", ".join(lists.listed_by))
        if score and score >= section.dnsbl_threshold:
            listed = lists.listed_by if lists is not None else ()
            text = (f"Service unavailable; client [{self.address}] blocked using "
                    f"{', '.join(listed)}" if listed else
                    f"Service unavailable; client [{self.address}] refused: "
                    + "; ".join(reasons))
            return self._refuse("dnsbl" if listed else "score", "; ".join(reasons),
                                replies.CLIENT_LISTED.with_text(text), score=score)
        if score:
            self.decided("score", "accept", "; ".join(reasons), score=score)
        return None

    def _refuse(self, check: str, reason: str, reply: Reply, **fields: Any) -> Reply:
        self.decided(check, "refuse", reason, reply=str(reply), **fields)
        return reply

    def decided(self, check: str, action: str, reason: str, **fields: Any) -> None:
        log.info("defence {check}: {action} client={client}: {reason}", check=check,
                 action=action, client=self.address, reason=reason)
        self.emit("defence", check=check, action=action, reason=reason, client=self.address,
                  **fields)


def _all(waiting: Sequence[Deferred[Any]]) -> Deferred[None]:
    """Fires when every Deferred of ``waiting`` has (they never fail: errbacks are in place)."""
    out: Deferred[None] = Deferred()
    remaining = [len(waiting)]

    def one(result: object) -> object:
        remaining[0] -= 1
        if remaining[0] == 0:
            out.callback(None)
        return result

    for d in waiting:
        d.addBoth(one)
    return out

