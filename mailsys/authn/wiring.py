"""Building mail authentication from settings: the signing keys of the local domains (read at
start and on reload, refused with one line when missing, unreadable or readable by others) and
the MessageAuthentication the SMTP listeners use."""

from __future__ import annotations

import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mailsys.authn.checks import InboundChecks
from mailsys.authn.dkim import DKIMSigner, KeyFileError, SigningKey, ThreadRunner, load_key
from mailsys.authn.intake import MessageAuthentication, PolicyTable
from mailsys.authn.policy import AuthnPolicy, CheckPolicy, DMARCPolicy
from mailsys.authn.sink import AuthenticatingSink
from mailsys.config import Config
from mailsys.delivery.mx import make_resolver
from mailsys.dns import CachingResolver
from mailsys.interfaces import IMessageSink
from mailsys.journey.events import NULL_RECORDER
from mailsys.journey.interfaces import IJourneyRecorder

log = Logger(namespace="mailsys.authn")


def key_file(key_dir: Path, domain: str, selector: str) -> Path:
    """DIR/DOMAIN.SELECTOR.pem, where `mailsys dkim genkey` writes a key."""
    return Path(key_dir) / f"{domain}.{selector}.pem"


def load_signing_keys(key_dir: Path, domains: Iterable[str],
                      selectors: Mapping[str, Sequence[str]]) -> dict[str, list[SigningKey]]:
    """The keys of each domain: the selectors configured for it (each must exist), else every
    DOMAIN.*.pem in ``key_dir``; RSA first, so the signature every receiver understands is on
    top. Raises KeyFileError naming the file."""
    keys: dict[str, list[SigningKey]] = {}
    wanted = {d.lower().removesuffix("."): list(s) for d, s in selectors.items()}
    for raw in domains:
        domain = raw.lower().removesuffix(".")
        if domain in wanted:
            paths = [key_file(key_dir, domain, s) for s in wanted[domain]]
        else:
            paths = sorted(Path(key_dir).glob(f"{domain}.*.pem")) if Path(key_dir).is_dir() \
                else []
        found = []
        for path in paths:
            _check_private(path)
            selector = path.name[len(domain) + 1:-len(".pem")]
            found.append(load_key(path, domain, selector))
        found.sort(key=lambda k: k.algorithm != "rsa-sha256")
        if found:
            keys[domain] = found
    for domain in wanted:
        if domain not in keys:
            raise KeyFileError(f"dkim selectors for {domain}: not a local domain")
    return keys


def _check_private(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    # Group read is the project's mode for secrets the server's group shares (0640,
    # mailsys.ownership); anything for others is refused.
    if mode & (stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP):
        raise KeyFileError(f"{path}: a private key must not be open to others "
                           f"(mode {stat.S_IMODE(mode):04o}; chmod 600 or 640)")


class Authn:
    """Mail authentication as the service wires it: the shared caching resolver (also the
    relay's), the sinks for inbound and submission listeners and for the server's notices,
    and the reload of the signing keys."""

    def __init__(self, config: Config, reactor: Any,
                 run_in_thread: ThreadRunner = deferToThread,
                 journey: IJourneyRecorder = NULL_RECORDER) -> None:
        section = config.authn
        self._journey = journey
        self._config = config
        self._reactor = reactor
        self._run_in_thread = run_in_thread
        servers = section.dns_servers or config.relay.dns_servers
        self.resolver: CachingResolver | None = None
        defence = config.defence
        if (section.checks or config.relay.enabled
                or (defence.enabled and (defence.dnsbl or defence.dnswl
                                         or defence.fcrdns != "none"))):
            upstream = make_resolver([(s.host, s.port) for s in servers], reactor)
            self.resolver = CachingResolver(upstream, reactor, timeout=section.dns_timeout)
        self.keys = self._load_keys()
        default = _policy(section.dmarc, section.spf, section.dkim, section.iprev)
        domains = {
            domain.lower(): _policy(table.get("dmarc", section.dmarc),
                                    table.get("spf", section.spf),
                                    table.get("dkim", section.dkim),
                                    table.get("iprev", section.iprev))
            for domain, table in section.domains.items()
        }
        self.policies = PolicyTable(default, domains)
        self.authentication = self._build()

    def _load_keys(self) -> dict[str, list[SigningKey]]:
        section = self._config.authn
        if not section.sign:
            return {}
        assert section.key_dir is not None  # config.py fills in the default
        return load_signing_keys(section.key_dir, self._config.routing.local_domains,
                                 section.selectors)

    def _build(self) -> MessageAuthentication:
        section = self._config.authn
        checks = None
        if section.checks:
            assert self.resolver is not None and section.authserv_id is not None
            checks = InboundChecks(self.resolver, section.authserv_id,
                                   run_in_thread=self._run_in_thread, clock=self._reactor)
        signer = DKIMSigner(self.keys, run_in_thread=self._run_in_thread) if self.keys else None
        return MessageAuthentication(checks, signer, self.policies,
                                     authserv_id=section.authserv_id)

    def reload(self, config: Config | None = None) -> None:
        """Read the signing keys again (SIGHUP), from ``config``'s key directory and selectors
        when given (a configuration reload); a broken key keeps the old ones, and says so."""
        previous = self._config
        if config is not None:
            self._config = config
        try:
            keys = self._load_keys()
        except KeyFileError as exc:
            self._config = previous
            log.error("DKIM keys not reloaded, the old ones stay: {error}", error=str(exc))
            return
        self.keys = keys
        signer = DKIMSigner(keys, run_in_thread=self._run_in_thread) if keys else None
        self.authentication.signer = signer
        log.info("DKIM keys reloaded: {domains}",
                 domains=", ".join(f"{d} ({len(k)})" for d, k in sorted(keys.items()))
                 or "none")

    def wrap(self, sink: IMessageSink) -> IMessageSink:
        """The sink every listener and the notices hand messages to: authenticated and local
        mail is signed, the rest checked (AuthenticatingSink)."""
        return AuthenticatingSink(sink, self.authentication, self._journey)


def _policy(dmarc: str, spf: str, dkim: str, iprev: str) -> AuthnPolicy:
    # config.py has checked every value against these sets.
    return AuthnPolicy(dmarc=cast(DMARCPolicy, dmarc), spf=cast(CheckPolicy, spf),
                       dkim=cast(CheckPolicy, dkim), iprev=cast(CheckPolicy, iprev))
