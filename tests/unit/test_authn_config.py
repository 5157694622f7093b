"""The [authn] section: defaults, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailsys.config import ConfigError, from_mapping


def _config(tmp_path: Path, authn: dict[str, Any], check_files: bool = False) -> Any:
    return from_mapping({"server": {"hostname": "mx.example.test"}, "authn": authn},
                        tmp_path / "mailsys.toml", check_files=check_files)


def test_defaults(tmp_path: Path) -> None:
    """Checks on, DMARC honoured, the others header only; authserv-id is the host name and
    keys live in dkim/ beside the file."""
    authn = _config(tmp_path, {}).authn
    assert (authn.checks, authn.dmarc, authn.spf, authn.dkim, authn.iprev) == (
        True, "honour", "none", "none", "none")
    assert authn.authserv_id == "mx.example.test"
    assert authn.key_dir == tmp_path / "dkim"


@pytest.mark.parametrize(("table", "key"), [
    ({"spf": "honour"}, "authn.spf"),
    ({"dmarc": "maybe"}, "authn.dmarc"),
    ({"domains": {"lab.test": {"arc": "reject"}}}, 'authn.domains."lab.test".arc'),
    ({"domains": {"lab.test": {"dkim": "honour"}}}, 'authn.domains."lab.test".dkim'),
    ({"domains": {"not a domain": {"dkim": "none"}}}, 'authn.domains."not a domain"'),
    ({"authserv_id": "no spaces allowed"}, "authn.authserv_id"),
    ({"selectors": {"example.test": ["bad/selector"]}}, 'authn.selectors."example.test"'),
])
def test_bad_values(tmp_path: Path, table: dict[str, Any], key: str) -> None:
    """A wrong value is one error naming its key."""
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, table)
    assert caught.value.key == key


def test_missing_key_file(tmp_path: Path) -> None:
    """A configured selector whose key file is missing is an error when files are checked."""
    with pytest.raises(ConfigError, match=r"cannot read .*example\.test\.mail\.pem"):
        _config(tmp_path, {"selectors": {"example.test": ["mail"]}}, check_files=True)
    _config(tmp_path, {"selectors": {"example.test": ["mail"]}}, check_files=False)
