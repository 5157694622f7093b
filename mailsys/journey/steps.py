"""What each kind of journey event means, in words, and the rule behind it with its RFC section.

This is the catalog ``mailsys trace`` (and later the web page) renders events with; the rooms
only emit plain fields. An emitter may pass ``rule=`` to name a more precise rule than the
catalog's (the relay knows it tried mx2 because mx1 refused). Fields each kind carries:

========================  =====================================================================
smtp.connect              client, rdns, listener (smtp, submission, submissions)
smtp.tls                  tls (version and cipher), implicit (TLS from the first byte)
smtp.ehlo                 command (EHLO/HELO), name, reply
smtp.auth                 user, mechanism, reply (never the SASL exchange)
smtp.mail / smtp.rcpt     sender / recipient, reply (refused ones too), txn
smtp.data                 command (DATA/BDAT), size, reply, txn, subject (as sent), and the
                          queue id once queued
smtp.close                reason (lost connection after DATA, closed without QUIT), messages;
                          not emitted for a session that ends with QUIT
defence                   check (ratelimit, harvest, pregreet, dnsbl, dnswl, helo, fcrdns, lists,
                          greylist, spamfilter, score), action (refuse, allow, accept, junk,
                          unchecked, limit), reason, client, reply, score
spool.commit              sender, recipients, size: the message is durable; routes: for each
                          recipient the routing decision, shown as a step of its own
route                     recipient, original (as in RCPT TO), target (local, relay), mailbox
relay.mx                  domain, answers ("10 mx1.b.test" ...), implicit, error
relay.connect             host, address, port, preference, error, after (why the host before
                          it failed)
relay.tls                 host, tls (version and cipher, "" for none), verified, policy, error
relay.reply               host, command, reply
authn.iprev               result, ip, name (the confirmed one), problem, evidence (DNS answers)
authn.spf                 result, identity (mailfrom, helo), domain, sender, ip, mechanism (the
                          term that decided), explanation, problem, lookups, void_lookups,
                          evidence
authn.dkim                result (none: no signature), domain (d=), selector (s=), algorithm,
                          identity (i=), header_b, key_bits, problem, evidence; one per signature
authn.dmarc               result, from_domain, policy, record, record_domain,
                          organizational_domain, spf_aligned, dkim_aligned, aligned_dkim_domain,
                          problem, evidence
authn.verdict             action (accept, junk, defer, reject), reason, junk (recipients), reply,
                          removed_forged_results
authn.sign                domain (of From), signed, signing_domains, selectors, algorithms,
                          problem (why unsigned)
delivery.attempt          recipient, agent, status (delivered, deferred, failed), host, reply,
                          next_attempt (epoch seconds)
delivery.maildir          recipient, mailbox, folder, file, written (False: found from before a
                          crash)
dsn.created               parent, relation (bounce, delay), recipients
pop3.retr / pop3.dele     user, number, size
imap.fetch                user, folder, uid, item
imap.flags                user, folder, uid, flags, operation
imap.move                 user, folder, to, uid
imap.expunge              user, folder, uid
========================  =====================================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mailsys.journey.events import JourneyEvent

Fields = Mapping[str, Any]


@dataclass(frozen=True)
class Step:
    """One line of a journey: what happened, and the rule behind it (may be empty)."""

    text: str
    rule: str


# RFC 3463 §3.1-3.8: the subject of an enhanced status code is its second number.
_ENHANCED_SUBJECTS = {
    "1": ("address", "RFC 3463 §3.2"),
    "2": ("mailbox", "RFC 3463 §3.3"),
    "3": ("mail system", "RFC 3463 §3.4"),
    "4": ("network or routing", "RFC 3463 §3.5"),
    "5": ("protocol", "RFC 3463 §3.6"),
    "6": ("content", "RFC 3463 §3.7"),
    "7": ("security or policy", "RFC 3463 §3.8"),
}


def _f(fields: Fields, name: str, default: str = "?") -> str:
    value = fields.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or default
    return str(value)


def outcome(reply: str) -> str:
    """'accepted', 'refused for now' or 'refused' from an SMTP reply's first digit.

    RFC 5321 §4.2.1: 2yz completes, 3yz asks for more, 4yz is transient, 5yz is permanent.
    """
    first = reply[:1]
    return {"2": "accepted", "3": "continue", "4": "refused for now",
            "5": "refused"}.get(first, "answered")


def reply_rule(command_rule: str, reply: str) -> str:
    """``command_rule``, plus the enhanced status code's subject when the reply refuses."""
    parts = reply.split(" ", 2)
    if reply[:1] in ("4", "5") and len(parts) > 1 and parts[1].count(".") == 2:
        subject = _ENHANCED_SUBJECTS.get(parts[1].split(".")[1])
        if subject is not None:
            return f"{command_rule}; {parts[1]}: {subject[0]} status, {subject[1]}"
    return command_rule


