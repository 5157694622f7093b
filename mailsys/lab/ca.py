"""The lab certificate authority: one CA, and a certificate per lab host naming its host name
and its address, so that ``tls_policy = "verify"`` holds between lab servers and a student adds
one CA file to a mail client.

Keys are ECDSA P-256: quick to make (a lab comes up in seconds) and spoken by every TLS client
of the last decade. Files are PEM; keys are written readable by their owner only. Called from
the `mailsys lab` command, never on a reactor thread.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# A lab lives for a course, not for years; the CA outlives its host certificates.
CA_DAYS = 3650
HOST_DAYS = 825  # the longest lifetime Apple's clients accept (CA/B Forum's former limit)
# Clocks of students' machines drift; a certificate valid from a little earlier still verifies.
BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class HostFiles:
    """Where one host's certificate chain (leaf, then CA) and key are."""

    certificate: Path
    key: Path


class LabCA:
    """A CA kept in ``directory`` (ca.pem, ca.key); created on first use, reused after."""

    def __init__(self, directory: Path, name: str = "mailsys lab CA") -> None:
        self.directory = Path(directory)
        self.certificate_path = self.directory / "ca.pem"
        self.key_path = self.directory / "ca.key"
        self._name = name
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._certificate: x509.Certificate | None = None

    def ensure(self) -> None:
        """Load the CA from its files, or make one and write them."""
        if self.certificate_path.exists() and self.key_path.exists():
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{self.key_path}: not an EC private key")
            self._key = key
            self._certificate = x509.load_pem_x509_certificate(
                self.certificate_path.read_bytes())
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self._name)])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            # RFC 5280 §4.2.1.9: a CA certificate says so, critically; it signs certificates only.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_key(self.key_path, key)
        self.certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        self._key, self._certificate = key, certificate

    def issue(self, hostname: str, address: str, directory: Path) -> HostFiles:
        """A certificate for ``hostname`` and ``address`` (both as subject alternative names,
        RFC 6125 §6.4: clients match names there, not in the common name), in ``directory``."""
        if self._key is None or self._certificate is None:
            self.ensure()
        assert self._key is not None and self._certificate is not None
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        issuer_key = self._certificate.public_key()
        assert isinstance(issuer_key, ec.EllipticCurvePublicKey)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=HOST_DAYS))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address(address))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        files = HostFiles(directory / "cert.pem", directory / "key.pem")
        _write_key(files.key, key)
        chain = (certificate.public_bytes(serialization.Encoding.PEM)
                 + self._certificate.public_bytes(serialization.Encoding.PEM))
        files.certificate.write_bytes(chain)
        return files


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    # Created 0600 from the start: the key is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
