"""Intake defences (mailsys.defence): rate limits, DNS lists, HELO, allow and block lists,
early talkers, and the SMTP session's seam into them."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.names import common

from mailsys import replies
from mailsys.config import ConfigError, DefenceSection, from_mapping
from mailsys.defence.dnsbl import DNSLists, parse_zones, query_name
from mailsys.defence.greylist import Greylist
from mailsys.defence.helo import helo_problem
from mailsys.defence.intake import IntakeDefence
from mailsys.defence.lists import Access, AccessLists
from mailsys.defence.ratelimit import Buckets, client_network
from mailsys.defence.spamfilter import RspamdFilter, parse_answer
from mailsys.dns.cache import CachingResolver
from mailsys.journey.events import MemoryRecorder
from mailsys.journey.steps import describe
from mailsys.labdns import Zone
from mailsys.smtp.server import ListenerRole
from mailsys.smtp.testing import MemorySink, SessionDriver, make_factory
from tests.unit.test_spool import ImmediateDiskPool

CLIENT = "192.0.2.10"
ZONE = {
    "10.2.0.192.bl.test": {"A": ["127.0.0.2"]},
    "10.2.0.192.weak.test": {"A": ["127.0.0.4"]},
    "11.2.0.192.bl.test": {"A": ["127.255.255.254"]},  # Spamhaus: query refused, no listing
    "12.2.0.192.wl.test": {"A": ["127.0.10.2"]},
    "12.2.0.192.bl.test": {"A": ["127.0.0.2"]},
}
TRANSACTION = (b"EHLO client.test\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
               b"DATA\r\n")
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n.\r\n"


def section(**values: Any) -> DefenceSection:
    """A [defence] section that applies to the test clients (no exempt networks)."""
    values.setdefault("exempt_networks", ())
    return dataclasses.replace(DefenceSection(), **values)


class Silent(common.ResolverBase):
    """An upstream DNS server that never answers."""

    def _lookup(self, name: bytes, cls: int, type: int, timeout: object = None) -> Deferred[Any]:
        return Deferred()


def defended(clock: Clock | None = None, zone: dict[str, Any] | None = None, *,
             upstream: Any = None, role: ListenerRole = ListenerRole.MTA,
             **values: Any) -> tuple[Any, Clock, MemoryRecorder]:
    clock = clock or Clock()
    resolver = CachingResolver(upstream if upstream is not None else Zone(zone or ZONE), clock)
    defence = IntakeDefence(section(**values), clock, resolver=resolver,
                            hostname="mx.example.test", inbound=role is ListenerRole.MTA)
    journey = MemoryRecorder()
    factory = make_factory(clock=clock, defence=defence, journey=journey, role=role,
                           sink=MemorySink())
    return factory, clock, journey


def decisions(journey: MemoryRecorder) -> list[tuple[str, str]]:
    return [(e.fields["check"], e.fields["action"]) for e in journey.events
            if e.kind == "defence"]


# --- rate limits ---------------------------------------------------------------------------


def test_buckets_limit_and_drain() -> None:
    """A bucket takes ``limit`` events, refuses the next, and takes more as time drains it."""
    clock = Clock()
    buckets = Buckets(clock, 3, 60.0)
    assert [buckets.hit("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.hit("b")
    clock.advance(20)  # one event's worth drained
    assert buckets.hit("a")
    assert not buckets.hit("a")


def test_buckets_memory_bounded_with_100000_addresses() -> None:
    """100,000 distinct client addresses keep at most max_entries buckets, the most recent."""
    clock = Clock()
    buckets = Buckets(clock, 5, 60.0, max_entries=10_000)
    keys = [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(100_000)]
    tracemalloc.start()
    try:
        for key in keys:
            buckets.hit(key)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(buckets) == 10_000
    assert buckets.level("10.1.134.159") == 1.0  # the last one seen is kept
    assert buckets.level("10.0.0.0") == 0.0  # the first was forgotten
    assert peak < 4 * 1024 * 1024  # about 10,000 entries' worth, not 100,000


def test_client_network_prefixes() -> None:
    """IPv4 counts per address (/32), IPv6 per /64, a mapped IPv4 as IPv4."""
    assert client_network("192.0.2.7") == "192.0.2.7"
    assert client_network("192.0.2.7", ipv4_prefix=24) == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3::4") == "2001:db8:1:2::/64"
    assert client_network("::ffff:192.0.2.7") == "192.0.2.7"


def test_connection_rate_refused_with_421() -> None:
    """Past connections_per_minute from one network the greeting is 421 4.7.0 and it closes;
    another network is unaffected."""
    factory, clock, journey = defended(connections_per_minute=2)
    for _ in range(2):
        assert SessionDriver(factory, CLIENT).lines()[0].startswith("220 ")
    third = SessionDriver(factory, CLIENT)
    assert third.lines() == [str(replies.RATE_CONNECTIONS)]
    assert third.closed
    assert SessionDriver(factory, "192.0.2.99").lines()[0].startswith("220 ")
    assert ("ratelimit", "refuse") in decisions(journey)
    clock.advance(60)
    assert SessionDriver(factory, CLIENT).lines()[0].startswith("220 ")


def test_message_rate_refused_with_450() -> None:
    """Past messages_per_hour, MAIL gets 450 4.7.1 with the reason."""
    factory, _, _ = defended(messages_per_hour=2)
    driver = SessionDriver(factory, CLIENT)
    driver.lines()
    for _ in range(2):
        assert driver.codes(TRANSACTION + MESSAGE)[-1] == 250
    assert driver.send(b"MAIL FROM:<s@remote.test>\r\n") == [str(replies.RATE_MESSAGES)]


def test_recipient_rate_refused_with_450() -> None:
    """Past recipients_per_hour, RCPT gets 450 4.7.1."""
    factory, _, _ = defended(recipients_per_hour=2)
    driver = SessionDriver(factory, CLIENT)
    driver.lines()
    rcpts = b"".join(b"RCPT TO:<alice@example.test>\r\n" for _ in range(3))
    lines = driver.send(b"EHLO c.test\r\nMAIL FROM:<s@remote.test>\r\n" + rcpts)
    assert lines[-1] == str(replies.RATE_RECIPIENTS)


def test_directory_harvest_10000_random_recipients() -> None:
    """10,000 RCPTs to random local parts: past failed_recipients_per_hour the client gets
    421 4.7.0 and the session closes; its next connection is refused at the greeting."""
    factory, _, journey = defended(failed_recipients_per_hour=20)
    driver = SessionDriver(factory, CLIENT)
    driver.lines()
    rcpts = b"".join(b"RCPT TO:<u%05d@example.test>\r\n" % n for n in range(10_000))
    lines = driver.send(b"EHLO c.test\r\nMAIL FROM:<s@remote.test>\r\n" + rcpts)
    codes = [line[:3] for line in lines]
    assert codes.count("550") == 20
    assert lines[-1] == str(replies.RATE_UNKNOWN_RECIPIENTS)
    assert len(lines) == 8 + 1 + 20 + 1  # EHLO lines, MAIL, 20 refusals, the 421: no more
    assert driver.closed
    again = SessionDriver(factory, CLIENT)
    assert again.lines() == [str(replies.RATE_UNKNOWN_RECIPIENTS)]
    assert ("harvest", "refuse") in decisions(journey)


def test_submission_per_user_limits() -> None:
    """Authenticated submission counts messages per user, not per network."""
    defence = IntakeDefence(section(submission_messages_per_hour=1), Clock(), resolver=None,
                            hostname="mx.example.test", inbound=False)
    client = defence.client(CLIENT, lambda *a, **k: None)
    assert client.connected() is None
    assert client.mail("alice@example.test", "alice@example.test") is None
    client.message(b"x", lambda: _details("alice@example.test"), "alice@example.test")
    assert client.mail("alice@example.test", "alice@example.test") == \
        replies.RATE_USER_MESSAGES
    other = defence.client(CLIENT, lambda *a, **k: None)
    assert other.mail("bob@example.test", "bob@example.test") is None


def _details(user: str | None) -> Any:
    from mailsys.defence.intake import MessageDetails
    return MessageDetails(CLIENT, "c.test", "s@remote.test", ("alice@example.test",), "Q1", user)


def test_exempt_networks_skip_everything() -> None:
    """A client in exempt_networks (loopback by default) is never limited."""
    factory, _, _ = defended(connections_per_minute=1, exempt_networks=("192.0.2.0/24",))
    for _ in range(3):
        assert SessionDriver(factory, CLIENT).lines()[0].startswith("220 ")


# --- DNS lists -------------------------------------------------------------------------------


def test_query_names() -> None:
    """RFC 5782 §2.1 and §2.4: reversed octets, reversed nibbles for IPv6."""
    assert query_name("192.0.2.10", "bl.test") == "10.2.0.192.bl.test"
    assert query_name("2001:db8::1", "bl.test") == (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test")


def test_dns_list_weights_filters_and_error_codes() -> None:
    """Weights add up per answer filter; Spamhaus's 127.255.255.x answers are not listings."""
    clock = Clock()
    resolver = CachingResolver(Zone(ZONE), clock)
    lists = DNSLists(resolver, clock, parse_zones(
        {"bl.test": 0.6, "weak.test=127.0.0.[2..3]": 5.0, "weak.test=127.0.0.4": 0.5}))
    result: list[Any] = []
    lists.check("192.0.2.10").addCallback(result.append)
    assert result[0].score == pytest.approx(1.1)
    assert result[0].listed_by == ("bl.test", "weak.test")
    lists.check("192.0.2.11").addCallback(result.append)
    assert result[1].score == 0.0
    assert not result[1].failed


