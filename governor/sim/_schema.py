"""Profiles and scenarios are checked by the one schema engine, :mod:`governor.schema`.

What is the simulator's own: its error, :class:`SimDataError`, a
:class:`governor.config.ConfigError` (a daemon that catches config errors at start
catches a bad profile or scenario the same way), and reading a file as TOML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from governor.config import parse_toml, read_small_file
from governor.errors import SimDataError as SimDataError  # noqa: PLC0414  (re-exported)
from governor.schema import Issues


def issues_in(file: str) -> Issues:
    """A collector for the problems of one profile or scenario file; it raises SimDataError."""
    return Issues(file, SimDataError)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse ``path`` as TOML; raise SimDataError naming the file on any failure."""
    return parse_toml(read_small_file(path, SimDataError), str(path), SimDataError)
