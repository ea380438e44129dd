"""Checked access to parsed TOML for profiles and scenarios.

Every problem is collected (file, key path, expected, got) and raised at once as a
:class:`SimDataError`, a :class:`governor.config.ConfigError`: a daemon that catches
config errors at start catches a bad profile or scenario the same way.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from governor.config import ConfigIssue, parse_toml, read_small_file
from governor.errors import SimDataError as SimDataError  # noqa: PLC0414  (re-exported)


def describe(value: Any) -> str:
    """A short rendering of a found value and its TOML type, for error messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def read_toml(path: Path) -> dict[str, Any]:
    """Parse ``path`` as TOML; raise SimDataError naming the file on any failure."""
    return parse_toml(read_small_file(path, SimDataError), str(path), SimDataError)


class Issues:
    """The problems found in one file so far."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.found: list[ConfigIssue] = []

    def add(self, key: str, expected: str, got: str) -> None:
        """Record one problem."""
        self.found.append(ConfigIssue(self.file, key, expected, got))

    def raise_if_any(self) -> None:
        """Raise SimDataError listing every problem, if there is one."""
        if self.found:
            raise SimDataError(self.found)


class Table:
    """One TOML table read key by key; :meth:`finish` reports keys nobody asked for."""

    def __init__(self, data: dict[str, Any], path: str, issues: Issues) -> None:
        self.data = data
        self.path = path
        self.issues = issues
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        """The full key path of ``name`` in this table."""
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        """Whether ``name`` is present (and mark it as known)."""
        self._seen.add(name)
        return name in self.data

    def number(
        self,
        name: str,
        expected: str,
        *,
        lo: float = -math.inf,
        hi: float = math.inf,
        default: float | None = None,
        required: bool = True,
        above: bool = False,
    ) -> float | None:
        """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``above``); None after an issue or
        when absent and not required (``default`` then)."""
        self._seen.add(name)
        if name not in self.data:
            if required and default is None:
                self.issues.add(self.key(name), f"{expected} (a number)", "nothing")
            return default
        value = self.data[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.issues.add(self.key(name), f"{expected} (a number)", describe(value))
            return None
        low_ok = value > lo if above else value >= lo
        if not (low_ok and value <= hi):
            bound = f"above {lo:g}" if above else f"at least {lo:g}"
            span = bound if hi == math.inf else f"{bound} and at most {hi:g}"
            self.issues.add(self.key(name), f"{expected}, {span}", describe(value))
            return None
        return float(value)

    def integer(self, name: str, expected: str, *, lo: int = 0, required: bool = True) -> int | None:
        """A whole number >= ``lo``; None after an issue or when absent and not required."""
        self._seen.add(name)
        if name not in self.data:
            if required:
                self.issues.add(self.key(name), f"{expected} (an integer)", "nothing")
            return None
        value = self.data[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            self.issues.add(self.key(name), f"{expected} (an integer >= {lo})", describe(value))
            return None
        return value

    def string(
        self, name: str, expected: str, *, default: str | None = None, choices: Sequence[str] = ()
    ) -> str | None:
        """A string (one of ``choices`` when given); ``default`` when absent."""
        self._seen.add(name)
        if name not in self.data:
            if default is None:
                self.issues.add(self.key(name), f"{expected} (a string)", "nothing")
            return default
        value = self.data[name]
        if not isinstance(value, str) or (choices and value not in choices):
            wanted = "one of " + ", ".join(repr(c) for c in choices) if choices else f"{expected} (a string)"
            self.issues.add(self.key(name), wanted, describe(value))
            return None
        return value

    def boolean(self, name: str, expected: str, *, default: bool) -> bool:
        """true or false; ``default`` when absent or wrong."""
        self._seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if not isinstance(value, bool):
            self.issues.add(self.key(name), f"{expected} (true or false)", describe(value))
            return default
        return value

    def table(self, name: str, *, required: bool = True) -> Table | None:
        """A sub-table; None when absent (an issue if required) or not a table."""
        self._seen.add(name)
        if name not in self.data:
            if required:
                self.issues.add(self.key(name), "a table", "nothing")
            return None
        value = self.data[name]
        if not isinstance(value, dict):
            self.issues.add(self.key(name), "a table", describe(value))
            return None
        return Table(value, self.key(name), self.issues)

    def tables(self, name: str) -> list[Table]:
        """An array of tables (``[[name]]``); empty when absent."""
        self._seen.add(name)
        value = self.data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.issues.add(self.key(name), f"an array of tables ([[{name}]])", describe(value))
            return []
        return [Table(v, f"{self.key(name)}[{i}]", self.issues) for i, v in enumerate(value)]

    def finish(self) -> None:
        """Report every key that no reader asked for, with a did-you-mean."""
        for name in self.data:
            if name in self._seen:
                continue
            close = difflib.get_close_matches(name, sorted(self._seen), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            known = ", ".join(sorted(self._seen))
            self.issues.add(self.key(name), f"one of the known keys: {known}", f"unknown key '{name}'{hint}")
