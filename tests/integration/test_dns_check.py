"""`mailsys dns check` asks a real DNS server (the lab DNS over UDP) and reports, record by
record, what is missing or differs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.relay_support import start_lab_dns

MAILSYS = str(Path(sys.executable).parent / "mailsys")


def test_dns_check_reports_each_record(tmp_path: Path) -> None:
    """Published records are ok; a missing DMARC record and a wrong MX are named; the exit
    status says something is off."""
    keys = tmp_path / "keys"
    subprocess.run([MAILSYS, "dkim", "genkey", "example.test", "--key-dir", str(keys)],
                   check=True, capture_output=True, timeout=60)
    record = subprocess.run([MAILSYS, "dns", "records", "example.test", "--key-dir", str(keys),
                             "--config", str(tmp_path / "none.toml")],
                            check=True, capture_output=True, timeout=60).stdout.decode()
    dkim = next(line for line in record.splitlines() if line.startswith("mail._domainkey"))
    key_text = "".join(dkim.split('"')[1::2])
    zone = {
        "example.test": {"MX": [[10, "other.example.test"]], "TXT": ["v=spf1 mx -all"]},
        "mail.example.test": {"A": ["192.0.2.25"], "TXT": ["v=spf1 a -all"]},
        "mail._domainkey.example.test": {"TXT": [key_text]},
        "_mta-sts.example.test": {"TXT": ["v=STSv1; id=1"]},
        "_smtp._tls.example.test": {"TXT": ["v=TLSRPTv1; rua=mailto:postmaster@example.test"]},
        "_imaps._tcp.example.test": {"SRV": [[0, 1, 993, "mail.example.test"]]},
        # Our sending address on one test blocklist, not on the other.
        "25.2.0.192.bl.test": {"A": ["127.0.0.2"]},
    }
    lab = start_lab_dns(tmp_path / "dns", zone)
    try:
        done = subprocess.run(
            [MAILSYS, "dns", "check", "example.test", "--key-dir", str(keys), "--ipv4",
             "192.0.2.25", "--dns-server", lab.server, "--config", str(tmp_path / "none.toml"),
             "--dnsbl", "bl.test", "--dnsbl", "clean.test"],
            capture_output=True, timeout=120)
    finally:
        lab.stop()
    out = done.stdout.decode()
    assert done.returncode == 1, (out, done.stderr)
    lines = {" ".join(line.split()[:3]): line for line in out.splitlines()}
    assert lines["differs MX example.test"].endswith("found other.example.test")
    assert "ok A mail.example.test" in lines
    assert "ok TXT mail._domainkey.example.test" in lines
    assert "ok TXT example.test" in lines
    assert "missing TXT _dmarc.example.test" in lines
    assert "ok SRV _imaps._tcp.example.test" in lines
    assert "missing SRV _pop3._tcp.example.test" in lines
    assert lines["listed DNSBL 25.2.0.192.bl.test"].endswith(
        "192.0.2.25 is listed by bl.test (127.0.0.2)")
    assert "ok DNSBL 25.2.0.192.clean.test" in lines
    assert out.splitlines()[-1].endswith("records as expected")
