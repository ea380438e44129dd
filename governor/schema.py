"""One schema engine for every file the governor reads: config, classes, profiles, scenarios, traces.

A document is checked key by key against :class:`Key` specs (declared in a table, as
:mod:`governor.config` does, or asked for one by one through a :class:`Table`, as the
simulator's profiles and scenarios do). Every problem is collected as a
:class:`ConfigIssue` - file, key path (``power.ladder_w[1]``), what was expected, what
was found - so a file reports all its problems at once; unknown keys get a
did-you-mean. The caller raises its own error type with the issues.

Hostile input stays bounded: a found value is shown cut to 60 characters with its type
(a huge integer or a long list is described, never printed), key names are cut, and
the error types print at most a fixed number of issues (:mod:`governor.config`).
No I/O here.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from governor.errors import ConfigError
from governor.errors import ConfigIssue as ConfigIssue  # noqa: PLC0414  (re-exported: one definition, in errors)
from governor.policy import clip

__all__ = [
    "MAX_BYTES",
    "ConfigIssue",
    "Issues",
    "Key",
    "Table",
    "Validator",
    "between",
    "convert",
    "describe",
    "finite_number",
    "one_of",
    "section",
    "short",
    "shown",
    "span",
    "table_of",
    "unknown",
]


class Issues:
    """The problems found in one file so far; ``error`` (given the issues) is what
    :meth:`raise_if_any` raises."""

    def __init__(self, file: str, error: Callable[[Sequence[ConfigIssue]], Exception] | None = None) -> None:
        self.file = file
        self.issues: list[ConfigIssue] = []
        self._error = error

    def add(self, key: str, expected: str, got: str) -> None:
        """Record one problem."""
        self.issues.append(ConfigIssue(self.file, key, expected, got))

    def raise_if_any(self) -> None:
        """Raise the error listing every problem, if there is one (and an error type was given)."""
        if self.issues and self._error is not None:
            raise self._error(self.issues)


# --------------------------------------------------------------------------- showing values


def short(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters for a message (a key name can be megabytes long)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _safe_repr(value: Any) -> str | None:
    """``repr(value)``, or None when it cannot be had (nested too deep, an int too long to print)."""
    try:
        return repr(value)
    except (RecursionError, ValueError):
        return None


def describe(value: Any) -> str:
    """A found value for a message: its repr cut to 60 characters and its type; never raises."""
    kind = type(value).__name__
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits ({kind})"
    if isinstance(value, (list, dict)) and len(value) > 20:
        return f"a {kind} of {len(value)} items"
    text = _safe_repr(value)
    if text is None:
        return f"a {kind} nested too deeply to show"
    return f"{short(text, 60)} ({kind})"


def shown(value: Any) -> str:
    """A found value as its repr alone, cut to 60 characters (the style of class and size messages)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = _safe_repr(value)
    return clip(text) if text is not None else f"a {type(value).__name__} nested too deeply to show"


