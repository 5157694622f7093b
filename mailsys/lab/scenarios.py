"""The lab's scenarios (`mailsys lab scenario list|run NAME`): each one sends mail with real
clients (smtplib, imaplib) to the running lab, waits for the outcome it expects under a deadline,
prints the journeys the servers recorded (mailsys.journey.trace) after a short explanation of
what to look for and the RFC behind it, and succeeds only when the expected outcome happened.

A scenario that needs a fault or the hurried clock sets it through mailsys.lab.control and
clears the fault again, whatever happens.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import email.utils
import imaplib
import io
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import IO

from mailsys.authn.dkim import load_key, sign_message
from mailsys.journey.events import JourneyEvent
from mailsys.journey.store import JourneyStore, JourneyStoreError
from mailsys.journey.trace import Journey, find_journeys, render_text
from mailsys.lab.control import Lab
from mailsys.lab.faults import read_fault
from mailsys.lab.plan import LabError, LabHost, LabPlan
from mailsys.lab.zone import DKIM_SELECTOR, dkim_key_path

DEADLINE = 60.0  # seconds for a whole scenario
POLL = 0.1
CLIENT_TIMEOUT = 20.0
JOURNEY_SETTLE = 5.0  # seconds to wait for a journey not yet written


class ScenarioFailedError(Exception):
    """The expected outcome did not happen; the text says what was seen instead."""


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    lesson: tuple[str, ...]  # what to look for in the journeys, each with its RFC
    run: Callable[[Run], str]  # the outcome, in one line; raises ScenarioFailedError


class Run:
    """One scenario run against the lab in ``lab``'s directory."""

    def __init__(self, lab: Lab, plan: LabPlan, out: IO[str]) -> None:
        self.lab = lab
        self.plan = plan
        self.out = out
        self.end = time.monotonic() + DEADLINE
        self.shown: list[tuple[LabHost, str]] = []  # journeys to print: (server, query)

    # -- the lab -----------------------------------------------------------------------------

    def host(self, index: int) -> LabHost:
        if index >= len(self.plan.hosts):
            raise LabError(f"this scenario needs a lab of {index + 1} domains or more")
        return self.plan.hosts[index]

    def tls(self) -> ssl.SSLContext:
        """A client context trusting the lab CA alone, checking names, as a student's would."""
        return ssl.create_default_context(cafile=str(self.plan.ca_file))

    def left(self) -> float:
        return max(0.1, self.end - time.monotonic())

    def wait(self, predicate: Callable[[], object], what: str) -> None:
        """Poll ``predicate`` until it is true or the scenario's deadline has passed."""
        while not predicate():
            if time.monotonic() >= self.end:
                raise ScenarioFailedError(f"not within {DEADLINE:g} s: {what}")
            time.sleep(POLL)

    @contextlib.contextmanager
    def fault(self, host: LabHost, name: str) -> Iterator[None]:
        """``name`` on ``host`` for the block; cleared after it whatever happened."""
        self.say(f"$ mailsys lab fault {host.domain} {name}")
        self.say("  " + self.lab.fault(host.domain, name))
        try:
            yield
        finally:
            self.say(f"$ mailsys lab fault {host.domain} clear")
            self.say("  " + self.lab.fault(host.domain, "clear"))

    def advance(self, seconds: float, text: str) -> None:
        self.say(f"$ mailsys lab clock advance {text}")
        self.say("  " + self.lab.clock("advance", seconds))

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # -- sending ---------------------------------------------------------------------------------

    def message(self, sender: str, recipient: str, subject: str, body: str) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = recipient
        msg["Subject"] = subject
        msg["Date"] = email.utils.formatdate(localtime=False)
        msg["Message-ID"] = email.utils.make_msgid("lab", sender.partition("@")[2])
        msg.set_content(body)
        return msg

    def submit(self, host: LabHost, user: int, msg: EmailMessage) -> str:
        """Submit ``msg`` as the host's ``user`` (587's role: STARTTLS, then AUTH PLAIN), as a
        mail client does; returns its Message-ID."""
        account = host.users[user]
        self.say(f"{account.address} submits to {host.hostname}:{self.plan.ports.submission} "
                 f"(STARTTLS, AUTH; RFC 6409): {msg['Subject']!r} to {msg['To']}")
        with smtplib.SMTP(host.address, self.plan.ports.submission,
                          timeout=CLIENT_TIMEOUT) as client:
            client.starttls(context=self.tls())
            client.login(account.address, account.password)
            client.send_message(msg)
        return str(msg["Message-ID"])

    def connect_mx(self, target: LabHost, source: LabHost) -> smtplib.SMTP:
        """An SMTP client at ``target``'s port 25 stand-in, leaving from ``source``'s address
        and saying its name: the way ``source``'s server would come, but typed by hand."""
        client = smtplib.SMTP(target.address, self.plan.ports.smtp, timeout=CLIENT_TIMEOUT,
                              local_hostname=source.hostname,
                              source_address=(source.address, 0))
        client.ehlo()
        client.starttls(context=self.tls())
        client.ehlo()
        return client

    # -- outcomes --------------------------------------------------------------------------------

    def delivered(self, host: LabHost, address: str, message_id: str) -> bytes | None:
        """The copy of ``message_id`` in ``address``'s INBOX on ``host``, if there is one."""
        user, _, domain = address.partition("@")
        inbox = host.directory / "maildirs" / domain / user
        needle = message_id.encode()
        for folder in ("new", "cur"):
            directory = inbox / folder
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                with contextlib.suppress(OSError):
                    data = path.read_bytes()
                    head = data.split(b"\n\n", 1)[0]
                    if needle in head:
                        return data
        return None

    def wait_delivered(self, host: LabHost, address: str, message_id: str) -> bytes:
        found: list[bytes] = []

        def arrived() -> bool:
            data = self.delivered(host, address, message_id)
            if data is not None:
                found.append(data)
            return data is not None

        self.wait(arrived, f"{message_id} in {address}'s mailbox on {host.hostname}")
        return found[0]

    def events(self, host: LabHost, query: str) -> list[JourneyEvent]:
        """Every recorded event of the journeys ``query`` names on ``host``."""
        return [e for j in self.journeys(host, query) for e in j.events]

    def journeys(self, host: LabHost, query: str) -> list[Journey]:
        if not host.journey_path.exists():
            return []
        try:
            store = JourneyStore(host.journey_path, readonly=True)
        except JourneyStoreError:
            return []
        try:
            return find_journeys(store, query)[0]
        except Exception:  # sqlite3.Error while the server creates its tables
            return []
        finally:
            store.close()

    def wait_event(self, host: LabHost, query: str, test: Callable[[JourneyEvent], bool],
                   what: str) -> JourneyEvent:
        """The first event of ``query``'s journeys on ``host`` that passes ``test``; the server
        writes its journey in batches, so it may take a moment to be seen."""
        found: list[JourneyEvent] = []

        def seen() -> bool:
            found.extend(e for e in self.events(host, query) if test(e))
            return bool(found)

        self.wait(seen, f"{what} in the journey on {host.hostname}")
        return found[0]

    def wait_kind(self, host: LabHost, query: str, kind: str, what: str,
                  **fields: str) -> JourneyEvent:
        """The first event of ``kind`` in ``query``'s journeys on ``host`` whose fields have
        the values ``fields`` names."""
        return self.wait_event(host, query, lambda e: e.kind == kind and all(
            e.fields.get(name) == value for name, value in fields.items()), what)

    def wait_attempt(self, host: LabHost, query: str, status: str, what: str) -> JourneyEvent:
        """The first delivery attempt of ``query`` on ``host`` that ended ``status``
        (deferred, failed, ...)."""
        return self.wait_kind(host, query, "delivery.attempt", what, status=status)

    def show(self, host: LabHost, query: str) -> None:
        self.shown.append((host, query))

    def print_journeys(self) -> None:
        for host, query in self.shown:
            self.say()
            self.say(f"journey on {host.hostname} (mailsys trace --config {host.config_path} "
                     f"'{query}'):")
            buffer = io.StringIO()
            # The server writes its journey in batches (mailsys.journey.writer): give the last
            # steps a moment to reach the store.
            settle = time.monotonic() + JOURNEY_SETTLE
            while not self.journeys(host, query) and time.monotonic() < min(settle, self.end):
                time.sleep(POLL)
            journeys = self.journeys(host, query)
            if journeys:
                render_text(journeys, 0, buffer)
            else:
                buffer.write("  (nothing recorded)\n")
            self.out.write(buffer.getvalue())


