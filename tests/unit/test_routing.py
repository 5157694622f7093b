"""Routing: local domains, aliases, users, subaddresses, postmaster and catch-all, in that order."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from mailsys.auth.users import UserStore
from mailsys.config import RoutingSection
from mailsys.envelope import TargetKind
from mailsys.interfaces import IRouter
from mailsys.routing import MAX_ALIAS_DEPTH, Destination, Router, UnknownRecipient

LOCAL = TargetKind.LOCAL
RELAY = TargetKind.RELAY


class Users:
    """An in-memory user directory with the one method the router uses."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def exists(self, mailbox: str) -> bool:
        return mailbox.lower() in self.names


def router(
    *users: str,
    local_domains: tuple[str, ...] = ("example.test", "other.test"),
    domain_aliases: Mapping[str, str] | None = None,
    aliases: Mapping[str, tuple[str, ...]] | None = None,
    catch_all: Mapping[str, str] | None = None,
    separator: str = "+",
) -> Router:
    routing = RoutingSection(
        local_domains=local_domains,
        domain_aliases=dict(domain_aliases or {}),
        aliases=dict(aliases or {}),
        catch_all=dict(catch_all or {}),
        subaddress_separator=separator,
    )
    return Router(routing, Users(*users))


def local(address: str, mailbox: str | None = None) -> Destination:
    return Destination(address, LOCAL, mailbox or address)


def test_provides_irouter() -> None:
    """The router is held to the IRouter interface the SMTP policy uses."""
    assert verifyObject(IRouter, router())


def test_local_domains_and_alias_domains_are_local() -> None:
    """Local and alias domains are ours, any case, with or without a trailing dot."""
    r = router(domain_aliases={"Alias.Test": "example.test"})
    for domain in ("example.test", "EXAMPLE.Test", "example.test.", "other.test",
                   "alias.test", "ALIAS.TEST."):
        assert r.is_local_domain(domain), domain
    for domain in ("example.org", "sub.example.test", "test", "[192.0.2.1]"):
        assert not r.is_local_domain(domain), domain


def test_remote_address_is_relayed_with_its_local_part_untouched() -> None:
    """An address in another domain is one RELAY destination; only the domain is lowercased."""
    assert router().resolve("Bob.Smith@Example.ORG.") == [
        Destination("Bob.Smith@example.org", RELAY)]


def test_user_is_delivered_to_its_mailbox() -> None:
    """A user of the store resolves to its mailbox, whatever the case of the address."""
    r = router("alice@example.test")
    assert r.resolve("alice@example.test") == [local("alice@example.test")]
    assert r.resolve("ALICE@Example.Test.") == [local("alice@example.test")]


def test_unknown_user_of_a_local_domain_is_refused() -> None:
    """An unknown user with no alias or catch-all raises UnknownRecipient."""
    with pytest.raises(UnknownRecipient):
        router("alice@example.test").resolve("bob@example.test")
    with pytest.raises(UnknownRecipient):
        router().resolve("no-at-sign")


def test_domain_alias_maps_to_the_target_domain() -> None:
    """user@alias.test delivers as user@example.test; Delivered-To shows the real domain."""
    r = router("alice@example.test", domain_aliases={"alias.test": "example.test"})
    assert r.resolve("Alice@ALIAS.test") == [local("alice@example.test")]
    with pytest.raises(UnknownRecipient):
        r.resolve("bob@alias.test")


def test_alias_takes_precedence_over_a_user() -> None:
    """An alias with the same name as a user wins over the user's own mailbox."""
    r = router("alice@example.test", "bob@example.test",
               aliases={"alice@example.test": ("bob@example.test",)})
    assert r.resolve("alice@example.test") == [local("bob@example.test")]


def test_alias_expands_to_local_and_external_addresses() -> None:
    """An alias reaches several users and outside addresses; alias keys ignore case."""
    r = router("alice@example.test", "bob@other.test",
               aliases={"Team@Example.Test": ("alice@example.test", "BOB@other.test",
                                              "Carol@Example.ORG")})
    assert r.resolve("team@EXAMPLE.test") == [
        local("alice@example.test"),
        local("bob@other.test"),
        Destination("Carol@example.org", RELAY),
    ]


def test_alias_expansion_is_recursive_and_deduplicated() -> None:
    """Nested aliases expand fully, and each mailbox or remote address appears once."""
    r = router("alice@example.test", "bob@example.test",
               aliases={"all@example.test": ("staff@example.test", "alice@example.test",
                                             "x@remote.test"),
                        "staff@example.test": ("alice@example.test", "bob+news@example.test",
                                               "bob@example.test", "x@REMOTE.test")})
    assert r.resolve("all@example.test") == [
        local("alice@example.test"),
        local("bob+news@example.test", "bob@example.test"),
        Destination("x@remote.test", RELAY),
    ]


