"""Signing keys from the key directory: discovery, order, and one-line refusals."""

from __future__ import annotations

import os
from pathlib import Path

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
    """A private key readable by group or others is refused (chmod 600)."""
    _write(key_file(tmp_path, "example.test", "mail"), "rsa", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signing_keys(tmp_path, ["example.test"], {})


def test_selectors_for_unknown_domain(tmp_path: Path) -> None:
    """Selectors for a domain that is not local are refused."""
    _write(key_file(tmp_path, "example.test", "mail"), "rsa")
    with pytest.raises(KeyFileError, match="not a local domain"):
        load_signing_keys(tmp_path, ["lab.test"], {"example.test": ["mail"]})


def test_no_key_dir(tmp_path: Path) -> None:
    """Without a key directory nothing is signed, and that is no error."""
    assert load_signing_keys(tmp_path / "none", ["example.test"], {}) == {}
