"""``mailsys dkim genkey`` and ``mailsys dns records``: make a DKIM key and print the DNS records a
mail domain needs, as a commented zone fragment a newcomer can paste."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from twisted.internet.defer import Deferred
from twisted.names import dns

from mailsys.authn.dkim import KeyFileError, generate_key, load_key, public_record, txt_strings
from mailsys.config import ConfigError, load
from mailsys.defence.dnsbl import Zone, parse_zones, query_name
from mailsys.dns import Answer, CachingResolver, DNSTemporaryError
from mailsys.ownership import (
    OwnershipError,
    ServerAccount,
    configured_account,
    hand_over,
    make_directory,
)
from mailsys.values import DNSServer

DEFAULT_SELECTORS = {"rsa": "mail", "ed25519": "mail-ed"}


class AuthnCommandError(ValueError):
    """A failure of these commands, reported as one line (exit status 1)."""


def add_authn_commands(commands: Any, config_option: argparse.ArgumentParser,
                       parser_class: type[argparse.ArgumentParser]) -> None:
    """Add ``dkim ACTION`` and ``dns ACTION`` to the ``mailsys`` parser's subcommands."""
    dkim = commands.add_parser("dkim", help="DKIM signing keys")
    dkim_actions = dkim.add_subparsers(dest="dkim_command", metavar="ACTION", required=True,
                                       parser_class=parser_class)
    genkey = dkim_actions.add_parser(
        "genkey", parents=[config_option],
        help="write a new DKIM key for a domain and print its DNS record")
    genkey.add_argument("domain", metavar="DOMAIN")
    genkey.add_argument("--selector", "-s", metavar="S",
                        help="the selector (default: mail for RSA, mail-ed for Ed25519)")
    genkey.add_argument("--algorithm", "-a", choices=("rsa", "ed25519"), default="rsa",
                        help="rsa (2048 bits, the default) or ed25519 (RFC 8463)")
    genkey.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    genkey.add_argument("--key-dir", type=Path, metavar="DIR",
                        help="where keys live (default: authn.key_dir, dkim/ beside the "
                             "configuration file)")
    genkey.set_defaults(run=run_genkey)

    dns_command = commands.add_parser("dns", help="the DNS records a mail domain needs")
    dns_actions = dns_command.add_subparsers(dest="dns_command", metavar="ACTION",
                                             required=True, parser_class=parser_class)
    records = dns_actions.add_parser(
        "records", parents=[config_option],
        help="print a commented zone fragment: MX, SPF, DKIM, DMARC, MTA-STS, TLSRPT, SRV")
    records.add_argument("domain", metavar="DOMAIN")
    records.add_argument("--host", metavar="NAME",
                         help="the mail server's name (default: server.hostname from the "
                              "configuration when it is a real name, else mail.DOMAIN)")
    records.add_argument("--ipv4", metavar="ADDRESS", help="the server's public IPv4 address")
    records.add_argument("--ipv6", metavar="ADDRESS", help="the server's public IPv6 address")
    records.add_argument("--key-dir", type=Path, metavar="DIR",
                         help="where DKIM keys live (default: dkim/ beside the configuration)")
    records.add_argument("--reports", metavar="ADDRESS",
                         help="where DMARC and TLS reports go (default: postmaster@DOMAIN)")
    records.set_defaults(run=run_records)
    check = dns_actions.add_parser(
        "check", parents=[config_option],
        help="ask DNS (authn.dns_servers, relay.dns_servers, else the system's resolver) and "
             "say, record by record, what is missing or differs from `dns records`")
    check.add_argument("domain", metavar="DOMAIN")
    check.add_argument("--host", metavar="NAME")
    check.add_argument("--ipv4", metavar="ADDRESS")
    check.add_argument("--ipv6", metavar="ADDRESS")
    check.add_argument("--key-dir", type=Path, metavar="DIR")
    check.add_argument("--reports", metavar="ADDRESS")
    check.add_argument("--dns-server", action="append", metavar="IP[:PORT]",
                       help="ask this server instead of the configured ones (repeatable)")
    check.add_argument("--dnsbl", action="append", metavar="ZONE",
                       help="also look our sending addresses up in this DNS blocklist "
                            "(repeatable; default: [defence] dnsbl of the configuration)")
    check.set_defaults(run=run_check)


def _key_dir(args: argparse.Namespace) -> Path:
    """--key-dir, else the configuration's authn.key_dir, else dkim/ beside it."""
    if args.key_dir is not None:
        return Path(args.key_dir)
    path = Path(args.config)
    if path.exists():
        try:
            key_dir = load(path, check_files=False).authn.key_dir
        except ConfigError:
            key_dir = None
        if key_dir is not None:
            return key_dir
    return path.parent / "dkim"