def test_alias_naming_itself_delivers_to_its_own_mailbox() -> None:
    """``alice = alice, bob``: alice's own mailbox and bob's, like sendmail and Postfix."""
    r = router("alice@example.test", "bob@example.test",
               aliases={"alice@example.test": ("alice@example.test", "bob@example.test")})
    assert r.resolve("alice@example.test") == [
        local("alice@example.test"), local("bob@example.test")]


def test_alias_loop_without_a_user_is_refused() -> None:
    """a -> b -> a with no user at either end resolves to nothing: UnknownRecipient."""
    r = router(aliases={"a@example.test": ("b@example.test",),
                        "b@example.test": ("a@example.test",)})
    with pytest.raises(UnknownRecipient):
        r.resolve("a@example.test")


def test_alias_loop_keeps_the_branches_that_reach_someone() -> None:
    """A loop inside a larger alias is cut; the other targets still receive the mail."""
    r = router("carol@example.test",
               aliases={"a@example.test": ("b@example.test", "carol@example.test"),
                        "b@example.test": ("a@example.test",)})
    assert r.resolve("a@example.test") == [local("carol@example.test")]
    assert r.resolve("b@example.test") == [local("carol@example.test")]


def test_alias_chain_deeper_than_the_limit_is_cut() -> None:
    """A chain of aliases longer than MAX_ALIAS_DEPTH stops there rather than run away."""
    chain = {f"a{i}@example.test": (f"a{i + 1}@example.test",) for i in range(MAX_ALIAS_DEPTH + 1)}
    r = router(f"a{MAX_ALIAS_DEPTH + 1}@example.test", aliases=chain)
    with pytest.raises(UnknownRecipient):
        r.resolve("a0@example.test")
    assert r.resolve("a1@example.test") == [local(f"a{MAX_ALIAS_DEPTH + 1}@example.test")]


def test_alias_with_some_unknown_targets_keeps_the_rest() -> None:
    """A stale alias member is dropped; the alias is refused only when nobody is left."""
    r = router("alice@example.test",
               aliases={"team@example.test": ("gone@example.test", "alice@example.test"),
                        "dead@example.test": ("gone@example.test",)})
    assert r.resolve("team@example.test") == [local("alice@example.test")]
    with pytest.raises(UnknownRecipient):
        r.resolve("dead@example.test")


def test_subaddress_delivers_to_the_user() -> None:
    """user+tag goes to user's mailbox; the destination address keeps the tag."""
    r = router("alice@example.test")
    assert r.resolve("Alice+Lists@example.test") == [
        local("alice+lists@example.test", "alice@example.test")]
    assert r.resolve("alice+a+b@example.test") == [
        local("alice+a+b@example.test", "alice@example.test")]
    with pytest.raises(UnknownRecipient):
        r.resolve("+tag@example.test")
    with pytest.raises(UnknownRecipient):
        r.resolve("bob+tag@example.test")


def test_subaddress_of_an_alias_expands_the_alias() -> None:
    """sales+web goes wherever the alias sales goes."""
    r = router("alice@example.test", aliases={"sales@example.test": ("alice@example.test",)})
    assert r.resolve("sales+web@example.test") == [local("alice@example.test")]


def test_exact_user_or_alias_beats_the_subaddress_rule() -> None:
    """A user or alias literally named user+tag is used as such."""
    r = router("alice@example.test", "alice+work@example.test",
               aliases={"alice+spam@example.test": ("x@remote.test",)})
    assert r.resolve("alice+work@example.test") == [local("alice+work@example.test")]
    assert r.resolve("alice+spam@example.test") == [Destination("x@remote.test", RELAY)]


def test_subaddress_separator_is_configurable_and_can_be_off() -> None:
    """The separator comes from the config; an empty one turns subaddressing off."""
    dash = router("alice@example.test", separator="-")
    assert dash.resolve("alice-x@example.test") == [
        local("alice-x@example.test", "alice@example.test")]
    with pytest.raises(UnknownRecipient):
        dash.resolve("alice+x@example.test")
    with pytest.raises(UnknownRecipient):
        router("alice@example.test", separator="").resolve("alice+x@example.test")


def test_catch_all_receives_unknown_users_of_its_domain() -> None:
    """Mail for an unknown user goes to the domain's catch-all; other domains are unaffected."""
    r = router("alice@example.test", "bob@other.test",
               domain_aliases={"alias.test": "example.test"},
               catch_all={"Example.Test": "alice@example.test"})
    assert r.resolve("whoever@example.test") == [
        local("alice@example.test")]
    assert r.resolve("whoever@alias.test") == [local("alice@example.test")]
    assert r.resolve("bob@other.test") == [local("bob@other.test")]
    with pytest.raises(UnknownRecipient):
        r.resolve("whoever@other.test")


