"""Arbitrary input to the checks gives a result, never an exception."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from mailsys.authn.dkim import DKIMVerifier
from mailsys.authn.results import strip_authentication_results
from mailsys.authn.spf import SPFChecker
from mailsys.dns import CachingResolver
from mailsys.labdns import Zone

MESSAGE = b"From: a@example.test\r\nSubject: x\r\n\r\nbody\r\n"
_SPF_TERMS = st.sampled_from([
    "a", "mx", "ptr", "-all", "~all", "?all", "include:x.test", "redirect=x.test",
    "exists:%{i}.x.test", "ip4:192.0.2.0/24", "ip6:2001:db8::/32", "a:%{d}", "exp=x.test",
    "%", "%{", "a/99", "ip4:300.1.1.1", "=", "a:", "mx//129", "include:%{l}.x.test",
])


def _now(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(function, *args)


@settings(max_examples=200, deadline=None)
@given(st.lists(_SPF_TERMS, max_size=12), st.text(max_size=20))
def test_spf_any_record(terms: list[str], noise: str) -> None:
    """Any record built from real and broken terms (or noise) gives an SPF result."""
    record = " ".join(["v=spf1", *terms, noise])
    zone = Zone({"x.test": {"TXT": [record], "A": ["192.0.2.1"]},
                 "example.test": {"TXT": [record]}})
    checker = SPFChecker(CachingResolver(zone, Clock()))
    results: list[Any] = []
    checker.check_mailfrom("192.0.2.1", "a@example.test", "helo.test").addBoth(results.append)
    assert results[0].result in ("pass", "fail", "softfail", "neutral", "none", "permerror",
                                 "temperror")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_dkim_any_signature_field(value: bytes) -> None:
    """Any bytes as a DKIM-Signature value give DKIM results, never an exception."""
    value = value.replace(b"\r", b"").replace(b"\n", b"")
    zone = Zone({"s._domainkey.example.test": {"TXT": ["v=DKIM1; k=rsa; p=AAAA"]}})
    verifier = DKIMVerifier(CachingResolver(zone, Clock()), run_in_thread=_now)
    results: list[Any] = []
    verifier.verify(b"DKIM-Signature: " + value + b"\r\n" + MESSAGE).addBoth(results.append)
    assert isinstance(results[0], list)
    assert all(r.result in ("permerror", "fail", "policy", "temperror", "neutral")
               for r in results[0])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_strip_any_header(value: bytes) -> None:
    """Any Authentication-Results value is kept or removed, never an exception."""
    value = value.replace(b"\r", b"").replace(b"\n", b"")
    message = b"Authentication-Results: " + value + b"\r\n" + MESSAGE
    stripped, removed = strip_authentication_results(message, "mx.here.test")
    assert stripped.endswith(MESSAGE) and removed in (0, 1)