def _account(args: argparse.Namespace) -> ServerAccount | None:
    path = Path(args.config)
    if not path.exists():
        return None
    try:
        return configured_account(load(path, check_files=False))
    except (ConfigError, OwnershipError):
        return None


def key_path(key_dir: Path, domain: str, selector: str) -> Path:
    """Where the key of (domain, selector) lives: DIR/DOMAIN.SELECTOR.pem."""
    return key_dir / f"{domain}.{selector}.pem"


def _domain(text: str) -> str:
    domain = text.strip().lower().removesuffix(".")
    labels = domain.split(".")
    if len(labels) < 2 or not all(labels) or any(len(label) > 63 for label in labels) or any(
            not all(c.isalnum() or c == "-" for c in label) for label in labels):
        raise AuthnCommandError(f"not a domain name: {text!r}")
    return domain


def run_genkey(args: argparse.Namespace) -> int:
    """Write the key (mode 0600, never over an existing one) and print its record."""
    domain = _domain(args.domain)
    algorithm: Literal["rsa", "ed25519"] = args.algorithm
    selector = args.selector or DEFAULT_SELECTORS[algorithm]
    if not all(c.isalnum() or c in "-_" for c in selector):
        raise AuthnCommandError(f"not a usable selector: {selector!r}")
    if algorithm == "rsa" and not 1024 <= args.bits <= 4096:
        raise AuthnCommandError("--bits must be between 1024 and 4096 (RFC 8301)")
    directory = _key_dir(args)
    account = _account(args)
    make_directory(directory, account, 0o700)
    path = key_path(directory, domain, selector)
    pem, record = generate_key(algorithm, args.bits)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AuthnCommandError(f"{path} exists; choose another --selector") from None
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
        file.flush()
        os.fsync(file.fileno())
    # Run as root, the key goes to the account the server runs as, which must read it.
    hand_over(path, account, mode=0o600)
    print(f"; wrote {path} (keep it secret: mode 0600)")
    print(f"; publish this record, then sign with selector {selector!r}:")
    print(f"{selector}._domainkey.{domain}. IN TXT ( {txt_strings(record)} )")
    return 0


def run_records(args: argparse.Namespace) -> int:
    """Print the zone fragment for ``args.domain``."""
    sys.stdout.write(zone_fragment(args))
    return 0


def _configured_host(args: argparse.Namespace) -> str | None:
    path = Path(args.config)
    if not path.exists():
        return None
    try:
        hostname = load(path, check_files=False).server.hostname
    except ConfigError:
        return None
    return hostname if "." in hostname and hostname != "localhost" else None


@dataclass(frozen=True)
class ZoneRecord:
    """One record the fragment publishes: owner relative to the domain ("@" for itself)."""

    name: str
    kind: str
    data: str

    def owner(self, domain: str) -> str:
        return domain if self.name == "@" else f"{self.name}.{domain}"


def zone_fragment(args: argparse.Namespace, now: float | None = None) -> str:
    """The commented zone fragment (RFC 1035 master file syntax) for a mail domain."""
    return _fragment(args, now)[0]


