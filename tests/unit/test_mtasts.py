"""Outbound MTA-STS (RFC 8461): the policy text, mx patterns, the TXT id, the cache (max_age,
a new id, failures, persistence) and the relay's enforcement, on a lab zone and a Clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from mailsys.delivery.mtasts import (
    MAX_AGE_LIMIT,
    RETRY_AFTER,
    Policy,
    PolicyCache,
    PolicyError,
    mx_matches,
    parse_policy,
    record_id,
)
from mailsys.dns.cache import CachingResolver
from mailsys.labdns import Zone
from mailsys.values import TLSPolicy
from tests.unit.test_relay import DEFERRED, DELIVERED, START, ZONE, Lab, done, envelope
from tests.unit.test_spool import ImmediateDiskPool

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.remote.test\r\nmax_age: 86400\r\n"


def test_policy_is_parsed() -> None:
    """§3.2: version, mode, max_age and every mx line; LF line ends too; unknown keys ignored."""
    policy = parse_policy("version: STSv1\nmode: testing\nmx: A.example.\nmx: *.b.example\n"
                          "max_age: 600\nextension: x\n")
    assert policy == Policy("testing", 600, ("a.example", "*.b.example"))
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mx == ()


@pytest.mark.parametrize(("text", "reason"), [
    ("mode: enforce\nmx: a\nmax_age: 1\n", "version"),
    ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "version"),
    ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "mode"),
    ("version: STSv1\nmode: enforce\nmx: a\n", "max_age"),
    (f"version: STSv1\nmode: enforce\nmx: a\nmax_age: {MAX_AGE_LIMIT + 1}\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 1\n", "without any mx"),
    ("<html>not a policy</html>\n", "key: value"),
])
def test_bad_policy_text_is_refused(text: str, reason: str) -> None:
    """A policy without STSv1, with an unknown mode, a bad max_age, no mx, or not key: value
    lines is refused with the reason."""
    with pytest.raises(PolicyError, match=reason):
        parse_policy(text)


def test_mx_patterns() -> None:
    """§4.1: exact names, and a leading wildcard standing for exactly one label."""
    assert mx_matches("mx1.remote.test", "MX1.remote.test.")
    assert mx_matches("*.remote.test", "mx1.remote.test")
    assert not mx_matches("*.remote.test", "a.mx1.remote.test")
    assert not mx_matches("*.remote.test", "remote.test")
    assert not mx_matches("mx1.remote.test", "mx2.remote.test")


def test_txt_record_id() -> None:
    """§3.1: the id of exactly one v=STSv1 record; none, two, or a bad id mean no policy."""
    assert record_id([b"v=STSv1; id=20260101T000000;"]) == "20260101T000000"
    assert record_id([b"v=spf1 -all", b"v=STSv1;id=abc"]) == "abc"
    assert record_id([]) is None
    assert record_id([b"v=STSv1; id=a", b"v=STSv1; id=b"]) is None
    assert record_id([b"v=STSv1; id=not-valid!"]) is None
    assert record_id([b"v=STSv1; id=" + b"a" * 33]) is None


class Fetches:
    """The policy server, played by the test: each fetch gets ``text`` or fails."""

    def __init__(self, text: str = POLICY) -> None:
        self.text = text
        self.error: str | None = None
        self.calls: list[str] = []

    def __call__(self, domain: str) -> Deferred[str]:
        self.calls.append(domain)
        if self.error is not None:
            return fail(PolicyError(self.error))
        return succeed(self.text)


class Setup:
    def __init__(self, tmp_path: Path, txt: str | None = "v=STSv1; id=one") -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.zone_data: dict[str, Any] = {}
        self.set_txt(txt)
        self.fetches = Fetches()
        self.directory = tmp_path / "mta-sts"
        self.cache = self.make_cache()

    def set_txt(self, txt: str | None) -> None:
        self.zone_data.clear()
        if txt is not None:
            self.zone_data["_mta-sts.remote.test"] = {"TXT": [txt]}

    def make_cache(self) -> PolicyCache:
        # A fresh resolver per look: the test changes the zone between looks.
        resolver = _FreshResolver(self.zone_data, self.clock)
        return PolicyCache(resolver, self.fetches, ImmediateDiskPool(),  # type: ignore[arg-type]
                           self.directory, self.clock)

    def policy(self) -> Policy | None:
        result: list[Policy | None] = []
        self.cache.policy_for("remote.test").addCallback(result.append)
        assert result, "the look did not finish"
        return result[0]


class _FreshResolver:
    def __init__(self, data: dict[str, Any], clock: Clock) -> None:
        self._data = data
        self._clock = clock

    def query_answer(self, name: str, type: int) -> Any:
        return CachingResolver(Zone(dict(self._data)), self._clock).query_answer(name, type)


def test_policy_is_fetched_once_and_cached_for_its_max_age(tmp_path: Path) -> None:
    """The first look fetches; later looks with the same id use the cache until max_age."""
    setup = Setup(tmp_path)
    assert setup.policy() == parse_policy(POLICY)
    assert setup.policy() == parse_policy(POLICY)
    assert setup.fetches.calls == ["remote.test"]
    setup.clock.advance(86401)
    setup.policy()
    assert len(setup.fetches.calls) == 2


def test_new_txt_id_fetches_again(tmp_path: Path) -> None:
    """§5.1: a TXT id other than the cached one makes the policy be fetched again."""
    setup = Setup(tmp_path)
    setup.policy()
    setup.set_txt("v=STSv1; id=two")
    setup.fetches.text = POLICY.replace("enforce", "testing")
    assert setup.policy() == Policy("testing", 86400, ("mx1.remote.test",))
    assert len(setup.fetches.calls) == 2


def test_failures_keep_a_cached_policy_and_without_one_mean_none(tmp_path: Path) -> None:
    """A failed fetch or a missing TXT record keeps an unexpired cached policy; with no cached
    policy they mean no policy at all."""
    setup = Setup(tmp_path)
    setup.fetches.error = "policy larger than 65536 bytes"
    assert setup.policy() is None
    setup.fetches.error = None
    setup.clock.advance(RETRY_AFTER)
    assert setup.policy() == parse_policy(POLICY)
    setup.set_txt("v=STSv1; id=two")
    setup.fetches.error = "no policy from mta-sts.remote.test within 30s"
    assert setup.policy() == parse_policy(POLICY)
    setup.set_txt(None)
    assert setup.policy() == parse_policy(POLICY)


def test_failed_fetch_is_not_repeated_for_every_message(tmp_path: Path) -> None:
    """After a failed fetch the same id is fetched again only after RETRY_AFTER; a new id at
    once."""
    setup = Setup(tmp_path)
    setup.fetches.error = "connection refused"
    assert setup.policy() is None and setup.policy() is None
    assert len(setup.fetches.calls) == 1
    setup.clock.advance(RETRY_AFTER + 1)
    setup.policy()
    assert len(setup.fetches.calls) == 2
    setup.set_txt("v=STSv1; id=two")
    setup.fetches.error = None
    assert setup.policy() == parse_policy(POLICY)
    assert len(setup.fetches.calls) == 3


def test_cached_policy_survives_a_restart(tmp_path: Path) -> None:
    """The policy is kept on disk: a new cache (a restarted server) uses it without a fetch,
    even while the policy host cannot be reached."""
    setup = Setup(tmp_path)
    setup.policy()
    assert (setup.directory / "remote.test.json").exists()
    setup.cache = setup.make_cache()
    setup.fetches.error = "connection refused"
    assert setup.policy() == parse_policy(POLICY)
    assert len(setup.fetches.calls) == 1


# -- enforcement by the relay --------------------------------------------------------------------


def sts_lab(tmp_path: Path, text: str, **kwargs: Any) -> Lab:
    tmp_path.mkdir(parents=True, exist_ok=True)
    lab = Lab(tmp_path, **kwargs)
    lab.zone.set({**ZONE, "_mta-sts.remote.test": {"TXT": ["v=STSv1; id=one"]}})
    fetches = Fetches(text)
    resolver = CachingResolver(lab.zone, lab.clock)
    # The cache the wiring (mailsys.delivery.wiring) gives the agent, on the lab's zone.
    lab.agent._mta_sts = PolicyCache(resolver, fetches, lab.pool,  # type: ignore[arg-type]
                                     None, lab.clock)
    return lab


def test_enforce_refuses_a_host_outside_the_policy_and_defers(tmp_path: Path) -> None:
    """enforce with mx patterns naming neither MX host: no host is connected to and the mail
    is deferred with 4.7.5 naming the policy."""
    lab = sts_lab(tmp_path, POLICY.replace("mx1.remote.test", "mx9.remote.test"))
    (d,) = lab.deliver(envelope("Q1", "bob@remote.test"))
    attempt = done(d)
    assert attempt.status is DEFERRED
    assert attempt.reply.code == 451 and attempt.reply.enhanced == "4.7.5"
    assert "MTA-STS" in attempt.reply.text
    assert lab.dialer.connects == []


def test_enforce_uses_only_matching_hosts_with_verified_tls(tmp_path: Path) -> None:
    """enforce naming mx2 only: mx1 (preferred) is skipped, mx2 gets the mail over TLS that
    must verify (a certificate failure defers, no plaintext retry)."""
    lab = sts_lab(tmp_path, POLICY.replace("mx1.remote.test", "mx2.remote.test"))
    (d,) = lab.deliver(envelope("Q1", "bob@remote.test"))
    assert done(d).status is DELIVERED
    assert [address for address, _, _ in lab.dialer.connects] == ["127.0.0.3"]
    assert lab.mx1.connections == 0 and lab.mx2.received

    failing = sts_lab(tmp_path / "again", POLICY.replace("mx1.remote.test", "mx2.remote.test"))
    failing.mx2.tls_error = "certificate verify failed"
    (d,) = failing.deliver(envelope("Q2", "bob@remote.test"))
    attempt = done(d)
    assert attempt.status is DEFERRED and "certificate verify failed" in attempt.reply.text
    assert len(failing.dialer.connects) == 1


def test_testing_mode_only_reports(tmp_path: Path) -> None:
    """testing: a host outside the patterns is still used (and logged)."""
    lab = sts_lab(tmp_path, POLICY.replace("enforce", "testing")
                  .replace("mx1.remote.test", "mx9.remote.test"))
    (d,) = lab.deliver(envelope("Q1", "bob@remote.test"))
    assert done(d).status is DELIVERED
    assert lab.mx1.received


def test_per_domain_tls_policy_overrides_mta_sts(tmp_path: Path) -> None:
    """A tls_policy_per_domain entry for the domain wins: its policy applies, MTA-STS not."""
    lab = sts_lab(tmp_path, POLICY.replace("mx1.remote.test", "mx9.remote.test"),
                  tls_per_domain={"remote.test": "opportunistic"})
    (d,) = lab.deliver(envelope("Q1", "bob@remote.test"))
    assert done(d).status is DELIVERED
    assert lab.agent.tls_policy(lab.agent.route_for("bob@remote.test")) is \
        TLSPolicy.OPPORTUNISTIC
