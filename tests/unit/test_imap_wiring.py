"""The [imap] config section and the listeners built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.cred.portal import Portal
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsys import config
from mailsys.auth.portal import MailRealm
from mailsys.auth.throttle import LoginThrottle
from mailsys.config import ConfigError
from mailsys.imap.session import IMAPServerFactory
from mailsys.mailbox.store import MailboxStore
from mailsys.retrieval import mailbox_listeners
from mailsys.tls import ServerTLS, ensure_self_signed
from tests.unit.mailbox_support import ImmediatePool

TLS = '[tls]\ncertificate = "{d}/c.pem"\nkey = "{d}/k.pem"\ncreate_self_signed = true\n'


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "mailsys.toml"
    path.write_text(text.replace("{d}", str(tmp_path)))
    return config.load(path)


def test_defaults(tmp_path: Path) -> None:
    """Without [imap] nothing listens; limits default to RFC-minded values."""
    imap = load(tmp_path, "").imap
    assert imap.listen == () and imap.listen_tls == ()
    assert not imap.allow_plaintext_auth and imap.idle_timeout == 1800.0
    assert imap.max_literal_size == 50 * 1024 * 1024


@pytest.mark.parametrize(("text", "expected"), [
    ('[imap]\nlisten_tls = ["tcp:2993"]\n', "imap.listen_tls: implicit TLS needs [tls]"),
    ("[imap]\nidle_timeout = 600\n", "imap.idle_timeout: must be at least 1800 seconds"),
    ('[imap]\nlisten = ["ssl:993"]\n', "imap.listen: endpoint 'ssl:993': type must be"),
    ("[imap]\nmax_literal_size = 0\n", "imap.max_literal_size: must be a positive integer"),
    ("[imap]\nport = 143\n", "imap.port: unknown key"),
])
def test_bad_values(tmp_path: Path, text: str, expected: str) -> None:
    """Bad [imap] values are one line naming the key and the reason."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert expected in str(info.value)


def test_embedded_default_listens_on_2143_and_2993() -> None:
    """The embedded default config has IMAP on 2143 (STARTTLS) and 2993 (TLS)."""
    imap = config.load(Path(__file__).parents[2] / "etc" / "mailsys.toml").imap
    assert imap.listen == ("tcp:2143:interface=127.0.0.1:backlog=1024",)
    assert imap.listen_tls == ("tcp:2993:interface=127.0.0.1:backlog=1024",)


def test_production_example_uses_143_and_993() -> None:
    """The production example listens on 143 and 993 with plaintext login off."""
    imap = config.load(Path(__file__).parents[2] / "etc" / "production.toml",
                       check_files=False).imap
    assert [d.split(":")[1] for d in imap.listen + imap.listen_tls] == ["143", "993"]
    assert not imap.allow_plaintext_auth


def test_factories_wrap_implicit_tls(tmp_path: Path) -> None:
    """listen gets the IMAP factory; listen_tls the same wrapped in TLS from the first byte."""
    loaded = load(tmp_path, TLS + '[imap]\nlisten = ["tcp:2143"]\nlisten_tls = ["tcp:2993"]\n')
    ensure_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "mail.example.test")
    tls = ServerTLS(tmp_path / "c.pem", tmp_path / "k.pem")
    clock = Clock()
    factories = mailbox_listeners(IMAPServerFactory, loaded,
                                  MailboxStore(tmp_path, ImmediatePool()), Portal(MailRealm()),
                                  LoginThrottle(clock), tls, clock)
    assert [d for d, _ in factories] == ["tcp:2143:backlog=1024", "tcp:2993:backlog=1024"]
    plain, wrapped = factories[0][1], factories[1][1]
    assert isinstance(plain, IMAPServerFactory) and not plain.implicit_tls
    assert isinstance(wrapped, TLSMemoryBIOFactory)
    inner = wrapped.wrappedFactory
    assert isinstance(inner, IMAPServerFactory) and inner.implicit_tls
