"""`mailsys dkim genkey` and `mailsys dns records`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import dns.rdatatype
import dns.zone
import pytest

from mailsys.cli import main


def test_genkey_writes_private_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """genkey writes a 0600 key and prints its TXT record; it never overwrites a key."""
    keys = tmp_path / "keys"
    assert main(["dkim", "genkey", "example.test", "--key-dir", str(keys)]) == 0
    path = keys / "example.test.mail.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    out = capsys.readouterr().out
    assert 'mail._domainkey.example.test. IN TXT ( "v=DKIM1; k=rsa; p=' in out
    assert main(["dkim", "genkey", "example.test", "--key-dir", str(keys)]) == 1
    assert "exists; choose another --selector" in capsys.readouterr().err


def test_genkey_ed25519(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--algorithm ed25519 makes an RFC 8463 key under its own default selector."""
    assert main(["dkim", "genkey", "example.test", "-a", "ed25519", "--key-dir",
                 str(tmp_path)]) == 0
    assert (tmp_path / "example.test.mail-ed.pem").exists()
    assert "k=ed25519; p=" in capsys.readouterr().out


def test_genkey_bad_domain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A name that is not a domain is one line on stderr and exit status 1."""
    assert main(["dkim", "genkey", "not a domain", "--key-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("mailsys: not a domain name")


def test_records_is_a_zone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The fragment parses as a zone file and holds MX, SPF, DKIM, DMARC, MTA-STS, TLSRPT,
    the RFC 6186 SRV records and autoconfig."""
    keys = tmp_path / "keys"
    main(["dkim", "genkey", "example.test", "--key-dir", str(keys)])
    capsys.readouterr()
    assert main(["dns", "records", "example.test", "--key-dir", str(keys),
                 "--ipv4", "192.0.2.25", "--config", str(tmp_path / "none.toml")]) == 0
    text = capsys.readouterr().out
    zone = dns.zone.from_text(text, origin="example.test.", check_origin=False,
                              relativize=False)

    def txt(name: str) -> str:
        rdataset = zone.find_rdataset(_abs(name), dns.rdatatype.TXT)
        return b"".join(next(iter(rdataset)).strings).decode()

    mx = zone.find_rdataset(_abs("@"), dns.rdatatype.MX)
    assert str(next(iter(mx)).exchange) == "mail.example.test."
    assert str(next(iter(zone.find_rdataset(_abs("mail"), dns.rdatatype.A)))) == "192.0.2.25"
    assert txt("@") == "v=spf1 mx -all"
    assert txt("mail._domainkey").startswith("v=DKIM1; k=rsa; p=MII")
    assert txt("_dmarc").startswith("v=DMARC1; p=quarantine")
    assert txt("_mta-sts").startswith("v=STSv1; id=")
    assert txt("_smtp._tls").startswith("v=TLSRPTv1;")
    for service in ("_submissions._tcp", "_submission._tcp", "_imaps._tcp", "_imap._tcp",
                    "_pop3s._tcp", "_pop3._tcp"):
        zone.find_rdataset(_abs(service), dns.rdatatype.SRV)
    zone.find_rdataset(_abs("autoconfig"), dns.rdatatype.CNAME)


def test_records_without_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a key the fragment says how to make one instead of a DKIM record."""
    assert main(["dns", "records", "example.test", "--key-dir", str(tmp_path),
                 "--config", str(tmp_path / "none.toml")]) == 0
    out = capsys.readouterr().out
    assert "run `mailsys dkim genkey example.test`" in out
    assert "_domainkey" not in out.replace("mailsys dkim genkey", "")


def _abs(name: str) -> str:
    return "example.test." if name == "@" else f"{name}.example.test."


def test_genkey_uses_configured_key_dir(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Without --key-dir the key goes where the server will look: authn.key_dir."""
    config = tmp_path / "mailsys.toml"
    config.write_text(f'[authn]\nkey_dir = "{tmp_path / "server-keys"}"\n')
    assert main(["dkim", "genkey", "example.test", "--config", str(config)]) == 0
    assert (tmp_path / "server-keys" / "example.test.mail.pem").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another account")
def test_genkey_as_root_gives_the_key_to_the_server_account(tmp_path: Path) -> None:
    """Run as root, genkey hands the key (0600) and its directory to [server] user/group, so
    the server that drops privileges can read it."""
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    config = tmp_path / "mailsys.toml"
    config.write_text(f'[server]\nuser = "nobody"\ngroup = "{group}"\n')
    assert main(["dkim", "genkey", "example.test", "--config", str(config)]) == 0
    key = tmp_path / "dkim" / "example.test.mail.pem"
    assert (key.stat().st_uid, stat.S_IMODE(key.stat().st_mode)) == (nobody.pw_uid, 0o600)
    assert key.parent.stat().st_uid == nobody.pw_uid