def _connect(f: Fields) -> Step:
    listener = _f(f, "listener", "smtp")
    rdns = f.get("rdns")
    who = f"{_f(f, 'client')} ({rdns})" if rdns else _f(f, "client")
    rule = {"submission": "message submission, RFC 6409 §3.1",
            "submissions": "submission over implicit TLS, RFC 8314 §3.3"}.get(
        listener, "SMTP session opening, RFC 5321 §3.1")
    return Step(f"client {who} connected to {listener}", rule)


def _tls(f: Fields) -> Step:
    how = "TLS from the first byte" if f.get("implicit") else "STARTTLS"
    rule = "RFC 8314 §3.3" if f.get("implicit") else "RFC 3207 §4"
    return Step(f"{how}: {_tls_text(f)}", rule)


def _tls_text(f: Fields) -> str:
    described = f.get("tls")
    if isinstance(described, str) and described:
        return described.removeprefix("using ")
    return f"{_f(f, 'version')} {_f(f, 'cipher', '')}".rstrip()


def _ehlo(f: Fields) -> Step:
    command = _f(f, "command", "EHLO")
    return Step(f"{command} {_f(f, 'name')} {_reply(f)}".rstrip(), "RFC 5321 §4.1.1.1")


def _auth(f: Fields) -> Step:
    reply = str(f.get("reply") or "")
    if reply.startswith("235") or (not reply and f.get("user")):
        return Step(f"authenticated as {_f(f, 'user')} with {_f(f, 'mechanism')}",
                    "SMTP AUTH, RFC 4954 §4")
    return Step(f"authentication with {_f(f, 'mechanism')} failed {_reply(f)}".rstrip(),
                reply_rule("RFC 4954 §6", reply))


def _mail(f: Fields) -> Step:
    reply = str(f.get("reply") or "")
    return Step(f"MAIL FROM:<{_f(f, 'sender', '')}> {outcome(reply)} {_reply(f)}".rstrip(),
                reply_rule("RFC 5321 §4.1.1.2", reply))


def _rcpt(f: Fields) -> Step:
    reply = str(f.get("reply") or "")
    return Step(f"RCPT TO:<{_f(f, 'recipient', '')}> {outcome(reply)} {_reply(f)}".rstrip(),
                reply_rule("RFC 5321 §4.1.1.3", reply))


def _data(f: Fields) -> Step:
    command = _f(f, "command", "DATA")
    reply = str(f.get("reply") or "")
    rule = "CHUNKING, RFC 3030 §2" if command == "BDAT" else "RFC 5321 §4.1.1.4"
    size = f.get("size")
    sized = f" {size} bytes" if size is not None else ""
    return Step(f"{command}{sized} {outcome(reply)} {_reply(f)}".rstrip(),
                reply_rule(rule, reply))


def _close(f: Fields) -> Step:
    reason = _f(f, "reason", "QUIT")
    return Step(f"session closed ({reason})", "RFC 5321 §4.1.1.10" if reason == "QUIT" else "")


def _commit(f: Fields) -> Step:
    size = f.get("size")
    sized = f", {size} bytes" if size is not None else ""
    return Step(f"queued{sized}: message and envelope fsync'd before the 250 reply",
                "the receiver takes responsibility on 250, RFC 5321 §6.1")


