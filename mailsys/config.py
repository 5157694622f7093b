"""Configuration: one TOML file read into frozen dataclasses, checked before anything starts.

Every problem is reported as one line naming the file, the key and the reason; unknown keys and
wrong types are errors, not surprises at run time. Relative paths are resolved against the current
working directory, like twistd's own --pidfile and --logfile.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailsys.auth import throttle as _throttle
from mailsys.delivery.nexthop import NextHopError, check_transport_value, parse_next_hop

DEFAULT_BACKLOG = 1024
_SIZE_TEXT = re.compile(r"^\s*(\d+)\s*([KMGT]?)B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_LISTENER_TYPES = ("tcp", "tcp6", "unix")


def parse_size(text: str) -> int | None:
    """Bytes from "500", "100K", "25M", "2G" (powers of 1024); None for "none" (no limit).

    Raises ValueError for anything else.
    """
    if text.strip().lower() in ("none", "unlimited"):
        return None
    match = _SIZE_TEXT.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 500K, 100M, 2G or none)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


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
    """Identity of this mail system."""

    hostname: str = "localhost"


@dataclass(frozen=True)
class StorageSection:
    """Where state lives: the durable spool, the Maildirs and the user store."""

    spool: Path = Path("var/spool")
    maildirs: Path = Path("maildirs")
    users: Path = Path("var/users")
    # Free space the spool's file system keeps: below it MAIL FROM gets 452 4.3.1 ("100M";
    # "none" turns the check off). Unset: three times smtp.max_message_size.
    spool_min_free: str | None = None

    def spool_floor(self, max_message_size: int) -> int:
        """The free-space floor in bytes (0: no floor)."""
        if self.spool_min_free is None:
            return 3 * max_message_size
        return parse_size(self.spool_min_free) or 0


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
    # RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF.
    max_line_length: int = 1000
    # RFC 5321 §4.5.3.2.7: the server timeout should be at least 5 minutes.
    idle_timeout: float = 300.0
    max_bad_commands: int = 10
    max_connections: int = 500
    max_connections_per_client: int = 20
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
    logins (the rule is mailsys.auth.throttle's)."""

    # Each failure of a user at an address answers later: base delay, doubling per failure, at
    # most max delay (seconds).
    throttle_base_delay: float = _throttle.BASE_DELAY
    throttle_max_delay: float = _throttle.MAX_DELAY
    # After this many failures, that user at that address is refused outright until the window
    # passes after the last one.
    throttle_max_failures: int = _throttle.MAX_FAILURES
    # After this many failures within a window, for any users, the whole address is refused
    # (password spraying) until the window passes after the last one.
    throttle_max_address_failures: int = _throttle.MAX_ADDRESS_FAILURES
    throttle_window: float = _throttle.WINDOW


@dataclass(frozen=True)
class RelaySection:
    """Mail for other domains: DNS, TLS policy, next hops, retries and delivery status notices.

    Next hops are written ``smtp:[host]:port``, ``smtp:domain`` (its MX hosts) or
    ``smtps:[host]:465`` (mailsys.delivery.nexthop). Times are in seconds.
    """

    # false: relayed recipients wait in the queue and nothing leaves (a closed lab, tests).
    enabled: bool = True
    # "ip" or "ip:port" ("[ipv6]:port"); empty: the system's /etc/resolv.conf.
    dns_servers: tuple[str, ...] = ()
    ip_version: str = "any"  # "any", "ipv4" or "ipv6"
    # The TCP port of MX hosts: 25, except in labs and tests on unprivileged ports.
    port: int = 25
    tls_policy: str = "opportunistic"  # "opportunistic", "verify" or "none"
    tls_policy_per_domain: Mapping[str, str] = field(default_factory=dict)
    # Trust anchors (PEM) for the "verify" policy; default: the system's store.
    tls_ca_file: Path | None = None
    smarthost: str | None = None
    smarthost_username: str | None = None
    smarthost_password: str | None = None
    smarthost_password_file: Path | None = None
    # domain, ".domain" (subdomains) or "*" -> "mx", "smarthost" or a next hop
    transport: Mapping[str, str] = field(default_factory=dict)
    # The wait after the 1st, 2nd, ... temporary failure; the last value repeats.
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
    # RFC 5321 §4.5.4.1: give up after 4-5 days.
    max_lifetime: float = 5 * 86400.0
    # RFC 3461 §4.1: a "delayed" notice once a recipient has waited this long.
    delay_warning: float = 4 * 3600.0
    connect_timeout: float = 30.0
    per_destination_concurrency: int = 20
    helo_name: str | None = None  # default: server.hostname


@dataclass(frozen=True)
class DevSection:
    """Development conveniences of the embedded default; absent in production."""

    demo_user: str | None = None
    demo_password: str | None = None


