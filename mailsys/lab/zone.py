"""The lab's DNS zone, as mailsys.labdns serves it: for each domain its MX, the host's A record
and the PTR of its address, and the TXT records of mail authentication: SPF, DMARC, MTA-STS,
TLSRPT, and DKIM when a key has been made for the domain.

Everything is derived from the plan; the DKIM records come from ``dkim_records``, the one place
that learns about keys.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from mailsys.authn.dkim import KeyFileError, generate_key, load_key, public_record
from mailsys.lab.plan import LabHost, LabPlan

DKIM_SELECTOR = "lab"

ZoneData = dict[str, dict[str, Any]]


def reverse_name(address: str) -> str:
    """The in-addr.arpa name of an address (RFC 1035 §3.5), where its PTR record is."""
    return ipaddress.ip_address(address).reverse_pointer


def dkim_key_path(host: LabHost) -> Path:
    """DIR/DOMAIN/dkim/DOMAIN.lab.pem: where `mailsys dkim genkey` would put it for the host's
    configuration (authn.key_dir), so the server finds it as any server does."""
    return host.dkim_directory / f"{host.domain}.{DKIM_SELECTOR}.pem"


def dkim_records(plan: LabPlan) -> dict[str, tuple[str, str]]:
    """domain -> (selector, TXT text) of the DKIM key each lab domain signs with: a key made
    once per domain (RSA 2048, mailsys.authn.dkim's genkey) and kept across `lab up`, its
    public half as RFC 6376 §3.6.1 publishes it ("v=DKIM1; k=rsa; p=...")."""
    records = {}
    for host in plan.hosts:
        path = dkim_key_path(host)
        host.dkim_directory.mkdir(parents=True, exist_ok=True)
        try:
            key = load_key(path, host.domain, DKIM_SELECTOR)
            record = public_record(key)
        except (KeyFileError, OSError):
            pem, record = generate_key("rsa", 2048)
            # A private key: 0600 from its creation on (authn refuses one open to others).
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(pem)
            os.replace(tmp, path)
        records[host.domain] = (DKIM_SELECTOR, record)
    return records


def build_zone(plan: LabPlan, dkim: Mapping[str, tuple[str, str]] | None = None,
               policy_id: str | None = None, servfail: Collection[str] = ()) -> ZoneData:
    """The zone of the whole lab. ``policy_id`` is the MTA-STS policy id (RFC 8461 §3.1: it
    changes whenever the policy does); default: the time, to the second. Every name of a
    domain in ``servfail`` answers SERVFAIL (the `dns-servfail` fault)."""
    zone: ZoneData = {}
    sts_id = policy_id or time.strftime("%Y%m%d%H%M%S", time.gmtime())
    fallback = plan.fallback
    for host in plan.hosts:
        records = _host_records(host, sts_id)
        if fallback is not None and host.domain == fallback.domain:
            # RFC 5321 §5.1: the lowest preference is tried first; mx1 is switched off, so
            # senders must go on to the next MX.
            records[host.domain]["MX"] = [[10, f"mx1.{host.domain}"], [20, host.hostname]]
            records[f"mx1.{host.domain}"] = {"A": [plan.dead_address]}
        if dkim and host.domain in dkim:
            selector, text = dkim[host.domain]
            # RFC 6376 §3.6.2.1: the key is at selector._domainkey.domain.
            records[f"{selector}._domainkey.{host.domain}"] = {"TXT": [text]}
        if host.domain in servfail:
            records = {name: ({"error": "servfail"} if not name.endswith(".arpa") else value)
                       for name, value in records.items()}
        zone.update(records)
    return zone


def policy_id_of(zone: Mapping[str, Any], plan: LabPlan) -> str | None:
    """The MTA-STS id a zone already publishes, kept when the zone is rewritten for a fault."""
    for host in plan.hosts:
        for text in zone.get(f"_mta-sts.{host.domain}", {}).get("TXT", []):
            if isinstance(text, str) and "id=" in text:
                return text.rpartition("id=")[2].strip()
    return None


def read_zone(plan: LabPlan) -> ZoneData:
    try:
        data = json.loads(plan.zone_path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _host_records(host: LabHost, sts_id: str) -> ZoneData:
    domain, name, address = host.domain, host.hostname, host.address
    records: ZoneData = {
        # RFC 5321 §5.1: mail for the domain goes to its MX; RFC 7208 §4: the domain's SPF
        # policy lists the one address its mail leaves from, and nothing else may send it.
        domain: {"MX": [[10, name]], "TXT": [f"v=spf1 ip4:{address} -all"]},
        # RFC 7208 §2.3: the HELO name has an SPF policy of its own.
        name: {"A": [address], "TXT": ["v=spf1 a -all"]},
        # The reverse name points back at the host: iprev (RFC 8601 §3) passes.
        reverse_name(address): {"PTR": [name]},
        # RFC 7489 §6.1: DMARC policy; reject what fails, so spoofing shows.
        f"_dmarc.{domain}": {"TXT": ["v=DMARC1; p=reject; adkim=r; aspf=r"]},
        # RFC 8461 §3.1: the MTA-STS record, and the host serving the policy (§3.2).
        f"_mta-sts.{domain}": {"TXT": [f"v=STSv1; id={sts_id}"]},
        f"mta-sts.{domain}": {"A": [address]},
        # RFC 8460 §3: where TLS reports go.
        f"_smtp._tls.{domain}": {"TXT": [f"v=TLSRPTv1; rua=mailto:tlsrpt@{domain}"]},
    }
    return records


def write_zone(plan: LabPlan, zone: Mapping[str, Any]) -> None:
    """Write the zone file atomically: the DNS server re-reads it and never sees half a file."""
    path = plan.zone_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(zone, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
