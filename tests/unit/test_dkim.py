"""DKIM: the RFC 8463 example, our own signatures, and bad input that must give a result."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim as dkimpy
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailsys.authn.dkim import (
    DKIMResult,
    DKIMSigner,
    DKIMVerifier,
    KeyFileError,
    SigningKey,
    generate_key,
    hash_headers,
    load_key,
    parse_message,
    public_record,
    relaxed_body,
    relaxed_headers,
    select_headers,
    sign_message,
    without_b_value,
)
from mailsys.dns import CachingResolver
from mailsys.labdns import Zone

DATA = Path(__file__).parent.parent / "data" / "dkim"
# RFC 8463 Appendix A.2.
RFC8463_KEYS = {
    "brisbane._domainkey.football.example.com": {
        "TXT": ["v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="]},
    "test._domainkey.football.example.com": {
        "TXT": ["v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWR"
                "iGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutAC"
                "DfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3"
                "Ip3G+2kryOTIKT+l/K4w3QIDAQAB"]},
}
MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
           b"Subject: Lunch\r\nDate: Mon, 07 Dec 2026 04:00:00 +0000\r\n"
           b"Message-ID: <1@example.test>\r\n\r\nAt noon?\r\n")


def _now(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Runs the 'thread' work at once, so tests stay synchronous."""
    return maybeDeferred(function, *args)


def _keys() -> tuple[dict[str, Any], list[SigningKey]]:
    zone: dict[str, Any] = {}
    keys = []
    for selector, algorithm in (("rsa1", "rsa"), ("ed1", "ed25519")):
        pem, record = generate_key(algorithm)  # type: ignore[arg-type]
        zone[f"{selector}._domainkey.example.test"] = {"TXT": [record]}
        keys.append(_signing_key(pem, selector))
    return zone, keys


def _signing_key(pem: bytes, selector: str, domain: str = "example.test") -> SigningKey:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pem") as file:
        file.write(pem)
        file.flush()
        return load_key(Path(file.name), domain, selector)