def _route(f: Fields) -> Step:
    recipient = _f(f, "recipient")
    target = _f(f, "target")
    original = f.get("original")
    domain = _f(f, "domain", recipient.rpartition("@")[2] or "?")
    if isinstance(original, str) and original and original.lower() != recipient.lower():
        via = "relay to " + domain if target == "relay" else \
            "local mailbox " + _f(f, "mailbox", recipient)
        return Step(f"{original} expanded to {recipient}: {via}",
                    "aliases and lists, RFC 5321 §3.9")
    if target == "local":
        return Step(f"{recipient}: local mailbox {_f(f, 'mailbox', recipient)}",
                    "a local domain's mailbox, RFC 5321 §2.3.5")
    if target == "alias":
        return Step(f"{recipient}: alias, expanded to {_f(f, 'targets')}",
                    "aliases, RFC 5321 §3.9.1")
    if target == "relay":
        via = f" via {f['nexthop']}" if f.get("nexthop") else ""
        return Step(f"{recipient}: relay to {domain}{via}",
                    "another domain's mail goes to its MX, RFC 5321 §5.1")
    return Step(f"{recipient}: {target}", "")


def _mx(f: Fields) -> Step:
    domain = _f(f, "domain")
    if f.get("error"):
        return Step(f"MX lookup for {domain} failed: {f['error']}", "RFC 5321 §5.1")
    if f.get("implicit"):
        return Step(f"{domain} has no MX: its address records are the implicit MX "
                    f"({_f(f, 'answers')})", "implicit MX, RFC 5321 §5.1")
    return Step(f"MX for {domain}: {_f(f, 'answers')}",
                "lowest preference first, RFC 5321 §5.1")


def _relay_connect(f: Fields) -> Step:
    host = _f(f, "host")
    address = f" [{f['address']}]" if f.get("address") else ""
    preference = f" (preference {f['preference']})" if f.get("preference") is not None else ""
    if f.get("error"):
        return Step(f"could not use {host}{address}{preference}: {f['error']}",
                    "try the next address or MX host, RFC 5321 §5.1")
    if f.get("after"):
        return Step(f"tried {host}{address}{preference} after the one before failed "
                    f"({f['after']})", "next MX host, RFC 5321 §5.1")
    return Step(f"connected to {host}{address}{preference}", "RFC 5321 §5.1")


def _relay_tls(f: Fields) -> Step:
    host = _f(f, "host")
    policy = f.get("policy")
    if f.get("error"):
        return Step(f"TLS with {host} failed: {f['error']}", "RFC 3207 §4.1")
    if "tls" in f and not f.get("tls"):
        return Step(f"no TLS with {host} (policy {policy or 'opportunistic'})",
                    "opportunistic TLS falls back to plaintext, RFC 7435 §3"
                    if policy != "none" else "")
    verified = "certificate verified" if f.get("verified") else "certificate not verified"
    rule = ("RFC 3207 §4.1; the name checked as in RFC 6125 §6" if f.get("verified")
            else "RFC 3207 §4.1; opportunistic, RFC 7435 §3")
    return Step(f"TLS with {host}: {_tls_text(f)}, {verified}", rule)


def _relay_reply(f: Fields) -> Step:
    reply = str(f.get("reply") or "")
    return Step(f"{_f(f, 'host')} answered {_f(f, 'command', '')} with {reply}".replace(
        "  ", " "), reply_rule("reply codes, RFC 5321 §4.2", reply))


def _attempt(f: Fields) -> Step:
    recipient = _f(f, "recipient")
    status = _f(f, "status")
    # A local delivery's "host" is the Maildir writer itself: the maildir step says where.
    host = f" at {f['host']}" if f.get("host") and f.get("agent") != "local" else ""
    reply = str(f.get("reply") or "")
    said = f": {reply}" if reply else ""
    if status == "deferred":
        when = f.get("next_attempt")
        retry = f", next attempt {_clock(when)}" if isinstance(when, int | float) else ""
        return Step(f"{recipient} deferred{host}{said}{retry}",
                    reply_rule("retry later, RFC 5321 §4.5.4.1", reply))
    if status == "failed":
        return Step(f"{recipient} failed{host}{said}",
                    reply_rule("permanent failure, RFC 5321 §4.2.1", reply))
    return Step(f"{recipient} delivered{host}{said}", "RFC 5321 §4.2.1" if reply else "")


