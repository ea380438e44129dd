"""Process classes and the VRAM policy: the ``[vram]`` and ``[[class]]`` config tables.

Each process on a GPU gets exactly one class: the first ``[[class]]`` in file order
whose every given match key matches, else the default class (``[vram.default]``,
named ``unclassified``). A class has a VRAM budget, a priority (higher is more
important; under pressure the lowest priority is acted on first), an action
(``observe``, ``terminate`` = SIGTERM then SIGKILL, ``kill`` = SIGKILL), a grace
period and a kill-after time.

A budget is per process and per GPU: each GPU's memory is its own resource, so a
tensor-parallel process using 4 GiB on each of two GPUs is within a 6 GiB budget.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from governor.config import _Collector

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$")

ACTIONS = ("observe", "terminate", "kill")
MATCH_KEYS = ("name", "exe", "cmdline", "user", "unit", "slice", "cgroup")
DEFAULT_PROTECTED_NAMES = (
    "Xorg",
    "Xwayland",
    "X",
    "gnome-shell",
    "kwin_wayland",
    "kwin_x11",
    "mutter",
    "sway",
    "weston",
    "Hyprland",
    "gamescope",
    "gdm-x-session",
    "sddm",
    "nvidia-persistenced",
)
"""Display servers, compositors and NVIDIA's own daemon: never signalled."""


def parse_size(value: Any) -> int | None:
    """Bytes from ``"6GiB"``, ``"512 MiB"``, ``"2GB"`` or an integer; None when malformed."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    m = _SIZE.match(value)
    if m is None:
        return None
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2) or ""])


def format_size(size_bytes: int) -> str:
    """A byte count in the largest binary unit that keeps it readable (``6GiB``)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = SIZE_UNITS[unit]
        if size_bytes >= scale and size_bytes % (scale // 16 or 1) == 0:
            value = size_bytes / scale
            return f"{value:g}{unit}"
    return f"{size_bytes}B"


@dataclass(frozen=True, slots=True)
class ProcessMatch:
    """Match rules of a class; every given key must match (AND)."""

    name: str | None = None  # glob on the process name (comm)
    exe: str | None = None  # glob on the executable path
    cmdline: re.Pattern[str] | None = None  # regex searched in the command line
    user: str | None = None  # user name or numeric uid
    unit: str | None = None  # glob on the systemd unit (from /proc/PID/cgroup)
    slice: str | None = None  # glob on any systemd slice in the cgroup path
    cgroup: re.Pattern[str] | None = None  # regex searched in the cgroup path (containers)

    def is_empty(self) -> bool:
        """True when no match key is given (the class can never match)."""
        return all(getattr(self, k) is None for k in MATCH_KEYS)

    def describe(self) -> str:
        """The match rules as text."""
        parts = []
        for key in MATCH_KEYS:
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value.pattern if isinstance(value, re.Pattern) else value!r}")
        return " and ".join(parts) or "nothing"


@dataclass(frozen=True, slots=True)
class ProcessClass:
    """A named class of processes with its budget and enforcement."""

    name: str
    match: ProcessMatch = field(default_factory=ProcessMatch)
    budget_bytes: int | None = None  # None: no budget (observe only)
    priority: int = 0
    action: str = "observe"
    grace_s: float = 30.0
    kill_after_s: float = 10.0
    dry_run: bool = False
    protected: bool = False


DEFAULT_CLASS = ProcessClass(name="unclassified", priority=0, action="observe")


@dataclass(frozen=True, slots=True)
class VramPolicy:
    """Per-GPU free reserve, memory pressure, cooldown, protection and the classes."""

    enabled: bool = True
    reserve_bytes: int = 0
    pressure_used_ratio: float = 0.90
    cooldown_s: float = 30.0
    dry_run: bool = False
    per_process_metrics: bool = False
    protected_names: tuple[str, ...] = DEFAULT_PROTECTED_NAMES
    classes: tuple[ProcessClass, ...] = ()
    default_class: ProcessClass = DEFAULT_CLASS

    def class_named(self, name: str) -> ProcessClass:
        """The class called ``name`` (the default class when unknown)."""
        for klass in self.classes:
            if klass.name == name:
                return klass
        return self.default_class


# --------------------------------------------------------------------------- parsing


def _str(value: Any, path: str, out: _Collector, expected: str) -> str | None:
    if isinstance(value, str) and value:
        return value
    out.add(path, expected, repr(value))
    return None


def _regex(value: Any, path: str, out: _Collector) -> re.Pattern[str] | None:
    text = _str(value, path, out, "a regular expression (a non-empty string)")
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        out.add(path, "a valid regular expression", f"{text!r} ({exc})")
        return None


def _parse_match(table: Any, path: str, out: _Collector) -> ProcessMatch:
    from governor.config import _table, _unknown

    values: dict[str, Any] = {}
    checked = _table(table, path, out)
    if checked is None:
        return ProcessMatch()
    for key, value in checked.items():
        key_path = f"{path}.{key}"
        if key in ("cmdline", "cgroup"):
            values[key] = _regex(value, key_path, out)
        elif key == "user":
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                values[key] = str(value)
            else:
                values[key] = _str(value, key_path, out, "a user name or uid")
        elif key in MATCH_KEYS:
            values[key] = _str(value, key_path, out, "a glob pattern (a non-empty string)")
        else:
            _unknown(key_path, key, MATCH_KEYS, out)
    return ProcessMatch(**values)