def test_dnsbl_listed_client_refused_naming_the_list() -> None:
    """A listed client gets 554 5.7.1 at MAIL, naming the list."""
    factory, _, journey = defended(dnsbl={"bl.test": 1.0})
    driver = SessionDriver(factory, CLIENT)
    driver.lines()
    lines = driver.send(b"EHLO c.test\r\nMAIL FROM:<s@remote.test>\r\n")
    assert lines[-1] == "554 5.7.1 Service unavailable; client [192.0.2.10] blocked using bl.test"
    assert ("dnsbl", "refuse") in decisions(journey)


def test_defence_decision_in_the_journey() -> None:
    """A refusal is a journey step that says which check, why, and the rule behind it."""
    factory, _, journey = defended(dnsbl={"bl.test": 1.0})
    driver = SessionDriver(factory, CLIENT)
    driver.lines()
    driver.send(b"EHLO c.test\r\nMAIL FROM:<s@remote.test>\r\n")
    (event,) = [e for e in journey.events if e.kind == "defence"]
    step = describe(event)
    assert step.text.startswith("intake defence dnsbl: refuse, listed by bl.test (554 5.7.1")
    assert step.rule.startswith("DNS blocklist, RFC 5782; 5.7.1")


def test_dnswl_allowlisted_client_skips_the_other_checks() -> None:
    """A client on a DNS allowlist is not refused though a blocklist lists it."""
    factory, _, journey = defended(dnsbl={"bl.test": 1.0}, dnswl=("wl.test",))
    driver = SessionDriver(factory, "192.0.2.12")
    driver.lines()
    assert driver.codes(TRANSACTION + MESSAGE)[-1] == 250
    assert ("dnswl", "allow") in decisions(journey)


