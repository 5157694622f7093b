"""The [pop3] config section and the listeners built from it."""

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
from mailsys.mailbox.store import MailboxStore
from mailsys.pop3.server import POP3ServerFactory
from mailsys.retrieval import mailbox_listeners
from mailsys.tls import ServerTLS, ensure_self_signed
from tests.unit.mailbox_support import ImmediatePool

TLS = '[tls]\ncertificate = "{d}/c.pem"\nkey = "{d}/k.pem"\ncreate_self_signed = true\n'


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "mailsys.toml"
    path.write_text(text.replace("{d}", str(tmp_path)))
    return config.load(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


def test_defaults(tmp_path: Path) -> None:
    """Without [pop3] nothing listens; the limits have RFC-minded defaults."""
    pop3 = load(tmp_path, "").pop3
    assert pop3.listen == () and pop3.listen_tls == ()
    assert not pop3.allow_plaintext_auth
    assert pop3.idle_timeout == 600.0


def test_listeners_normalised(tmp_path: Path) -> None:
    """POP3 listeners are checked like SMTP's and get a backlog."""
    pop3 = load(tmp_path, TLS + '[pop3]\nlisten = "tcp:2110:interface=127.0.0.1"\n'
                'listen_tls = ["tcp:2995"]\n').pop3
    assert pop3.listen == ("tcp:2110:interface=127.0.0.1:backlog=1024",)
    assert pop3.listen_tls == ("tcp:2995:backlog=1024",)


@pytest.mark.parametrize(("text", "expected"), [
    ('[pop3]\nlisten_tls = ["tcp:2995"]\n', "pop3.listen_tls: implicit TLS needs [tls]"),
    ("[pop3]\nidle_timeout = 60\n", "pop3.idle_timeout: must be at least 600 seconds"),
    ('[pop3]\nlisten = ["ssl:995"]\n', "pop3.listen: endpoint 'ssl:995': type must be"),
    ("[pop3]\nmax_bad_commands = 0\n", "pop3.max_bad_commands: must be a positive integer"),
    ("[pop3]\nallow_plaintext_auth = 1\n", "pop3.allow_plaintext_auth: must be true or false"),
    ("[pop3]\nport = 110\n", "pop3.port: unknown key"),
])
def test_bad_values(tmp_path: Path, text: str, expected: str) -> None:
    """Bad [pop3] values are one line naming the key and the reason."""
    assert expected in error(tmp_path, text)


def test_embedded_default_listens_on_2110_and_2995() -> None:
    """The embedded default config has POP3 on 2110 (STLS) and 2995 (TLS)."""
    pop3 = config.load(Path(__file__).parents[2] / "etc" / "mailsys.toml").pop3
    assert pop3.listen == ("tcp:2110:interface=127.0.0.1:backlog=1024",)
    assert pop3.listen_tls == ("tcp:2995:interface=127.0.0.1:backlog=1024",)


def test_factories_wrap_implicit_tls(tmp_path: Path) -> None:
    """listen gets the POP3 factory; listen_tls the same wrapped in TLS from the first byte."""
    loaded = load(tmp_path, TLS + '[pop3]\nlisten = ["tcp:2110"]\nlisten_tls = ["tcp:2995"]\n')
    ensure_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "mail.example.test")
    tls = ServerTLS(tmp_path / "c.pem", tmp_path / "k.pem")
    clock = Clock()
    factories = mailbox_listeners(POP3ServerFactory, loaded,
                                  MailboxStore(tmp_path, ImmediatePool()), Portal(MailRealm()),
                                  LoginThrottle(clock), tls, clock)
    assert [d for d, _ in factories] == ["tcp:2110:backlog=1024", "tcp:2995:backlog=1024"]
    plain, wrapped = factories[0][1], factories[1][1]
    assert isinstance(plain, POP3ServerFactory) and not plain.implicit_tls
    assert isinstance(wrapped, TLSMemoryBIOFactory)
    inner = wrapped.wrappedFactory
    assert isinstance(inner, POP3ServerFactory) and inner.implicit_tls