def _fragment(args: argparse.Namespace,
              now: float | None = None) -> tuple[str, list[ZoneRecord]]:
    domain = _domain(args.domain)
    host = _domain(args.host) if args.host else (_configured_host(args) or f"mail.{domain}")
    reports = args.reports or f"postmaster@{domain}"
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    in_zone = host == domain or host.endswith("." + domain)
    relative = host[: -len(domain) - 1] if host.endswith("." + domain) else "@"
    out: list[str] = []
    add = out.append
    records: list[ZoneRecord] = []

    def rr(name: str, kind: str, data: str, comment_out: bool = False) -> None:
        line = f"{name:<19} 3600 IN {kind:<5} {data}"
        add(";" + line if comment_out else line)
        if not comment_out:
            records.append(ZoneRecord(name, kind, data))
    add(f"; DNS records for the mail domain {domain}, from `mailsys dns records {domain}`.")
    add(f"; Paste them into the zone of {domain}. Lines starting with ';' are comments.")
    add(f"$ORIGIN {domain}.")
    add("")
    add("; Mail for the domain goes to this host (RFC 5321 §5.1).")
    rr("@", "MX", f"10 {host}.")
    if in_zone:
        add("; The mail host's addresses: use the server's public ones.")
        if args.ipv4:
            rr(relative, "A", args.ipv4)
        else:
            rr(relative, "A", "<the server's IPv4 address> (give --ipv4)", comment_out=True)
        if args.ipv6:
            rr(relative, "AAAA", args.ipv6)
        else:
            rr(relative, "AAAA", "<the server's IPv6 address> (give --ipv6)", comment_out=True)
    else:
        add(f"; {host} is outside this zone: its A/AAAA records belong to its own zone.")
    add("")
    add("; SPF (RFC 7208): only the hosts named by MX may send mail as this domain;")
    add("; the host's own name gets one too, for the HELO check.")
    rr("@", "TXT", '"v=spf1 mx -all"')
    if in_zone:
        rr(relative, "TXT", '"v=spf1 a -all"')
    add("")
    add("; DKIM (RFC 6376, RFC 8463): the public key of each signing selector.")
    keys = _dkim_records(_key_dir(args), domain)
    for selector, record in keys:
        if selector.startswith(";"):
            add(selector)
        else:
            rr(f"{selector}._domainkey", "TXT", f"( {txt_strings(record)} )")
    if not keys:
        add(f"; No key yet: run `mailsys dkim genkey {domain}` (and with --algorithm ed25519")
        add("; for a second signature), then run this command again.")
    add("")
    add("; DMARC (RFC 9989): what receivers do with mail that fails SPF and DKIM alignment.")
    add("; Start with p=none and read the reports; then quarantine; then reject.")
    rr("_dmarc", "TXT", f'"v=DMARC1; p=quarantine; rua=mailto:{reports}"')
    add("")
    add("; MTA-STS (RFC 8461): senders must use TLS to reach us. The policy itself is served at")
    add(f"; https://mta-sts.{domain}/.well-known/mta-sts.txt; change id= whenever it changes.")
    rr("_mta-sts", "TXT", f'"v=STSv1; id={stamp}"')
    rr("mta-sts", "CNAME", f"{host}.")
    add("; TLS reporting (RFC 8460): where senders report TLS failures.")
    rr("_smtp._tls", "TXT", f'"v=TLSRPTv1; rua=mailto:{reports}"')
    add("")
    add("; Mail clients find the servers (RFC 6186; RFC 8314 prefers implicit TLS, so the")
    add("; TLS ports come first).")
    for service, priority, port in (("_submissions._tcp", 0, 465), ("_submission._tcp", 10, 587),
                                    ("_imaps._tcp", 0, 993), ("_imap._tcp", 10, 143),
                                    ("_pop3s._tcp", 0, 995), ("_pop3._tcp", 10, 110)):
        rr(service, "SRV", f"{priority} 1 {port} {host}.")
    add("; Thunderbird's autoconfig and Outlook's autodiscover ask these names.")
    rr("autoconfig", "CNAME", f"{host}.")
    rr("_autodiscover._tcp", "SRV", f"0 1 443 {host}.")
    add("")
    add("; Reverse DNS (iprev): ask whoever owns the server's address for a PTR record")
    add(f"; naming {host}. Many receivers refuse mail from addresses without one.")
    return "\n".join(out) + "\n", records


def _dkim_records(directory: Path, domain: str) -> list[tuple[str, str]]:
    """(selector, TXT record) of each key of ``domain`` in ``directory``; a key that cannot
    be read gives ("; why", "")."""
    found: list[tuple[str, str]] = []
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob(f"{domain}.*.pem")):
        selector = path.name[len(domain) + 1:-len(".pem")]
        try:
            key = load_key(path, domain, selector)
        except KeyFileError as exc:
            found.append((f"; {exc}", ""))
            continue
        found.append((selector, public_record(key)))
    return found


# -- dns check ---------------------------------------------------------------------------------

_TYPES = {"MX": dns.MX, "A": dns.A, "AAAA": dns.AAAA, "TXT": dns.TXT, "SRV": dns.SRV,
          "CNAME": dns.CNAME}


