"""Configuration loading: good files load, every bad one is one line naming file, key and reason."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mailsys import config, values
from mailsys.config import ConfigError


def _load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "mailsys.toml"
    path.write_text(text)
    return config.load(path)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "mailsys.toml") + ": ")
    return message


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """An empty file is a valid configuration with documented defaults."""
    loaded = _load(tmp_path, "")
    assert loaded.smtp.max_message_size == 25 * 1024 * 1024
    assert loaded.smtp.max_recipients == 100
    assert loaded.smtp.max_line_length == 65536
    assert loaded.tls.enabled is False


def test_backlog_is_added_to_listeners(tmp_path: Path) -> None:
    """A listener without backlog= gets one, since Twisted's default of 50 drops bursts."""
    loaded = _load(tmp_path, '[smtp]\nlisten = ["tcp:2525:interface=127.0.0.1"]\n')
    assert loaded.smtp.listen == ("tcp:2525:interface=127.0.0.1:backlog=1024",)
    loaded = _load(tmp_path, '[smtp]\nlisten = "tcp:2525:backlog=7"\n')
    assert loaded.smtp.listen == ("tcp:2525:backlog=7",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[nonsense]\n", "nonsense: unknown section"),
        ("[smtp]\nmax_recipeints = 3\n", "smtp.max_recipeints: unknown key"),
        ('[smtp]\nmax_recipients = "3"\n', "smtp.max_recipients: must be a positive integer"),
        ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients: must be a positive integer"),
        ("[smtp]\nmax_recipients = true\n", "smtp.max_recipients: must be a positive integer"),
        ('[smtp]\nlisten = ["ssl:465"]\n', "smtp.listen: endpoint 'ssl:465': type must be"),
        ('[smtp]\nlisten = ["tcp:http"]\n', "smtp.listen: endpoint 'tcp:http': needs a port"),
        ('[smtp]\nlisten = ["tcp:25:colour=blue"]\n', "unknown option 'colour'"),
        ('[smtp]\nlisten = ["tcp:25:backlog=x"]\n', "backlog must be a positive integer"),
        ('[server]\nhostname = "bad host"\n', "server.hostname: not a valid host name"),
        ('[submission]\nlisten_tls = ["tcp:465"]\n', "submission.listen_tls: implicit TLS needs"),
        ('[tls]\ncertificate = "c.pem"\n', "tls: certificate and key must be given together"),
        ('[tls]\ncertificate = "/nonexistent/c.pem"\nkey = "/nonexistent/k.pem"\n',
         "tls.certificate: file not found: /nonexistent/c.pem"),
        ('[routing]\nlocal_domains = ["a.test"]\ncatch_all = { "b.test" = "x@a.test" }\n',
         'routing.catch_all."b.test": not in routing.local_domains'),
        ('[routing.aliases]\n"team" = ["x@a.test"]\n', "alias must be a full address"),
        ('[routing.aliases]\n"team@a.test" = ["x"]\n', "target 'x' must be a full address"),
        ('[routing]\ndomain_aliases = { "old.test" = "new.test" }\n', "is not in routing.local_"),
        ('[dev]\ndemo_user = "demo@x.test"\n', "dev: demo_user and demo_password"),
        ('[smtp]\nlisten = ["tcp:25:interface=999.1.1.1"]\n',
         "smtp.listen: endpoint 'tcp:25:interface=999.1.1.1': interface must be an IP address"),
        ('[smtp]\nlisten = ["tcp:25:interface=mail.example.test"]\n',
         "interface must be an IP address, not 'mail.example.test'"),
        ('[smtp]\nlisten = ["tcp:2525:interface=127.0.0.1"]\n'
         '[pop3]\nlisten = ["tcp:2525:interface=127.0.0.1"]\n',
         "pop3.listen: endpoint 'tcp:2525:interface=127.0.0.1': port 2525 is already taken by "
         "'tcp:2525:interface=127.0.0.1' (smtp.listen)"),
        ('[imap]\nlisten = ["tcp:143", "tcp:143:interface=127.0.0.1"]\n',
         "imap.listen: endpoint 'tcp:143:interface=127.0.0.1': port 143 is already taken"),
        ('[smtp]\nlisten = ["tcp:25:interface=127.0.0.1"]\n'
         '[submission]\nlisten = ["tcp6:25:interface=\\\\:\\\\:"]\n',
         "submission.listen: endpoint"),
        ('[smtp]\nlisten = ["tcp6:25:interface=\\\\:\\\\:0"]\n'
         '[submission]\nlisten = ["tcp6:25:interface=\\\\:\\\\:1"]\n',
         "submission.listen: endpoint"),
        ("[smtp\n", "TOML syntax error"),
        ("smtp = 3\n", "smtp: must be a table"),
    ],
)
def test_bad_values_are_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    """Each kind of mistake names its key and says why."""
    assert expected in _error(tmp_path, text)


