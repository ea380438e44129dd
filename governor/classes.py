"""Process classes and the VRAM policy: the ``[vram]`` and ``[[class]]`` config tables.

Each process on a GPU gets exactly one class: the first ``[[class]]`` in file order
whose every given match key matches, else the default class (``[vram.default]``,
named ``unclassified``). A class has a VRAM budget, a priority (higher is more
important; under pressure the lowest priority is acted on first), an action
(``observe``, ``terminate`` = SIGTERM then SIGKILL, ``kill`` = SIGKILL, ``stop-unit`` =
stop the process's systemd unit through D-Bus, optionally resumed), a grace period and a
kill-after time. A class that acts may not name a unit on the built-in deny list
(:data:`governor.policy.DENIED_UNITS`), and ``stop-unit`` never names a user session's units.

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

# ruff: noqa: PLC0414 - "import X as X" marks a re-export (names that moved to governor.policy/schema)
import fnmatch
from collections.abc import Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import regex

# The policy types live in governor.policy; the names stay importable from here (re-exports).
from governor.policy import ACTIONS as ACTIONS
from governor.policy import BINARY_UNITS as BINARY_UNITS
from governor.policy import DEFAULT_CLASS as DEFAULT_CLASS
from governor.policy import DEFAULT_PROTECTED_NAMES as DEFAULT_PROTECTED_NAMES
from governor.policy import DENIED_UNITS, SESSION_UNITS, denied_by
from governor.policy import MATCH_KEYS as MATCH_KEYS
from governor.policy import MESSAGE_VALUE_CHARS as MESSAGE_VALUE_CHARS
from governor.policy import SIGNAL_ACTIONS as SIGNAL_ACTIONS
from governor.policy import UNTRUSTED_KEYS as UNTRUSTED_KEYS
from governor.policy import ProcessAction as ProcessAction
from governor.policy import ProcessClass as ProcessClass
from governor.policy import ProcessMatch as ProcessMatch
from governor.policy import VramPolicy as VramPolicy
from governor.policy import clip as clip
from governor.policy import format_size as format_size
from governor.schema import MAX_BYTES, Issues, Key, between, convert, one_of, shown, table_of, unknown

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
MAX_SIZE_BYTES = MAX_BYTES
"""The largest budget or reserve (8 PiB: 10**400 bytes made every scrape fail)."""
_MAX_SIZE_TEXT = "8192TiB"
MAX_CLASSES = 256
"""At most this many ``[[class]]`` tables: bounds the overlap check and every tick's matching."""
MATCH_TIMEOUT_S = 0.05
"""Bound of one ``cmdline``/``cgroup`` regex match, in seconds of CPU time (the ``regex``
module counts CPU time: on a loaded machine the wall time of a cut-off match is longer;
the per-tick budget in :mod:`governor.processes` counts wall time)."""


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


# --------------------------------------------------------------------------- parsing


def _str(value: Any, path: str, out: Issues, expected: str) -> str | None:
    if isinstance(value, str) and value:
        return value
    out.add(path, expected, shown(value))
    return None


def _regex(value: Any, path: str, out: Issues) -> regex.Pattern[str] | None:
    text = _str(value, path, out, "a regular expression (a non-empty string)")
    if text is None:
        return None
    import regex  # here, not at the top: a config without patterns never loads it (about 2 MiB)

    try:
        return regex.compile(text)
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        out.add(path, "a valid regular expression", f"{shown(text)} ({clip(str(exc))})")
        return None


def _size(value: Any, path: str, out: Issues, notes: list[str], example: str) -> int | None:
    parsed = parse_size_unit(value)
    if parsed is None or parsed[0] > MAX_SIZE_BYTES:
        out.add(
            path,
            f'a size such as "{example}", "512MiB", "6 gib" or a number of bytes (at most {_MAX_SIZE_TEXT})',
            shown(value),
        )
        return None
    size, decimal = parsed
    if decimal:
        notes.append(
            f"{path} = {shown(value)} is {size} bytes ({format_size(size)}): a decimal unit "
            "(1 GB = 10^9 bytes) is not GiB (2^30 bytes); write GiB, MiB or G, M for binary units"
        )
    return size


def _parse_match(table: Any, path: str, out: Issues) -> ProcessMatch:
    values: dict[str, Any] = {}
    checked = table_of(table, path, out)
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
                out.add(key_path, "true or false", shown(value))
        else:
            unknown(key_path, key, [*MATCH_KEYS, "user_units"], out)
    return ProcessMatch(**values)


CLASS_KEYS: dict[str, Key] = {
    "priority": Key("int", "a priority (higher is more important)", between(-1000, 1000)),
    "action": Key("str", "an action", one_of(*(a.value for a in ACTIONS))),
    "grace_s": Key("float", "seconds", between(0.0, 86400.0)),
    "kill_after_s": Key("float", "seconds", between(0.0, 86400.0)),
    "dry_run": Key("bool", "true or false"),
    "protected": Key("bool", "true or false"),
    "resume": Key("bool", "true or false (stop-unit: start the unit again once there is room)"),
    "resume_after_s": Key("float", "seconds", between(0.0, 86400.0)),
    "resume_after_max_s": Key("float", "seconds", between(0.0, 86400.0)),
    "flap_window_s": Key("float", "seconds (0 turns the resume backoff off)", between(0.0, 86400.0)),
    "restart_loop_count": Key("int", "a number of signals", between(1, 1000)),
    "restart_loop_window_s": Key("float", "seconds", between(1.0, 86400.0)),
}
"""The scalar keys of a ``[[class]]`` (and ``[vram.default]``); name, budget and match are read apart."""
VRAM_KEYS: dict[str, Key] = {
    "enabled": Key("bool", "true or false"),
    "pressure_used_ratio": Key("float", "a ratio", between(0.05, 1.0)),
    "cooldown_s": Key("float", "seconds", between(0.0, 86400.0)),
    "dry_run": Key("bool", "true or false"),
    "per_process_metrics": Key("bool", "true or false"),
}
"""The scalar keys of ``[vram]``; reserve, protected_names and default are read apart."""