def _maildir(f: Fields) -> Step:
    how = "found already in" if f.get("written") is False else "written to"
    return Step(f"{_f(f, 'recipient')}: {how} {_f(f, 'mailbox')} folder "
                f"{_f(f, 'folder', 'INBOX')} as {_f(f, 'file')}",
                "Maildir: tmp/, fsync, then rename into new/")


def _dsn(f: Fields) -> Step:
    relation = _f(f, "relation", "bounce")
    what = {"bounce": "bounce (failed)", "delay": "delay notice"}.get(relation, relation)
    rule = ("delay notice, RFC 3461 §4.1; RFC 3464 §2" if relation == "delay"
            else "delivery status notification, RFC 3464 §2")
    return Step(f"{what} for message {_f(f, 'parent')} to <{_f(f, 'sender', '')}>", rule)


def _pop3(verb: str, rule: str) -> Callable[[Fields], Step]:
    def describe(f: Fields) -> Step:
        return Step(f"{_f(f, 'user')} {verb} by POP3", rule)
    return describe


def _imap_fetch(f: Fields) -> Step:
    return Step(f"{_f(f, 'user')} read it over IMAP ({_f(f, 'item', 'BODY[]')} in "
                f"{_f(f, 'folder', 'INBOX')})", "FETCH, RFC 9051 §6.4.5")


def _imap_flags(f: Fields) -> Step:
    return Step(f"{_f(f, 'user')} set flags {_f(f, 'operation', '')} {_f(f, 'flags', '()')} "
                f"in {_f(f, 'folder', 'INBOX')}".replace("  ", " "), "STORE, RFC 9051 §6.4.6")


def _imap_move(f: Fields) -> Step:
    return Step(f"{_f(f, 'user')} moved it from {_f(f, 'folder', 'INBOX')} to {_f(f, 'to')}",
                "MOVE, RFC 6851 §3")


def _imap_expunge(f: Fields) -> Step:
    return Step(f"{_f(f, 'user')} expunged it from {_f(f, 'folder', 'INBOX')}",
                "EXPUNGE, RFC 9051 §6.4.3")


_DEFENCE_RULES = {
    "ratelimit": "rate limit per client network or user",
    "harvest": "directory harvest limit: unknown recipients per client network",
    "pregreet": "the client must wait for the greeting, RFC 5321 §4.2.1 (postscreen's test)",
    "dnsbl": "DNS blocklist, RFC 5782",
    "dnswl": "DNS allowlist, RFC 5782",
    "helo": "the HELO/EHLO name, RFC 5321 §4.1.1.1",
    "fcrdns": "forward-confirmed reverse DNS, RFC 8601 §3",
    "lists": "allow and block lists of the configuration",
    "greylist": "greylisting, RFC 6647",
    "spamfilter": "the content filter (rspamd)",
    "score": "HELO, reverse DNS and DNS lists scored together",
}


def _defence(f: Fields) -> Step:
    check = _f(f, "check")
    reply = f" {_reply(f)}" if f.get("reply") else ""
    return Step(f"intake defence {check}: {_f(f, 'action')}, {_f(f, 'reason', '')}{reply}",
                reply_rule(_DEFENCE_RULES.get(check, ""), str(f.get("reply") or "")))


# -- mail authentication (mailsys.authn) ---------------------------------------------------------

# How much of one DNS answer a text line shows (a DKIM key record is some 400 characters);
# the JSON output and the store keep it whole.
_EVIDENCE_SHOWN = 100


