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
from collections.abc import Mapping
from typing import Any

from mailsys.lab.plan import LabHost, LabPlan

ZoneData = dict[str, dict[str, Any]]


def reverse_name(address: str) -> str:
    """The in-addr.arpa name of an address (RFC 1035 §3.5), where its PTR record is."""
    return ipaddress.ip_address(address).reverse_pointer


def dkim_records(plan: LabPlan) -> dict[str, tuple[str, str]]:
    """domain -> (selector, TXT text) of the DKIM key each lab domain signs with.

    The hook for DKIM: none yet, as mailsys cannot sign (its `dkim genkey` is not built yet).
    When it can, generate a key per host here (under ``host.directory``), point the host's
    config at it, and return its public record (RFC 6376 §3.6.1: "v=DKIM1; k=...; p=...").
    """
    return {}


def build_zone(plan: LabPlan, dkim: Mapping[str, tuple[str, str]] | None = None,
               policy_id: str | None = None) -> ZoneData:
    """The zone of the whole lab. ``policy_id`` is the MTA-STS policy id (RFC 8461 §3.1: it
    changes whenever the policy does); default: the time, to the second."""
    zone: ZoneData = {}
    sts_id = policy_id or time.strftime("%Y%m%d%H%M%S", time.gmtime())
    for host in plan.hosts:
        zone.update(_host_records(host, sts_id))
        if dkim and host.domain in dkim:
            selector, text = dkim[host.domain]
            # RFC 6376 §3.6.2.1: the key is at selector._domainkey.domain.
            zone[f"{selector}._domainkey.{host.domain}"] = {"TXT": [text]}
    return zone


def _host_records(host: LabHost, sts_id: str) -> ZoneData:
    domain, name, address = host.domain, host.hostname, host.address
    return {
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


def write_zone(plan: LabPlan, zone: Mapping[str, Any]) -> None:
    """Write the zone file atomically: the DNS server re-reads it and never sees half a file."""
    path = plan.zone_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(zone, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