@dataclass(frozen=True)
class QuotaSection:
    """Per-mailbox limits (mailsys.delivery.quota): a default for every mailbox, overridden per
    user (canonical address); none by default. Sizes as "500K", "100M", "2G" or "none"."""

    storage: str | None = None
    messages: int | None = None
    # A notice goes to the user's INBOX when a delivery takes the mailbox past this share.
    warn_percent: int = 90
    storage_per_user: Mapping[str, str] = field(default_factory=dict)
    messages_per_user: Mapping[str, int] = field(default_factory=dict)


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
    dev: DevSection = field(default_factory=DevSection)
    quota: QuotaSection = field(default_factory=QuotaSection)


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
    "dev": DevSection,
    "quota": QuotaSection,
}

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


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
    _check(config, check_files=check_files)
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
        if isinstance(value, str) and args[0] is str:
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


def normalize_listener(description: str, path: Path, key: str) -> str:
    """Check one listener endpoint string; add ``backlog=`` when absent.

    Twisted's default backlog of 50 drops connections under a burst, so we always set one.
    Only plain stream endpoints are allowed: mailsys adds TLS itself, so that certificates can be
    reloaded without a restart.
    """
    from twisted.internet import endpoints

    try:
        args, kwargs = endpoints._parse(description)  # the same parser serverFromString uses
    except Exception as exc:  # pragma: no cover - _parse raises few things
        raise ConfigError(path, key, f"bad endpoint string {description!r}: {exc}") from None
    if not args:
        raise ConfigError(path, key, f"bad endpoint string {description!r}: empty")
    kind = str(args[0]).lower()
    if kind not in _LISTENER_TYPES:
        raise ConfigError(
            path, key,
            f"endpoint {description!r}: type must be one of {', '.join(_LISTENER_TYPES)} "
            "(mailsys adds TLS itself)",
        )
    if kind in ("tcp", "tcp6"):
        port = args[1] if len(args) > 1 else kwargs.get("port")
        if port is None or not str(port).isdigit() or not 0 <= int(str(port)) <= 65535:
            raise ConfigError(path, key, f"endpoint {description!r}: needs a port 0-65535")
    elif len(args) < 2 and "address" not in kwargs:
        raise ConfigError(path, key, f"endpoint {description!r}: needs a socket path")
    allowed = {"tcp": {"port", "interface", "backlog"}, "tcp6": {"port", "interface", "backlog"},
               "unix": {"address", "mode", "backlog", "lockfile"}}[kind]
    for name in kwargs:
        if name not in allowed:
            raise ConfigError(path, key, f"endpoint {description!r}: unknown option {name!r}")
    interface = kwargs.get("interface")
    if interface is not None and interface != "":
        try:
            ipaddress.ip_address(str(interface))
        except ValueError:
            # bind() would try to resolve it at start-up and fail there, or bind a surprise.
            raise ConfigError(path, key, f"endpoint {description!r}: interface must be an IP "
                              f"address, not {interface!r}") from None
    backlog = kwargs.get("backlog")
    if backlog is None:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    if not str(backlog).isdigit() or int(str(backlog)) <= 0:
        raise ConfigError(path, key,
                          f"endpoint {description!r}: backlog must be a positive integer")
    return description


# Every key that holds listener endpoint strings, in the order the service binds them.
LISTENER_KEYS = (("smtp", "listen"), ("submission", "listen"), ("submission", "listen_tls"),
                 ("pop3", "listen"), ("pop3", "listen_tls"), ("imap", "listen"),
                 ("imap", "listen_tls"))
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def _claim_port(bound: dict[tuple[str, int], tuple[str, str]], description: str, path: Path,
                key: str) -> None:
    """Refuse a TCP listener whose port another listener of this config already binds.

    The service would fail at start-up with "address already in use" and no key to go by. A
    wildcard interface overlaps every interface of its port (Linux refuses both binds).
    """
    from twisted.internet import endpoints

    args, kwargs = endpoints._parse(description)
    if str(args[0]).lower() not in ("tcp", "tcp6"):
        return
    port = int(str(args[1] if len(args) > 1 else kwargs["port"]))
    if port == 0:
        return  # any free port: never a clash
    interface = str(kwargs.get("interface", ""))
    if interface:
        interface = ipaddress.ip_address(interface).compressed  # "::0" is "::"
    for (other_interface, other_port), (other_key, other) in bound.items():
        if other_port == port and (other_interface == interface or interface in _WILDCARDS
                                   or other_interface in _WILDCARDS):
            raise ConfigError(path, key, f"endpoint {description!r}: port {port} is already "
                              f"taken by {other!r} ({other_key})")
    bound[(interface, port)] = (key, description)


def _check_storage_limits(config: Config) -> None:
    """The free-space floor and the quota sizes must parse; the warning level is a percentage."""
    path = config.path
    sizes = [("storage.spool_min_free", config.storage.spool_min_free),
             ("quota.storage", config.quota.storage)]
    sizes += [(f"quota.storage_per_user.{_quote(user)}", size)
              for user, size in config.quota.storage_per_user.items()]
    for key, value in sizes:
        if value is None:
            continue
        try:
            parse_size(value)
        except ValueError as exc:
            raise ConfigError(path, key, str(exc)) from None
    if config.quota.warn_percent > 100:
        raise ConfigError(path, "quota.warn_percent", "must be 1-100")


