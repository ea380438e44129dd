"""Process classes and the VRAM policy: the ``[vram]`` and ``[[class]]`` config tables.

Each process on a GPU gets exactly one class: the first ``[[class]]`` in file order
whose every given match key matches, else the default class (``[vram.default]``,
named ``unclassified``). A class has a VRAM budget, a priority (higher is more
important; under pressure the lowest priority is acted on first), an action
(``observe``, ``terminate`` = SIGTERM then SIGKILL, ``kill`` = SIGKILL), a grace
period and a kill-after time.

A budget is per process and per GPU: each GPU's memory is its own resource, so a
tensor-parallel process using 4 GiB on each of two GPUs is within a 6 GiB budget.

Trust: a process chooses its own name (``prctl(PR_SET_NAME)``) and command line, so
``name`` and ``cmdline`` are *untrusted* keys. A class whose action signals
(``terminate``, ``kill``) but whose match uses only untrusted keys is enforced as
``observe`` (with a check-config warning): a process can put itself in it, or out of
it, at will. The trusted keys are ``user`` (the owner uid), ``exe`` (the executable
the kernel reports), ``unit``, ``slice`` and ``cgroup`` (read from the part of the
cgroup path that systemd, not the user, created; see :mod:`governor.processes`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import regex

if TYPE_CHECKING:
    from governor.config import _Collector

BINARY_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
"""The units sizes are printed in (largest first when rendering)."""
_UNITS = {
    "": (1, False),
    "b": (1, False),
    "k": (2**10, False),
    "kib": (2**10, False),
    "m": (2**20, False),
    "mib": (2**20, False),
    "g": (2**30, False),
    "gib": (2**30, False),
    "t": (2**40, False),
    "tib": (2**40, False),
    "kb": (10**3, True),
    "mb": (10**6, True),
    "gb": (10**9, True),
    "tb": (10**12, True),
}
"""Lower-cased unit -> (bytes, decimal?). A bare letter ("6g") is binary, like ``free -g``."""
SIZE_TEXT_MAX_CHARS = 64
"""Longer size strings are refused before they are looked at (no size needs more)."""
MAX_CLASSES = 256
"""At most this many ``[[class]]`` tables: bounds the overlap check and every tick's matching."""
MATCH_TIMEOUT_S = 0.05
"""Bound of one ``cmdline``/``cgroup`` regex match, in seconds of CPU time (the ``regex``
module counts CPU time: on a loaded machine the wall time of a cut-off match is longer;
the per-tick budget in :mod:`governor.processes` counts wall time)."""
MESSAGE_VALUE_CHARS = 60
"""Values quoted in config errors and warnings are cut to this many characters."""

ACTIONS = ("observe", "terminate", "kill")
MATCH_KEYS = ("name", "exe", "cmdline", "user", "unit", "slice", "cgroup")
UNTRUSTED_KEYS = ("name", "cmdline")
"""Match keys whose value the process itself chooses (comm name, command line)."""
SIGNAL_ACTIONS = ("terminate", "kill")
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
"""Display servers, compositors and NVIDIA's own daemon: never signalled.

Matched against the basename of the executable the kernel reports (/proc/PID/exe),
never the comm name, and only for a root-owned system binary (see
:func:`governor.processes.protection`)."""


