"""[journey] in the configuration, and the wiring: one writer, passed to every room."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from mailsys.config import ConfigError, from_mapping
from mailsys.journey.events import NULL_RECORDER
from mailsys.journey.writer import JourneyWriter
from mailsys.service import build_service


def config(tmp_path: Path, **journey: Any) -> Any:
    return from_mapping({
        "storage": {"spool": str(tmp_path / "spool"), "maildirs": str(tmp_path / "maildirs"),
                    "users": str(tmp_path / "users")},
        "smtp": {"listen": ["tcp:0:interface=127.0.0.1"]},
        "submission": {"listen": [], "listen_tls": []},
        "pop3": {"listen": [], "listen_tls": []},
        "imap": {"listen": [], "listen_tls": []},
        "relay": {"enabled": False},
        "journey": journey,
    }, tmp_path / "mailsys.toml")


def test_journey_defaults(tmp_path: Path) -> None:
    """Recording is off unless enabled, in var/journey.sqlite, for 30 days, up to 256 MiB."""
    section = config(tmp_path).journey
    assert section.enabled is False
    assert section.path == Path("var/journey.sqlite")
    assert section.retention == 30 * 86400.0
    assert section.max_bytes == 256 * 1024 * 1024


@pytest.mark.parametrize(("values", "message"), [
    ({"retention": 60}, "journey.retention: must be at least 3600 seconds"),
    ({"max_bytes": 1000}, "journey.max_bytes: must be at least 1048576"),
    ({"keep": True}, "journey.keep: unknown key"),
    ({"enabled": "yes"}, "journey.enabled"),
])
def test_journey_values_are_checked(tmp_path: Path, values: dict[str, Any],
                                    message: str) -> None:
    """A bad [journey] value stops start-up with the key and the reason."""
    with pytest.raises(ConfigError, match=message.replace(".", r"\.", 1)):
        config(tmp_path, **values)


def test_one_writer_is_the_first_service_and_every_room_records_through_it(
        tmp_path: Path) -> None:
    """With recording on there is one writer; the SMTP listeners and the runner use it."""
    path = tmp_path / "journey.sqlite"
    service = build_service(config(tmp_path, enabled=True, path=str(path), retention=7200.0),
                            MemoryReactorClock())
    writer = service.journey
    assert isinstance(writer, JourneyWriter) and writer.path == path
    assert writer not in list(service)  # started first and stopped last by the service itself
    factories = [listener._factory for _, listener in service._listeners]
    assert factories and all(f.journey is writer for f in factories)
    assert service.runner._journey is writer


def test_recording_off_wires_the_null_recorder(tmp_path: Path) -> None:
    """With recording off there is no writer and every room gets the no-op recorder."""
    service = build_service(config(tmp_path, enabled=False), MemoryReactorClock())
    assert service.journey is None
    factories = [listener._factory for _, listener in service._listeners]
    assert all(f.journey is NULL_RECORDER for f in factories)
    assert not (tmp_path / "var").exists()
