"""TLS for our listeners: the server context, its reload when certificates are renewed, and the
self-signed development certificate made on first start.

Contexts allow TLS 1.2 and 1.3 only, with forward-secret AEAD ciphers only, no compression and no
renegotiation. Every new connection asks ``ServerTLS.server_context()``, so a reload takes effect
for the next connection without a restart. ``describe_tls`` says what a connection negotiated,
for Received fields and logs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from typing import Protocol as TypingProtocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from typing_extensions import override
from zope.interface import implementer

log = Logger()

_PEM_CERT_END = b"-----END CERTIFICATE-----"

# TLS 1.2 suites: ECDHE key exchange (forward secrecy) with AES-GCM or ChaCha20-Poly1305 only,
# Mozilla's "intermediate" list, which every mail client of the last decade speaks. Twisted's
# default list also allows CBC suites and RSA key exchange (no forward secrecy). TLS 1.3 suites
# are all AEAD and OpenSSL's defaults are kept.
_TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])
SERVER_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(
    _TLS12_CIPHERS
)


# The IANA ALPN ids of the protocols we serve (RFC 7301 registry; "smtp", "imap" and "pop3"
# were registered against the ALPACA cross-protocol attack).
MAIL_ALPN = (b"smtp", b"imap", b"pop3")


class TLSConfigurationError(Exception):
    """The certificate or key cannot be used; the message names the file and the reason."""


class NoMailProtocolError(SSL.Error):
    """The client's ALPN offer names only protocols we do not speak (a browser, say).

    Its argument has the shape of OpenSSL's error queue, as Twisted's TLS code expects of every
    SSL.Error it handles.
    """

    def __init__(self) -> None:
        super().__init__([("SSL routines", "select_alpn", "no mail protocol in the ALPN offer")])


def select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    """The ALPN answer: the first mail protocol the client offered.

    A client that sends no ALPN is served without it (most mail clients). One that offers only
    other protocols (h2, http/1.1: a browser lured here, the ALPACA attack) is refused with the
    no_application_protocol alert, as RFC 7301 §3.2 prescribes.
    """
    for protocol in offered:
        if protocol in MAIL_ALPN:
            return protocol
    raise NoMailProtocolError()


class _HardenedOptions(CertificateOptions):
    """CertificateOptions that also refuses TLS 1.2 renegotiation and answers ALPN for mail."""

    @override
    def _makeContext(self, skipCiphers: bool = False) -> SSL.Context:
        context: SSL.Context = super()._makeContext(skipCiphers)
        # Client-initiated renegotiation is a DoS lever and has no use for mail.
        context.set_options(SSL.OP_NO_RENEGOTIATION)
        # Twisted installs an ALPN callback that, with no protocols configured, answers every
        # ALPN offer with an internal_error alert, so any client sending ALPN (even "smtp")
        # could not connect. Ours accepts the mail protocols and refuses the rest cleanly.
        context.set_alpn_select_callback(select_alpn)
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
        raise TLSConfigurationError(
            f"{certificate}: cannot read certificate: {exc.strerror}"
        ) from None
    try:
        key_pem = key.read_bytes()
    except OSError as exc:
        raise TLSConfigurationError(f"{key}: cannot read key: {exc.strerror}") from None
    blocks = [
        block + _PEM_CERT_END
        for block in chain_pem.split(_PEM_CERT_END)
        if b"-----BEGIN" in block
    ]
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
        acceptableCiphers=SERVER_CIPHERS,
    )
    try:
        options.getContext()  # checks that the key matches the certificate, now, not per client
    except SSL.Error:
        raise TLSConfigurationError(
            f"{key}: does not match the certificate {certificate}"
        ) from None
    return options


class TLSContextSource(TypingProtocol):
    """Where STARTTLS, STLS and implicit TLS get the server context (ServerTLS, with reloads).

    The protocol servers depend on this rather than on ServerTLS so that tests can hand them
    a fixed context.
    """

    def server_context(self) -> IOpenSSLServerConnectionCreator:
        """The current server context; may raise if no usable certificate is loaded."""


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
            log.error("TLS reload failed, keeping the current certificate: {reason}",
                      reason=str(exc))
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
    Apple's clients accept a certificate (even one the user trusts) only with the serverAuth
    extended key usage and at most 825 days of validity, so it has both.
    """
    if certificate.exists() and key.exists():
        return False
    certificate.parent.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # clock skew
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    # The embedded default listens on loopback: clients that check IP names find both.
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_encipherment=True, content_commitment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
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


def describe_tls(transport: object) -> str | None:
    """What ``transport`` negotiated, Postfix style, or None if it is not (yet) TLS:
    ``using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)``.

    With STARTTLS the TCP transport's ``getHandle()`` is, from then on, the pyOpenSSL
    Connection; with implicit TLS the session's transport is the TLSMemoryBIOProtocol, whose
    ``getHandle()`` is that Connection too.
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        handle = get_handle()
        if not hasattr(handle, "get_protocol_version_name"):
            return None  # a plain socket: not TLS
        version = handle.get_protocol_version_name()
        cipher = handle.get_cipher_name()
        bits = handle.get_cipher_bits()
    except Exception:  # a handle in an odd state says nothing rather than break a message
        log.failure("cannot describe the TLS connection")
        return None
    if cipher is None or bits is None or version in (None, "", "Unknown"):
        return None  # the handshake has not finished
    # pyOpenSSL gives the secret bits only; for the AEAD suites we allow both numbers agree.
    return f"using {version} with cipher {cipher} ({bits}/{bits} bits)"
