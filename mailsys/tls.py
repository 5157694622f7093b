"""TLS for our listeners: the server context, its reload when certificates are renewed, and the
self-signed development certificate made on first start.

Contexts allow TLS 1.2 and 1.3 only, with Twisted's modern cipher list, no compression and no
renegotiation. Every new connection asks ``ServerTLS.server_context()``, so a reload takes effect
for the next connection without a restart.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

log = Logger()

_PEM_CERT_END = b"-----END CERTIFICATE-----"


class TLSConfigurationError(Exception):
    """The certificate or key cannot be used; the message names the file and the reason."""


class _HardenedOptions(CertificateOptions):
    """CertificateOptions that also refuses TLS 1.2 renegotiation."""

    def _makeContext(self, skipCiphers: bool = False) -> SSL.Context:  # noqa: N803 - Twisted's name
        context: SSL.Context = super()._makeContext(skipCiphers)
        # Client-initiated renegotiation is a DoS lever and has no use for mail.
        context.set_options(SSL.OP_NO_RENEGOTIATION)
        return context


@dataclass(frozen=True)
class _FileStamp:
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> _FileStamp | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


def load_server_options(certificate: Path, key: Path) -> CertificateOptions:
    """Build server options from a PEM chain (leaf first) and a PEM key; raise on any problem."""
    try:
        chain_pem = certificate.read_bytes()
    except OSError as exc:
        raise TLSConfigurationError(f"{certificate}: cannot read certificate: {exc.strerror}") from None
    try:
        key_pem = key.read_bytes()
    except OSError as exc:
        raise TLSConfigurationError(f"{key}: cannot read key: {exc.strerror}") from None
    blocks = [block + _PEM_CERT_END for block in chain_pem.split(_PEM_CERT_END) if b"-----BEGIN" in block]
    if not blocks:
        raise TLSConfigurationError(f"{certificate}: no PEM certificate found")
    try:
        chain = [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError:
        raise TLSConfigurationError(f"{certificate}: not a valid PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TLSConfigurationError(f"{key}: not a valid PEM private key (or encrypted)") from None
    # pyOpenSSL takes cryptography's objects directly; its own X509/PKey wrappers are deprecated.
    # (Twisted's annotations still name the wrappers, hence the casts.)
    options = _HardenedOptions(
        privateKey=cast(Any, private_key),
        certificate=cast(Any, chain[0]),
        extraCertChain=cast(Any, chain[1:]),
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()  # checks that the key matches the certificate, now, not per client
    except SSL.Error:
        raise TLSConfigurationError(f"{key}: does not match the certificate {certificate}") from None
    return options


class ServerTLS:
    """The current server TLS options, reloaded when the certificate or key files change."""

    def __init__(self, certificate: Path, key: Path) -> None:
        self.certificate = certificate
        self.key = key
        self._options = load_server_options(certificate, key)
        self._stamps = self._current_stamps()

    def _current_stamps(self) -> tuple[_FileStamp | None, _FileStamp | None]:
        return (_FileStamp.of(self.certificate), _FileStamp.of(self.key))

    def server_context(self) -> CertificateOptions:
        """The options a new connection uses (TLSContextSource for the protocol servers)."""
        return self._options

    def reload(self) -> bool:
        """Re-read the files. On error keep serving the old certificate and log why."""
        try:
            options = load_server_options(self.certificate, self.key)
        except TLSConfigurationError as exc:
            log.error("TLS reload failed, keeping the current certificate: {reason}", reason=str(exc))
            return False
        self._options = options
        self._stamps = self._current_stamps()
        log.info("TLS certificate reloaded from {certificate}", certificate=str(self.certificate))
        return True

    def reload_if_changed(self) -> bool:
        """Reload when either file changed since the last load (renewal by certbot and friends)."""
        if self._current_stamps() == self._stamps:
            return False
        return self.reload()


def ensure_self_signed(certificate: Path, key: Path, hostname: str) -> bool:
    """Create a self-signed development certificate when the files do not exist yet.

    SAN: the configured hostname, localhost and 127.0.0.1. Returns True if files were created.
    """
    if certificate.exists() and key.exists():
        return False
    certificate.parent.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )
    key_bytes = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_bytes)
    certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return True


@implementer(IOpenSSLServerConnectionCreator)
class CurrentCertificateCreator:
    """Creates each implicit-TLS connection from the ServerTLS options in force at that moment."""

    def __init__(self, tls: ServerTLS) -> None:
        self._tls = tls

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:  # noqa: N802
        connection: SSL.Connection = self._tls.server_context().serverConnectionForTLS(protocol)
        return connection