def _parse_class(table: Mapping[str, Any], path: str, out: Issues, notes: list[str], *, default: bool) -> ProcessClass:
    schema = CLASS_KEYS
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
            converted = convert(schema[key], value, key_path, out)
            if converted is not None:
                values[key] = ProcessAction(converted) if key == "action" else converted
        else:
            unknown(key_path, key, known, out)
    if default:
        values["name"] = DEFAULT_CLASS.name
    elif not values.get("name"):
        if "name" not in table:
            out.add(f"{path}.name", "a class name", "nothing")
        values["name"] = f"<class {path}>"
    if "match" not in values and not default:
        out.add(f"{path}.match", "a match table (name, exe, cmdline, user, unit, slice or cgroup)", "nothing")
    klass = ProcessClass(**{k: v for k, v in values.items() if v is not None or k == "budget_bytes"})
    if klass.action is not ProcessAction.OBSERVE and "budget" not in table:  # a bad one is reported already
        out.add(f"{path}.budget", f"a budget for action '{klass.action}'", "no budget")
    _check_units(klass, path, out, default=default)
    return klass


def _check_units(klass: ProcessClass, path: str, out: Issues, *, default: bool) -> None:
    """A class that acts may not name a unit on the deny list; stop-unit never reaches user sessions."""
    if klass.action is ProcessAction.OBSERVE or klass.protected:
        return
    match = klass.match
    if match.unit is not None:
        entry = denied_by(match.unit)
        if entry is not None:
            out.add(
                f"{path}.match.unit",
                f"a unit the governor may act on (action '{klass.action}'): none on the built-in deny list "
                f"({', '.join(DENIED_UNITS[:6])}, ...)",
                f"{shown(match.unit)}, which could name {entry!r}",
            )
    if klass.action is not ProcessAction.STOP_UNIT:
        return
    if default:
        out.add(
            f"{path}.action", "observe, terminate or kill (stop-unit needs a class that names its units)", "'stop-unit'"
        )
    if match.user_units:
        out.add(
            f"{path}.match.user_units",
            "false for action 'stop-unit' (units of user sessions are never stopped)",
            "true",
        )
    for key in ("unit", "slice"):
        glob = getattr(match, key)
        entry = None if glob is None else denied_by(glob, SESSION_UNITS)
        if entry is not None:
            out.add(
                f"{path}.match.{key}",
                "system units only for action 'stop-unit' (user sessions are observed, never stopped)",
                f"{shown(glob)}, which could name {entry!r}",
            )
    if klass.resume_after_max_s < klass.resume_after_s:
        out.add(
            f"{path}.resume_after_max_s",
            f"seconds at least resume_after_s ({klass.resume_after_s:g})",
            f"{klass.resume_after_max_s:g}",
        )


def parse_vram(vram: Any, classes: Any, out: Issues) -> VramPolicy:
    """Validate ``[vram]`` and ``[[class]]``; problems go to ``out``."""
    values: dict[str, Any] = {}
    notes: list[str] = []
    if vram is not None:
        table = table_of(vram, "vram", out)
        schema = VRAM_KEYS
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
                    out.add(path, "a list of executable names (basenames)", shown(value))
            elif key == "default":
                sub = table_of(value, path, out)
                if sub is not None:
                    values["default_class"] = _parse_class(sub, path, out, notes, default=True)
            elif key in schema:
                converted = convert(schema[key], value, path, out)
                if converted is not None:
                    values[key] = converted
            else:
                unknown(path, key, [*schema, "reserve", "protected_names", "default"], out)
    parsed: list[ProcessClass] = []
    if classes is not None:
        if not isinstance(classes, list):
            out.add("class", "an array of tables ([[class]])", shown(classes))
        elif len(classes) > MAX_CLASSES:
            out.add("class", f"at most {MAX_CLASSES} [[class]] tables", f"{len(classes)} tables")
        else:
            seen: set[str] = set()
            for i, entry in enumerate(classes):
                table = table_of(entry, f"class[{i}]", out)
                if table is None:
                    continue
                klass = _parse_class(table, f"class[{i}]", out, notes, default=False)
                if klass.name in seen or klass.name == DEFAULT_CLASS.name:
                    out.add(f"class[{i}].name", "a class name used once (not 'unclassified')", shown(klass.name))
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
        if klass.resume and klass.action is not ProcessAction.STOP_UNIT:
            warnings.append(
                f"class '{clip(klass.name)}' sets resume = true but its action is '{klass.action}': "
                "only a stop-unit class is resumed"
            )
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