def _evidence(f: Fields) -> str:
    """'; DNS: answer | answer' from the ``evidence`` field, each answer shortened."""
    items = f.get("evidence")
    if not isinstance(items, list) or not items:
        return ""
    shown = [str(item) if len(str(item)) <= _EVIDENCE_SHOWN
             else str(item)[:_EVIDENCE_SHOWN - 1] + "…" for item in items]
    return "; DNS: " + " | ".join(shown)


def _problem(f: Fields) -> str:
    return f" ({f['problem']})" if f.get("problem") else ""


# RFC 7208 §2.6: what each SPF result means.
_SPF_RESULTS = {"none": "§2.6.1", "neutral": "§2.6.2", "pass": "§2.6.3", "fail": "§2.6.4",
                "softfail": "§2.6.5", "temperror": "§2.6.6", "permerror": "§2.6.7"}


def _spf(f: Fields) -> Step:
    result = _f(f, "result")
    identity = "HELO" if f.get("identity") == "helo" else "MAIL FROM"
    decided = f", decided by {f['mechanism']}" if f.get("mechanism") else ""
    counted = f", {f['lookups']} lookups" if f.get("lookups") else ""
    return Step(f"SPF {result} for {identity} {_f(f, 'domain')} from {_f(f, 'ip')}{decided}"
                f"{counted}{_problem(f)}{_evidence(f)}",
                f"SPF {identity} identity, RFC 7208 §2.3-2.4; {result}: "
                f"RFC 7208 {_SPF_RESULTS.get(result, '§2.6')}")


def _dkim(f: Fields) -> Step:
    result = _f(f, "result")
    if result == "none":
        return Step("DKIM: no signature", "dkim=none, RFC 8601 §2.7.1")
    bits = f", {f['key_bits']}-bit key" if f.get("key_bits") else ""
    rule = {"pass": "RFC 6376 §6.1.3", "fail": "RFC 6376 §6.1.3",
            "temperror": "key lookup failed, RFC 6376 §6.1.2",
            "policy": "RFC 8301 §3; RFC 8601 §2.7.1"}.get(
        result, "RFC 6376 §6.1.1-6.1.2; RFC 8601 §2.7.1")
    if f.get("algorithm") == "ed25519-sha256":
        rule += "; Ed25519, RFC 8463"
    return Step(f"DKIM {result}: signature d={_f(f, 'domain')} s={_f(f, 'selector')} "
                f"({_f(f, 'algorithm')}{bits}){_problem(f)}{_evidence(f)}", rule)


def _dmarc(f: Fields) -> Step:
    result = _f(f, "result")
    aligned = [name for name, field in (("SPF", "spf_aligned"), ("DKIM", "dkim_aligned"))
               if f.get(field)]
    via = f", aligned by {' and '.join(aligned)}" if aligned else ""
    if f.get("aligned_dkim_domain"):
        via += f" (d={f['aligned_dkim_domain']})"
    record = (f", record at _dmarc.{_f(f, 'record_domain')}: {f['record']}" if f.get("record")
              else "")
    org = (f", organizational domain {f['organizational_domain']}"
           if f.get("organizational_domain") else "")
    policy = f", policy {f['policy']}" if result == "fail" else ""
    return Step(f"DMARC {result} for From {_f(f, 'from_domain')}{via}{policy}{record}{org}"
                f"{_problem(f)}{_evidence(f)}",
                "identifier alignment, RFC 9989 §4.4; policy discovery by tree walk, §4.10")


def _iprev(f: Fields) -> Step:
    result = _f(f, "result")
    name = f" is {f['name']}" if f.get("name") else ""
    return Step(f"iprev {result}: {_f(f, 'ip')}{name}{_problem(f)}{_evidence(f)}",
                "forward-confirmed reverse DNS, RFC 8601 §3")


