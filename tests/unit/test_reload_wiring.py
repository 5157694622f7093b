"""What the service hands a reloaded configuration to (mailsys.service with mailsys.reload):
routing, SMTP and IMAP listener limits, login throttling, quotas, the queue's schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock

from mailsys.config import Config, from_mapping
from mailsys.delivery.quota import MailboxQuota
from mailsys.envelope import TargetKind
from mailsys.service import build_service
from mailsys.smtp.testing import HOSTNAME, SessionDriver, make_factory
from mailsys.testing import make_config


def config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "storage": {"spool": str(tmp_path / "spool"), "maildirs": str(tmp_path / "maildirs"),
                    "users": str(tmp_path / "users")},
        "smtp": {"listen": ["tcp:0:interface=127.0.0.1"]},
        "submission": {"listen": [], "listen_tls": []},
        "pop3": {"listen": [], "listen_tls": []},
        "imap": {"listen": ["tcp:0:interface=127.0.0.1"], "listen_tls": []},
        "relay": {"enabled": False},
        "routing": {"local_domains": ["example.test"]},
        "quota": {"storage": "1000"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return from_mapping(data, tmp_path / "mailsys.toml")


def test_a_reload_reaches_every_part(tmp_path: Path) -> None:
    """After the swap, the router knows the new alias, the SMTP and IMAP factories the new
    limits, the throttle and the quotas their new values, the runner its new schedule."""
    service = build_service(config(tmp_path), MemoryReactorClock())
    running = service.configuration
    assert running is not None
    new = config(tmp_path, smtp={"max_message_size": 4242, "max_connections": 7},
                 imap={"max_connections": 9},
                 routing={"aliases": {"help@example.test": ["postmaster@example.test"]}},
                 auth={"throttle_max_failures": 3}, quota={"storage": "2000"},
                 relay={"retry_schedule": [5.0]})
    # The swap itself (reload() reads the file in a disk thread first; tests/unit/test_reload).
    result = running._use(new)
    assert result.ok and result.needs_restart == ()
    assert running.current is new
    factories = {type(listener._factory).__name__: listener._factory
                 for _, listener in service._listeners}
    smtp, imap = factories["SMTPServerFactory"], factories["IMAPServerFactory"]
    assert smtp.config is new and b"SIZE 4242" in smtp.ehlo_reply(False)
    assert smtp.connections.max_total == 7
    assert imap.section.max_connections == 9 and imap.connections.max_total == 9
    policy = smtp.policy
    destinations = policy._router.resolve("help@example.test")
    assert [d.kind for d in destinations] == [TargetKind.LOCAL]
    assert smtp.throttle.max_failures == 3
    assert service.runner._retry_schedule == (5.0,)
    quota = next(agent for agent in service.runner._agents.values()
                 if getattr(agent, "_quota", None) is not None)._quota
    assert isinstance(quota, MailboxQuota) and quota.rules.default.storage == 2000


def test_an_open_smtp_session_keeps_its_limits() -> None:
    """An SMTP session open during a reload keeps the SIZE it advertised and enforces on a
    second EHLO; a session opened after it gets the new one."""
    factory = make_factory(max_message_size=1000)
    before = SessionDriver(factory)
    assert "250-SIZE 1000" in before.send(b"EHLO client.test\r\n")
    factory.reconfigure(make_config(HOSTNAME, smtp={"max_message_size": 2000}))
    assert "250-SIZE 1000" in before.send(b"EHLO client.test\r\n")
    lines = before.send(b"MAIL FROM:<a@remote.test> SIZE=1500\r\n")
    assert lines[-1].startswith("552")
    after = SessionDriver(factory)
    assert "250-SIZE 2000" in after.send(b"EHLO client.test\r\n")
