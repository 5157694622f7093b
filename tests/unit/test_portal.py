"""The portal and realm every protocol logs in through, and SASL PLAIN decoding."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import Interface
from zope.interface.verify import verifyObject

from mailsys.auth.portal import IMailUser, MailRealm, MailUser, build_portal, login
from mailsys.auth.sasl import SASLError, decode_base64, decode_plain
from mailsys.auth.users import UserStore
from tests.unit.mailbox_support import failure_of, result_of


def run_now(func: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(func, *args, **kwargs)


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> UserStore:
    store = UserStore(tmp_path_factory.mktemp("portal") / "users")
    store.add("alice@example.test", "wonderland")
    return store


def test_realm_provides_irealm() -> None:
    """The realm is held to twisted.cred's interface."""
    assert verifyObject(IRealm, MailRealm())


def test_login_gives_mail_user(users: UserStore) -> None:
    """A right password gives a MailUser naming the canonical mailbox."""
    portal = build_portal(users, run_now)
    user = result_of(login(portal, "Alice@Example.test", "wonderland"))
    assert user == MailUser("alice@example.test")
    assert IMailUser.providedBy(user)


@pytest.mark.parametrize(("name", "password"), [
    ("alice@example.test", "wrong"), ("nobody@example.test", "wonderland"), ("", "x"),
])
def test_bad_login_fails_unauthorized(users: UserStore, name: str, password: str) -> None:
    """A wrong password, an unknown user and an empty name all fail with UnauthorizedLogin."""
    portal = build_portal(users, run_now)
    failure_of(login(portal, name, password), UnauthorizedLogin)


def test_realm_refuses_other_interfaces() -> None:
    """The realm only makes IMailUser avatars."""

    class IOther(Interface):
        pass

    with pytest.raises(NotImplementedError):
        MailRealm().requestAvatar(b"a@b.test", None, IOther)


def test_plain_decoding() -> None:
    """PLAIN is authzid NUL authcid NUL password (RFC 4616 §2)."""
    raw = base64.b64encode(b"\0alice@example.test\0pass word")
    plain = decode_plain(decode_base64(raw))
    assert (plain.authzid, plain.authcid, plain.password) == ("", "alice@example.test",
                                                              "pass word")


@pytest.mark.parametrize("raw", [b"not base64!", base64.b64encode(b"no separators"),
                                 base64.b64encode(b"\0\0pw"), base64.b64encode(b"\0u\0"),
                                 base64.b64encode(b"\0u\xff\0pw"), b"="])
def test_plain_malformed(raw: bytes) -> None:
    """Malformed PLAIN responses raise SASLError."""
    with pytest.raises(SASLError):
        decode_plain(decode_base64(raw))
