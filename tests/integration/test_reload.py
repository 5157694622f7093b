"""Reload without restart against the real `twistd -n mailsys`: SIGHUP and `mailsys reload`
re-read the configuration while an IMAP session (imaplib) stays connected; a broken file keeps
the running configuration and says why in one log line."""

from __future__ import annotations

import imaplib
import signal
import smtplib
import subprocess
from collections.abc import Callable

from tests.integration.conftest import MAILSYS, MailServer, wait_for
from tests.integration.test_imap import IMAPServer, make_imap

NEW_ALIAS = '"helpdesk@example.test" = ["demo@example.test"]'


def _send(server: MailServer, recipient: str, subject: str) -> None:
    with smtplib.SMTP(server.interface, server.smtp_port, timeout=30) as client:
        client.sendmail("someone@remote.test", [recipient],
                        f"From: someone@remote.test\r\nTo: {recipient}\r\n"
                        f"Subject: {subject}\r\n\r\nbody\r\n")


def _refused(server: MailServer, recipient: str) -> int:
    with smtplib.SMTP(server.interface, server.smtp_port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("someone@remote.test")
        code, _ = client.rcpt(recipient)
        return code


def _count(text: str, needle: str) -> int:
    return sum(1 for line in text.splitlines() if needle in line)


def _reload_command(server: MailServer) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MAILSYS, "--config", str(server.config_path), "reload"],
                          capture_output=True, text=True, timeout=60, check=False)


def _logged_in(imap: IMAPServer) -> tuple[imaplib.IMAP4, int]:
    client = imap.starttls()
    typ, data = client.select("INBOX")
    assert typ == "OK"
    return client, int(data[0] or 0)


def test_sighup_routes_by_a_new_alias_while_imap_stays(
        server_factory: Callable[..., MailServer]) -> None:
    """After SIGHUP the next message to a newly added alias is delivered by it, and an IMAP
    session opened before the reload is still connected and sees the message arrive."""
    imap = make_imap(server_factory)
    server = imap.mail
    assert server.process is not None
    client, before = _logged_in(imap)
    assert _refused(server, "helpdesk@example.test") == 550
    server.aliases = NEW_ALIAS
    server.write_config()
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded from" in server.log(), deadline=30,
             message="the reload in the log")
    _send(server, "helpdesk@example.test", "by the new alias")
    wait_for(lambda: len(server.inbox_files()) == 1, deadline=30, message="the delivery")
    delivered = server.inbox_files()[0].read_bytes()
    assert b"Delivered-To: helpdesk@example.test" in delivered or b"by the new alias" in delivered

    def seen() -> bool:
        typ, _ = client.noop()
        assert typ == "OK"  # the session opened before the reload still answers
        typ, data = client.search(None, "ALL")
        return typ == "OK" and len(data[0].split()) == before + 1

    wait_for(seen, deadline=30, message="the IMAP session to see the new message")
    client.logout()
    assert server.process.poll() is None


def test_broken_file_keeps_the_running_configuration(
        server_factory: Callable[..., MailServer]) -> None:
    """A reload of a file with a bad value keeps the running configuration (the old alias still
    routes, the new one does not) and logs one line naming the file, the key and the reason;
    `mailsys reload` reads the file first, says the same line and exits 2 without asking."""
    imap = make_imap(server_factory)
    server = imap.mail
    assert server.process is not None
    good = server.config_path.read_text()
    server.config_path.write_text(
        good.replace("[routing.aliases]\n", f"[routing.aliases]\n{NEW_ALIAS}\n")
        .replace("[smtp]\n", "[smtp]\nmax_recipients = -5\n"))
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration not reloaded" in server.log(), deadline=30,
             message="the refusal in the log")
    log = server.log()
    assert _count(log, "configuration not reloaded") == 1
    line = next(line for line in log.splitlines() if "configuration not reloaded" in line)
    assert str(server.config_path) in line and "smtp.max_recipients" in line
    assert "Traceback" not in log
    assert _refused(server, "helpdesk@example.test") == 550
    _send(server, "team@example.test", "by the old alias")
    wait_for(lambda: len(server.inbox_files()) == 1, deadline=30, message="the delivery")

    result = _reload_command(server)
    assert result.returncode == 2
    assert result.stderr == f"mailsys: {line.partition('the running one stays: ')[2]}\n"
    assert _count(server.log(), "configuration not reloaded") == 1
    assert server.process.poll() is None


def test_reload_command_applies_and_names_listeners_needing_a_restart(
        server_factory: Callable[..., MailServer]) -> None:
    """`mailsys reload` applies a good file (a new alias routes at once) and names a listener
    whose endpoint changed as needing a restart; the old listener keeps serving."""
    imap = make_imap(server_factory)
    server = imap.mail
    old_port = server.smtp_port
    server.aliases = NEW_ALIAS
    server.smtp_extra = "max_message_size = 123456"
    server.write_config()
    text = server.config_path.read_text()
    server.config_path.write_text(text.replace(f"tcp:{imap.port}:", f"tcp:{imap.port + 1}:", 1))
    result = _reload_command(server)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"reloaded {server.config_path}")
    assert "needs a restart: listener imap.listen" in result.stdout
    assert "imap.listen" in server.log() and "takes a restart" in server.log()
    assert server.smtp_port == old_port
    with smtplib.SMTP(server.interface, server.smtp_port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.esmtp_features["size"] == "123456"  # a new limit for a new session
    _send(server, "helpdesk@example.test", "after mailsys reload")
    wait_for(lambda: len(server.inbox_files()) == 1, deadline=30, message="the delivery")
    client = imap.starttls()  # the old IMAP endpoint still serves until a restart
    assert client.noop()[0] == "OK"
    client.logout()