def _parse_class(table: Mapping[str, Any], path: str, out: _Collector, *, default: bool) -> ProcessClass:
    from governor.config import Key, _between, _convert, _one_of, _unknown

    schema = {
        "priority": Key("int", "a priority (higher is more important)", _between(-1000, 1000)),
        "action": Key("str", "an action", _one_of(*ACTIONS)),
        "grace_s": Key("float", "seconds", _between(0.0, 86400.0)),
        "kill_after_s": Key("float", "seconds", _between(0.0, 86400.0)),
        "dry_run": Key("bool", "true or false"),
        "protected": Key("bool", "true or false"),
    }
    known = [*schema, "budget", "match"] if default else [*schema, "name", "budget", "match"]
    values: dict[str, Any] = {}
    for key, value in table.items():
        key_path = f"{path}.{key}"
        if key == "name" and not default:
            values["name"] = _str(value, key_path, out, "a class name (a non-empty string)")
        elif key == "budget":
            size = parse_size(value)
            if size is None:
                out.add(key_path, 'a size such as "6GiB", "512MiB" or a number of bytes', repr(value))
            values["budget_bytes"] = size
        elif key == "match" and not default:
            values["match"] = _parse_match(value, key_path, out)
        elif key in schema:
            converted = _convert(schema[key], value, key_path, out)
            if converted is not None:
                values[key] = converted
        else:
            _unknown(key_path, key, known, out)
    if default:
        values["name"] = DEFAULT_CLASS.name
    elif not values.get("name"):
        if "name" not in table:
            out.add(f"{path}.name", "a class name", "nothing")
        values["name"] = f"<class {path}>"
    if "match" not in values and not default:
        out.add(f"{path}.match", "a match table (name, exe, cmdline, user, unit, slice or cgroup)", "nothing")
    klass = ProcessClass(**{k: v for k, v in values.items() if v is not None or k == "budget_bytes"})
    if klass.action != "observe" and klass.budget_bytes is None:
        out.add(f"{path}.budget", f"a budget for action '{klass.action}'", "no budget")
    return klass


def parse_vram(vram: Any, classes: Any, out: _Collector) -> VramPolicy:
    """Validate ``[vram]`` and ``[[class]]``; problems go to ``out``."""
    from governor.config import Key, _between, _convert, _table, _unknown

    values: dict[str, Any] = {}
    if vram is not None:
        table = _table(vram, "vram", out)
        schema = {
            "enabled": Key("bool", "true or false"),
            "pressure_used_ratio": Key("float", "a ratio", _between(0.05, 1.0)),
            "cooldown_s": Key("float", "seconds", _between(0.0, 86400.0)),
            "dry_run": Key("bool", "true or false"),
            "per_process_metrics": Key("bool", "true or false"),
        }
        for key, value in (table or {}).items():
            path = f"vram.{key}"
            if key == "reserve":
                size = parse_size(value)
                if size is None:
                    out.add(path, 'a size such as "2GiB" or a number of bytes', repr(value))
                else:
                    values["reserve_bytes"] = size
            elif key == "protected_names":
                if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
                    values["protected_names"] = tuple(value)
                else:
                    out.add(path, "a list of process names", repr(value))
            elif key == "default":
                sub = _table(value, path, out)
                if sub is not None:
                    values["default_class"] = _parse_class(sub, path, out, default=True)
            elif key in schema:
                converted = _convert(schema[key], value, path, out)
                if converted is not None:
                    values[key] = converted
            else:
                _unknown(path, key, [*schema, "reserve", "protected_names", "default"], out)
    parsed: list[ProcessClass] = []
    if classes is not None:
        if not isinstance(classes, list):
            out.add("class", "an array of tables ([[class]])", repr(classes))
        else:
            seen: set[str] = set()
            for i, entry in enumerate(classes):
                table = _table(entry, f"class[{i}]", out)
                if table is None:
                    continue
                klass = _parse_class(table, f"class[{i}]", out, default=False)
                if klass.name in seen or klass.name == DEFAULT_CLASS.name:
                    out.add(f"class[{i}].name", "a class name used once (not 'unclassified')", repr(klass.name))
                seen.add(klass.name)
                parsed.append(klass)
    return VramPolicy(classes=tuple(parsed), **values)


# --------------------------------------------------------------------------- advice


def config_warnings(policy: VramPolicy) -> list[str]:
    """Classes that can never match, and overlaps with which class wins (for check-config)."""
    warnings = []
    for i, klass in enumerate(policy.classes):
        if klass.match.is_empty():
            warnings.append(f"class '{klass.name}' has no match rule and can never match")
            continue
        for earlier in policy.classes[:i]:
            if _may_overlap(earlier.match, klass.match):
                both = f"{earlier.match.describe()} / {klass.match.describe()}"
                warnings.append(
                    f"classes '{earlier.name}' and '{klass.name}' may both match a process ({both}); "
                    f"'{earlier.name}' wins (first in file)"
                )
    return warnings


def _may_overlap(a: ProcessMatch, b: ProcessMatch) -> bool:
    """False only when some key is given in both with globs that cannot match the same text."""
    for key in ("name", "exe", "unit", "slice", "user"):
        x, y = getattr(a, key), getattr(b, key)
        if (
            x is not None
            and y is not None
            and not (fnmatch.fnmatchcase(x, y) or fnmatch.fnmatchcase(y, x) or _has_glob(x) or _has_glob(y))
        ):
            return False
    return True


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")