def _auth_results(data: bytes) -> str:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    return " ".join(" ".join(str(v).split()) for v in parsed.get_all("Authentication-Results", []))


def _has(results: str, *needles: str) -> bool:
    return all(needle in results for needle in needles)


# -- the scenarios -----------------------------------------------------------------------------


def first_mail(run: Run) -> str:
    alpha, beta = run.host(0), run.host(1)
    sender, recipient = alpha.users[0].address, beta.users[1].address
    msg = run.message(sender, recipient, "first mail in the lab", "Hello, this is my first mail.")
    message_id = run.submit(alpha, 0, msg)
    run.show(alpha, message_id)
    run.show(beta, message_id)
    data = run.wait_delivered(beta, recipient, message_id)
    results = _auth_results(data)
    run.wait_kind(beta, message_id, "delivery.maildir", "the Maildir delivery")
    if not _has(results, "spf=pass", "dkim=pass", "dmarc=pass"):
        raise ScenarioFailedError(f"delivered, but authentication did not all pass: {results}")
    return (f"delivered to {recipient} on {beta.hostname}; beta's verdict: "
            f"spf=pass dkim=pass dmarc=pass")


def mx_fallback(run: Run) -> str:
    alpha = run.host(0)
    gamma = run.plan.fallback
    if gamma is None:
        raise LabError("mx-fallback needs a lab of 3 domains or more (the last has two MX)")
    recipient = gamma.users[0].address
    msg = run.message(alpha.users[0].address, recipient, "does the backup MX work?",
                      "The first MX is switched off.")
    message_id = run.submit(alpha, 0, msg)
    run.show(alpha, message_id)
    run.wait_delivered(gamma, recipient, message_id)
    failed = run.wait_event(
        alpha, message_id,
        lambda e: e.kind == "relay.connect" and str(e.fields.get("host", "")).startswith("mx1.")
        and bool(e.fields.get("error")), "the failed connection to mx1")
    run.wait_event(alpha, message_id,
                   lambda e: e.kind == "relay.connect" and e.fields.get("host") == gamma.hostname
                   and not e.fields.get("error"), f"the connection to {gamma.hostname}")
    return (f"mx1.{gamma.domain} failed ({failed.fields.get('error')}); delivered through "
            f"{gamma.hostname}, the next MX")


