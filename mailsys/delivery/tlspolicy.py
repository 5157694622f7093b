"""TLS for outbound mail: which policy applies to a destination, and the client contexts.

Policies (RFC 3207 STARTTLS; RFC 7435 for what "opportunistic" means):

- ``opportunistic`` (the default): STARTTLS when the server offers it, without requiring the
  certificate to verify (an unauthenticated but encrypted channel beats plaintext); plaintext
  when it is not offered.
- ``verify``: STARTTLS is required and the certificate must chain to a trusted root and match
  the MX host name (service_identity, RFC 6125); otherwise the host is skipped and the mail
  deferred with the reason.
- ``none``: never STARTTLS.

A policy is set globally and per destination domain (``example.org`` exactly, ``.example.org``
for its subdomains).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from mailsys.values import TLSPolicy

_PEM_CERT_END = b"-----END CERTIFICATE-----"


class TLSPolicies:
    """The policy for each destination domain: per-domain entries, else the default."""

    def __init__(self, default: TLSPolicy, per_domain: Mapping[str, TLSPolicy]) -> None:
        self.default = default
        self._exact: dict[str, TLSPolicy] = {}
        self._suffixes: dict[str, TLSPolicy] = {}
        for key, value in per_domain.items():
            name = key.lower().removesuffix(".")
            target = self._suffixes if name.startswith(".") else self._exact
            target[name] = value

    def for_domain(self, domain: str) -> TLSPolicy:
        policy = self._entry(domain)
        return policy if policy is not None else self.default

    def has_entry(self, domain: str) -> bool:
        """Whether a per-domain entry names ``domain`` (it then overrides MTA-STS)."""
        return self._entry(domain) is not None

    def _entry(self, domain: str) -> TLSPolicy | None:
        domain = domain.lower().removesuffix(".")
        policy = self._exact.get(domain)
        if policy is not None:
            return policy
        labels = domain.split(".")
        for index in range(1, len(labels)):
            policy = self._suffixes.get("." + ".".join(labels[index:]))
            if policy is not None:
                return policy
        return None


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """A client connection that encrypts without checking the certificate, sending SNI."""

    def __init__(self, context: SSL.Context, hostname: str) -> None:
        self._context = context
        self._hostname = hostname

    def clientConnectionForTLS(  # noqa: N802 - IOpenSSLClientConnectionCreator
        self, tlsProtocol: TLSMemoryBIOProtocol  # noqa: N803
    ) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if not _is_ip(self._hostname):
            # RFC 6066 §3: SNI carries a host name, never an address.
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        return connection


class ClientTLS:
    """Builds client TLS connection creators for the relay.

    ``ca_file`` (PEM, one or more certificates) replaces the system's trust store for the
    ``verify`` policy: a lab trusts its own CA, tests a self-signed receiver.
    """

    def __init__(self, ca_file: Path | None = None) -> None:
        self._ca_file = ca_file
        self._trust: Any = None
        # One context for every unverified connection: building one costs milliseconds.
        options = ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        self._unverified_context: SSL.Context = options.getContext()

    def _trust_root(self) -> Any:
        if self._trust is None:
            if self._ca_file is None:
                self._trust = ssl.platformTrust()
            else:
                data = self._ca_file.read_bytes()
                certificates = [
                    ssl.Certificate.loadPEM(block + _PEM_CERT_END)
                    for block in data.split(_PEM_CERT_END)
                    if b"-----BEGIN" in block
                ]
                if not certificates:
                    raise ValueError(f"{self._ca_file}: no PEM certificate")
                self._trust = ssl.trustRootFromCertificates(certificates)
        return self._trust

    def opportunistic(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """Encrypt, accept any certificate (RFC 7435: better than plaintext)."""
        return _Unverified(self._unverified_context, hostname)

    def verifying(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """Encrypt, and require a trusted certificate that matches ``hostname`` (RFC 6125)."""
        return ssl.optionsForClientTLS(
            hostname,
            trustRoot=self._trust_root(),
            extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
        )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