def test_dnsbl_timeout_mail_flows_marked() -> None:
    """A DNS list that does not answer in dnsbl_timeout: the mail is accepted and marked."""
    factory, clock, journey = defended(upstream=Silent(), dnsbl={"bl.test": 1.0},
                                       dnsbl_timeout=3.0)
    driver = SessionDriver(factory, CLIENT)
    driver.lines()
    assert driver.send(b"EHLO c.test\r\nMAIL FROM:<s@remote.test>\r\n")[-1] == "250 DSN"
    clock.advance(3)
    assert driver.lines() == [str(replies.SENDER_OK)]
    assert driver.codes(b"RCPT TO:<alice@example.test>\r\nDATA\r\n" + MESSAGE)[-1] == 250
    stored = factory.sink.accepted[0][1]  # type: ignore[attr-defined]
    assert b"\r\nX-Mailsys-Defence: dnsbl=bl.test timeout\r\n" in stored
    assert ("dnsbl", "unchecked") in decisions(journey)


# --- HELO, lists ------------------------------------------------------------------------------


@pytest.mark.parametrize(("helo", "problem"), [
    ("client.example.org", None),
    ("[192.0.2.10]", None),
    ("DESKTOP_01", None),
    ("mx.example.test", "HELO names our own host"),
    ("[10.0.0.1]", "HELO names our own address"),
    ("bad name!", "HELO is neither a host name nor an address literal"),
    ("[IPv6:nonsense]", "HELO is neither a host name nor an address literal"),
])
def test_helo_problems(helo: str, problem: str | None) -> None:
    """Our own name or address, or neither a name nor an address literal, is a bad HELO."""
    assert helo_problem(helo, ("mx.example.test",), ("10.0.0.1",)) == problem


