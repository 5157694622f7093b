"""The teaching lab's pieces without starting it: plan, CA, zone, configs, state and refusals."""

from __future__ import annotations

import io
import os
import socket
import stat
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import crypto
from twisted.names import dns

from mailsys import cli, config
from mailsys.lab.ca import LabCA
from mailsys.lab.configs import render_config
from mailsys.lab.control import Lab, LabProcess, LabState, _process_start, render_table
from mailsys.lab.plan import LabError, make_plan
from mailsys.lab.zone import build_zone, reverse_name
from mailsys.labdns import Zone
from mailsys.values import DNSServer, TLSPolicy


def test_plan_defaults() -> None:
    """Three domains on 127.0.2.0/24: DNS on .1, one host per domain from .2, two users each."""
    plan = make_plan(Path("lab"), 3, "127.0.2.0/24")
    assert plan.dns_address == "127.0.2.1"
    assert [(h.domain, h.hostname, h.address) for h in plan.hosts] == [
        ("alpha.test", "mail.alpha.test", "127.0.2.2"),
        ("beta.test", "mail.beta.test", "127.0.2.3"),
        ("gamma.test", "mail.gamma.test", "127.0.2.4")]
    assert [(u.address, u.password) for u in plan.hosts[1].users] == [
        ("alice@beta.test", "alice-beta"), ("bob@beta.test", "bob-beta")]
    assert plan.directory.is_absolute()


@pytest.mark.parametrize(("domains", "net", "message"), [
    (0, "127.0.2.0/24", "--domains must be 1-24"),
    (25, "127.0.2.0/24", "--domains must be 1-24"),
    (3, "10.0.0.0/24", "must be inside 127.0.0.0/8"),
    (3, "::1/128", "must be inside 127.0.0.0/8"),
    (3, "lab", "is not a network"),
    (3, "127.0.2.0/30", "the lab needs 5"),
])
def test_plan_refuses_bad_input(domains: int, net: str, message: str) -> None:
    """Bad --domains and --net values are one line naming the option."""
    with pytest.raises(LabError, match=message):
        make_plan(Path("lab"), domains, net)


def test_ca_issues_host_certificates_that_verify(tmp_path: Path) -> None:
    """A host certificate chains to the lab CA and names its host and address as SANs; the
    CA is made once and reused; keys are readable by their owner only."""
    ca = LabCA(tmp_path / "ca")
    ca.ensure()
    files = ca.issue("mail.alpha.test", "127.0.2.2", tmp_path / "alpha")
    leaf = x509.load_pem_x509_certificates(files.certificate.read_bytes())[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mail.alpha.test"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.2.2"]
    store = crypto.X509Store()
    store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, ca.certificate_path.read_bytes()))
    crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf)).verify_certificate()
    before = ca.certificate_path.read_bytes()
    LabCA(tmp_path / "ca").ensure()
    assert ca.certificate_path.read_bytes() == before
    for key in (ca.key_path, files.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_zone_has_the_records_of_delivery_and_authentication() -> None:
    """Per domain: MX, A, PTR, SPF, DMARC, MTA-STS and TLSRPT; DKIM when a key is given."""
    plan = make_plan(Path("lab"), 2, "127.0.2.0/24")
    zone = build_zone(plan, {"beta.test": ("lab", "v=DKIM1; k=ed25519; p=AAAA")},
                      policy_id="1")
    assert zone["alpha.test"] == {"MX": [[10, "mail.alpha.test"]],
                                  "TXT": ["v=spf1 ip4:127.0.2.2 -all"]}
    assert zone["mail.alpha.test"]["A"] == ["127.0.2.2"]
    assert zone["2.2.0.127.in-addr.arpa"] == {"PTR": ["mail.alpha.test"]}
    assert zone["_dmarc.alpha.test"]["TXT"][0].startswith("v=DMARC1; p=reject")
    assert zone["_mta-sts.alpha.test"] == {"TXT": ["v=STSv1; id=1"]}
    assert zone["_smtp._tls.alpha.test"]["TXT"][0].startswith("v=TLSRPTv1; rua=mailto:")
    assert zone["lab._domainkey.beta.test"] == {"TXT": ["v=DKIM1; k=ed25519; p=AAAA"]}
    assert "lab._domainkey.alpha.test" not in zone
    assert reverse_name("127.0.2.3") == "3.2.0.127.in-addr.arpa"


def test_labdns_answers_txt_and_ptr() -> None:
    """The lab DNS answers TXT (split into 255-octet strings) and PTR records of the zone."""
    long_text = "v=DKIM1; p=" + "A" * 400
    zone = Zone({"a.test": {"TXT": ["v=spf1 -all", long_text]},
                 "2.2.0.127.in-addr.arpa": {"PTR": "mail.a.test"}})
    answers, _, _ = zone.answer("a.test", dns.TXT)
    texts = [b"".join(rr.payload.data) for rr in answers]
    assert texts == [b"v=spf1 -all", long_text.encode()]
    assert max(len(part) for rr in answers for part in rr.payload.data) == 255
    answers, _, _ = zone.answer("2.2.0.127.in-addr.arpa", dns.PTR)
    assert [str(rr.payload.name) for rr in answers] == ["mail.a.test"]
    # A name with no record of the type asked: no answer, the SOA in the authority section
    # (RFC 2308 §2.2 NODATA), so resolvers can cache the absence.
    answers, authority, _ = zone.answer("a.test", dns.MX)
    assert answers == [] and [rr.type for rr in authority] == [dns.SOA]


def test_host_config_loads_with_verify_policy_and_own_address(tmp_path: Path) -> None:
    """A lab host's config is valid: listeners on its address, relay through the lab DNS with
    verified TLS against the lab CA, leaving from its own address."""
    plan = make_plan(tmp_path, 2, "127.0.2.0/24")
    host = plan.hosts[0]
    ca = LabCA(plan.ca_directory)
    files = ca.issue(host.hostname, host.address, host.directory / "tls")
    host.directory.mkdir(parents=True, exist_ok=True)
    host.config_path.write_text(render_config(plan, host, files))
    loaded = config.load(host.config_path)
    assert loaded.server.hostname == "mail.alpha.test"
    assert loaded.smtp.listen[0].startswith("tcp:2525:interface=127.0.2.2")
    assert loaded.relay.dns_servers == (DNSServer("127.0.2.1", 5053),)
    assert loaded.relay.tls_policy is TLSPolicy.VERIFY and loaded.relay.port == 2525
    assert loaded.relay.tls_ca_file == plan.ca_file
    assert loaded.relay.bind_address == "127.0.2.2"
    assert loaded.routing.local_domains == ("alpha.test",)


def test_state_round_trip(tmp_path: Path) -> None:
    """lab.json keeps the lab's shape and each process's pid, start time and ports."""
    state = LabState(3, "127.0.2.0/24",
                     [LabProcess("dns", 12, 345, [("127.0.2.1", 5053)])])
    state.write(tmp_path / "lab.json")
    assert LabState.read(tmp_path / "lab.json") == state
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LabError, match="not a lab state file"):
        LabState.read(tmp_path / "bad.json")