def run_check(args: argparse.Namespace) -> int:
    """Compare what DNS says with what `dns records` would publish; 1 if anything is off."""
    _, expected = _fragment(args)
    servers = [DNSServer.parse(text) for text in args.dns_server or []]
    zones = parse_zones({zone: 1.0 for zone in args.dnsbl or []})
    senders = [a for a in (args.ipv4, args.ipv6) if a]
    if Path(args.config).exists():
        config = load(args.config, check_files=False)
        if not servers:
            servers = list(config.authn.dns_servers or config.relay.dns_servers)
        if not zones:
            zones = parse_zones(config.defence.dnsbl)
        senders += [a for a in (config.relay.bind_address, config.relay.bind_address6)
                    if a and a not in senders]
    from twisted.internet import reactor

    from mailsys.delivery.mx import make_resolver

    resolver = CachingResolver(make_resolver([(s.host, s.port) for s in servers], reactor),
                               reactor, timeout=10)
    lines: list[str] = []
    failures: list[int] = []
    checked: list[int] = []

    async def ask() -> None:
        for record in expected:
            verdict, detail = await _check_record(resolver, _domain(args.domain), record)
            if verdict != "ok":
                failures.append(1)
            lines.append(f"{verdict:<8} {record.kind:<5} {record.owner(_domain(args.domain))}"
                         f"  {detail}")
        # A common reason mail bounces: our own sending address on a blocklist.
        for address in senders:
            for zone in zones:
                verdict, name, detail = await _check_listing(resolver, address, zone)
                checked.append(1)
                if verdict != "ok":
                    failures.append(1)
                lines.append(f"{verdict:<8} DNSBL {name}  {detail}")

    def stop(_: object) -> None:
        reactor.stop()

    def start() -> None:
        Deferred.fromCoroutine(ask()).addBoth(stop)

    reactor.callWhenRunning(start)
    reactor.run()
    for line in lines:
        print(line.rstrip())
    total = len(expected) + len(checked)
    summary = f"{total - len(failures)} of {total} records as expected"
    print(summary)
    return 1 if failures else 0


async def _check_listing(resolver: CachingResolver, address: str,
                         zone: Zone) -> tuple[str, str, str]:
    """("ok" | "listed" | "error", the name asked, what was found) for one sending address."""
    name = query_name(address, zone.zone)
    if name is None:
        return "error", address, "not an IP address"
    try:
        answer: Answer = await resolver.query_answer(name, dns.A)
    except DNSTemporaryError as exc:
        return "error", name, exc.reason
    found = [a for a in answer.addresses() if zone.counts(a)]
    if found:
        return "listed", name, f"{address} is listed by {zone.zone} ({', '.join(found)})"
    return "ok", name, f"{address} not listed by {zone.zone}"


def _strings(data: str) -> str:
    return "".join(re.findall(r'"([^"]*)"', data))


async def _check_record(resolver: CachingResolver, domain: str,
                        record: ZoneRecord) -> tuple[str, str]:
    """("ok" | "missing" | "differs" | "error", what was found)."""
    name = record.owner(domain)
    try:
        answer: Answer = await resolver.query_answer(name, _TYPES[record.kind])
    except DNSTemporaryError as exc:
        return "error", exc.reason
    if record.kind == "MX":
        wanted = record.data.split()[1].removesuffix(".").lower()
        found = [x for _, x in answer.exchanges()]
        return ("ok", wanted) if wanted in found else _absent(answer, ", ".join(found))
    if record.kind in ("A", "AAAA"):
        wanted = str(ipaddress.ip_address(record.data))
        found = answer.addresses()
        return ("ok", wanted) if wanted in found else _absent(answer, ", ".join(found))
    if record.kind == "CNAME":
        wanted = record.data.removesuffix(".").lower()
        found = answer.names()
        return ("ok", wanted) if wanted in found else _absent(answer, ", ".join(found))
    if record.kind == "SRV":
        _, _, port, target = record.data.split()
        found = [f"{r.port} {_target(r)}" for r in answer.records]
        wanted = f"{port} {target.removesuffix('.').lower()}"
        return ("ok", wanted) if wanted in found else _absent(answer, "; ".join(found))
    text = _strings(record.data)
    prefix = text.split(";")[0].split(" ")[0]  # v=spf1, v=DKIM1, v=DMARC1, v=STSv1 ...
    found_texts = [t.decode("utf-8", "replace") for t in answer.texts()]
    same_kind = [t for t in found_texts if t.lower().startswith(prefix.lower())]
    if text in found_texts:
        return "ok", text[:60]
    if not same_kind:
        return _absent(answer, "; ".join(found_texts)[:80])
    if prefix in ("v=STSv1", "v=TLSRPTv1", "v=DMARC1", "v=spf1"):
        # A policy of the owner's own making is fine; say what it is.
        return "ok", f"{same_kind[0][:60]} (differs from the suggestion)"
    return "differs", f"found {same_kind[0][:60]}"


def _target(record: Any) -> str:
    target: Any = record.target
    return str(target).lower().removesuffix(".")


def _absent(answer: Answer, found: str) -> tuple[str, str]:
    if not answer.exists:
        return "missing", "no such name"
    return ("differs", f"found {found}") if found else ("missing", "no record")
