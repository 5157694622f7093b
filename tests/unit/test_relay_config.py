"""The [relay] section and next hops: syntax, routes per domain, and one-line config errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailsys import config
from mailsys.delivery.nexthop import NextHops
from mailsys.delivery.tlspolicy import TLSPolicies
from mailsys.values import (
    DNSServer,
    IPVersion,
    NextHop,
    NextHopError,
    RouteKind,
    TLSPolicy,
    Transport,
    parse_next_hop,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("smtp:[127.0.0.3]:2525", NextHop(RouteKind.HOST, "127.0.0.3", 2525)),
    ("smtp:[Mail.Example.ORG]", NextHop(RouteKind.HOST, "mail.example.org", 25)),
    ("smtp:example.org", NextHop(RouteKind.MX, "example.org", 25)),
    ("example.org:2525", NextHop(RouteKind.MX, "example.org", 2525)),
    ("smtps:[smtp.example.org]", NextHop(RouteKind.HOST, "smtp.example.org", 465, True)),
    ("smtps:[smtp.example.org]:587", NextHop(RouteKind.HOST, "smtp.example.org", 587, True)),
    ("[IPv6:::1]:26", NextHop(RouteKind.HOST, "::1", 26)),
    ("192.0.2.1", NextHop(RouteKind.HOST, "192.0.2.1", 25)),
])
def test_next_hop_syntax(text: str, expected: NextHop) -> None:
    """Next hops as Postfix writes them: [host] skips MX, smtps: is implicit TLS on 465."""
    assert parse_next_hop(text) == expected


@pytest.mark.parametrize("text", ["smtp:", "smtp:[host", "smtp:[h]:x", "smtp:[h]:70000",
                                  "smtp:bad_host!", "smtp:[h]x"])
def test_bad_next_hops(text: str) -> None:
    """A next hop that cannot be parsed says so."""
    with pytest.raises(NextHopError):
        parse_next_hop(text)


def test_routes_by_domain() -> None:
    """Exact domains, then ".parent" entries, then "*", then the smarthost or MX."""
    hops = NextHops({"lab.test": parse_next_hop("smtp:[127.0.0.3]:2525"),
                     ".corp.test": Transport.SMARTHOST, "direct.test": Transport.MX},
                    smarthost=parse_next_hop("smtp:[relay.isp.test]:587"), port=2600)
    assert hops.route("LAB.test.").hop == NextHop(RouteKind.HOST, "127.0.0.3", 2525)
    assert hops.route("a.b.corp.test").smarthost
    assert hops.route("direct.test").hop == NextHop(RouteKind.MX, "direct.test", 2600)
    assert hops.route("anything.test").smarthost
    plain = NextHops({}, port=2600)
    assert plain.route("x.test").hop == NextHop(RouteKind.MX, "x.test", 2600)
    assert not plain.route("x.test").smarthost
    assert NextHops({"*": parse_next_hop("smtp:[10.0.0.1]")}).route("y.test").hop.name == (
        "10.0.0.1")
    with pytest.raises(NextHopError):
        NextHops({"x.test": Transport.SMARTHOST})


def test_tls_policies_by_domain() -> None:
    """Per-domain TLS policies override the default, ".domain" for subdomains."""
    policies = TLSPolicies(TLSPolicy.OPPORTUNISTIC,
                           {"bank.test": TLSPolicy.VERIFY, ".internal.test": TLSPolicy.NONE})
    assert policies.for_domain("Bank.Test") is TLSPolicy.VERIFY
    assert policies.for_domain("mx.internal.test") is TLSPolicy.NONE
    assert policies.for_domain("other.test") is TLSPolicy.OPPORTUNISTIC


def load(relay: dict[str, Any], tmp_path: Path | None = None) -> config.Config:
    return config.from_mapping({"relay": relay}, tmp_path or "test.toml")


def test_relay_defaults() -> None:
    """Defaults: RFC 5321's lifetime, a 4 h delay warning, the usual retry schedule."""
    relay = config.from_mapping({}, "test.toml").relay
    assert relay.enabled and relay.tls_policy is TLSPolicy.OPPORTUNISTIC and relay.port == 25
    assert relay.retry_schedule == (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
    assert relay.max_lifetime == 5 * 86400 and relay.delay_warning == 4 * 3600


def test_relay_section_accepted() -> None:
    """A full [relay] section loads, every value parsed once into the type its users take."""
    relay = load({
        "dns_servers": ["127.0.0.1:5353", "::1", "[::1]:53"], "ip_version": "ipv4",
        "tls_policy": "verify", "tls_policy_per_domain": {"lab.test": "none"},
        "smarthost": "smtps:[relay.test]:465", "smarthost_username": "u",
        "smarthost_password": "p", "transport": {"lab.test": "smtp:[127.0.0.3]:2525",
                                                  "*": "smarthost"},
        "retry_schedule": [1, 2.5], "max_lifetime": 10, "delay_warning": 5,
        "per_destination_concurrency": 3, "helo_name": "out.example.test",
    }).relay
    assert relay.retry_schedule == (1.0, 2.5)
    assert relay.dns_servers == (
        DNSServer("127.0.0.1", 5353), DNSServer("::1", 53), DNSServer("::1", 53))
    assert relay.ip_version is IPVersion.IPV4 and relay.tls_policy is TLSPolicy.VERIFY
    assert relay.tls_policy_per_domain == {"lab.test": TLSPolicy.NONE}
    assert relay.smarthost == NextHop(RouteKind.HOST, "relay.test", 465, True)
    assert relay.transport == {"lab.test": NextHop(RouteKind.HOST, "127.0.0.3", 2525),
                               "*": Transport.SMARTHOST}


@pytest.mark.parametrize(("relay", "message"), [
    ({"dns_servers": ["ns.example"]}, "relay.dns_servers: 'ns.example' is not an IP address"),
    ({"dns_servers": ["127.0.0.1:x"]}, "relay.dns_servers: '127.0.0.1:x': the port must be"),
    ({"ip_version": "4"}, "relay.ip_version: must be one of any, ipv4, ipv6"),
    ({"tls_policy": "must"}, "relay.tls_policy: must be one of"),
    ({"tls_policy_per_domain": {"x.test": "maybe"}}, 'relay.tls_policy_per_domain."x.test"'),
    ({"smarthost": "smtp:[x"}, "relay.smarthost: next hop 'smtp:[x': missing ']'"),
    ({"transport": {"x.test": "smarthost"}}, "needs relay.smarthost to be set"),
    ({"transport": {"bad domain": "mx"}}, "not a valid domain"),
    ({"smarthost_username": "u"}, "relay.smarthost_username: needs relay.smarthost"),
    ({"smarthost": "smtp:[h]", "smarthost_username": "u"}, "needs exactly one of"),
    ({"smarthost_password": "p"}, "a smarthost password needs smarthost_username"),
    ({"retry_schedule": []}, "relay.retry_schedule: needs at least one delay"),
    ({"retry_schedule": [0]}, "relay.retry_schedule: must be a positive number"),
    ({"max_lifetime": -1}, "relay.max_lifetime: must be a positive number"),
    ({"port": 70000}, "relay.port: must be 1-65535"),
    ({"helo_name": "not a name"}, "relay.helo_name: not a valid host name"),
    ({"colour": "blue"}, "relay.colour: unknown key"),
])
def test_relay_errors_are_one_line(relay: dict[str, Any], message: str) -> None:
    """Every problem is one line naming the key and the reason."""
    with pytest.raises(config.ConfigError) as caught:
        load(relay)
    text = str(caught.value)
    assert "\n" not in text and message in text, text


def test_relay_files_checked(tmp_path: Path) -> None:
    """A password file or CA file that cannot be read is named at load time."""
    with pytest.raises(config.ConfigError, match=r"relay\.tls_ca_file: cannot read"):
        config.from_mapping({"relay": {"tls_ca_file": str(tmp_path / "none.pem")}}, "t.toml")
    relay = config.from_mapping({"relay": {"tls_ca_file": str(tmp_path / "none.pem")}},
                                "t.toml", check_files=False).relay
    assert relay.tls_ca_file == tmp_path / "none.pem"