def test_listeners_may_share_a_port_on_other_addresses(tmp_path: Path) -> None:
    """One port on two specific addresses, or port 0 twice, is no clash."""
    loaded = _load(tmp_path, '[smtp]\nlisten = ["tcp:25:interface=127.0.0.1", '
                   '"tcp:25:interface=127.0.0.2", "tcp:0", "tcp:0"]\n')
    assert len(loaded.smtp.listen) == 4


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    """A config path that does not exist is reported with the path."""
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "absent.toml")
    assert str(info.value).startswith(f"{tmp_path / 'absent.toml'}: cannot read")


def test_self_signed_allows_missing_files(tmp_path: Path) -> None:
    """With create_self_signed the certificate files may be absent: they are made on start."""
    loaded = _load(
        tmp_path,
        f'[tls]\ncertificate = "{tmp_path}/c.pem"\nkey = "{tmp_path}/k.pem"\n'
        "create_self_signed = true\n",
    )
    assert loaded.tls.enabled


def test_auth_throttle_settings(tmp_path: Path) -> None:
    """[auth] sets the login throttle; defaults are mailsys.auth.throttle's, bad values refused."""
    assert _load(tmp_path, "").auth.throttle_max_failures == 10
    loaded = _load(tmp_path, "[auth]\nthrottle_base_delay = 0.1\nthrottle_max_failures = 3\n")
    assert (loaded.auth.throttle_base_delay, loaded.auth.throttle_max_failures) == (0.1, 3)
    assert "auth.throttle_window: must be a positive number" in _error(
        tmp_path, "[auth]\nthrottle_window = 0\n")


def test_auth_address_limit(tmp_path: Path) -> None:
    """[auth] throttle_max_address_failures sets the whole address's limit; it must be a positive
    integer no smaller than the per-user limit, each refusal one line naming file and key."""
    assert _load(tmp_path, "").auth.throttle_max_address_failures == 100
    loaded = _load(tmp_path, "[auth]\nthrottle_max_address_failures = 40\n")
    assert loaded.auth.throttle_max_address_failures == 40
    error = _error(tmp_path, "[auth]\nthrottle_max_address_failures = 0\n")
    assert "auth.throttle_max_address_failures: must be a positive integer" in error
    assert "\n" not in error
    error = _error(tmp_path, "[auth]\nthrottle_max_failures = 10\n"
                             "throttle_max_address_failures = 5\n")
    assert error.endswith(
        "auth.throttle_max_address_failures: must be at least auth.throttle_max_failures (10)")
    assert "auth.throttle_max_adress_failures: unknown key" in _error(
        tmp_path, "[auth]\nthrottle_max_adress_failures = 50\n")


def _mailsys_imports(module: object) -> set[str]:
    source = Path(str(getattr(module, "__file__", ""))).read_text()
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.split(".")[0] == "mailsys"}


def test_config_is_at_the_bottom_of_the_import_graph() -> None:
    """config.py imports only the value types of mailsys.values, which imports nothing of ours."""
    assert _mailsys_imports(config) == {"mailsys.values"}
    assert _mailsys_imports(values) == set()


def test_normalised_sections_are_copies(tmp_path: Path) -> None:
    """A section that needed normalising is a new frozen copy; one that did not is kept."""
    loaded = config.from_mapping({"smtp": {"listen": "tcp:2525"}, "server": {"hostname": "m.test"}},
                                 tmp_path / "x.toml")
    assert loaded.smtp.listen == ("tcp:2525:backlog=1024",)
    again = config.from_mapping({"smtp": {"listen": ["tcp:2525:backlog=1024"]}},
                                tmp_path / "x.toml")
    assert again.smtp == loaded.smtp and loaded.server.hostname == "m.test"
