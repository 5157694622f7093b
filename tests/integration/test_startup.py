"""Start-up as an administrator meets it: the plugin, the sample configs, first start, bad input."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from mailsys import config
from tests.integration.conftest import MAILSYS, ROOT, TWISTD, MailServer


def test_twistd_lists_the_plugin() -> None:
    """`twistd --help` lists the mailsys plugin."""
    result = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "mailsys" in result.stdout


def test_sample_configs_load() -> None:
    """The embedded default and the production example are valid configurations."""
    default = config.load(ROOT / "etc" / "mailsys.toml")
    assert default.routing.local_domains == ("example.test",)
    assert all("127.0.0.1" in listener for listener in default.smtp.listen)
    production = config.load(ROOT / "etc" / "production.toml", check_files=False)
    assert any(":25:" in listener for listener in production.smtp.listen)


def test_first_start_creates_certificate_and_demo_user(server: MailServer) -> None:
    """On first start the self-signed certificate and the demo user exist and the log says so."""
    assert (server.directory / "var" / "tls" / "cert.pem").is_file()
    users = (server.directory / "var" / "users").read_text()
    assert users.startswith("demo@example.test:{ARGON2ID}")
    assert ((server.directory / "var" / "users").stat().st_mode & 0o777) == 0o600
    log = server.log()
    assert "self-signed development certificate" in log
    assert "created the demo user demo@example.test" in log


def _broken(tmp_path: Path) -> Path:
    path = tmp_path / "broken.toml"
    path.write_text('[smtp]\nmax_recipients = "many"\n')
    return path


def test_twistd_with_broken_config_prints_one_line(tmp_path: Path) -> None:
    """twistd with a broken config exits 2 with one line naming the file, key and reason."""
    path = _broken(tmp_path)
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mailsys", "--config", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    reason = "smtp.max_recipients: must be a positive integer, got 'many'"
    assert lines == [f"mailsys: {path}: {reason}"]
    assert "Traceback" not in result.stdout


def test_check_config_reports_one_line(tmp_path: Path) -> None:
    """`mailsys check-config` on a broken file prints one clear line and exits 2."""
    path = _broken(tmp_path)
    result = subprocess.run([MAILSYS, "check-config", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "smtp.max_recipients" in result.stderr and str(path) in result.stderr


def test_check_config_accepts_the_default() -> None:
    """`mailsys check-config` on the embedded default exits 0."""
    result = subprocess.run([MAILSYS, "check-config", str(ROOT / "etc" / "mailsys.toml")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_port_in_use_stops_startup(server_factory: Callable[..., MailServer]) -> None:
    """A listener that cannot bind stops start-up with one clear line and exit status 2."""
    srv = server_factory("busy")
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", srv.submission_port))
        blocker.listen(1)
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "mailsys", "--config", str(srv.config_path)],
            capture_output=True, text=True, timeout=60, cwd=srv.directory,
        )
    assert result.returncode == 2
    # twistd has already redirected stderr into its log (stdout with -n) at this point.
    output = result.stdout + result.stderr
    assert f"mailsys: cannot listen on 'tcp:{srv.submission_port}" in output
    assert "Traceback" not in result.stderr + result.stdout
