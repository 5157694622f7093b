"""Routing: which domains are ours, and to which mailboxes or remote addresses a recipient goes.

Resolution happens at RCPT time, so an unknown local user is refused in the SMTP dialogue
(RFC 5321 §3.3) and the envelope records exactly where each copy goes.

The rules, in order, for an address in a local domain (after lowercasing it and mapping an alias
domain to its target domain):

1. an alias: expanded to its targets, each resolved by these same rules (recursively, at most
   ``MAX_ALIAS_DEPTH`` levels deep); targets in other domains are relayed;
2. a user of the store: delivered to that mailbox;
3. a subaddress ``user+tag`` (separator from the config; empty turns it off): resolved as
   ``user`` by rules 1 and 2, when ``user+tag`` itself is neither alias nor user;
4. the domain's catch-all, resolved by these same rules;
5. ``postmaster``, which RFC 5321 §4.5.1 requires in every domain we accept mail for:
   wherever ``postmaster@<first local domain>`` goes by these rules, and if that is nowhere,
   the Maildir of ``postmaster@<first local domain>`` itself (created on first delivery), where
   an administrator can read it. A postmaster address is never refused;
6. otherwise UnknownRecipient.

During alias expansion an address already being expanded further up (a loop) is resolved by
rules 2 and 3 only, so ``alice = alice, bob`` delivers to alice's own mailbox and to bob, the way
sendmail and Postfix treat an alias that names itself. A target that resolves to nothing (an
unknown user, a loop of aliases with no user in it, too deep a chain) is dropped and logged; the
recipient is refused only if nothing at all remains. Destinations are deduplicated: one copy per
local mailbox, one per remote address.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from twisted.logger import Logger
from zope.interface import implementer

from mailsys.config import RoutingSection

# Destination is plain data and lives with the envelope; it stays importable from here.
from mailsys.envelope import Destination as Destination
from mailsys.envelope import TargetKind
from mailsys.interfaces import IRouter

# A chain of aliases deeper than this is a configuration mistake, not a design.
MAX_ALIAS_DEPTH = 10

POSTMASTER = "postmaster"


class UnknownRecipient(Exception):  # noqa: N818 - a public name others already use
    """The address is in a local domain but names no user, alias or catch-all."""


class Mailboxes(Protocol):
    """What the router needs of the user store: is this canonical ``user@domain`` a user?"""

    def exists(self, mailbox: str) -> bool: ...


def _domain(domain: str) -> str:
    # DNS names are case-insensitive (RFC 4343) and "example.test." is the same fully qualified
    # name as "example.test".
    return domain.lower().removesuffix(".")


@implementer(IRouter)
class Router:
    """Resolves recipients by the rules of the module docstring, from the config and the users.

    The user store is asked on every call, so users added while the server runs are found.
    """

    _log = Logger()

    def __init__(self, routing: RoutingSection, users: Mailboxes) -> None:
        self._users = users
        self.reconfigure(routing)

    def reconfigure(self, routing: RoutingSection) -> None:
        """Resolve by ``routing`` from now on (a reload, mailsys.reload): every table is
        replaced here, on the reactor thread, so no lookup sees half of the old and half of
        the new."""
        self._separator = routing.subaddress_separator
        self._local_domains = [_domain(d) for d in routing.local_domains]
        self._domain_aliases = {_domain(k): _domain(v) for k, v in routing.domain_aliases.items()}
        self._catch_all = {
            _domain(domain): self._normalize(target) for domain, target in routing.catch_all.items()
        }
        self._aliases: dict[str, tuple[str, ...]] = {}
        for key, targets in routing.aliases.items():
            normalized = self._normalize(key)
            # Two spellings of one alias (case, alias domain) are merged rather than one lost.
            self._aliases[normalized] = self._aliases.get(normalized, ()) + tuple(targets)

    def is_local_domain(self, domain: str) -> bool:
        """True for a local domain or an alias domain, case-insensitive, trailing dot ignored."""
        domain = _domain(domain)
        return domain in self._local_domains or domain in self._domain_aliases

    def resolve(self, address: str) -> list[Destination]:
        """Expand ``address`` into its destinations; UnknownRecipient if a local one has none.

        Remote addresses come back as one RELAY destination with the domain lowercased and the
        local part as given (only the remote server may interpret it). A LOCAL destination's
        address is the expanded, lowercased address (what Delivered-To shows); its mailbox is the
        store's canonical name.
        """
        local, at, domain = address.rpartition("@")
        if not at:
            # RFC 5321 §4.5.1: "Postmaster" without a domain must be accepted.
            if address.lower() == POSTMASTER and self._local_domains:
                local, domain = POSTMASTER, self._local_domains[0]
            else:
                raise UnknownRecipient(address)
        if not self.is_local_domain(domain):
            return [Destination(f"{local}@{_domain(domain)}", TargetKind.RELAY)]
        found: list[Destination] = []
        self._expand(self._normalize(f"{local}@{domain}"), (), found)
        if not found:
            raise UnknownRecipient(address)
        return _deduplicate(found)

    def may_send_as(self, mailbox: str, address: str) -> bool:
        """True if the user ``mailbox`` may use ``address`` as a submission's envelope sender.

        That is the user's own address (any case, in any alias domain of its domain), a
        subaddress of it, or an alias whose expansion delivers to the mailbox (a subaddress of
        such an alias too). A catch-all does not make a user the owner of every address of a
        domain, and addresses in other domains belong to nobody here.
        """
        local, at, domain = address.rpartition("@")
        if not at or not local or not self.is_local_domain(domain):
            return False
        mailbox = mailbox.lower()
        normalized = self._normalize(address)
        local, _, domain = normalized.rpartition("@")
        candidates = [normalized]
        base = self._base_address(local, domain)
        if base is not None:
            candidates.append(base)
        for candidate in candidates:
            if candidate == mailbox:
                return True
            found: list[Destination] = []
            if self._expand_alias(candidate, candidate, (), found) and any(
                destination.mailbox == mailbox for destination in found
            ):
                return True
        return False

    def _normalize(self, address: str) -> str:
        """Lowercase a local address and map an alias domain to its target domain.

        A remote address keeps its local part as given: only the remote server may interpret it.
        """
        local, _, domain = address.rpartition("@")
        domain = _domain(domain)
        if not self.is_local_domain(domain):
            return f"{local}@{domain}"
        return f"{local.lower()}@{self._domain_aliases.get(domain, domain)}"

    def _expand(
        self, address: str, path: tuple[str, ...], out: list[Destination],
        postmaster_fallback: bool = True,
    ) -> None:
        """Append the destinations of ``address`` (normalized) to ``out``.

        ``path`` holds the addresses being expanded above this one, outermost first.
        """
        local, _, domain = address.rpartition("@")
        if not self.is_local_domain(domain):
            out.append(Destination(address, TargetKind.RELAY))
            return
        before = len(out)
        reason = self._expand_local(address, local, domain, path, out)
        if len(out) > before:
            return
        if local == POSTMASTER:
            # RFC 5321 §4.5.1: postmaster must be accepted. Nobody configured one that works, so
            # keep the mail in the first local domain's postmaster Maildir (created on first
            # delivery) where an administrator can read it, rather than refuse it.
            if postmaster_fallback:
                out.append(Destination(address, TargetKind.LOCAL, self._primary_postmaster()))
        elif path:
            self._drop(address, path, reason)

    def _expand_local(
        self, address: str, local: str, domain: str, path: tuple[str, ...],
        out: list[Destination],
    ) -> str:
        """Rules 1-5 for a normalized local address; returns why nothing was found, if so."""
        if address in path:
            # A loop: the address names itself somewhere down its own expansion.
            self._deliver_plain(address, out)
            return "alias loop with no user at its end"
        if len(path) > MAX_ALIAS_DEPTH:
            return f"alias chain deeper than {MAX_ALIAS_DEPTH}"
        if self._expand_alias(address, address, path, out):
            return "no alias target could be delivered"
        if self._deliver_user(address, address, out):
            return ""
        base = self._base_address(local, domain)
        if base is not None and (
            self._expand_alias(base, address, path, out) or self._deliver_user(base, address, out)
        ):
            return "no alias target could be delivered"
        catch_all = self._catch_all.get(domain)
        if catch_all is not None:
            before = len(out)
            self._expand(catch_all, (*path, address), out)
            if len(out) > before:
                return ""
        primary = self._primary_postmaster()
        if local == POSTMASTER and address != primary and primary not in path:
            # Without a fallback here, so that if the primary postmaster is nowhere, the fallback
            # Destination keeps this domain's address (what Delivered-To will show).
            self._expand(primary, (*path, address), out, postmaster_fallback=False)
        return "no such user"

    def _expand_alias(
        self, key: str, address: str, path: tuple[str, ...], out: list[Destination]
    ) -> bool:
        targets = self._aliases.get(key)
        if targets is None:
            return False
        below = (*path, address)
        for target in targets:
            self._expand(self._normalize(target), below, out)
        return True

    def _deliver_user(self, mailbox: str, address: str, out: list[Destination]) -> bool:
        if not self._users.exists(mailbox):
            return False
        out.append(Destination(address, TargetKind.LOCAL, mailbox))
        return True

    def _deliver_plain(self, address: str, out: list[Destination]) -> bool:
        """Rules 2 and 3 only: the address as a user, or as a subaddress of one."""
        if self._deliver_user(address, address, out):
            return True
        local, _, domain = address.rpartition("@")
        base = self._base_address(local, domain)
        return base is not None and self._deliver_user(base, address, out)

    def _base_address(self, local: str, domain: str) -> str | None:
        """``user@domain`` for ``user+tag@domain``, or None if there is no subaddress."""
        if not self._separator or self._separator not in local:
            return None
        base = local.split(self._separator, 1)[0]
        return f"{base}@{domain}" if base else None

    def _primary_postmaster(self) -> str:
        return f"{POSTMASTER}@{self._local_domains[0]}"

    def _drop(self, address: str, path: tuple[str, ...], reason: str) -> None:
        self._log.warn("routing: {original} -> {address} dropped: {reason}",
                       original=path[0] if path else address, address=address, reason=reason)


def _deduplicate(destinations: Iterable[Destination]) -> list[Destination]:
    seen: set[tuple[TargetKind, str]] = set()
    result = []
    for destination in destinations:
        key = (destination.kind, destination.mailbox or destination.address)
        if key not in seen:
            seen.add(key)
            result.append(destination)
    return result
