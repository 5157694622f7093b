"""Configuration: one TOML file read into frozen dataclasses, checked before anything starts.

Every problem is reported as one line naming the file, the key and the reason; unknown keys and
wrong types are errors, not surprises at run time. Each value is parsed once, here, into the type
its users take (next hops, TLS policies... are mailsys.values' types); each section has one
checker, which returns the section normalised (a copy made with ``dataclasses.replace``).
Relative paths are resolved against the current working directory, like twistd's own --pidfile
and --logfile. This module sits at the bottom of the import graph: it imports no domain module.

A new section is a frozen dataclass in ``_SECTIONS`` and a field of ``Config``, with a checker
in ``_CHECKERS`` if its values have rules beyond their types.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NewType

from mailsys.values import (
    DNSListKey,
    DNSServer,
    IPVersion,
    NextHop,
    TLSPolicy,
    Transport,
    parse_next_hop,
    parse_transport,
)

DEFAULT_BACKLOG = 1024
_SIZE_TEXT = re.compile(r"^\s*(\d+)\s*([KMGT]?)B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_LISTENER_TYPES = ("tcp", "tcp6", "unix")


# A size in bytes written as text ("500K", "100M", "2G", "none"); 0 means no limit.
ByteSize = NewType("ByteSize", int)


def parse_size(text: str) -> ByteSize:
    """Bytes from "500", "100K", "25M", "2G" (powers of 1024); 0 for "none" (no limit).

    Raises ValueError for anything else.
    """
    if text.strip().lower() in ("none", "unlimited"):
        return ByteSize(0)
    match = _SIZE_TEXT.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 500K, 100M, 2G or none)")
    return ByteSize(int(match.group(1)) * _UNITS[match.group(2).upper()])


class ConfigError(Exception):
    """A configuration problem: file, dotted key and a reason, rendered as one line."""

    def __init__(self, path: str | Path, key: str, reason: str) -> None:
        super().__init__(path, key, reason)
        self.path = str(path)
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        where = f"{self.path}: {self.key}: " if self.key else f"{self.path}: "
        return where + self.reason


@dataclass(frozen=True)
class ServerSection:
    """Identity of this mail system, and the account it runs as (mailsys.ownership).

    ``user``/``group`` name the account twistd drops to (``--uid``/``--gid``), so that the
    ``mailsys`` commands give the files they write to it; unset, files stay private to their
    writer, as suits a server that runs as the administrator's own user.
    """

    hostname: str = "localhost"
    user: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class StorageSection:
    """Where state lives: the durable spool, the Maildirs and the user store."""

    spool: Path = Path("var/spool")
    maildirs: Path = Path("maildirs")
    users: Path = Path("var/users")
    # Free space the spool's file system keeps: below it MAIL FROM gets 452 4.3.1 ("100M";
    # "none" turns the check off). Unset: three times smtp.max_message_size.
    spool_min_free: ByteSize | None = None

    def spool_floor(self, max_message_size: int) -> int:
        """The free-space floor in bytes (0: no floor)."""
        if self.spool_min_free is None:
            return 3 * max_message_size
        return self.spool_min_free


@dataclass(frozen=True)
class TLSSection:
    """Certificate chain and key (PEM). With create_self_signed, missing files are generated."""

    certificate: Path | None = None
    key: Path | None = None
    create_self_signed: bool = False

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class SMTPSection:
    """The MTA listener (port 25) and the limits every SMTP listener enforces."""

    listen: tuple[str, ...] = ()
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    # RFC 5321 §4.5.3.1.4 sets 512 octets for a command line; extensions (SIZE, DSN's ORCPT and
    # ENVID, AUTH=) lengthen MAIL and RCPT, so we allow more, as Postfix does.
    max_command_length: int = 2048
    # RFC 5321 §4.5.3.1.6 sets 1000 octets including CRLF for a text line; sloppy but real
    # senders exceed it, so longer lines are taken up to this bound, stored as received and
    # re-encoded when relayed (mailsys.delivery.longlines), as Postfix accepts them.
    max_line_length: int = 65536
    # RFC 5321 §4.5.3.2.7: the server timeout should be at least 5 minutes.
    idle_timeout: float = 300.0
    max_bad_commands: int = 10
    max_connections: int = 500
    max_connections_per_client: int = 20
    # Near the cap (this percentage of max_connections), a session that has not completed a
    # transaction may stay silent only stress_idle_timeout seconds, and at the cap the one silent
    # longest is closed to admit a newcomer (Postfix's stress mode): idle connections held
    # from a few addresses cannot lock real senders out.
    stress_percent: int = 80
    stress_idle_timeout: float = 10.0
    max_received_headers: int = 50
    offer_auth: bool = False


@dataclass(frozen=True)
class SubmissionSection:
    """Message submission: 587 with STARTTLS (RFC 6409) and 465 with implicit TLS (RFC 8314)."""

    listen: tuple[str, ...] = ()
    listen_tls: tuple[str, ...] = ()
    hide_client_address: bool = False


@dataclass(frozen=True)
class RoutingSection:
    """Which domains are ours and how their addresses map to mailboxes."""

    local_domains: tuple[str, ...] = ()
    # alias domain -> local domain: user@alias.test delivers as user@example.test
    domain_aliases: Mapping[str, str] = field(default_factory=dict)
    # address -> one or more addresses, local or external
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # local domain -> address receiving mail for unknown users of that domain
    catch_all: Mapping[str, str] = field(default_factory=dict)
    subaddress_separator: str = "+"


@dataclass(frozen=True)
class POP3Section:
    """POP3 (RFC 1939): 110 with STLS (RFC 2595) and 995 with implicit TLS (RFC 8314)."""

    listen: tuple[str, ...] = ()
    listen_tls: tuple[str, ...] = ()
    # USER/PASS and AUTH PLAIN before TLS; off by default (RFC 2595 §2.3, RFC 8314 §3).
    allow_plaintext_auth: bool = False
    # RFC 1939 §3: the autologout timer must be at least 10 minutes.
    idle_timeout: float = 600.0
    max_bad_commands: int = 10
    # RFC 2449 §4 caps a command line at 255 octets; SASL response lines (RFC 5034) may be
    # longer, so we allow more, as for SMTP.
    max_command_length: int = 2048
    # Shared by the STLS and implicit-TLS listeners. A POP3 client holds one connection at a
    # time, but an office behind one NAT address has many clients.
    max_connections: int = 500
    max_connections_per_client: int = 50


@dataclass(frozen=True)
class IMAPSection:
    """IMAP (RFC 3501): 143 with STARTTLS and 993 with implicit TLS (RFC 8314)."""

    listen: tuple[str, ...] = ()
    listen_tls: tuple[str, ...] = ()
    # LOGIN and AUTHENTICATE PLAIN before TLS; off by default (LOGINDISABLED, RFC 3501 §6.2.3).
    allow_plaintext_auth: bool = False
    # RFC 3501 §5.4: the autologout timer must be at least 30 minutes.
    idle_timeout: float = 1800.0
    # The largest literal (an APPEND's message) a command may carry: larger ones get NO [TOOBIG].
    max_literal_size: int = 50 * 1024 * 1024
    # A command's text outside its literals (RFC 7162 §4 recommends accepting at least 8192).
    max_command_length: int = 65536
    max_bad_commands: int = 20
    # Shared by the STARTTLS and implicit-TLS listeners. Desktop clients keep up to five
    # connections per account open (Thunderbird's default), and an office shares one address.
    max_connections: int = 1000
    max_connections_per_client: int = 100


@dataclass(frozen=True)
class AuthSection:
    """Login-failure throttling per user and client address, shared by every protocol with
    logins (the rule is mailsys.auth.throttle's; its defaults are these)."""

    # Each failure of a user at an address answers later: base delay, doubling per failure, at
    # most max delay (seconds).
    throttle_base_delay: float = 1.0
    throttle_max_delay: float = 15.0
    # After this many failures, that user at that address is refused outright until the window
    # passes after the last one.
    throttle_max_failures: int = 10
    # After this many failures within a window, for any users, the whole address is refused
    # (password spraying) until the window passes after the last one.
    throttle_max_address_failures: int = 100
    throttle_window: float = 15 * 60.0
    # Successful password checks remembered (mailsys.auth.credcache), so a client logging in
    # again with the same password skips the hash: for cache_ttl seconds, at most cache_size
    # users and passwords (Dovecot's auth_cache_ttl and auth_cache_size). A changed users file
    # drops it; cache = false checks every password.
    cache: bool = True
    cache_ttl: float = 3600.0
    cache_size: int = 10_000


@dataclass(frozen=True)
class RelaySection:
    """Mail for other domains: DNS, TLS policy, next hops, retries and delivery status notices.

    Next hops are written ``smtp:[host]:port``, ``smtp:domain`` (its MX hosts) or
    ``smtps:[host]:465`` (mailsys.values.parse_next_hop). Times are in seconds.
    """

    # false: relayed recipients wait in the queue and nothing leaves (a closed lab, tests).
    enabled: bool = True
    # "ip" or "ip:port" ("[ipv6]:port"); empty: the system's /etc/resolv.conf.
    dns_servers: tuple[DNSServer, ...] = ()
    ip_version: IPVersion = IPVersion.ANY  # "any", "ipv4" or "ipv6"
    # The TCP port of MX hosts: 25, except in labs and tests on unprivileged ports.
    port: int = 25
    tls_policy: TLSPolicy = TLSPolicy.OPPORTUNISTIC  # "opportunistic", "verify" or "none"
    tls_policy_per_domain: Mapping[str, TLSPolicy] = field(default_factory=dict)
    # Trust anchors (PEM) for the "verify" policy; default: the system's store.
    tls_ca_file: Path | None = None
    smarthost: NextHop | None = None
    smarthost_username: str | None = None
    smarthost_password: str | None = None
    smarthost_password_file: Path | None = None
    # domain, ".domain" (subdomains) or "*" -> "mx", "smarthost" or a next hop
    transport: Mapping[str, Transport | NextHop] = field(default_factory=dict)
    # The wait after the 1st, 2nd, ... temporary failure; the last value repeats.
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
    # RFC 5321 §4.5.4.1: give up after 4-5 days.
    max_lifetime: float = 5 * 86400.0
    # RFC 3461 §4.1: a "delayed" notice once a recipient has waited this long.
    delay_warning: float = 4 * 3600.0
    connect_timeout: float = 30.0
    per_destination_concurrency: int = 20
    helo_name: str | None = None  # default: server.hostname
    # The local address outbound connections leave from, per family (Postfix's
    # smtp_bind_address and smtp_bind_address6); default: the one the system picks. A host with
    # several addresses sends from the one its SPF record, PTR and peers' Received lines name.
    bind_address: str | None = None
    bind_address6: str | None = None
    # RFC 8461 MTA-STS for mail over MX: a destination's policy is fetched, cached under the
    # spool and enforced (mailsys.delivery.mtasts); a tls_policy_per_domain entry overrides it.
    mta_sts: bool = True
    # The deadline of one policy fetch (DNS, TLS, HTTP), in seconds.
    mta_sts_timeout: float = 30.0
    # Labs and tests only: the HTTPS port of mta-sts.<domain> (RFC 8461 §3.3 fixes 443).
    mta_sts_lab_https_port: int = 443


@dataclass(frozen=True)
class JourneySection:
    """The message journey: every step of every message, kept for ``mailsys trace``."""

    # Off unless asked for: recording still costs a measurable share of intake throughput
    # (bench/smtp_intake.py --journey on|off); the embedded default turns it on.
    enabled: bool = False
    path: Path = Path("var/journey.sqlite")
    # How long a message's steps are kept, in seconds (30 days).
    retention: float = 30 * 86400.0
    # The store's size bound in bytes: beyond it the oldest steps go first.
    max_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class PickupSection:
    """Mail handed over by ``mailsys-sendmail`` (mailsys.pickup): a directory local programs
    may write to and not read, like Postfix's maildrop. The server picks files up from it."""

    directory: Path = Path("var/pickup")
    # The group whose members may submit (the directory's group, mode 3730). Unset: the
    # server's group ([server] group or its user's primary group), else the process's own.
    group: str | None = None
    # The domain added to a local user's login name for the default sender and to recipients
    # given without a domain (Postfix's myorigin). Unset: the first local domain.
    origin: str | None = None


@dataclass(frozen=True)
class WebSection:
    """The HTTP listener (mailsys.web): health, metrics, client autoconfiguration, MTA-STS."""

    listen: tuple[str, ...] = ()
    # RFC 8461 §3.2 policy served at https://mta-sts.<domain>/.well-known/mta-sts.txt; "none"
    # serves no policy (404).
    mta_sts_mode: str = "none"
    # The MX host names the policy allows; unset: server.hostname.
    mta_sts_mx: tuple[str, ...] = ()
    # RFC 8461 §3.2: max_age in seconds, at most 31557600 (about one year).
    mta_sts_max_age: int = 604800
    # The host name clients are told to use for IMAP, POP3 and submission; unset:
    # server.hostname.
    client_hostname: str | None = None


@dataclass(frozen=True)
class DevSection:
    """Development conveniences of the embedded default; absent in production."""

    demo_user: str | None = None
    demo_password: str | None = None


@dataclass(frozen=True)
class AuthnSection:
    """Mail authentication (mailsys.authn): SPF, DKIM, DMARC and iprev checks on the inbound
    (port 25) listeners, whatever the client's address, never on submission; DKIM signing of
    submitted mail and of the server's own notices.

    Per check: "none" (the Authentication-Results header only), "junk" (to the recipient's Junk
    folder) or "reject" (550 5.7.x at the end of DATA); DMARC also takes "honour", the default:
    what the sender's domain publishes (p=reject refuses, p=quarantine goes to Junk). A DNS
    failure never refuses permanently.
    """

    checks: bool = True
    authserv_id: str | None = None  # default: server.hostname
    dmarc: str = "honour"
    spf: str = "none"
    dkim: str = "none"
    iprev: str = "none"
    # recipient domain -> {"dmarc" | "spf" | "dkim" | "iprev": policy}: that domain's own
    domains: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # DNS for the checks (and for the relay's MX lookups, one cache for both); default: the
    # relay's dns_servers, else /etc/resolv.conf.
    dns_servers: tuple[DNSServer, ...] = ()
    dns_timeout: float = 10.0
    sign: bool = True
    # DOMAIN.SELECTOR.pem files, as `mailsys dkim genkey` writes them; default: dkim/ beside
    # this file.
    key_dir: Path | None = None
    # domain -> selectors to sign with; default: every key of a local domain in key_dir.
    selectors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


AUTHN_POLICIES = ("none", "junk", "reject")
AUTHN_DMARC_POLICIES = ("honour", *AUTHN_POLICIES)


@dataclass(frozen=True)
class QuotaSection:
    """Per-mailbox limits (mailsys.delivery.quota): a default for every mailbox, overridden per
    user (canonical address); none by default. Sizes as "500K", "100M", "2G" or "none"."""

    storage: ByteSize | None = None  # None or 0: no limit
    messages: int | None = None
    # A notice goes to the user's INBOX when a delivery takes the mailbox past this share.
    warn_percent: int = 90
    storage_per_user: Mapping[str, ByteSize] = field(default_factory=dict)  # 0: no limit
    messages_per_user: Mapping[str, int] = field(default_factory=dict)


DEFENCE_POLICIES = ("none", "score", "reject")
SPAM_FILTER_FAILURES = ("accept", "defer")


@dataclass(frozen=True)
class DefenceSection:
    """Intake defences (mailsys.defence) of the MTA listeners (port 25), with defaults fit for
    a server on the open internet; submission listeners keep only the connection rate and the
    per-user limits. Lists here are read again with the configuration.

    Rates count per client network: the address cut to ``ipv4_prefix``/``ipv6_prefix`` bits.
    Past a limit the client gets 421 4.7.0 (connections) or 450 4.7.1 (messages, recipients),
    never a silent drop. ``exempt_networks`` (Postfix's mynetworks) skip every check.
    """

    enabled: bool = True
    exempt_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    # The memory bound: client networks (and users) whose counts are kept, least recent
    # forgotten first.
    max_clients_tracked: int = 50_000
    connections_per_minute: int = 60
    messages_per_hour: int = 1000
    recipients_per_hour: int = 2000
    # Recipients refused as unknown (a directory harvest): past this the client's RCPTs get
    # 450 4.7.1 and it is told to go away.
    failed_recipients_per_hour: int = 30
    # Authenticated submission, per user (587 and 465).
    submission_messages_per_hour: int = 1000
    submission_recipients_per_hour: int = 5000
    # Seconds the greeting waits after a "220-" first line (postscreen's pregreet test); a
    # client that talks before the greeting ends gets 554. Unset: greet at once, and only a
    # client talking before even the first line is caught.
    greeting_pause: float | None = None
    # DNS blocklist zones with their weight: "zone" (any 127.0.0.0/8 answer but Spamhaus's
    # error codes 127.255.255.x), "zone=127.0.0.4" or "zone=127.0.0.[2..11]".
    dnsbl: Mapping[str, float] = field(default_factory=dict)
    # DNS allowlist zones: a listed client skips the other checks.
    dnswl: tuple[str, ...] = ()
    # A client whose weights add up to this is refused with 554 5.7.1.
    dnsbl_threshold: float = 1.0
    # Seconds a DNS list may take; after that the mail flows, marked.
    dnsbl_timeout: float = 5.0
    # A HELO naming us (our host name or address) or neither a valid name nor an address
    # literal: "none", "score" (adds helo_weight) or "reject" (550 5.7.1 at MAIL).
    helo: str = "reject"
    helo_weight: float = 1.0
    # No forward-confirmed reverse DNS (RFC 8601 §3 iprev): "none", "score" or "reject".
    fcrdns: str = "none"
    fcrdns_weight: float = 0.5
    # Senders ("user@domain", "@domain" or "domain" with its subdomains) and networks.
    allow_senders: tuple[str, ...] = ()
    block_senders: tuple[str, ...] = ()
    allow_networks: tuple[str, ...] = ()
    block_networks: tuple[str, ...] = ()
    # Greylisting (client /24 or /64, sender, recipient), off by default.
    greylisting: bool = False
    greylist_delay: float = 300.0
    # How long a triplet that passed, and a client network that passed, are remembered.
    greylist_retention: float = 36 * 86400.0
    greylist_path: Path = Path("var/greylist.json")
    # rspamd's HTTP address ("http://127.0.0.1:11333"); unset: no spam filter.
    spam_filter: str | None = None
    spam_filter_timeout: float = 10.0
    # A filter that is down or slow: "accept" (marked) or "defer" (451 4.7.1).
    spam_filter_failure: str = "accept"
    # "add header" and "rewrite subject" verdicts: to the Junk folder (else only the header).
    spam_filter_junk: bool = True


@dataclass(frozen=True)
class LabSection:
    """A server of the teaching lab (mailsys.lab): files `mailsys lab` writes and the server
    reads. Absent outside a lab; each part is off unless named."""

    # Faults the teacher injects (`mailsys lab fault`), and `fail-NNN@` recipients.
    faults: Path | None = None
    # The hurried queue clock (`mailsys lab clock`): an offset and a rate.
    clock: Path | None = None


@dataclass(frozen=True)
class Config:
    """The whole configuration, as loaded from ``path``."""

    path: Path
    server: ServerSection = field(default_factory=ServerSection)
    storage: StorageSection = field(default_factory=StorageSection)
    tls: TLSSection = field(default_factory=TLSSection)
    smtp: SMTPSection = field(default_factory=SMTPSection)
    submission: SubmissionSection = field(default_factory=SubmissionSection)
    routing: RoutingSection = field(default_factory=RoutingSection)
    pop3: POP3Section = field(default_factory=POP3Section)
    imap: IMAPSection = field(default_factory=IMAPSection)
    auth: AuthSection = field(default_factory=AuthSection)
    relay: RelaySection = field(default_factory=RelaySection)
    journey: JourneySection = field(default_factory=JourneySection)
    pickup: PickupSection = field(default_factory=PickupSection)
    web: WebSection = field(default_factory=WebSection)
    authn: AuthnSection = field(default_factory=AuthnSection)
    dev: DevSection = field(default_factory=DevSection)
    quota: QuotaSection = field(default_factory=QuotaSection)
    lab: LabSection = field(default_factory=LabSection)
    defence: DefenceSection = field(default_factory=DefenceSection)


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSection,
    "storage": StorageSection,
    "tls": TLSSection,
    "smtp": SMTPSection,
    "submission": SubmissionSection,
    "routing": RoutingSection,
    "pop3": POP3Section,
    "imap": IMAPSection,
    "auth": AuthSection,
    "relay": RelaySection,
    "journey": JourneySection,
    "pickup": PickupSection,
    "web": WebSection,
    "authn": AuthnSection,
    "dev": DevSection,
    "quota": QuotaSection,
    "lab": LabSection,
    "defence": DefenceSection,
}

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")

