"""A Config for protocol tests: the defaults of every section but the values a test names.

Sessions read their config section directly; a test that wants ``max_bad_commands=3`` builds
the Config that says so, instead of a copy of the settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mailsys.config import Config, ServerSection


def make_config(hostname: str = "mx.example.test", **sections: Mapping[str, Any]) -> Config:
    """A Config for ``hostname`` with the defaults, and in each named section the values given
    (``make_config(smtp={"max_recipients": 2})``)."""
    config = Config(path=Path("test.toml"), server=ServerSection(hostname=hostname))
    changes = {name: dataclasses.replace(getattr(config, name), **values)
               for name, values in sections.items()}
    return dataclasses.replace(config, **changes)