def _verdict(f: Fields) -> Step:
    action = _f(f, "action", "accept")
    reason = f" ({f['reason']})" if f.get("reason") else ""
    removed = f.get("removed_forged_results")
    forged = (f"; {removed} forged Authentication-Results field(s) of ours removed"
              if isinstance(removed, int) and removed else "")
    text = {
        "accept": "authentication verdict: accepted",
        "junk": f"authentication verdict: to the Junk folder of {_f(f, 'junk')}",
        "defer": f"authentication verdict: refused for now {_reply(f)}",
        "reject": f"authentication verdict: refused {_reply(f)}",
    }.get(action, f"authentication verdict: {action}")
    rule = ("a DNS failure only defers, never refuses: temperror, RFC 7208 §8.6"
            if action == "defer" else "the policy of [authn] and the sender's DMARC record")
    if forged:
        rule += "; forged results removed, RFC 8601 §5"
    return Step(f"{text.rstrip()}{reason}{forged}", rule)


def _sign(f: Fields) -> Step:
    if not f.get("signed"):
        return Step(f"not DKIM-signed{_problem(f)}", "")
    selectors = f.get("selectors") or []
    algorithms = f.get("algorithms") or []
    domains = f.get("signing_domains") or []
    parts = [f"d={d} s={s} ({a})" for d, s, a in zip(domains, selectors, algorithms, strict=False)]
    rule = "DKIM signing, RFC 6376 §5"
    if "ed25519-sha256" in algorithms:
        rule += "; Ed25519, RFC 8463"
    return Step(f"DKIM-signed for From {_f(f, 'domain')}: {', '.join(parts)}", rule)


def _reply(f: Fields) -> str:
    reply = f.get("reply")
    return f"({reply})" if reply else ""


_CATALOG: dict[str, Callable[[Fields], Step]] = {
    "smtp.connect": _connect,
    "smtp.tls": _tls,
    "smtp.ehlo": _ehlo,
    "smtp.auth": _auth,
    "smtp.mail": _mail,
    "smtp.rcpt": _rcpt,
    "smtp.data": _data,
    "smtp.close": _close,
    "defence": _defence,
    "spool.commit": _commit,
    "route": _route,
    "relay.mx": _mx,
    "relay.connect": _relay_connect,
    "relay.tls": _relay_tls,
    "relay.reply": _relay_reply,
    "authn.iprev": _iprev,
    "authn.spf": _spf,
    "authn.dkim": _dkim,
    "authn.dmarc": _dmarc,
    "authn.verdict": _verdict,
    "authn.sign": _sign,
    "delivery.attempt": _attempt,
    "delivery.maildir": _maildir,
    "dsn.created": _dsn,
    "pop3.retr": _pop3("retrieved it", "RETR, RFC 1939 §5"),
    "pop3.dele": _pop3("deleted it", "DELE, RFC 1939 §5; removed at QUIT, §6"),
    "imap.fetch": _imap_fetch,
    "imap.flags": _imap_flags,
    "imap.move": _imap_move,
    "imap.expunge": _imap_expunge,
}

KINDS = frozenset(_CATALOG)


def steps_of(event: JourneyEvent) -> list[tuple[str, Step, dict[str, Any]]]:
    """The lines of ``event``: (kind, step, fields); a spool commit adds one per route.

    The routes ride on the commit event because it is the hot path: one event per message
    instead of one more per recipient.
    """
    lines = [(event.kind, describe(event), dict(event.fields))]
    if event.kind == "spool.commit":
        routes = event.fields.get("routes")
        for route in routes if isinstance(routes, list) else ():
            if isinstance(route, dict):
                lines.append(("route", describe(JourneyEvent(event.at, "route", event.queue_id,
                                                             fields=route)), route))
    return lines


def describe(event: JourneyEvent) -> Step:
    """The line for ``event``: the catalog's words, the emitter's rule if it gave one."""
    render = _CATALOG.get(event.kind)
    fields = event.fields
    if render is None:
        shown = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("txn", "rule"))
        step = Step(f"{event.kind} {shown}".rstrip(), "")
    else:
        try:
            step = render(fields)
        except Exception:  # a field of an unexpected type must not hide the rest of a journey
            step = Step(f"{event.kind} {dict(fields)}", "")
    rule = fields.get("rule")
    if isinstance(rule, str) and rule:
        step = Step(step.text, rule)
    return step


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))