def parse_size_unit(value: Any) -> tuple[int, bool] | None:
    """(bytes, whether a decimal unit such as GB was used), or None when malformed.

    Accepts a non-negative integer (bytes) or a string: a decimal number, optional
    spaces and a case-insensitive unit (B, K/KiB, M/MiB, G/GiB, T/TiB are binary;
    KB, MB, GB, TB are decimal). The result must be a whole number of bytes. Runs in
    time linear in the text, which is at most ``SIZE_TEXT_MAX_CHARS`` long.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value, False) if value >= 0 else None
    if not isinstance(value, str) or len(value) > SIZE_TEXT_MAX_CHARS:
        return None
    text = value.strip()
    end = 0
    while end < len(text) and ((text[end].isascii() and text[end].isdigit()) or text[end] == "."):
        end += 1
    number, unit = text[:end], text[end:].lstrip().lower()
    whole, dot, fraction = number.partition(".")
    if not whole.isdigit() or (dot and not fraction.isdigit()) or fraction.count(".") or unit not in _UNITS:
        return None
    scale, decimal = _UNITS[unit]
    size = Fraction(number) * scale
    if size.denominator != 1:
        return None
    return int(size), decimal


def parse_size(value: Any) -> int | None:
    """Bytes from ``"6GiB"``, ``"6 gib"``, ``"6g"``, ``"512 MiB"``, ``"2GB"`` or an integer; None when malformed."""
    parsed = parse_size_unit(value)
    return None if parsed is None else parsed[0]


def render_size(size_bytes: int) -> str:
    """A byte count exactly, as ``parse_size`` reads it back: ``6GiB``, else ``1000B``.

    Uses the largest binary unit that divides the count exactly.
    """
    for unit, scale in reversed(BINARY_UNITS.items()):
        if size_bytes >= scale and size_bytes % scale == 0:
            return f"{size_bytes // scale}{unit}"
    return f"{size_bytes}B"


def format_size(size_bytes: int) -> str:
    """A byte count for people (logs, reports): ``6GiB`` when exact, else two decimals (``7.30GiB``)."""
    for unit, scale in reversed(BINARY_UNITS.items()):
        if size_bytes >= scale:
            if size_bytes % scale == 0:
                return f"{size_bytes // scale}{unit}"
            return f"{size_bytes / scale:.2f}{unit}"
    return f"{size_bytes}B"


def clip(text: str) -> str:
    """``text`` cut to ``MESSAGE_VALUE_CHARS`` characters (with "...") for a message."""
    return text if len(text) <= MESSAGE_VALUE_CHARS else text[: MESSAGE_VALUE_CHARS - 3] + "..."


@dataclass(frozen=True, slots=True)
class ProcessMatch:
    """Match rules of a class; every given key must match (AND)."""

    name: str | None = None  # glob on the process name (comm): untrusted
    exe: str | None = None  # glob on the executable path (/proc/PID/exe)
    cmdline: regex.Pattern[str] | None = None  # regex searched in the command line: untrusted
    user: str | None = None  # user name or numeric uid
    unit: str | None = None  # glob on the systemd unit (from /proc/PID/cgroup)
    slice: str | None = None  # glob on any systemd slice in the cgroup path
    cgroup: regex.Pattern[str] | None = None  # regex searched in the cgroup path (containers)
    user_units: bool = False  # unit/slice/cgroup also see a user manager's own units

    def is_empty(self) -> bool:
        """True when no match key is given (the class can never match)."""
        return all(getattr(self, k) is None for k in MATCH_KEYS)

    def untrusted_only(self) -> bool:
        """True when every given key is one the process chooses itself (name, cmdline)."""
        return not self.is_empty() and all(getattr(self, k) is None for k in MATCH_KEYS if k not in UNTRUSTED_KEYS)

    def describe(self) -> str:
        """The match rules as text (long values cut)."""
        parts = []
        for key in MATCH_KEYS:
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={clip(value.pattern if isinstance(value, regex.Pattern) else repr(value))}")
        if self.user_units:
            parts.append("user_units")
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

    @property
    def enforced_action(self) -> str:
        """The action really taken: ``observe`` when a signalling class matches only on untrusted keys."""
        if self.action in SIGNAL_ACTIONS and self.match.untrusted_only():
            return "observe"
        return self.action


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
    notes: tuple[str, ...] = field(default=(), metadata={"config": False})  # advice found while parsing (decimal size units), for check-config

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
    out.add(path, expected, clip(repr(value)))
    return None


def _regex(value: Any, path: str, out: _Collector) -> regex.Pattern[str] | None:
    text = _str(value, path, out, "a regular expression (a non-empty string)")
    if text is None:
        return None
    try:
        return regex.compile(text)
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        out.add(path, "a valid regular expression", f"{clip(repr(text))} ({clip(str(exc))})")
        return None


def _size(value: Any, path: str, out: _Collector, notes: list[str], example: str) -> int | None:
    parsed = parse_size_unit(value)
    if parsed is None:
        out.add(path, f'a size such as "{example}", "512MiB", "6 gib" or a number of bytes', clip(repr(value)))
        return None
    size, decimal = parsed
    if decimal:
        notes.append(
            f"{path} = {clip(repr(value))} is {size} bytes ({format_size(size)}): a decimal unit "
            "(1 GB = 10^9 bytes) is not GiB (2^30 bytes); write GiB, MiB or G, M for binary units"
        )
    return size


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
        elif key == "user_units":
            if isinstance(value, bool):
                values[key] = value
            else:
                out.add(key_path, "true or false", clip(repr(value)))
        else:
            _unknown(key_path, key, [*MATCH_KEYS, "user_units"], out)
    return ProcessMatch(**values)


def _parse_class(
    table: Mapping[str, Any], path: str, out: _Collector, notes: list[str], *, default: bool
) -> ProcessClass:
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
            values["budget_bytes"] = _size(value, key_path, out, notes, "6GiB")
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
    notes: list[str] = []
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
                size = _size(value, path, out, notes, "2GiB")
                if size is not None:
                    values["reserve_bytes"] = size
            elif key == "protected_names":
                if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
                    values["protected_names"] = tuple(value)
                else:
                    out.add(path, "a list of executable names (basenames)", clip(repr(value)))
            elif key == "default":
                sub = _table(value, path, out)
                if sub is not None:
                    values["default_class"] = _parse_class(sub, path, out, notes, default=True)
            elif key in schema:
                converted = _convert(schema[key], value, path, out)
                if converted is not None:
                    values[key] = converted
            else:
                _unknown(path, key, [*schema, "reserve", "protected_names", "default"], out)
    parsed: list[ProcessClass] = []
    if classes is not None:
        if not isinstance(classes, list):
            out.add("class", "an array of tables ([[class]])", clip(repr(classes)))
        elif len(classes) > MAX_CLASSES:
            out.add("class", f"at most {MAX_CLASSES} [[class]] tables", f"{len(classes)} tables")
        else:
            seen: set[str] = set()
            for i, entry in enumerate(classes):
                table = _table(entry, f"class[{i}]", out)
                if table is None:
                    continue
                klass = _parse_class(table, f"class[{i}]", out, notes, default=False)
                if klass.name in seen or klass.name == DEFAULT_CLASS.name:
                    out.add(f"class[{i}].name", "a class name used once (not 'unclassified')", clip(repr(klass.name)))
                seen.add(klass.name)
                parsed.append(klass)
    return VramPolicy(classes=tuple(parsed), notes=tuple(notes), **values)


# --------------------------------------------------------------------------- advice


def config_warnings(policy: VramPolicy) -> list[str]:
    """Advice for check-config: size-unit notes, classes that can never match or whose
    signals are refused (untrusted keys only), slow patterns, overlaps and which class wins."""
    warnings = list(policy.notes)
    for i, klass in enumerate(policy.classes):
        if klass.match.is_empty():
            warnings.append(f"class '{clip(klass.name)}' has no match rule and can never match")
            continue
        if klass.enforced_action != klass.action:
            warnings.append(
                f"class '{clip(klass.name)}' has action '{klass.action}' but matches only on keys a process "
                f"chooses itself ({', '.join(k for k in UNTRUSTED_KEYS if getattr(klass.match, k) is not None)}): "
                "it is enforced as 'observe'; add user, exe, unit, slice or cgroup to let it signal"
            )
        for key in ("cmdline", "cgroup"):
            pattern = getattr(klass.match, key)
            if pattern is not None and has_nested_quantifier(pattern.pattern):
                warnings.append(
                    f"class '{clip(klass.name)}' {key} pattern /{clip(pattern.pattern)}/ has a nested quantifier "
                    f"(such as (a+)+ or (\\S+/)*): it can take exponential time, and each match is cut off after "
                    f"{MATCH_TIMEOUT_S:g} s, leaving the process unclassified for that tick"
                )
        for earlier in policy.classes[:i]:
            if _may_overlap(earlier.match, klass.match):
                both = f"{earlier.match.describe()} / {klass.match.describe()}"
                warnings.append(
                    f"classes '{clip(earlier.name)}' and '{clip(klass.name)}' may both match a process ({both}); "
                    f"'{clip(earlier.name)}' wins (first in file)"
                )
    return warnings


def has_nested_quantifier(pattern: str) -> bool:
    """True when a repeated group itself holds an unbounded repeat, as in ``(a+)+`` or ``(\\S+/)*``.

    Parsed with Python's own regex parser; a pattern it cannot parse (syntax only the
    ``regex`` module knows) is not judged.
    """
    try:
        from re import _parser as sre_parse  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # Python 3.10
        import sre_parse
    try:
        tree = sre_parse.parse(pattern)
    except Exception:  # anything it cannot parse is simply not judged
        return False
    return _nested(tree, sre_parse, inside=False)


def _nested(items: Any, sre: Any, *, inside: bool) -> bool:
    constants = sre._constants if hasattr(sre, "_constants") else sre
    repeats = {constants.MAX_REPEAT, constants.MIN_REPEAT, getattr(constants, "POSSESSIVE_REPEAT", None)}
    for op, arg in items:
        if op in repeats:
            _low, high, sub = arg
            unbounded = high == constants.MAXREPEAT or high > 1
            if inside and unbounded:
                return True
            if _nested(sub, sre, inside=inside or unbounded):
                return True
        elif op == constants.SUBPATTERN:
            if _nested(arg[-1], sre, inside=inside):
                return True
        elif op == constants.BRANCH:
            if any(_nested(branch, sre, inside=inside) for branch in arg[1]):
                return True
        elif op in (constants.ASSERT, constants.ASSERT_NOT):
            if _nested(arg[1], sre, inside=inside):
                return True
        elif op == getattr(constants, "ATOMIC_GROUP", None) and _nested(arg, sre, inside=inside):
            return True
    return False


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