def retry_then_deliver(run: Run) -> str:
    alpha, beta = run.host(0), run.host(1)
    recipient = beta.users[0].address
    msg = run.message(alpha.users[1].address, recipient, "retry, then deliver",
                      "beta refuses for now; alpha keeps the message and tries again.")
    with run.fault(beta, "tempfail"):
        message_id = run.submit(alpha, 1, msg)
        run.show(alpha, message_id)
        deferred = run.wait_attempt(alpha, message_id, "deferred", "the deferred attempt")
        run.say(f"  alpha deferred it: {deferred.fields.get('reply')}")
    run.show(beta, message_id)
    # The first retry is 30 s of queue time after the attempt (the lab's retry_schedule).
    run.advance(60, "1m")
    run.wait_delivered(beta, recipient, message_id)
    run.wait_kind(beta, message_id, "delivery.maildir", "the Maildir delivery")
    return f"deferred with {deferred.fields.get('reply')}, delivered at the retry"


def bounce(run: Run) -> str:
    alpha, beta = run.host(0), run.host(1)
    sender = alpha.users[0].address
    recipient = f"fail-550@{beta.domain}"
    msg = run.message(sender, recipient, "to an address that refuses",
                      "beta will answer 550 for this recipient.")
    message_id = run.submit(alpha, 0, msg)
    run.show(alpha, message_id)
    run.wait_attempt(alpha, message_id, "failed", "the failed attempt")
    created = run.wait_kind(alpha, message_id, "dsn.created", "the bounce (DSN)")
    bounce_id = created.message_id or ""

    def returned() -> bool:
        return run.delivered(alpha, sender, bounce_id) is not None if bounce_id else False

    run.wait(returned, f"the bounce in {sender}'s mailbox")
    run.wait_kind(alpha, message_id, "delivery.maildir", "the bounce's Maildir delivery")
    return f"{recipient} refused with 550; the bounce reached {sender}"


