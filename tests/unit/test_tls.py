"""TLS contexts: the development certificate, modern protocol floor, and reload on renewal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL

from mailsys import tls


def _make(tmp_path: Path, name: str = "mail.example.test") -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    assert tls.ensure_self_signed(cert, key, name)
    return cert, key


def test_self_signed_certificate_names_host_localhost_and_loopback(tmp_path: Path) -> None:
    """The development certificate's SAN has the hostname, localhost and 127.0.0.1."""
    cert, key = _make(tmp_path)
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test", "localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert key.stat().st_mode & 0o777 == 0o600
    assert not tls.ensure_self_signed(cert, key, "mail.example.test")  # never overwritten


def test_context_refuses_tls_below_1_2(tmp_path: Path) -> None:
    """Server contexts carry the no-TLSv1/TLSv1.1 options and no renegotiation."""
    context = tls.ServerTLS(*_make(tmp_path)).server_context().getContext()
    options = context.get_options() if hasattr(context, "get_options") else None
    if options is not None:
        assert options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1
        assert options & SSL.OP_NO_RENEGOTIATION
        assert options & SSL.OP_NO_COMPRESSION


def test_reload_if_changed_picks_up_renewed_files(tmp_path: Path) -> None:
    """Replacing the files is noticed and new connections get the new options."""
    cert, key = _make(tmp_path)
    source = tls.ServerTLS(cert, key)
    before = source.server_context()
    assert source.reload_if_changed() is False
    new_cert, new_key = _make(tmp_path, "renewed.example.test")
    os.replace(new_cert, cert)
    os.replace(new_key, key)
    assert source.reload_if_changed() is True
    assert source.server_context() is not before


def test_broken_reload_keeps_the_old_certificate(tmp_path: Path) -> None:
    """A half-written renewal does not take the service down: the old options stay."""
    cert, key = _make(tmp_path)
    source = tls.ServerTLS(cert, key)
    before = source.server_context()
    cert.write_text("garbage")
    assert source.reload() is False
    assert source.server_context() is before


@pytest.mark.parametrize("broken", ["certificate", "key", "mismatch"])
def test_unusable_files_are_clear_errors(tmp_path: Path, broken: str) -> None:
    """A missing, malformed or mismatched certificate or key names the file."""
    cert, key = _make(tmp_path)
    if broken == "certificate":
        cert.unlink()
    elif broken == "key":
        key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    else:
        _, other_key = _make(tmp_path, "other.example.test")
        key = other_key
    with pytest.raises(tls.TLSConfigurationError) as info:
        tls.load_server_options(cert, key)
    assert str(cert) in str(info.value) or str(key) in str(info.value)