class DKIMTests(SynchronousTestCase):
    zone: dict[str, Any]
    keys: list[SigningKey]

    @classmethod
    def setUpClass(cls) -> None:
        cls.zone, cls.keys = _keys()

    def verify(self, message: bytes, zone: dict[str, Any] | None = None,
               **options: Any) -> list[DKIMResult]:
        resolver = CachingResolver(Zone(self.zone if zone is None else zone), Clock())
        verifier = DKIMVerifier(resolver, run_in_thread=_now, **options)
        return self.successResultOf(verifier.verify(message))

    def signed(self, message: bytes = MESSAGE, keys: list[SigningKey] | None = None) -> bytes:
        return sign_message(message, self.keys if keys is None else keys) + message

    def test_rfc8463_example(self) -> None:
        """Both signatures of the RFC 8463 A.3 example verify with the A.2 keys."""
        results = self.verify((DATA / "rfc8463-a3.eml").read_bytes(), RFC8463_KEYS)
        self.assertEqual([(r.result, r.algorithm, r.selector, r.domain) for r in results],
                         [("pass", "ed25519-sha256", "brisbane", "football.example.com"),
                          ("pass", "rsa-sha256", "test", "football.example.com")])
        self.assertEqual(results[0].header_b, "/gCrinpcQOoI")
        self.assertEqual(results[1].key_bits, 1024)
        self.assertIn("TXT brisbane._domainkey.football.example.com", results[0].evidence[0])

    def test_sign_and_verify(self) -> None:
        """Our RSA and Ed25519 signatures verify, relaxed/relaxed, with From over-signed."""
        message = self.signed()
        results = self.verify(message)
        self.assertEqual([r.result for r in results], ["pass", "pass"])
        self.assertEqual([r.algorithm for r in results], ["rsa-sha256", "ed25519-sha256"])
        first = message.split(b"\r\nFrom:")[0]
        self.assertIn(b"c=relaxed/relaxed", first)
        signed = re.search(rb"h=([^;]*);", first.replace(b"\r\n", b""))
        assert signed is not None
        names = [h.strip() for h in signed.group(1).split(b":")]
        self.assertEqual(names.count(b"from"), 2)
        self.assertEqual(set(names), {b"from", b"to", b"subject", b"date", b"message-id"})

    def test_dkimpy_verifies_ours(self) -> None:
        """dkimpy's own verify(), fed the published records, accepts what we sign."""
        records = {f"{name}.".encode(): value["TXT"][0].encode()
                   for name, value in self.zone.items()}
        verifier = dkimpy.DKIM(self.signed())
        for index in (0, 1):
            self.assertTrue(verifier.verify(index, dnsfunc=lambda n, timeout=5: records.get(n)))

    def test_tampered_body_fails(self) -> None:
        """A changed body fails every signature."""
        message = self.signed().replace(b"At noon?", b"At one?")
        self.assertEqual([r.result for r in self.verify(message)], ["fail", "fail"])

    def test_tampered_header_fails(self) -> None:
        """A changed signed header fails the signature."""
        message = self.signed().replace(b"Subject: Lunch", b"Subject: Dinner")
        self.assertEqual([r.result for r in self.verify(message)], ["fail", "fail"])

    def test_added_from_fails(self) -> None:
        """A second From added on top breaks the over-signed From."""
        message = self.signed()
        message = message.replace(b"From: Alice", b"From: Mallory <m@evil.test>\r\nFrom: Alice", 1)
        self.assertEqual([r.result for r in self.verify(message)], ["fail", "fail"])

    def test_malformed_signature(self) -> None:
        """A DKIM-Signature of garbage is a permerror, not an exception."""
        for garbage in (b"garbage", b"v=1; a=rsa-sha256; d=; s", b"\xff\xfe;;==", b""):
            message = b"DKIM-Signature: " + garbage + b"\r\n" + MESSAGE
            results = self.verify(message)
            self.assertEqual([r.result for r in results], ["permerror"], garbage)

    def test_from_not_signed(self) -> None:
        """A signature whose h= leaves out From is a permerror (RFC 6376 §5.4)."""
        message = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa1; h=subject; "
                   b"bh=AAAA; b=AAAA\r\n" + MESSAGE)
        results = self.verify(message)
        self.assertEqual((results[0].result, results[0].problem), ("permerror",
                                                                  "From is not signed"))

    def test_signature_over_missing_header(self) -> None:
        """A message lacking some of the headers we sign is signed over those it has."""
        message = self.signed(MESSAGE.replace(b"Subject: Lunch\r\n", b""))
        self.assertEqual([r.result for r in self.verify(message)], ["pass", "pass"])

    def test_verify_signature_over_absent_header(self) -> None:
        """A signature whose h= names a field the message lacks passes (the absent field is
        hashed as nothing, RFC 6376 §5.4) and fails once that field is added."""
        header = dkimpy.DKIM(MESSAGE).sign(
            b"rsa1", b"example.test", self.keys[0].pem, canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[b"from", b"subject", b"reply-to", b"list-id"])
        self.assertIn(b"reply-to", header.lower())
        self.assertEqual(self.verify(header + MESSAGE)[0].result, "pass")
        added = header + MESSAGE.replace(b"Subject:", b"Reply-To: m@evil.test\r\nSubject:")
        self.assertEqual(self.verify(added)[0].result, "fail")

    def test_over_long_key_record(self) -> None:
        """A key record of thousands of octets (many TXT strings) is a permerror, not a
        crash or a hang."""
        message = self.signed(keys=[self.keys[0]])
        huge = {"rsa1._domainkey.example.test": {
            "TXT": ["v=DKIM1; k=rsa; p=" + "A" * 20000]}}
        result = self.verify(message, huge)[0]
        self.assertEqual(result.result, "permerror")
        self.assertTrue(result.problem)

    def test_malformed_signature_tags(self) -> None:
        """Signatures with bad tag values (a non-numeric l=, a b= that is not base64, an
        unknown c=, a future version) are each a result, never an exception."""
        good = sign_message(MESSAGE, [self.keys[0]])
        variants = {
            b"l=abc": good.replace(b"v=1;", b"v=1; l=abc;", 1),
            b"b=***": re.sub(rb"b=[^;]*$", b"b=***\r\n", good.rstrip(b"\r\n"), flags=re.S),
            b"c=odd": good.replace(b"c=relaxed/relaxed", b"c=odd/strange"),
            b"v=2": good.replace(b"v=1;", b"v=2;", 1),
            b"x<t": good.replace(b"v=1;", b"v=1; x=1;", 1),
        }
        for name, field in variants.items():
            results = self.verify(field + MESSAGE)
            self.assertEqual(len(results), 1, name)
            self.assertIn(results[0].result, ("permerror", "fail"), name)

    def test_body_length(self) -> None:
        """l= longer than the body is a permerror; shorter leaves content unsigned: policy."""
        signer = dkimpy.DKIM(MESSAGE)
        header = signer.sign(b"rsa1", b"example.test", self.keys[0].pem,
                             canonicalize=(b"relaxed", b"relaxed"), length=True)
        appended = header + MESSAGE + b"Click here!\r\n"
        result = self.verify(appended)[0]
        self.assertEqual(result.result, "policy")
        self.assertIn("unsigned", result.problem)
        shorter = header + MESSAGE.replace(b"At noon?\r\n", b"")
        self.assertEqual(self.verify(shorter)[0].result, "permerror")

    def test_rsa_sha1_is_policy(self) -> None:
        """An rsa-sha1 signature is reported as a policy failure (RFC 8301)."""
        signer = dkimpy.DKIM(MESSAGE, signature_algorithm=b"rsa-sha1")
        header = signer.sign(b"rsa1", b"example.test", self.keys[0].pem)
        self.assertEqual(self.verify(header + MESSAGE)[0].result, "policy")

    def test_short_key_is_policy(self) -> None:
        """A key shorter than the minimum is refused as policy, even when the maths holds."""
        result = self.verify(self.signed(keys=[self.keys[0]]), min_key_bits=4096)[0]
        self.assertEqual(result.result, "policy")

    def test_key_problems(self) -> None:
        """No key record is a permerror, a DNS failure a temperror, a revoked key a permerror,
        a key of the wrong type a permerror."""
        message = self.signed(keys=[self.keys[0]])
        self.assertEqual(self.verify(message, {})[0].result, "permerror")
        broken = {"rsa1._domainkey.example.test": {"error": "servfail"}}
        self.assertEqual(self.verify(message, broken)[0].result, "temperror")
        revoked = {"rsa1._domainkey.example.test": {"TXT": ["v=DKIM1; k=rsa; p="]}}
        self.assertEqual(self.verify(message, revoked)[0].result, "permerror")
        wrong = {"rsa1._domainkey.example.test": self.zone["ed1._domainkey.example.test"]}
        self.assertEqual(self.verify(message, wrong)[0].result, "permerror")

    def test_fifty_signatures(self) -> None:
        """Fifty signatures cost at most max_signatures lookups and give that many results."""
        one = sign_message(MESSAGE, [self.keys[1]])
        results = self.verify(one * 50 + MESSAGE)
        self.assertEqual(len(results), 8)
        self.assertTrue(all(r.result == "pass" for r in results))

    def test_no_signature(self) -> None:
        """A message without signatures has no results."""
        self.assertEqual(self.verify(MESSAGE), [])

    def test_signer_by_domain(self) -> None:
        """The signer signs with the keys of the sender's domain, and nothing for others."""
        signer = DKIMSigner({"example.test": self.keys}, run_in_thread=_now)
        fields = self.successResultOf(signer.sign(MESSAGE, "Example.Test"))
        self.assertEqual(fields.count(b"DKIM-Signature:"), 2)
        self.assertEqual(self.successResultOf(signer.sign(MESSAGE, "other.test")), b"")

    def test_public_record_matches(self) -> None:
        """The record printed for a loaded key is the one published at generation."""
        for key, name in zip(self.keys, ("rsa1", "ed1"), strict=True):
            self.assertEqual(public_record(key), self.zone[f"{name}._domainkey.example.test"]
                             ["TXT"][0])

    def test_bad_key_file(self) -> None:
        """A missing or unreadable key file is a one-line KeyFileError naming the file."""
        with self.assertRaises(KeyFileError) as missing:
            load_key(Path("/nonexistent/key.pem"), "example.test", "s")
        self.assertIn("/nonexistent/key.pem", str(missing.exception))
        with self.assertRaises(KeyFileError):
            _signing_key(b"not a key", "s")