def test_helo_our_own_name_refused() -> None:
    """With helo = "reject", a client greeting as us gets 550 5.7.1 at MAIL."""
    factory, _, _ = defended()
    driver = SessionDriver(factory, CLIENT)
    driver.lines()
    lines = driver.send(b"EHLO mx.example.test\r\nMAIL FROM:<s@remote.test>\r\n")
    assert lines[-1] == "550 5.7.1 HELO rejected: HELO names our own host"


def test_helo_scored_with_a_list_reaches_the_threshold() -> None:
    """With helo = "score", a bad HELO adds its weight to the DNS lists' score."""
    factory, _, _ = defended(helo="score", helo_weight=0.5, dnsbl={"weak.test": 0.5})
    driver = SessionDriver(factory, CLIENT)
    driver.lines()
    lines = driver.send(b"EHLO bad!name\r\nMAIL FROM:<s@remote.test>\r\n")
    assert lines[-1].startswith("554 5.7.1 ")


RDNS_ZONE = {
    **ZONE,
    "10.2.0.192.in-addr.arpa": {"PTR": ["host.remote.test"]},
    "host.remote.test": {"A": ["192.0.2.10"]},
    "11.2.0.192.in-addr.arpa": {"PTR": ["liar.remote.test"]},
    "liar.remote.test": {"A": ["198.51.100.1"]},
}


@pytest.mark.parametrize(("client", "policy", "code"), [
    ("192.0.2.10", "reject", 250),
    ("192.0.2.11", "reject", 550),
    ("192.0.2.13", "reject", 550),  # no PTR at all
    ("192.0.2.11", "score", 554),  # fcrdns_weight 1.0 reaches the threshold
    ("192.0.2.11", "none", 250),
])
def test_forward_confirmed_reverse_dns(client: str, policy: str, code: int) -> None:
    """Without forward-confirmed reverse DNS a client is refused or scored, by policy."""
    factory, _, _ = defended(zone=RDNS_ZONE, fcrdns=policy, fcrdns_weight=1.0)
    driver = SessionDriver(factory, client)
    driver.lines()
    assert driver.codes(b"EHLO c.test\r\nMAIL FROM:<s@remote.test>\r\n")[-1] == code


def test_access_lists() -> None:
    """Senders match by address, @domain or domain with subdomains; networks by prefix."""
    lists = AccessLists(allow_networks=["198.51.100.0/24"], block_networks=["203.0.113.0/24"],
                        allow_senders=["partner.test"], block_senders=["@spam.test",
                                                                       "x@ok.test"])
    assert lists.client("203.0.113.9") is Access.BLOCK
    assert lists.client("198.51.100.9") is Access.ALLOW
    assert lists.client("192.0.2.1") is None
    assert lists.sender("a@mail.partner.test") is Access.ALLOW
    assert lists.sender("a@spam.test") is Access.BLOCK
    assert lists.sender("a@sub.spam.test") is None
    assert lists.sender("x@ok.test") is Access.BLOCK
    assert lists.sender("") is None


def test_blocked_network_and_sender_refused_allowed_sender_skips() -> None:
    """A blocked network or sender gets 554 5.7.1 at MAIL; an allowed one skips the rest."""
    factory, _, _ = defended(block_networks=("192.0.2.8/30",), block_senders=("@spam.test",),
                             allow_senders=("friend.test",), dnsbl={"bl.test": 1.0})
    driver = SessionDriver(factory, CLIENT)
    driver.lines()
    assert driver.send(b"EHLO c.test\r\nMAIL FROM:<s@remote.test>\r\n")[-1] == \
        str(replies.CLIENT_BLOCKED)
    other = SessionDriver(factory, "192.0.2.200")
    other.lines()
    assert other.send(b"EHLO c.test\r\nMAIL FROM:<s@spam.test>\r\n")[-1] == \
        str(replies.SENDER_BLOCKED)
    listed = SessionDriver(factory, "192.0.2.12")  # on bl.test, but its sender is allowed
    listed.lines()
    assert listed.codes(b"EHLO c.test\r\nMAIL FROM:<s@friend.test>\r\n")[-1] == 250