def finite_number(value: Any) -> bool:
    """True for an int or float (not a bool) that is finite as a float; huge ints are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


# --------------------------------------------------------------------------- keys

Validator = Callable[[Any], "str | None"]
"""Returns None when a converted value is acceptable, else a description of what was expected."""

_NOUNS = {"float": "a number", "int": "an integer", "str": "a string", "array": "an array"}


@dataclass(frozen=True, slots=True)
class Key:
    """How one key is checked and converted.

    ``kind`` is ``float``, ``int``, ``bool``, ``str``, ``any`` (left to ``check``) or ``array`` (a list whose items
    ``item`` converts, None for an item it refuses as ``item_expected``). ``expected``
    says what the key holds; a value of the wrong type is reported as ``type_expected``
    (default: ``expected`` and the kind, "seconds (a number)"); ``check`` judges the
    converted value.
    """

    kind: str
    expected: str
    check: Validator | None = None
    type_expected: str | None = None
    item: Callable[[Any], Any] | None = None
    item_expected: str = ""

    def wrong_type(self) -> str:
        """What a value of the wrong type is told was expected."""
        if self.type_expected is not None:
            return self.type_expected
        noun = _NOUNS.get(self.kind)
        return self.expected if noun is None else f"{self.expected} ({noun})"


def between(lo: float, hi: float) -> Validator:
    """A value in ``[lo, hi]`` ("a value between 0 and 30")."""

    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"a value between {lo:g} and {hi:g}"

    return check


def span(expected: str, lo: float = -math.inf, hi: float = math.inf, *, above: bool = False) -> Validator:
    """A value in ``[lo, hi]`` (``(lo, hi]`` with ``above``), told as "``expected``, at least 0 and at most 60"."""

    def check(v: Any) -> str | None:
        low_ok = v > lo if above else v >= lo
        if low_ok and v <= hi:
            return None
        bound = f"above {lo:g}" if above else f"at least {lo:g}"
        return f"{expected}, {bound if hi == math.inf else f'{bound} and at most {hi:g}'}"

    return check


MAX_BYTES = 2**53
"""The largest byte count any file may give (8 PiB, far above any GPU's memory): every size
stays exact as a float, the type metrics carry it in."""

PATH_MAX_BYTES = 4095
"""The longest path the kernel takes (PATH_MAX less its NUL)."""


def kernel_path(v: Any) -> str | None:
    """A path the kernel can take: no NUL character, at most :data:`PATH_MAX_BYTES` bytes
    (an empty string passes: "not set" where the key allows it)."""
    if "\x00" in v or len(v.encode("utf-8", "surrogatepass")) > PATH_MAX_BYTES:
        return f"a path without NUL characters, at most {PATH_MAX_BYTES} bytes"
    return None


def one_of(*choices: str) -> Validator:
    """One of ``choices`` ("one of 'auto', 'json'")."""

    def check(v: Any) -> str | None:
        return None if v in choices else _choices_text(choices)

    return check


def _choices_text(choices: Sequence[str]) -> str:
    return "one of " + ", ".join(repr(c) for c in choices)


def _typed(kind: str, value: Any) -> tuple[bool, Any]:
    """(whether ``value`` is of ``kind``, the value converted)."""
    if kind == "float":
        ok = finite_number(value)
        return ok, float(value) if ok else None
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "str":
        return isinstance(value, str), value
    if kind == "array":
        return isinstance(value, list), value
    if kind == "any":  # the key's check decides (a number or a string, such as a floor "60%")
        return True, value
    raise AssertionError(kind)  # pragma: no cover - schema bug


def convert(key: Key, value: Any, path: str, out: Issues) -> Any:
    """Check one value against ``key``; the converted value, or None after recording an issue at ``path``."""
    ok, converted = _typed(key.kind, value)
    if not ok:
        out.add(path, key.wrong_type(), describe(value))
        return None
    if key.item is not None:
        items = []
        for i, raw in enumerate(value):
            item = key.item(raw)
            if item is None:
                out.add(f"{path}[{i}]", key.item_expected, describe(raw))
                ok = False
            items.append(item)
        if not ok:
            return None
        converted = tuple(items)
    if key.check is not None:
        problem = key.check(converted)
        if problem is not None:
            out.add(path, problem, describe(value))
            return None
    return converted


def unknown(path: str, name: str, known: Sequence[str], out: Issues) -> None:
    """Record an unknown key ``name`` at ``path``: the known keys and the closest one."""
    name = short(name)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    out.add(short(path, 80), "one of the known keys: " + ", ".join(sorted(known)), f"unknown key '{name}'{hint}")


def table_of(value: Any, path: str, out: Issues) -> Mapping[str, Any] | None:
    """``value`` when it is a table, else None after recording an issue."""
    if isinstance(value, dict):
        return value
    out.add(path, "a table", describe(value))
    return None


def section(table: Mapping[str, Any], schema: Mapping[str, Key], prefix: str, out: Issues) -> dict[str, Any]:
    """Convert the known keys of ``table`` (in file order); record unknown ones and bad values."""
    result: dict[str, Any] = {}
    for name, value in table.items():
        path = f"{prefix}{name}"
        key = schema.get(name)
        if key is None:
            unknown(path, name, list(schema), out)
            continue
        converted = convert(key, value, path, out)
        if converted is not None:
            result[name] = converted
    return result


# --------------------------------------------------------------------------- reading a table key by key


class Table:
    """One table read key by key; :meth:`finish` reports the keys nobody asked for."""

    def __init__(self, data: Mapping[str, Any], path: str, issues: Issues) -> None:
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

    def get(self, name: str, key: Key, *, required: bool = True, default: Any = None) -> Any:
        """``name`` converted by ``key``; ``default`` when absent (an issue when required and
        there is no default), None after an issue."""
        self._seen.add(name)
        if name not in self.data:
            if required and default is None:
                self.issues.add(self.key(name), key.wrong_type(), "nothing")
            return default
        return convert(key, self.data[name], self.key(name), self.issues)

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
        value: float | None = self.get(
            name, Key("float", expected, span(expected, lo, hi, above=above)), required=required, default=default
        )
        return value

    def integer(
        self, name: str, expected: str, *, lo: int = 0, hi: int | None = None, required: bool = True
    ) -> int | None:
        """A whole number >= ``lo`` (and <= ``hi``); None after an issue or when absent and not required."""
        wanted = f"{expected} (an integer >= {lo})" if hi is None else f"{expected} (an integer {lo} to {hi})"
        key = Key(
            "int", expected, lambda v: None if lo <= v and (hi is None or v <= hi) else wanted, type_expected=wanted
        )
        if name not in self.data and required:
            self._seen.add(name)
            self.issues.add(self.key(name), f"{expected} (an integer)", "nothing")
            return None
        value: int | None = self.get(name, key, required=required)
        return value

    def string(
        self, name: str, expected: str, *, default: str | None = None, choices: Sequence[str] = ()
    ) -> str | None:
        """A string (one of ``choices`` when given); ``default`` when absent."""
        if name not in self.data and default is None:
            self._seen.add(name)
            self.issues.add(self.key(name), f"{expected} (a string)", "nothing")
            return None
        wanted = _choices_text(choices) if choices else None
        key = Key("str", expected, one_of(*choices) if choices else None, type_expected=wanted)
        value: str | None = self.get(name, key, default=default)
        return value

    def boolean(self, name: str, expected: str, *, default: bool) -> bool:
        """true or false; ``default`` when absent or wrong."""
        value: bool | None = self.get(name, Key("bool", f"{expected} (true or false)"), default=default)
        return default if value is None else value

    def table(self, name: str, *, required: bool = True) -> Table | None:
        """A sub-table; None when absent (an issue if required) or not a table."""
        self._seen.add(name)
        if name not in self.data:
            if required:
                self.issues.add(self.key(name), "a table", "nothing")
            return None
        value = table_of(self.data[name], self.key(name), self.issues)
        return None if value is None else Table(value, self.key(name), self.issues)

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
        known = sorted(self._seen)
        for name in self.data:
            if name not in self._seen:
                unknown(self.key(name), name, known, self.issues)


def config_text(data: bytes, source: str, kind: str, error: type[ConfigError] = ConfigError) -> str:
    """``data`` as text for a ``kind`` parser (e.g. "TOML"); ``error`` naming ``source`` when it
    is not UTF-8 or holds NUL bytes (binary data, which no config format admits). A leading
    UTF-8 byte-order mark (some editors write one) is dropped."""
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise error([ConfigIssue(source, "", "UTF-8 text", f"undecodable byte at offset {exc.start}")]) from None
    if "\x00" in text:
        raise error([ConfigIssue(source, "", f"{kind} text", "binary data (NUL bytes)")])
    return text