# Values parsed from their text into mailsys.values' types; a ValueError's text is the reason.
_PARSERS: dict[Any, Callable[[str], Any]] = {
    NextHop: parse_next_hop,
    Transport | NextHop: parse_transport,
    TLSPolicy: TLSPolicy.parse,
    IPVersion: IPVersion.parse,
    DNSServer: DNSServer.parse,
    ByteSize: parse_size,
}


def load(path: str | Path, *, check_files: bool = True) -> Config:
    """Read and check the TOML file at ``path``; raise ConfigError on the first problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"TOML syntax error: {exc}") from None
    return from_mapping(data, path, check_files=check_files)


def from_mapping(data: Mapping[str, Any], path: str | Path, *, check_files: bool = True) -> Config:
    """Build a Config from already-parsed TOML data (used by load() and by tests)."""
    path = Path(path)
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in _SECTIONS:
            raise ConfigError(path, name, f"unknown section (known: {', '.join(_SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(path, name, "must be a table")
        sections[name] = _build(_SECTIONS[name], value, path, name)
    config = Config(path=path, **sections)
    config = _check_listeners(config)
    for name, checker in _CHECKERS.items():
        checked = checker(config, check_files)
        if checked is not getattr(config, name):
            config = replace(config, **{name: checked})
    return config


def _build(cls: type[Any], table: Mapping[str, Any], path: Path, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if key not in names:
            raise ConfigError(path, dotted, f"unknown key (known: {', '.join(sorted(names))})")
        values[key] = _convert(hints[key], value, path, dotted)
    return cls(**values)


def _convert(hint: Any, value: Any, path: Path, key: str) -> Any:
    parser = _PARSERS.get(hint)
    if parser is not None:
        if not isinstance(value, str):
            raise ConfigError(path, key, f"must be a string, got {value!r}")
        try:
            return parser(value)
        except ValueError as exc:
            raise ConfigError(path, key, str(exc)) from None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(path, key, f"must be a positive integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(path, key, f"must be a positive number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, key, f"must be a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(path, key, f"must be a non-empty path string, got {value!r}")
        return Path(value)
    if origin is tuple:
        if isinstance(value, str) and args[0] in (str, DNSServer):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(path, key, f"must be a list, got {value!r}")
        return tuple(_convert(args[0], item, path, key) for item in value)
    if origin is Mapping:
        if not isinstance(value, dict):
            raise ConfigError(path, key, "must be a table")
        return {
            str(k): _convert(args[1], v, path, f"{key}.{_quote(k)}") for k, v in value.items()
        }
    raise AssertionError(f"no converter for {hint!r}")  # pragma: no cover - schema bug


def _quote(key: str) -> str:
    return f'"{key}"' if not re.fullmatch(r"[A-Za-z0-9_-]+", key) else key


# -- listeners -------------------------------------------------------------------------------


def split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    r"""Split a Twisted endpoint string (the strports syntax serverFromString reads) into its
    positional arguments and ``name=value`` options: ``:`` separates them, ``\`` escapes the
    next character (``tcp6:25:interface=\:\:1``), the first unescaped ``=`` names an option."""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    part: list[str] = []
    name: str | None = None
    escaped = False

    def finish() -> None:
        text = "".join(part)
        if name is None:
            args.append(text)
        else:
            kwargs[name] = text

    for char in description:
        if escaped:
            part.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            finish()
            part, name = [], None
        elif char == "=" and name is None:
            name, part = "".join(part), []
        else:
            part.append(char)
    finish()
    return args, kwargs


def normalize_listener(description: str, path: Path, key: str) -> str:
    """Check one listener endpoint string; add ``backlog=`` when absent.

    Twisted's default backlog of 50 drops connections under a burst, so we always set one.
    Only plain stream endpoints are allowed: mailsys adds TLS itself, so that certificates can be
    reloaded without a restart.
    """
    args, kwargs = split_endpoint(description)
    if not args or not args[0]:
        raise ConfigError(path, key, f"bad endpoint string {description!r}: empty")
    kind = args[0].lower()
    if kind not in _LISTENER_TYPES:
        raise ConfigError(
            path, key,
            f"endpoint {description!r}: type must be one of {', '.join(_LISTENER_TYPES)} "
            "(mailsys adds TLS itself)",
        )
    if kind in ("tcp", "tcp6"):
        port = args[1] if len(args) > 1 else kwargs.get("port")
        if port is None or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(path, key, f"endpoint {description!r}: needs a port 0-65535")
    elif len(args) < 2 and "address" not in kwargs:
        raise ConfigError(path, key, f"endpoint {description!r}: needs a socket path")
    allowed = {"tcp": {"port", "interface", "backlog"}, "tcp6": {"port", "interface", "backlog"},
               "unix": {"address", "mode", "backlog", "lockfile"}}[kind]
    for name in kwargs:
        if name not in allowed:
            raise ConfigError(path, key, f"endpoint {description!r}: unknown option {name!r}")
    interface = kwargs.get("interface")
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            # bind() would try to resolve it at start-up and fail there, or bind a surprise.
            raise ConfigError(path, key, f"endpoint {description!r}: interface must be an IP "
                              f"address, not {interface!r}") from None
    backlog = kwargs.get("backlog")
    if backlog is None:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    if not backlog.isdigit() or int(backlog) <= 0:
        raise ConfigError(path, key,
                          f"endpoint {description!r}: backlog must be a positive integer")
    return description


# Every key that holds listener endpoint strings, in the order the service binds them.
LISTENER_KEYS = (("smtp", "listen"), ("submission", "listen"), ("submission", "listen_tls"),
                 ("pop3", "listen"), ("pop3", "listen_tls"), ("imap", "listen"),
                 ("imap", "listen_tls"), ("web", "listen"))
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def _claim_port(bound: dict[tuple[str, int], tuple[str, str]], description: str, path: Path,
                key: str) -> None:
    """Refuse a TCP listener whose port another listener of this config already binds.

    The service would fail at start-up with "address already in use" and no key to go by. A
    wildcard interface overlaps every interface of its port (Linux refuses both binds).
    """
    args, kwargs = split_endpoint(description)
    if args[0].lower() not in ("tcp", "tcp6"):
        return
    port = int(args[1] if len(args) > 1 else kwargs["port"])
    if port == 0:
        return  # any free port: never a clash
    interface = kwargs.get("interface", "")
    if interface:
        interface = ipaddress.ip_address(interface).compressed  # "::0" is "::"
    for (other_interface, other_port), (other_key, other) in bound.items():
        if other_port == port and (other_interface == interface or interface in _WILDCARDS
                                   or other_interface in _WILDCARDS):
            raise ConfigError(path, key, f"endpoint {description!r}: port {port} is already "
                              f"taken by {other!r} ({other_key})")
    bound[(interface, port)] = (key, description)


def _check_listeners(config: Config) -> Config:
    """Every listener of every section: valid, with a backlog, and no two on one port."""
    path = config.path
    bound: dict[tuple[str, int], tuple[str, str]] = {}  # (interface, port) -> (key, endpoint)
    fixed: dict[str, dict[str, tuple[str, ...]]] = {}
    for section, attr in LISTENER_KEYS:
        key = f"{section}.{attr}"
        listeners = getattr(getattr(config, section), attr)
        fixed.setdefault(section, {})[attr] = tuple(
            normalize_listener(d, path, key) for d in listeners
        )
        for description in listeners:  # as written, for the message
            _claim_port(bound, description, path, key)
    return replace(config, **{section: replace(getattr(config, section), **values)
                              for section, values in fixed.items()})


# -- one checker per section: (config, check_files) -> the section, normalised ------------------


def _check_server(config: Config, check_files: bool) -> ServerSection:
    if not _HOSTNAME.match(config.server.hostname):
        raise ConfigError(config.path, "server.hostname",
                          f"not a valid host name: {config.server.hostname!r}")
    return config.server


def _check_tls(config: Config, check_files: bool) -> TLSSection:
    path, tls = config.path, config.tls
    if (tls.certificate is None) != (tls.key is None):
        raise ConfigError(path, "tls", "certificate and key must be given together")
    if check_files and tls.enabled and not tls.create_self_signed:
        for key in ("certificate", "key"):
            file = getattr(tls, key)
            if not file.is_file():
                raise ConfigError(path, f"tls.{key}", f"file not found: {file}")
            try:
                file.open("rb").close()
            except OSError as exc:
                raise ConfigError(path, f"tls.{key}",
                                  f"cannot read {file}: {exc.strerror}") from None
    return tls


def _needs_tls(config: Config, key: str, listeners: tuple[str, ...]) -> None:
    if listeners and not config.tls.enabled:
        raise ConfigError(config.path, key, "implicit TLS needs [tls] certificate and key")


def _check_submission(config: Config, check_files: bool) -> SubmissionSection:
    _needs_tls(config, "submission.listen_tls", config.submission.listen_tls)
    return config.submission


def _check_pop3(config: Config, check_files: bool) -> POP3Section:
    _needs_tls(config, "pop3.listen_tls", config.pop3.listen_tls)
    if config.pop3.idle_timeout < 600:
        raise ConfigError(config.path, "pop3.idle_timeout",
                          "must be at least 600 seconds (RFC 1939 §3: ten minutes)")
    return config.pop3


def _check_imap(config: Config, check_files: bool) -> IMAPSection:
    _needs_tls(config, "imap.listen_tls", config.imap.listen_tls)
    if config.imap.idle_timeout < 1800:
        raise ConfigError(config.path, "imap.idle_timeout",
                          "must be at least 1800 seconds (RFC 3501 §5.4: thirty minutes)")
    return config.imap


def _check_routing(config: Config, check_files: bool) -> RoutingSection:
    path, routing = config.path, config.routing
    local = {d.lower() for d in routing.local_domains}
    for domain in routing.local_domains:
        if not _HOSTNAME.match(domain):
            raise ConfigError(path, "routing.local_domains", f"not a valid domain: {domain!r}")
    for alias, target in routing.domain_aliases.items():
        if target.lower() not in local:
            raise ConfigError(path, f"routing.domain_aliases.{_quote(alias)}",
                              f"target {target!r} is not in routing.local_domains")
    for domain in routing.catch_all:
        if domain.lower() not in local:
            raise ConfigError(path, f"routing.catch_all.{_quote(domain)}",
                              "not in routing.local_domains")
    for address, targets in routing.aliases.items():
        key = f"routing.aliases.{_quote(address)}"
        if "@" not in address:
            raise ConfigError(path, key, "alias must be a full address user@domain")
        if not targets:
            raise ConfigError(path, key, "needs at least one target address")
        for target in targets:
            if "@" not in target:
                raise ConfigError(path, key, f"target {target!r} must be a full address")
    if len(routing.subaddress_separator) > 1:
        raise ConfigError(path, "routing.subaddress_separator", "must be one character or empty")
    return routing


def _check_auth(config: Config, check_files: bool) -> AuthSection:
    auth = config.auth
    if auth.throttle_max_address_failures < auth.throttle_max_failures:
        # Else one user's typos would block every user of the address, the rule's whole point.
        raise ConfigError(config.path, "auth.throttle_max_address_failures",
                          f"must be at least auth.throttle_max_failures "
                          f"({auth.throttle_max_failures})")
    return auth


def _check_dev(config: Config, check_files: bool) -> DevSection:
    dev = config.dev
    if (dev.demo_user is None) != (dev.demo_password is None):
        raise ConfigError(config.path, "dev", "demo_user and demo_password must be given together")
    if dev.demo_user is not None and "@" not in dev.demo_user:
        raise ConfigError(config.path, "dev.demo_user", "must be a full address user@domain")
    return dev


def _check_journey(config: Config, check_files: bool) -> JourneySection:
    journey = config.journey
    if journey.retention < 3600:
        raise ConfigError(config.path, "journey.retention", "must be at least 3600 seconds")
    if journey.max_bytes < 1024 * 1024:
        raise ConfigError(config.path, "journey.max_bytes", "must be at least 1048576 (1 MiB)")
    return journey


def _check_relay(config: Config, check_files: bool) -> RelaySection:
    path = config.path
    relay = config.relay
    if relay.port > 65535:
        raise ConfigError(path, "relay.port", "must be 1-65535")
    if relay.mta_sts_lab_https_port > 65535:
        raise ConfigError(path, "relay.mta_sts_lab_https_port", "must be 1-65535")
    for domain in relay.tls_policy_per_domain:
        if not _HOSTNAME.match(domain.removeprefix(".")):
            raise ConfigError(path, f"relay.tls_policy_per_domain.{_quote(domain)}",
                              "not a valid domain")
    for domain, hop in relay.transport.items():
        key = f"relay.transport.{_quote(domain)}"
        if domain != "*" and not _HOSTNAME.match(domain.removeprefix(".")):
            raise ConfigError(path, key, "not a valid domain (or \".domain\", or \"*\")")
        if hop is Transport.SMARTHOST and relay.smarthost is None:
            raise ConfigError(path, key, '"smarthost" needs relay.smarthost to be set')
    if relay.smarthost_username is not None:
        if relay.smarthost is None:
            raise ConfigError(path, "relay.smarthost_username", "needs relay.smarthost")
        if (relay.smarthost_password is None) == (relay.smarthost_password_file is None):
            raise ConfigError(path, "relay",
                              "smarthost_username needs exactly one of smarthost_password "
                              "and smarthost_password_file")
    elif relay.smarthost_password is not None or relay.smarthost_password_file is not None:
        raise ConfigError(path, "relay", "a smarthost password needs smarthost_username")
    if not relay.retry_schedule:
        raise ConfigError(path, "relay.retry_schedule", "needs at least one delay")
    if relay.helo_name is not None and not _HOSTNAME.match(relay.helo_name):
        raise ConfigError(path, "relay.helo_name", f"not a valid host name: {relay.helo_name!r}")
    for name, version in (("bind_address", 4), ("bind_address6", 6)):
        text = getattr(relay, name)
        if text is None:
            continue
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(path, f"relay.{name}",
                              f"not an IP address: {text!r}") from None
        if address.version != version:
            raise ConfigError(path, f"relay.{name}", f"must be an IPv{version} address")
    if check_files:
        for name in ("tls_ca_file", "smarthost_password_file"):
            file = getattr(relay, name)
            if file is None:
                continue
            try:
                file.open("rb").close()
            except OSError as exc:
                raise ConfigError(path, f"relay.{name}",
                                  f"cannot read {file}: {exc.strerror}") from None
    return relay


def _check_pickup(config: Config, check_files: bool) -> PickupSection:
    pickup = config.pickup
    if pickup.origin is not None and not _HOSTNAME.match(pickup.origin):
        raise ConfigError(config.path, "pickup.origin", f"not a valid domain: {pickup.origin!r}")
    if check_files and pickup.group is not None:
        try:
            grp.getgrnam(pickup.group)
        except KeyError:
            raise ConfigError(config.path, "pickup.group",
                              f"no such group: {pickup.group!r}") from None
    return pickup


MTA_STS_MODES = ("enforce", "testing", "none")
# RFC 8461 §3.2: "max_age ... maximum value of 31557600".
MTA_STS_MAX_AGE_LIMIT = 31557600


def _check_web(config: Config, check_files: bool) -> WebSection:
    path, web = config.path, config.web
    if web.mta_sts_mode not in MTA_STS_MODES:
        raise ConfigError(path, "web.mta_sts_mode",
                          f"must be one of {', '.join(MTA_STS_MODES)}, got {web.mta_sts_mode!r}")
    if web.mta_sts_max_age > MTA_STS_MAX_AGE_LIMIT:
        raise ConfigError(path, "web.mta_sts_max_age",
                          f"at most {MTA_STS_MAX_AGE_LIMIT} (RFC 8461 §3.2)")
    for host in web.mta_sts_mx:
        # RFC 8461 §3.2: an mx pattern may start with "*." (one leftmost label).
        if not _HOSTNAME.match(host.removeprefix("*.")):
            raise ConfigError(path, "web.mta_sts_mx", f"not a valid MX pattern: {host!r}")
    if web.client_hostname is not None and not _HOSTNAME.match(web.client_hostname):
        raise ConfigError(path, "web.client_hostname",
                          f"not a valid host name: {web.client_hostname!r}")
    return web
def _check_authn(config: Config, check_files: bool) -> AuthnSection:
    path, authn = config.path, config.authn
    for name in ("spf", "dkim", "iprev"):
        if getattr(authn, name) not in AUTHN_POLICIES:
            raise ConfigError(path, f"authn.{name}", f"must be one of {', '.join(AUTHN_POLICIES)}")
    if authn.dmarc not in AUTHN_DMARC_POLICIES:
        raise ConfigError(path, "authn.dmarc",
                          f"must be one of {', '.join(AUTHN_DMARC_POLICIES)}")
    for domain, table in authn.domains.items():
        key = f"authn.domains.{_quote(domain)}"
        if not _HOSTNAME.match(domain):
            raise ConfigError(path, key, "not a valid domain")
        for name, value in table.items():
            allowed = AUTHN_DMARC_POLICIES if name == "dmarc" else AUTHN_POLICIES
            if name not in ("dmarc", "spf", "dkim", "iprev"):
                raise ConfigError(path, f"{key}.{name}",
                                  "unknown check (known: dkim, dmarc, iprev, spf)")
            if value not in allowed:
                raise ConfigError(path, f"{key}.{name}", f"must be one of {', '.join(allowed)}")
    authserv_id = authn.authserv_id or config.server.hostname
    if not _HOSTNAME.match(authserv_id):
        raise ConfigError(path, "authn.authserv_id", f"not a valid host name: {authserv_id!r}")
    key_dir = authn.key_dir if authn.key_dir is not None else path.parent / "dkim"
    for domain, selectors in authn.selectors.items():
        key = f"authn.selectors.{_quote(domain)}"
        if not _HOSTNAME.match(domain):
            raise ConfigError(path, key, "not a valid domain")
        for selector in selectors:
            if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", selector):
                raise ConfigError(path, key, f"not a valid selector: {selector!r}")
            file = key_dir / f"{domain}.{selector}.pem"
            if check_files:
                try:
                    file.open("rb").close()
                except OSError as exc:
                    raise ConfigError(path, key, f"cannot read {file}: {exc.strerror}") from None
    return replace(authn, authserv_id=authserv_id, key_dir=key_dir)


def _check_smtp(config: Config, check_files: bool) -> SMTPSection:
    if config.smtp.stress_percent > 100:
        raise ConfigError(config.path, "smtp.stress_percent", "must be 1-100")
    return config.smtp


def _check_quota(config: Config, check_files: bool) -> QuotaSection:
    if config.quota.warn_percent > 100:
        raise ConfigError(config.path, "quota.warn_percent", "must be 1-100")
    return config.quota




def _check_defence(config: Config, check_files: bool) -> DefenceSection:
    path, defence = config.path, config.defence
    if defence.ipv4_prefix > 32:
        raise ConfigError(path, "defence.ipv4_prefix", "must be 1-32")
    if defence.ipv6_prefix > 128:
        raise ConfigError(path, "defence.ipv6_prefix", "must be 1-128")
    networks: dict[str, Any] = {}
    for name in ("exempt_networks", "allow_networks", "block_networks"):
        normalised = []
        for text in getattr(defence, name):
            try:
                normalised.append(str(ipaddress.ip_network(text, strict=False)))
            except ValueError:
                raise ConfigError(path, f"defence.{name}",
                                  f"not an address or network: {text!r}") from None
        networks[name] = tuple(normalised)
    for name in ("allow_senders", "block_senders"):
        for text in getattr(defence, name):
            domain = text.rpartition("@")[2]
            if not _HOSTNAME.match(domain.removeprefix(".")):
                raise ConfigError(path, f"defence.{name}",
                                  f"not an address, @domain or domain: {text!r}")
    for key in defence.dnsbl:
        try:
            zone = DNSListKey.parse(key).zone
        except ValueError as exc:
            raise ConfigError(path, f"defence.dnsbl.{_quote(key)}", str(exc)) from None
        if not _HOSTNAME.match(zone):
            raise ConfigError(path, f"defence.dnsbl.{_quote(key)}", f"not a valid zone: {zone!r}")
    for zone in defence.dnswl:
        if not _HOSTNAME.match(zone):
            raise ConfigError(path, "defence.dnswl", f"not a valid zone: {zone!r}")
    for name in ("helo", "fcrdns"):
        if getattr(defence, name) not in DEFENCE_POLICIES:
            raise ConfigError(path, f"defence.{name}",
                              f"must be one of {', '.join(DEFENCE_POLICIES)}")
    if defence.spam_filter_failure not in SPAM_FILTER_FAILURES:
        raise ConfigError(path, "defence.spam_filter_failure",
                          f"must be one of {', '.join(SPAM_FILTER_FAILURES)}")
    if defence.spam_filter is not None and not re.fullmatch(
            r"http://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?/?", defence.spam_filter):
        raise ConfigError(path, "defence.spam_filter",
                          f"must be http://host[:port], got {defence.spam_filter!r}")
    return replace(defence, **networks)


# Run in this order after the listeners are checked; the first problem is reported.
_CHECKERS: dict[str, Callable[[Config, bool], Any]] = {
    "server": _check_server,
    "smtp": _check_smtp,
    "quota": _check_quota,
    "tls": _check_tls,
    "pop3": _check_pop3,
    "imap": _check_imap,
    "submission": _check_submission,
    "routing": _check_routing,
    "auth": _check_auth,
    "dev": _check_dev,
    "relay": _check_relay,
    "journey": _check_journey,
    "pickup": _check_pickup,
    "web": _check_web,


    "authn": _check_authn,
    "defence": _check_defence,
}
