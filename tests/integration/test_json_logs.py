"""`twistd mailsys --log-format json` for real: one JSON object per line in the log file, and the
file reopened on SIGHUP after logrotate-style moving; a wrong format is one line, status 2."""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import TWISTD, MailServer, wait_for


def _records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _texts(path: Path) -> list[str]:
    return [str(record.get("text")) for record in _records(path)]


def test_json_log_lines_and_reopen_on_sighup(server_factory: Callable[..., MailServer]) -> None:
    """Every line of the log file is one JSON object with time, level, namespace and text; a
    message's lines carry its queue id as a field; after the file is moved away, SIGHUP makes
    the server write to a new file of the same name."""
    server = server_factory()
    log_path = server.directory / "mailsys.json.log"
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", f"--logfile={log_path}", "mailsys", "--config",
         str(server.config_path), "--log-format", "json"],
        cwd=server.directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server.process = process  # stopped by pid at teardown
    wait_for(lambda: any(t.startswith("listening on") for t in _texts(log_path)), deadline=60,
             message="the listening lines")
    with smtplib.SMTP(server.interface, server.smtp_port, timeout=30) as client:
        client.sendmail("someone@remote.test", ["demo@example.test"],
                        "Subject: json\r\n\r\nbody\r\n")
    wait_for(lambda: any("status=delivered" in t for t in _texts(log_path)), deadline=30,
             message="the delivery line")
    records = _records(log_path)
    for record in records:
        assert {"time", "level", "namespace", "text", "log_format"} <= record.keys()
    assert any(record.get("queue_id") for record in records)

    log_path.rename(log_path.with_name("mailsys.json.log.1"))
    process.send_signal(signal.SIGHUP)
    wait_for(lambda: any("configuration reloaded" in t for t in _texts(log_path)), deadline=30,
             message="lines in the reopened file")
    assert not any("configuration reloaded" in t
                   for t in _texts(log_path.with_name("mailsys.json.log.1")))
    process.send_signal(signal.SIGTERM)
    # twistd ends by the signal it was sent, as a process without a handler would.
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)


def test_unknown_log_format_is_one_line(server_factory: Callable[..., MailServer]) -> None:
    """--log-format with another word than text or json stops twistd with one line, status 2."""
    server = server_factory()
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mailsys", "--config", str(server.config_path),
         "--log-format", "xml"],
        cwd=server.directory, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr == "mailsys: --log-format: 'xml' is not one of text, json\n"