def _check(config: Config, *, check_files: bool) -> None:
    path = config.path
    _check_storage_limits(config)
    if not _HOSTNAME.match(config.server.hostname):
        raise ConfigError(path, "server.hostname",
                          f"not a valid host name: {config.server.hostname!r}")
    bound: dict[tuple[str, int], tuple[str, str]] = {}  # (interface, port) -> (key, endpoint)
    for section, attr in LISTENER_KEYS:
        listeners = getattr(getattr(config, section), attr)
        fixed = tuple(normalize_listener(d, path, f"{section}.{attr}") for d in listeners)
        object.__setattr__(getattr(config, section), attr, fixed)
        for description in listeners:  # as written, for the message
            _claim_port(bound, description, path, f"{section}.{attr}")
    tls = config.tls
    if (tls.certificate is None) != (tls.key is None):
        raise ConfigError(path, "tls", "certificate and key must be given together")
    if config.pop3.listen_tls and not tls.enabled:
        raise ConfigError(path, "pop3.listen_tls", "implicit TLS needs [tls] certificate and key")
    if config.imap.listen_tls and not tls.enabled:
        raise ConfigError(path, "imap.listen_tls", "implicit TLS needs [tls] certificate and key")
    if config.imap.idle_timeout < 1800:
        raise ConfigError(path, "imap.idle_timeout",
                          "must be at least 1800 seconds (RFC 3501 §5.4: thirty minutes)")
    if config.pop3.idle_timeout < 600:
        raise ConfigError(path, "pop3.idle_timeout",
                          "must be at least 600 seconds (RFC 1939 §3: ten minutes)")
    if config.submission.listen_tls and not tls.enabled:
        raise ConfigError(path, "submission.listen_tls",
                          "implicit TLS needs [tls] certificate and key")
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
    routing = config.routing
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
    auth = config.auth
    if auth.throttle_max_address_failures < auth.throttle_max_failures:
        # Else one user's typos would block every user of the address, the rule's whole point.
        raise ConfigError(path, "auth.throttle_max_address_failures",
                          f"must be at least auth.throttle_max_failures "
                          f"({auth.throttle_max_failures})")
    dev = config.dev
    if (dev.demo_user is None) != (dev.demo_password is None):
        raise ConfigError(path, "dev", "demo_user and demo_password must be given together")
    if dev.demo_user is not None and "@" not in dev.demo_user:
        raise ConfigError(path, "dev.demo_user", "must be a full address user@domain")
    _check_relay(config, check_files=check_files)


_TLS_POLICIES = ("opportunistic", "verify", "none")
_IP_VERSIONS = ("any", "ipv4", "ipv6")


def _check_relay(config: Config, *, check_files: bool) -> None:
    path = config.path
    relay = config.relay
    for server in relay.dns_servers:
        try:
            parse_dns_server(server)
        except ValueError as exc:
            raise ConfigError(path, "relay.dns_servers", str(exc)) from None
    if relay.ip_version not in _IP_VERSIONS:
        raise ConfigError(path, "relay.ip_version",
                          f"must be one of {', '.join(_IP_VERSIONS)}, got {relay.ip_version!r}")
    if relay.port > 65535:
        raise ConfigError(path, "relay.port", "must be 1-65535")
    if relay.tls_policy not in _TLS_POLICIES:
        raise ConfigError(path, "relay.tls_policy",
                          f"must be one of {', '.join(_TLS_POLICIES)}, got {relay.tls_policy!r}")
    for domain, policy in relay.tls_policy_per_domain.items():
        key = f"relay.tls_policy_per_domain.{_quote(domain)}"
        if not _HOSTNAME.match(domain.removeprefix(".")):
            raise ConfigError(path, key, "not a valid domain")
        if policy not in _TLS_POLICIES:
            raise ConfigError(path, key,
                              f"must be one of {', '.join(_TLS_POLICIES)}, got {policy!r}")
    if relay.smarthost is not None:
        try:
            parse_next_hop(relay.smarthost)
        except NextHopError as exc:
            raise ConfigError(path, "relay.smarthost", str(exc)) from None
    for domain, hop in relay.transport.items():
        key = f"relay.transport.{_quote(domain)}"
        if domain != "*" and not _HOSTNAME.match(domain.removeprefix(".")):
            raise ConfigError(path, key, "not a valid domain (or \".domain\", or \"*\")")
        try:
            check_transport_value(hop, smarthost_configured=relay.smarthost is not None)
        except NextHopError as exc:
            raise ConfigError(path, key, str(exc)) from None
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


def parse_dns_server(text: str) -> tuple[str, int]:
    """``"ip"``, ``"ip:port"`` or ``"[ipv6]:port"`` as (address, port); ValueError if not."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"{text!r}: expected [ipv6]:port")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"{text!r}: the port must be a number")
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address (a name cannot bootstrap DNS)") from None
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: the port must be 1-65535")
    return host, port
