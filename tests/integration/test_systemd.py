"""systemd integration of the real server: READY=1 and STOPPING=1 on a notify socket the test
creates, and etc/mailsys.service accepted by `systemd-analyze verify`."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, TWISTD, MailServer, read_greeting


def test_ready_once_listening_and_stopping_on_shutdown(
    server_factory: Callable[..., MailServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """twistd -n mailsys sends READY=1 when every listener is bound (they all answer by then)
    and STOPPING=1 when it is told to stop."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        server = server_factory()
        server.start()
        ready = sock.recv(4096).decode()
        assert ready.splitlines()[0] == "READY=1"
        assert f"MAINPID={server.process.pid}" in ready  # type: ignore[union-attr]
        for port in (server.smtp_port, server.submission_port):
            assert read_greeting(port).startswith(b"220 ")
        server.stop()
        assert sock.recv(4096).decode().splitlines()[0] == "STOPPING=1"


def test_unit_file_verifies(tmp_path: Path) -> None:
    """etc/mailsys.service passes `systemd-analyze verify` once its ExecStart path exists."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (no systemd on this machine)")
    unit = (ROOT / "etc" / "mailsys.service").read_text()
    assert "/opt/mailsys/.venv/bin/twistd" in unit and "Type=notify" in unit
    (tmp_path / "mailsys.service").write_text(
        unit.replace("/opt/mailsys/.venv/bin/twistd", TWISTD))
    done = subprocess.run([analyze, "verify", str(tmp_path / "mailsys.service")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "mailsys.service" not in done.stderr, done.stderr