def test_catch_all_can_be_an_alias_or_an_external_address() -> None:
    """A catch-all target is resolved like any address: alias, user or remote."""
    r = router("alice@example.test",
               aliases={"admins@example.test": ("alice@example.test", "ops@remote.test")},
               catch_all={"example.test": "admins@example.test", "other.test": "X@Remote.test"})
    assert r.resolve("nobody@example.test") == [
        local("alice@example.test"), Destination("ops@remote.test", RELAY)]
    assert r.resolve("nobody@other.test") == [Destination("X@remote.test", RELAY)]


def test_catch_all_to_an_unknown_user_does_not_loop() -> None:
    """A catch-all naming an unknown user of its own domain refuses instead of looping."""
    r = router(catch_all={"example.test": "nobody@example.test"})
    with pytest.raises(UnknownRecipient):
        r.resolve("someone@example.test")


def test_postmaster_alias_or_user_is_used_when_defined() -> None:
    """postmaster@domain resolves through its own alias or user first (any case)."""
    r = router("alice@example.test", "postmaster@other.test",
               aliases={"postmaster@example.test": ("alice@example.test",)})
    assert r.resolve("PostMaster@example.test") == [local("alice@example.test")]
    assert r.resolve("postmaster@other.test") == [local("postmaster@other.test")]


def test_postmaster_of_another_domain_goes_to_the_first_domains_postmaster() -> None:
    """Without its own, postmaster@other goes where postmaster@<first local domain> goes."""
    r = router("alice@example.test",
               aliases={"postmaster@example.test": ("alice@example.test",)})
    assert r.resolve("postmaster@other.test") == [local("alice@example.test")]


def test_postmaster_prefers_its_domains_catch_all() -> None:
    """With no postmaster of its own, a domain's catch-all receives its postmaster mail."""
    r = router("alice@example.test", "bob@other.test",
               aliases={"postmaster@example.test": ("alice@example.test",)},
               catch_all={"other.test": "bob@other.test"})
    assert r.resolve("postmaster@other.test") == [local("bob@other.test")]


def test_postmaster_always_exists() -> None:
    """RFC 5321 §4.5.1: with nothing configured, postmaster lands in the first domain's
    postmaster Maildir, never refused, even without a domain or when its alias is broken."""
    r = router()
    assert r.resolve("postmaster@example.test") == [
        local("postmaster@example.test")]
    assert r.resolve("Postmaster@other.test") == [
        local("postmaster@other.test", "postmaster@example.test")]
    assert r.resolve("Postmaster") == [local("postmaster@example.test")]
    broken = router(aliases={"postmaster@example.test": ("gone@example.test",)})
    assert broken.resolve("postmaster@example.test") == [local("postmaster@example.test")]


def test_router_sees_users_added_to_a_real_store(tmp_path: Path) -> None:
    """With a real UserStore, a user added after the router was built is found."""
    store = UserStore(tmp_path / "users", clock=lambda: 0.0)
    r = Router(RoutingSection(local_domains=("example.test",)), store)
    with pytest.raises(UnknownRecipient):
        r.resolve("alice@example.test")
    store.add("alice@example.test", "pw")
    assert r.resolve("Alice+x@Example.test") == [
        local("alice+x@example.test", "alice@example.test")]


# --- who may send as which address (submission) -----------------------------------------------


def _senders() -> Router:
    return router(
        "alice@example.test", "bob@example.test",
        domain_aliases={"alias.test": "example.test"},
        aliases={"team@example.test": ("alice@example.test", "bob@example.test"),
                 "sales@example.test": ("bob@example.test",),
                 "info@other.test": ("team@example.test",),
                 "ext@example.test": ("alice@far.test",)},
        catch_all={"example.test": "alice@example.test"},
    )


@pytest.mark.parametrize("address", [
    "alice@example.test", "ALICE@Example.Test.", "alice+tag@example.test", "alice@alias.test",
    "team@example.test", "Team+x@alias.test", "info@other.test",
])
def test_may_send_as_own_addresses_and_aliases(address: str) -> None:
    """A user may send as itself, its subaddresses, in alias domains, and as aliases reaching it."""
    assert _senders().may_send_as("alice@example.test", address)


@pytest.mark.parametrize("address", [
    "bob@example.test", "sales@example.test", "nobody@example.test", "ext@example.test",
    "alice@far.test", "alice", "@example.test",
])
def test_may_not_send_as_others(address: str) -> None:
    """Other users, aliases not reaching the user, catch-all and foreign addresses are not its."""
    assert not _senders().may_send_as("alice@example.test", address)
