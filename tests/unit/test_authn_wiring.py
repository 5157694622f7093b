"""Signing keys from the key directory: discovery, order, and one-line refusals."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mailsys.authn.dkim import KeyFileError, generate_key
from mailsys.authn.wiring import key_file, load_signing_keys


def _write(path: Path, algorithm: str, mode: int = 0o600) -> None:
    pem, _ = generate_key(algorithm)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pem)
    os.chmod(path, mode)


def test_discovers_keys_rsa_first(tmp_path: Path) -> None:
    """Every DOMAIN.*.pem of a local domain is used, the RSA key first."""
    _write(key_file(tmp_path, "example.test", "a-ed"), "ed25519")
    _write(key_file(tmp_path, "example.test", "z-rsa"), "rsa")
    _write(key_file(tmp_path, "other.test", "mail"), "rsa")
    keys = load_signing_keys(tmp_path, ["example.test"], {})
    assert [(k.selector, k.algorithm) for k in keys["example.test"]] == [
        ("z-rsa", "rsa-sha256"), ("a-ed", "ed25519-sha256")]
    assert "other.test" not in keys


def test_configured_selectors_must_exist(tmp_path: Path) -> None:
    """A configured selector without its key file is a one-line error naming the file."""
    with pytest.raises(KeyFileError, match=r"example\.test\.mail\.pem"):
        load_signing_keys(tmp_path, ["example.test"], {"example.test": ["mail"]})


def test_key_open_to_others_refused(tmp_path: Path) -> None:
    """A private key readable by others is refused; group read (0640) is the project's mode
    for secrets shared with the server's group."""
    _write(key_file(tmp_path, "example.test", "ok"), "rsa", 0o640)
    assert load_signing_keys(tmp_path, ["example.test"], {})["example.test"][0].selector == "ok"
    _write(key_file(tmp_path, "example.test", "mail"), "rsa", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600 or 640"):
        load_signing_keys(tmp_path, ["example.test"], {})


def test_selectors_for_unknown_domain(tmp_path: Path) -> None:
    """Selectors for a domain that is not local are refused."""
    _write(key_file(tmp_path, "example.test", "mail"), "rsa")
    with pytest.raises(KeyFileError, match="not a local domain"):
        load_signing_keys(tmp_path, ["lab.test"], {"example.test": ["mail"]})


def test_no_key_dir(tmp_path: Path) -> None:
    """Without a key directory nothing is signed, and that is no error."""
    assert load_signing_keys(tmp_path / "none", ["example.test"], {}) == {}


def _config(tmp_path: Path, authn: str = "") -> Any:
    import tomllib

    from mailsys.config import from_mapping

    data = tomllib.loads(f"""
[server]
hostname = "mx.example.test"
[routing]
local_domains = ["example.test"]
[relay]
enabled = false
[authn]
key_dir = "{tmp_path / 'keys'}"
{authn}
""")
    return from_mapping(data, tmp_path / "mailsys.toml", check_files=False)


def test_authn_from_config(tmp_path: Path) -> None:
    """[authn] builds the resolver (checks on), the per-domain policies and the keys."""
    from twisted.internet.task import Clock

    from mailsys.authn.wiring import Authn

    _write(key_file(tmp_path / "keys", "example.test", "mail"), "rsa")
    authn = Authn(_config(tmp_path, 'dmarc = "junk"\n[authn.domains."lab.test"]\nspf = "reject"'),
                  Clock())
    assert authn.resolver is not None
    assert authn.policies.default.dmarc == "junk"
    assert authn.policies.for_recipient("x@lab.test").spf == "reject"
    assert authn.policies.for_recipient("x@lab.test").dmarc == "junk"
    assert [k.selector for k in authn.keys["example.test"]] == ["mail"]
    off = Authn(_config(tmp_path, "checks = false"), Clock())
    assert off.resolver is None and off.authentication.checks is None


def test_reload_keeps_old_keys_on_error(tmp_path: Path) -> None:
    """SIGHUP's reload picks up a new key; a broken key file keeps the keys in use."""
    from twisted.internet.task import Clock

    from mailsys.authn.wiring import Authn

    keys = tmp_path / "keys"
    _write(key_file(keys, "example.test", "mail"), "rsa")
    authn = Authn(_config(tmp_path, "checks = false"), Clock())
    _write(key_file(keys, "example.test", "mail-ed"), "ed25519")
    authn.reload()
    assert [k.selector for k in authn.keys["example.test"]] == ["mail", "mail-ed"]
    assert authn.authentication.signer is not None
    os.chmod(key_file(keys, "example.test", "mail-ed"), 0o644)
    authn.reload()
    assert [k.selector for k in authn.keys["example.test"]] == ["mail", "mail-ed"]


def test_which_mail_is_signed_and_which_checked(tmp_path: Path) -> None:
    """Authenticated and locally made mail is signed; mail from a client that did not
    authenticate - loopback too - is checked."""
    from twisted.internet.defer import succeed

    from mailsys.authn.sink import AuthenticatingSink
    from mailsys.envelope import Envelope

    calls: list[str] = []

    class Authentication:
        signer = object()  # signing and the checks on: with them off, neither is asked

        def unchecked(self, message: bytes) -> bytes | None:
            return None

        def signing(self, message: bytes, queue_id: str = "") -> Any:
            from mailsys.authn.intake import Signing

            calls.append("sign")
            return succeed(Signing(message))

        def inbound(self, facts: Any, message: bytes) -> Any:
            calls.append(f"check {facts.client_address}")
            from mailsys.authn.intake import IntakeVerdict

            return succeed(IntakeVerdict(message))

    class Inner:
        def new_queue_id(self) -> str:
            return "Q"

        def submit(self, envelope: Any, message: bytes) -> Any:
            return succeed(None)

    sink = AuthenticatingSink(Inner(), Authentication())  # type: ignore[arg-type]
    sink.submit(Envelope("Q", "a@example.test", [], 0.0, auth_user="a@example.test"), b"x")
    sink.submit(Envelope("Q", "", [], 0.0, protocol="local"), b"x")
    sink.submit(Envelope("Q", "a@example.test", [], 0.0, client_address="127.0.0.1"), b"x")
    assert calls == ["sign", "sign", "check 127.0.0.1"]