_BODY_LINES = st.lists(st.text(alphabet=" \t\x0bab.", max_size=12).map(str.encode), max_size=8)


@settings(deadline=None)  # a loaded machine must not fail a test about equality
@given(_BODY_LINES)
def test_relaxed_body_agrees_with_dkimpy(lines: list[bytes]) -> None:
    """Our relaxed body canonicalization equals dkimpy's on every CRLF body."""
    body = b"".join(line + b"\r\n" for line in lines)
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    assert relaxed_body(body) == policy.canonicalize_body(body)


@settings(deadline=None)
@given(_BODY_LINES, st.lists(st.sampled_from([b"From: a@b.test", b"X: y", b" folded",
                                              b"\tmore"]), max_size=5))
def test_parse_message_agrees_with_dkimpy(lines: list[bytes], fields: list[bytes]) -> None:
    """Parsing only the header section gives what dkimpy's whole-message parse gives."""
    fields = [b"Subject: s", *fields]
    message = b"".join(f + b"\r\n" for f in fields) + b"\r\n" + b"".join(
        line + b"\r\n" for line in lines)
    ours = parse_message(message)
    theirs = dkimpy.rfc822_parse(message)
    assert ([list(h) for h in ours[0]], ours[1]) == ([list(h) for h in theirs[0]], theirs[1])


