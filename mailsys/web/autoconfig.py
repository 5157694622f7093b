"""Client autoconfiguration: what Thunderbird (config-v1.1.xml) and Outlook (autodiscover POX)
are told about the servers of a local domain, so that a user types only an address.

Thunderbird reads ``emailProvider`` (``domain``, ``incomingServer`` and ``outgoingServer`` with
``hostname``, ``port``, ``socketType``, ``authentication``, ``username``); Outlook's
autodiscover answers with the "outlook" response schema (2006a) and one ``Protocol`` per
service. Every login name is the full address: that is how mailsys names its users.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from xml.sax.saxutils import escape

from mailsys.config import Config, split_endpoint

AUTODISCOVER_REQUEST_LIMIT = 16 * 1024
_EMAIL_ELEMENT = re.compile(
    rb"<(?:\w+:)?EMailAddress>\s*([^<\s]{3,320})\s*</(?:\w+:)?EMailAddress>")
_RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
_OUTLOOK_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"


@dataclass(frozen=True)
class Service:
    """One server a client may use: protocol ("imap", "pop3", "smtp"), port and whether TLS
    starts at once ("SSL") or after STARTTLS/STLS ("STARTTLS")."""

    protocol: str
    port: int
    socket_type: str


def _port(description: str) -> int | None:
    args, kwargs = split_endpoint(description)
    port = args[1] if len(args) > 1 else kwargs.get("port")
    return int(port) if port is not None and port.isdigit() and int(port) else None


def services(config: Config) -> list[Service]:
    """The services to advertise, from the listeners: the first TCP port of each protocol and
    kind of TLS, implicit TLS first (RFC 8314 §3 prefers it; clients try them in order)."""
    found: list[Service] = []
    for protocol, section in (("imap", config.imap), ("pop3", config.pop3),
                              ("smtp", config.submission)):
        for listeners, socket_type in ((section.listen_tls, "SSL"),
                                       (section.listen, "STARTTLS")):
            ports = [_port(d) for d in listeners if d.split(":", 1)[0].lower() != "unix"]
            port = next((p for p in ports if p is not None), None)
            if port is not None:
                found.append(Service(protocol, port, socket_type))
    return found


def served_domains(config: Config) -> frozenset[str]:
    """The domains whose users this server configures: local domains and alias domains."""
    return frozenset(d.lower().rstrip(".") for d in
                     (*config.routing.local_domains, *config.routing.domain_aliases))


def thunderbird_xml(domain: str, hostname: str, offered: list[Service]) -> bytes:
    """The clientConfig document (version 1.1) Thunderbird reads for ``domain``."""
    d, h = escape(domain), escape(hostname)
    parts = ['<?xml version="1.0" encoding="UTF-8"?>\n<clientConfig version="1.1">\n',
             f'  <emailProvider id="{d}">\n    <domain>{d}</domain>\n',
             f"    <displayName>{d}</displayName>\n",
             f"    <displayShortName>{d}</displayShortName>\n"]
    for service in offered:
        element = "outgoingServer" if service.protocol == "smtp" else "incomingServer"
        parts.append(
            f'    <{element} type="{service.protocol}">\n'
            f"      <hostname>{h}</hostname>\n"
            f"      <port>{service.port}</port>\n"
            f"      <socketType>{service.socket_type}</socketType>\n"
            "      <authentication>password-cleartext</authentication>\n"
            "      <username>%EMAILADDRESS%</username>\n"
            f"    </{element}>\n"
        )
    parts.append("  </emailProvider>\n</clientConfig>\n")
    return "".join(parts).encode("utf-8")


def autodiscover_address(body: bytes) -> str | None:
    """The EMailAddress of an Outlook autodiscover request, or None.

    Read with a pattern, not an XML parser: the body comes from anyone, and nothing else of
    it is needed (no entity expansion, no external references).
    """
    match = _EMAIL_ELEMENT.search(body[:AUTODISCOVER_REQUEST_LIMIT])
    if match is None:
        return None
    try:
        return match.group(1).decode("utf-8")
    except UnicodeDecodeError:
        return None


def autodiscover_xml(address: str, hostname: str, offered: list[Service]) -> bytes:
    """The autodiscover response (outlook schema 2006a) for ``address``."""
    a, h = escape(address), escape(hostname)
    parts = ['<?xml version="1.0" encoding="utf-8"?>\n',
             f'<Autodiscover xmlns="{_RESPONSE_NS}">\n',
             f'  <Response xmlns="{_OUTLOOK_NS}">\n    <Account>\n',
             "      <AccountType>email</AccountType>\n      <Action>settings</Action>\n"]
    seen: set[str] = set()
    for service in offered:
        kind = service.protocol.upper()
        if kind in seen:
            continue  # Outlook takes one Protocol of each type
        seen.add(kind)
        encryption = "SSL" if service.socket_type == "SSL" else "TLS"
        parts.append(
            "      <Protocol>\n"
            f"        <Type>{'POP3' if kind == 'POP3' else kind}</Type>\n"
            f"        <Server>{h}</Server>\n"
            f"        <Port>{service.port}</Port>\n"
            f"        <LoginName>{a}</LoginName>\n"
            "        <DomainRequired>off</DomainRequired>\n"
            "        <SPA>off</SPA>\n"
            "        <SSL>on</SSL>\n"
            f"        <Encryption>{encryption}</Encryption>\n"
            "        <AuthRequired>on</AuthRequired>\n"
            "      </Protocol>\n"
        )
    parts.append("    </Account>\n  </Response>\n</Autodiscover>\n")
    return "".join(parts).encode("utf-8")