def delay_then_bounce(run: Run) -> str:
    alpha, beta = run.host(0), run.host(1)
    sender = alpha.users[1].address
    recipient = f"fail-451@{beta.domain}"
    msg = run.message(sender, recipient, "to an address that always says later",
                      "beta answers 451 for this recipient, every time.")
    message_id = run.submit(alpha, 1, msg)
    run.show(alpha, message_id)
    run.wait_attempt(alpha, message_id, "deferred", "the deferred attempt")
    # The lab's delay_warning is 30 minutes of queue time, its max_lifetime one day.
    run.advance(3600, "1h")
    run.wait_kind(alpha, message_id, "dsn.created", "the delay notice", relation="delay")
    run.advance(86400, "1d")
    run.wait_attempt(alpha, message_id, "failed", "the expiry")
    run.wait_kind(alpha, message_id, "dsn.created", "the bounce", relation="bounce")
    return (f"{recipient} deferred; {sender} got a delay notice after 1h and a bounce when "
            "the message expired after 1d of queue time")


def spoofed_from(run: Run) -> str:
    alpha, beta, gamma = run.host(0), run.host(1), run.host(2)
    forged = f"ceo@{alpha.domain}"
    recipient = beta.users[1].address
    msg = run.message(forged, recipient, "urgent: pay this invoice",
                      "Please pay at once. (Sent from gamma's address, not alpha's.)")
    message_id = str(msg["Message-ID"])
    run.say(f"someone at {gamma.address} ({gamma.hostname}) connects to {beta.hostname}:"
            f"{run.plan.ports.smtp} and claims to be {forged}")
    run.show(beta, forged)
    with run.connect_mx(beta, gamma) as client:
        try:
            client.send_message(msg, from_addr=forged, to_addrs=[recipient])
        except smtplib.SMTPDataError as exc:
            said = exc.smtp_error
            text = said.decode(errors="replace") if isinstance(said, bytes) else said
            reply = f"{exc.smtp_code} {text}"
        else:
            raise ScenarioFailedError(f"{beta.hostname} accepted the forged message")
    if not reply.startswith("550"):
        raise ScenarioFailedError(f"refused, but not with 550 (DMARC p=reject): {reply}")
    if run.delivered(beta, recipient, message_id) is not None:
        raise ScenarioFailedError("the forged message was delivered")
    run.wait_kind(beta, forged, "smtp.data", "the refused DATA")
    return f"{beta.hostname} refused it at the end of DATA: {reply}"


def dkim_tampered(run: Run) -> str:
    alpha, beta = run.host(0), run.host(1)
    sender, recipient = alpha.users[0].address, beta.users[0].address
    msg = run.message(sender, recipient, "the amount is 100 euros", "Please pay 100 euros.\n")
    message_id = str(msg["Message-ID"])
    key = load_key(dkim_key_path(alpha), alpha.domain, DKIM_SELECTOR)
    raw = msg.as_bytes(policy=email.policy.SMTP)
    signed = sign_message(raw, [key]) + raw
    tampered = signed.replace(b"Please pay 100 euros.", b"Please pay 900 euros.")
    run.say(f"alpha's key signs it (d={alpha.domain}, s={DKIM_SELECTOR}); on the way the body "
            "is changed from 100 to 900 euros; it comes from alpha's own address")
    with run.connect_mx(beta, alpha) as client:
        client.sendmail(sender, [recipient], tampered)
    run.show(beta, message_id)
    data = run.wait_delivered(beta, recipient, message_id)
    results = _auth_results(data)
    run.wait_kind(beta, message_id, "delivery.maildir", "the Maildir delivery")
    if not _has(results, "dkim=fail", "spf=pass", "dmarc=pass"):
        raise ScenarioFailedError(f"expected dkim=fail with spf=pass, dmarc=pass: {results}")
    return ("delivered with dkim=fail (the body hash does not match) and dmarc=pass through "
            "aligned SPF")