def test_lists_reloaded_with_the_configuration() -> None:
    """reconfigure() takes new lists at once; the counts so far are kept."""
    factory, _, _ = defended()
    defence = factory.defence
    assert defence is not None
    defence.reconfigure(section(block_senders=("@spam.test",)))
    driver = SessionDriver(factory, CLIENT)
    driver.lines()
    assert driver.send(b"EHLO c.test\r\nMAIL FROM:<s@spam.test>\r\n")[-1] == \
        str(replies.SENDER_BLOCKED)


# --- early talkers ---------------------------------------------------------------------------


def test_pregreet_refused_with_554() -> None:
    """With a greeting pause, a client that talks before the greeting ends gets 554."""
    factory, _, journey = defended(greeting_pause=2.0)
    driver = SessionDriver(factory, CLIENT)
    assert driver.lines() == ["220-mx.example.test"]
    assert driver.send(b"EHLO bot\r\n") == [str(replies.PREGREET)]
    assert driver.closed
    assert ("pregreet", "refuse") in decisions(journey)


def test_patient_client_greeted_after_the_pause() -> None:
    """A client that waits gets the whole greeting and goes on."""
    factory, clock, _ = defended(greeting_pause=2.0)
    driver = SessionDriver(factory, CLIENT)
    driver.lines()
    clock.advance(2)
    assert driver.lines() == ["220 mx.example.test ESMTP mailsys"]
    assert driver.codes(TRANSACTION + MESSAGE)[-1] == 250


# --- the spam filter's answers ---------------------------------------------------------------

# Answers recorded from rspamd 3.4's /checkv2 (Debian bookworm), shortened.
RSPAMD_REJECT = (b'{"is_skipped":true,"score":15.0,"required_score":15.0,"action":"reject",'
                 b'"symbols":{"GTUBE":{"name":"GTUBE","score":0.0}},'
                 b'"messages":{"smtp_message":"Gtube pattern"}}')
RSPAMD_ADD_HEADER = (b'{"is_skipped":false,"score":7.0,"required_score":15.0,'
                     b'"action":"add header","symbols":{}}')
RSPAMD_CLEAN = b'{"is_skipped":false,"score":0.0,"required_score":15.0,"action":"no action"}'


@pytest.mark.parametrize(("body", "reply", "junk", "field"), [
    (RSPAMD_REJECT, replies.SPAM_REJECTED, False, b""),
    (b'{"action":"soft reject","score":9}', replies.SPAM_DEFERRED, False, b""),
    (RSPAMD_ADD_HEADER, None, True, b"X-Spam: Yes\r\nX-Spam-Status: Yes, score=7.00"),
    (RSPAMD_CLEAN, None, False, b"X-Spam-Status: No, score=0.00 required=15.00"),
])
def test_rspamd_actions(body: bytes, reply: Any, junk: bool, field: bytes) -> None:
    """rspamd's action maps to a refusal, the Junk folder with X-Spam, or a score field."""
    verdict = RspamdFilter("http://127.0.0.1:1", Clock()).verdict(body)
    assert verdict.reply == reply and verdict.junk == junk
    assert verdict.fields.startswith(field)


@pytest.mark.parametrize("body", [b"", b"[]", b'{"score": 1}', b"x" * (2 * 1024 * 1024),
                                  b'{"action": "reject", "score": "high"}'])
def test_rspamd_garbage_is_a_failure(body: bytes) -> None:
    """An answer that is not rspamd's JSON is a filter failure, never a verdict."""
    with pytest.raises(ValueError):
        parse_answer(body)


# --- greylisting -----------------------------------------------------------------------------