@settings(deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"From", b"SUBJECT ", b"x-y"]),
                          st.text(alphabet=" \t\r\nab;=", max_size=20).map(str.encode)),
                max_size=6))
def test_relaxed_headers_agree_with_dkimpy(headers: list[tuple[bytes, bytes]]) -> None:
    """Our relaxed header canonicalization equals dkimpy's."""
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    assert relaxed_headers(headers) == [tuple(h) for h in policy.canonicalize_headers(headers)]


@settings(deadline=None)
@given(st.text(alphabet="ab \t\r\n.", max_size=40).map(str.encode), st.booleans())
def test_relaxed_body_agrees_with_dkimpy_on_any_body(body: bytes, line_end: bool) -> None:
    """Also with lone CR or LF, with or without white space (the path that only cuts the
    empty lines at the end), and without a last CRLF when the last line does not end in white
    space (there the RFC 6376 §3.4.4 order of its two rules is read differently)."""
    if line_end:
        body += b"\r\n"
    elif body.endswith((b" ", b"\t")):
        body += b"."
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    assert relaxed_body(body) == policy.canonicalize_body(body)


def test_relaxed_body_examples() -> None:
    """Prose is kept as it is but for its empty last lines; a last line gets its CRLF."""
    assert relaxed_body(b"Hello.\r\nBye.\r\n\r\n\r\n") == b"Hello.\r\nBye.\r\n"
    assert relaxed_body(b"Hello.") == b"Hello.\r\n"
    assert relaxed_body(b"\r\n\r\n") == b""
    assert relaxed_body(b"") == b""


_SIGNATURE_VALUES = st.lists(st.sampled_from(
    [b"v=1", b"a=rsa-sha256", b" b=", b"b=", b"bh=AB+/=", b"\tb =", b"; b\r\n =", b"abc",
     b"AbC+/=", b" ", b"\r\n", b"\r\n\t", b"\n", b";", b"x=1", b"b=Zm9v", b"h=from:b"]),
    max_size=12).map(b"".join)


@settings(deadline=None)
@given(_SIGNATURE_VALUES)
def test_b_value_removal_agrees_with_dkimpy(value: bytes) -> None:
    """Taking out the b= value gives exactly what dkimpy's regular expression gives."""
    assert without_b_value(value) == dkimpy.RE_BTAG.sub(b"\\1", value)


def test_header_hash_agrees_with_dkimpy() -> None:
    """Our header hashing equals dkim.hash_headers for a real signature field, relaxed and
    simple, with an over-signed and an absent field."""
    import hashlib

    _, keys = _keys()
    field_value = sign_message(MESSAGE, keys[:1])[len(b"DKIM-Signature:"):]
    headers, _ = parse_message(MESSAGE)
    include = [b"from", b"subject", b"reply-to", b"from"]
    for c in (b"relaxed/relaxed", b"simple/simple"):
        policy = CanonicalizationPolicy.from_c_value(c)
        ours, theirs = hashlib.sha256(), hashlib.sha256()
        hash_headers(ours, policy, headers, include, (b"DKIM-Signature", field_value))
        dkimpy.hash_headers(theirs, policy, policy.canonicalize_headers(headers), include,
                            (b"DKIM-Signature", field_value), {})
        assert ours.digest() == theirs.digest(), c


@settings(deadline=None)
@given(st.lists(st.sampled_from([b"From", b"from", b"To", b"Subject", b"X-A"]), max_size=8),
       st.lists(st.sampled_from([b"from", b"to", b"subject", b"cc"]), max_size=8))
def test_select_headers_agrees_with_dkimpy(names: list[bytes], include: list[bytes]) -> None:
    """The fields chosen for hashing, repeated names bottom up, are dkimpy's choice."""
    headers = [(name, b" %d\r\n" % index) for index, name in enumerate(names)]
    assert select_headers(headers, include) == dkimpy.select_headers(headers, include)