def open_relay_attempt(run: Run) -> str:
    alpha, beta = run.host(0), run.host(1)
    outsider = f"spammer@{alpha.domain}"
    target = f"victim@{run.host(2).domain if len(run.plan.hosts) > 2 else alpha.domain}"
    run.say(f"a client connects to {beta.hostname}:{run.plan.ports.smtp} without logging in "
            f"and asks it to pass mail on to {target}")
    run.show(beta, target)
    with run.connect_mx(beta, alpha) as client:
        client.mail(outsider)
        code, text = client.rcpt(target)
        client.rset()
    reply = f"{code} {text.decode(errors='replace')}"
    if code < 500:
        raise ScenarioFailedError(f"{beta.hostname} did not refuse to relay: {reply}")
    run.wait_kind(beta, target, "smtp.rcpt", "the refused RCPT")
    return f"{beta.hostname} refused to relay: {reply}"


def read_by_imap(run: Run) -> str:
    alpha, beta = run.host(0), run.host(1)
    reader = alpha.users[0]
    msg = run.message(beta.users[1].address, reader.address, "read me over IMAP",
                      "Fetched with IMAP from alpha.")
    message_id = run.submit(beta, 1, msg)
    run.show(alpha, message_id)
    run.wait_delivered(alpha, reader.address, message_id)
    run.say(f"{reader.address} logs in to {alpha.hostname}:{run.plan.ports.imaps} "
            "(IMAPS, RFC 8314) and fetches it")
    with imaplib.IMAP4_SSL(alpha.address, run.plan.ports.imaps, ssl_context=run.tls(),
                           timeout=CLIENT_TIMEOUT) as imap:
        imap.login(reader.address, reader.password)
        imap.select("INBOX")
        _, found = imap.search(None, "HEADER", "Message-ID", message_id)
        numbers = found[0].split()
        if not numbers:
            raise ScenarioFailedError("IMAP SEARCH did not find the message")
        _, data = imap.fetch(numbers[-1], "(BODY[])")
        body = data[0][1] if isinstance(data[0], tuple) else b""
        imap.logout()
    if b"Fetched with IMAP" not in body:
        raise ScenarioFailedError("IMAP FETCH did not return the message")
    run.wait_kind(alpha, message_id, "imap.fetch", "the IMAP FETCH")
    return f"{reader.address} read it over IMAP"


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("first-mail", "alice@alpha.test writes to bob@beta.test; bob's server checks "
             "SPF, DKIM and DMARC and delivers", (
                 "alpha's submission listener takes it after STARTTLS and AUTH (RFC 6409, "
                 "RFC 3207, RFC 4954) and signs it with alpha's DKIM key (RFC 6376)",
                 "alpha queues it (fsync before the 250 reply), looks up beta.test's MX in the "
                 "lab DNS (RFC 5321 §5.1) and relays over TLS it verifies against the lab CA",
                 "beta checks SPF (RFC 7208), DKIM (RFC 6376), DMARC (RFC 7489) and iprev "
                 "(RFC 8601), writes Authentication-Results, delivers to the Maildir",
             ), first_mail),
    Scenario("mx-fallback", "mail for the last domain: its first MX is switched off, the "
             "second takes it", (
                 "the domain has two MX records; the lower preference is tried first "
                 "(RFC 5321 §5.1)",
                 "mx1 does not answer; the sender goes on to the next MX in the same attempt "
                 "(RFC 5321 §5.1: try each in order)",
             ), mx_fallback),
    Scenario("retry-then-deliver", "beta refuses for now (451); alpha keeps the message, "
             "retries on the hurried clock and delivers", (
                 "a 4xx reply means try again later (RFC 5321 §4.2.1); the sender keeps the "
                 "message in its queue (RFC 5321 §4.5.4.1)",
                 "the retry comes when the queue's clock reaches it; `lab clock advance` moves "
                 "that clock (RFC 5321 §4.5.4.1: at least 30 minutes between tries in real life)",
             ), retry_then_deliver),
    Scenario("bounce", "mail to fail-550@beta.test is refused for good; alice gets a bounce", (
                 "a 5xx reply is permanent (RFC 5321 §4.2.1): the sender gives up on that "
                 "recipient",
                 "the sender's server returns a delivery status notification to the envelope "
                 "sender (RFC 3464, RFC 5321 §6.1)",
             ), bounce),
    Scenario("delay-then-bounce", "fail-451@beta.test always says later: a delay notice, "
             "then a bounce when the message expires, on the hurried clock", (
                 "the sender keeps retrying a 4xx; after a while it tells its user the mail is "
                 "delayed (RFC 3461 §4.1 delay notice, RFC 3464)",
                 "it gives up at its maximum queue lifetime (RFC 5321 §4.5.4.1: at least 4-5 "
                 "days in real life; one day in the lab) and bounces (5.4.7)",
             ), delay_then_bounce),
    Scenario("spoofed-from", "a client at gamma's address claims to be ceo@alpha.test; "
             "DMARC p=reject refuses it", (
                 "SPF of alpha.test lists only alpha's address: the client's fails (RFC 7208)",
                 "no DKIM signature of alpha.test: nothing aligned passes, DMARC fails and "
                 "alpha.test publishes p=reject (RFC 7489 §6.3), so beta answers 550 5.7.1",
             ), spoofed_from),
    Scenario("dkim-tampered", "a signed message whose body changed on the way: dkim=fail, "
             "still delivered by aligned SPF", (
                 "the DKIM signature covers the body's hash (bh=); a changed body fails "
                 "(RFC 6376 §3.7)",
                 "DMARC needs one aligned pass, SPF or DKIM (RFC 7489 §4.2): SPF passes here",
             ), dkim_tampered),
    Scenario("open-relay-attempt", "a client without login asks beta to pass mail on to "
             "another domain; beta refuses", (
                 "port 25 takes mail for its own domains only; relaying for others needs "
                 "authentication (RFC 5321 §3.6.2; an open relay is abused by spammers)",
             ), open_relay_attempt),
    Scenario("read-by-imap", "bob@beta.test writes to alice@alpha.test, who reads it over "
             "IMAP", (
                 "delivery ends in alice's Maildir; reading is a separate protocol, IMAP "
                 "(RFC 9051, RFC 3501) over implicit TLS (RFC 8314)",
                 "the journey shows the FETCH: the store records who read which message",
             ), read_by_imap),
)


