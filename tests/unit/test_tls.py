"""TLS contexts: the development certificate, modern protocol floor, and reload on renewal."""

from __future__ import annotations

import contextlib
import datetime
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
    """The development certificate's SAN has the hostname, localhost, 127.0.0.1 and ::1."""
    cert, key = _make(tmp_path)
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test", "localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    usage = parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert parsed.not_valid_after_utc - parsed.not_valid_before_utc <= datetime.timedelta(days=825)
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


def test_only_forward_secret_aead_ciphers(tmp_path: Path) -> None:
    """The server offers TLS 1.3 suites and ECDHE with AES-GCM or ChaCha20 only: no CBC, no RSA
    key exchange."""
    context = tls.ServerTLS(*_make(tmp_path)).server_context().getContext()
    ciphers = SSL.Connection(context, None).get_cipher_list()
    assert "TLS_AES_256_GCM_SHA384" in ciphers and "ECDHE-RSA-AES256-GCM-SHA384" in ciphers
    tls12 = [c for c in ciphers if not c.startswith("TLS_")]
    assert tls12 and all(c.startswith("ECDHE-") for c in tls12)
    assert all("GCM" in c or "CHACHA20" in c for c in tls12)


class _Handle:
    def get_protocol_version_name(self) -> str:
        return "TLSv1.2"

    def get_cipher_name(self) -> str | None:
        return "ECDHE-RSA-AES256-GCM-SHA384"

    def get_cipher_bits(self) -> int | None:
        return 256


class _Transport:
    def __init__(self, handle: object) -> None:
        self.handle = handle

    def getHandle(self) -> object:  # noqa: N802 - the transport method's name
        return self.handle


def test_describe_tls() -> None:
    """describe_tls says what a TLS transport negotiated, Postfix style; None for plain TCP."""
    assert tls.describe_tls(_Transport(_Handle())) == (
        "using TLSv1.2 with cipher ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits)")
    assert tls.describe_tls(_Transport(object())) is None
    assert tls.describe_tls(object()) is None


def test_describe_tls_before_the_handshake(tmp_path: Path) -> None:
    """A pyOpenSSL connection that has not finished its handshake is described as nothing."""
    context = tls.ServerTLS(*_make(tmp_path)).server_context().getContext()
    assert tls.describe_tls(_Transport(SSL.Connection(context, None))) is None


def _handshake(server_context: SSL.Context, alpn: list[bytes] | None) -> SSL.Connection:
    """Run a TLS handshake in memory against ``server_context``; the server's connection."""
    client_context = SSL.Context(SSL.TLS_METHOD)
    if alpn is not None:
        client_context.set_alpn_protos(alpn)
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    for _ in range(10):
        for connection in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                connection.do_handshake()
        for source, target in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                target.bio_write(source.bio_read(65536))
    return server


@pytest.mark.parametrize(("offer", "chosen"), [
    (None, None), ([b"smtp"], b"smtp"), ([b"h2", b"imap"], b"imap"),
])
def test_alpn_mail_protocols_or_none(tmp_path: Path, offer: list[bytes] | None,
                                     chosen: bytes | None) -> None:
    """A client sending no ALPN, or a mail protocol's id, completes the handshake."""
    context = tls.ServerTLS(*_make(tmp_path)).server_context().getContext()
    server = _handshake(context, offer)
    assert server.get_protocol_version_name() == "TLSv1.3"
    assert (server.get_alpn_proto_negotiated() or None) == chosen


def test_alpn_for_other_protocols_is_refused(tmp_path: Path) -> None:
    """A client offering only HTTP protocols (ALPACA) is refused with NoMailProtocolError."""
    context = tls.ServerTLS(*_make(tmp_path)).server_context().getContext()
    with pytest.raises(tls.NoMailProtocolError):
        _handshake(context, [b"h2", b"http/1.1"])
