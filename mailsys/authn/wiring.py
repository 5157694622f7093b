"""Building mail authentication from settings: the signing keys of the local domains (read at
start and on reload, refused with one line when missing, unreadable or readable by others) and
the MessageAuthentication the SMTP listeners use."""

from __future__ import annotations

import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from twisted.internet.threads import deferToThread

from mailsys.authn.checks import InboundChecks
from mailsys.authn.dkim import DKIMSigner, KeyFileError, SigningKey, ThreadRunner, load_key
from mailsys.authn.intake import MessageAuthentication, PolicyTable
from mailsys.dns import CachingResolver


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
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path}: a private key must not be open to others "
                           f"(mode {stat.S_IMODE(mode):04o}; chmod 600)")


def build_authentication(
    *,
    resolver: CachingResolver,
    authserv_id: str,
    checks: bool,
    policies: PolicyTable,
    keys: Mapping[str, Sequence[SigningKey]],
    sign: bool = True,
    run_in_thread: ThreadRunner = deferToThread,
) -> MessageAuthentication:
    """The intake object for the SMTP listeners: checks for inbound, signing for submission."""
    inbound = (InboundChecks(resolver, authserv_id, run_in_thread=run_in_thread)
               if checks else None)
    signer = DKIMSigner(keys, run_in_thread=run_in_thread) if sign and keys else None
    return MessageAuthentication(inbound, signer, policies)