def find(name: str) -> Scenario:
    for scenario in SCENARIOS:
        if scenario.name == name:
            return scenario
    raise LabError(f"no scenario {name!r} (`mailsys lab scenario list` shows them)")


def run_scenario(lab: Lab, name: str, out: IO[str]) -> bool:
    """Run one scenario; True when its expected outcome happened (within DEADLINE)."""
    scenario = find(name)
    plan, _ = lab.running_plan()
    run = Run(lab, plan, out)
    run.say(f"scenario {scenario.name}: {scenario.summary}")
    for host in plan.hosts:
        fault = read_fault(host.fault_path).name
        if fault != "clear":
            run.say(f"note: the fault {fault} is on {host.domain}; the scenario may not go as "
                    f"planned (`mailsys lab fault {host.domain} clear`)")
    run.say("watch for:")
    for line in scenario.lesson:
        run.say(f"  - {line}")
    run.say()
    started = time.monotonic()
    try:
        outcome = scenario.run(run)
    except ScenarioFailedError as exc:
        run.print_journeys()
        run.say()
        run.say(f"FAILED: {scenario.name}: {exc}")
        return False
    except (OSError, smtplib.SMTPException, imaplib.IMAP4.error) as exc:
        run.print_journeys()
        run.say()
        run.say(f"FAILED: {scenario.name}: {type(exc).__name__}: {exc}")
        return False
    run.print_journeys()
    run.say()
    run.say(f"OK: {scenario.name} in {time.monotonic() - started:.1f} s: {outcome}")
    return True
