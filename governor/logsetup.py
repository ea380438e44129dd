"""Logging, configured in one place (structlog).

Formats:
* ``console``: coloured, aligned, for a human at a terminal;
* ``json``: one JSON object per line;
* ``journal``: one ``key=value`` line per event prefixed with ``<N>``, the syslog
  priority, which systemd-journald turns into the entry's priority, so
  ``journalctl -p warning`` filters by level.
``auto`` picks journal when JOURNAL_STREAM is set (we run under systemd), console on
a terminal, json otherwise.

Every string value is escaped: control characters, newlines and invalid surrogates
from process names or command lines never reach a log line raw.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from governor.escaping import escape

__all__ = ["LEVELS", "SYSLOG_PRIORITY", "configure", "escape", "get_logger", "reconfigure", "resolve_format"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def _escape_values(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = escape(value)
    return event


def _journal_prefix(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    level = str(event.get("level", method))
    event["_priority"] = SYSLOG_PRIORITY.get(level, 6)
    return event


def _journal_value(value: Any) -> str:
    """A value for a ``key=value`` journal line: bare when unambiguous, else double-quoted.

    Strings were already made printable by ``_escape_values``, so no value can break
    the line; backslashes are left as they are rather than doubled.
    """
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, (int, float)) else str(value)
    if text and all(c not in text for c in ' "=') and text.isprintable():
        return text
    return '"' + escape(text).replace('"', '\\"') + '"'


def _journal_renderer(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    """``<N>event key=value ...``: one line, with the syslog priority journald reads."""
    priority = event.pop("_priority", 6)
    name = event.pop("event", "")
    event.pop("timestamp", None)
    rest = " ".join(f"{key}={_journal_value(value)}" for key, value in event.items())
    return f"<{priority}>{name} {rest}".rstrip()


def resolve_format(requested: str, stream: TextIO | None = None) -> str:
    """Turn ``auto`` into a concrete format for this process's environment."""
    if requested != "auto":
        return requested
    if os.environ.get("JOURNAL_STREAM"):
        return "journal"
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return "console"
    except (AttributeError, ValueError):
        pass
    return "json"


_configured: dict[str, TextIO] = {}
"""The stream the last :func:`configure` chose, under "stream" (empty: never configured)."""


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> str:
    """Configure structlog for the whole process; returns the concrete format chosen."""
    stream = sys.stderr if stream is None else stream
    _configured["stream"] = stream
    concrete = resolve_format(log_format, stream)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
        _escape_values,
    ]
    if concrete == "journal":
        processors += [_journal_prefix, _journal_renderer]
    elif concrete == "json":
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=_colour(stream)),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, 20)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    return concrete


def reconfigure(log_format: str, level: str) -> str | None:
    """Apply a reloaded config's log format and level to the stream :func:`configure` chose.

    Returns the concrete format, or None (and changes nothing) when logging was never
    configured here (a library or test that set structlog up itself keeps its setup).
    """
    stream = _configured.get("stream")
    return None if stream is None else configure(log_format, level, stream)


def _colour(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def get_logger(**context: Any) -> Any:
    """A structlog logger, with ``context`` bound to every event it logs."""
    return structlog.get_logger().bind(**context)