def test_greylist_triplet_delay_and_known_senders(tmp_path: Path) -> None:
    """A new triplet is refused until the delay has passed; then its sender and network are
    known, and their mail to any recipient passes at once."""
    clock = Clock()
    greylist = Greylist(tmp_path / "greylist.json", clock, ImmediateDiskPool(), delay=300)
    assert not greylist.check("192.0.2.10", "s@remote.test", "alice@example.test")
    clock.advance(100)
    assert not greylist.check("192.0.2.10", "s@remote.test", "alice@example.test")
    clock.advance(200)
    # Another address of the same /24 retrying (a pool of outgoing servers) passes.
    assert greylist.check("192.0.2.77", "s@remote.test", "alice@example.test")
    assert greylist.check("192.0.2.10", "s@remote.test", "bob@example.test")
    assert not greylist.check("198.51.100.1", "s@remote.test", "bob@example.test")


def test_greylist_survives_a_restart(tmp_path: Path) -> None:
    """The tables are saved when the service stops and read at the next start."""
    clock = Clock()
    path = tmp_path / "greylist.json"
    first = Greylist(path, clock, ImmediateDiskPool(), delay=300)
    first.startService()
    first.check("192.0.2.10", "known@remote.test", "alice@example.test")
    first.check("192.0.2.10", "waiting@remote.test", "alice@example.test")
    clock.advance(300)
    assert first.check("192.0.2.10", "known@remote.test", "alice@example.test")
    first.stopService()
    second = Greylist(path, clock, ImmediateDiskPool(), delay=300)
    second.load()
    assert second.check("192.0.2.10", "known@remote.test", "carol@example.test")
    assert second.check("192.0.2.10", "waiting@remote.test", "alice@example.test")


def test_greylisting_in_the_session() -> None:
    """With greylisting, the first RCPT of a new triplet gets 450 4.7.1."""
    clock = Clock()
    greylist = Greylist(Path("/nonexistent/greylist.json"), clock, ImmediateDiskPool())
    defence = IntakeDefence(section(), clock, resolver=None, hostname="mx.example.test",
                            inbound=True, greylist=greylist)
    factory = make_factory(clock=clock, defence=defence)
    driver = SessionDriver(factory, CLIENT)
    driver.lines()
    assert driver.send(TRANSACTION)[-2:] == [str(replies.GREYLISTED),
                                             str(replies.NO_VALID_RECIPIENTS)]


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(("table", "message"), [
    ({"block_networks": ["203.0.113.0/33"]},
     "x.toml: defence.block_networks: not an address or network: '203.0.113.0/33'"),
    ({"dnsbl": {"bl.test=127.0.0.[9..2]": 1.0}},
     'x.toml: defence.dnsbl."bl.test=127.0.0.[9..2]": the range is empty'),
    ({"dnsbl": {"bl.test=10.0.0.2": 1.0}},
     'x.toml: defence.dnsbl."bl.test=10.0.0.2": must be a zone, zone=127.a.b.c or '
     "zone=127.a.b.[c..d]"),
    ({"helo": "maybe"}, "x.toml: defence.helo: must be one of none, score, reject"),
    ({"spam_filter": "https://rspamd:11333"},
     "x.toml: defence.spam_filter: must be http://host[:port], got 'https://rspamd:11333'"),
    ({"ipv6_prefix": 129}, "x.toml: defence.ipv6_prefix: must be 1-128"),
    ({"block_senders": ["@"]},
     "x.toml: defence.block_senders: not an address, @domain or domain: '@'"),
    ({"connections_per_minute": 0},
     "x.toml: defence.connections_per_minute: must be a positive integer, got 0"),
])
def test_bad_defence_settings_are_one_line(table: dict[str, Any], message: str) -> None:
    """A bad [defence] value stops start-up with one line naming the file, key and reason."""
    with pytest.raises(ConfigError) as info:
        from_mapping({"defence": table}, "x.toml")
    assert str(info.value) == message


def test_defence_settings_normalised() -> None:
    """Networks are normalised once, when the file is read."""
    loaded = from_mapping({"defence": {"allow_networks": ["192.0.2.7/24", "2001:DB8::1"]}},
                          "x.toml")
    assert loaded.defence.allow_networks == ("192.0.2.0/24", "2001:db8::1/128")
