"""Durations: one parser for every command-line duration, one format for decision reasons.

``parse_seconds`` reads ``24h``, ``90m``, ``3600s``, ``3600``, ``1h30m`` or ``0.5`` (units
``d``, ``h``, ``m``, ``s``, case-insensitive; bare numbers are seconds) for ``record
--duration``, ``record --interval`` and ``simulate --duration`` alike.
``format_seconds`` writes a duration the same way in every decision reason: whole
seconds from 10 s on, one decimal below (``"360 s"``, ``"1.5 s"``).
"""

from __future__ import annotations

import math
import re

__all__ = ["MAX_DURATION_S", "format_seconds", "parse_seconds"]

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(d|h|m|s)?", re.IGNORECASE)
_UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
MAX_DURATION_S = 366 * 86400.0
"""The longest duration accepted, in seconds: a year."""


def parse_seconds(text: str) -> float:
    """Seconds in ``text``; ValueError (saying what was expected) for anything else, 0 or over a year."""
    compact = text.strip()
    total = 0.0
    position = 0
    while position < len(compact):
        match = _PART.match(compact, position)
        if match is None:
            break
        total += float(match.group(1)) * _UNIT_S[(match.group(2) or "").lower()]
        position = match.end()
        while position < len(compact) and compact[position] == " ":
            position += 1
    if not compact or position != len(compact) or not math.isfinite(total):
        raise ValueError(f"expected a duration such as 24h, 90m or 3600s, got {text!r}")
    if not 0.0 < total <= MAX_DURATION_S:
        raise ValueError(f"expected more than 0 s and at most 366 days, got {text!r}")
    return total


def format_seconds(seconds: float) -> str:
    """``seconds`` for a reason: whole seconds at 10 s and above, one decimal below (``"60 s"``, ``"2.5 s"``)."""
    if abs(seconds) >= 9.95:
        return f"{seconds:.0f} s"
    return f"{seconds:.1f} s"