def test_process_identity() -> None:
    """A live process is known by pid and start time; a reused pid or no process is not."""
    me = LabProcess("me", os.getpid(), _process_start(os.getpid()))
    assert me.running()
    assert not LabProcess("me", os.getpid(), (me.started or 0) + 1).running()
    assert not LabProcess("gone", 2**22 + 1, 1).running()


def test_status_without_a_lab(tmp_path: Path) -> None:
    """Status of a directory without a lab says so and exits 3."""
    out = io.StringIO()
    assert Lab(tmp_path, out).status() == 3
    assert out.getvalue() == f"no lab in {tmp_path}\n"


def test_up_refuses_a_directory_holding_another_lab(tmp_path: Path) -> None:
    """A directory keeps one lab: other --domains or --net are refused, naming the lab there."""
    LabState(2, "127.0.2.0/24").write(tmp_path / "lab.json")
    with pytest.raises(LabError, match=r"holds another lab \(2 domains on 127.0.2.0/24\)"):
        Lab(tmp_path, io.StringIO()).up(3, "127.0.2.0/24")
    assert not (tmp_path / "ca").exists()  # refused before anything was made


def test_up_refuses_a_taken_port(tmp_path: Path) -> None:
    """A lab port another program holds is one line naming it; nothing is started."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.77.3", 5587))
        sock.listen()
        with pytest.raises(LabError, match=r"127\.0\.77\.3:5587/tcp \(beta\.test submission\) "
                                           "is already in use"):
            Lab(tmp_path, io.StringIO()).up(3, "127.0.77.0/24")
    assert LabState.read(tmp_path / "lab.json") is None


def test_cli_lab_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`mailsys lab status --dir DIR` reaches the lab commands; no lab exits 3."""
    assert cli.main(["lab", "status", "--dir", str(tmp_path)]) == 3
    assert "no lab in" in capsys.readouterr().out


def test_cli_lab_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A refused `lab up` is one line on stderr and exit status 1."""
    assert cli.main(["lab", "up", "--dir", str(tmp_path), "--net", "10.0.0.0/8"]) == 1
    assert capsys.readouterr().err == (
        "mailsys: --net '10.0.0.0/8' must be inside 127.0.0.0/8 (loopback)\n")


def test_table_names_hosts_users_ca_and_commands(tmp_path: Path) -> None:
    """The table shows every host, user and password, the CA file and lines to try."""
    plan = make_plan(tmp_path, 3, "127.0.2.0/24")
    table = render_table(plan)
    for needle in ("mail.gamma.test", "127.0.2.4", "bob@beta.test (bob-beta)", str(plan.ca_file),
                   "swaks --server 127.0.2.2:5587 --tls --tls-verify", "mutt ",
                   "mailsys lab down --dir", "Thunderbird: import",
                   "IMAP 127.0.2.2 port 5993 SSL/TLS", "mx1.gamma.test (preference 10",
                   "mailsys lab scenario list"):
        assert needle in table
