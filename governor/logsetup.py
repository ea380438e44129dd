"""Logging, configured in one place (structlog).

Formats:
* ``console``: coloured, aligned, for a human at a terminal;
* ``json``: one JSON object per line;
* ``journal``: under systemd, with the journal library (python3-systemd) importable,
  each event is a native journal entry: MESSAGE= (the event's sentence, from
  governor.messages), PRIORITY=, SYSLOG_IDENTIFIER=gpu-governor, EVENT= (the event
  name) and every key of the event upper-cased (GPU=, GPU_UUID=, RULE=, FROM=, TO=,
  REASON=, PID=, CLASS=, UNIT=...), so ``journalctl -u gpu-governor RULE=power_step_down``
  finds the decisions of one rule. Otherwise (no library, or the stream is not the one
  systemd connected to the journal) one ``key=value`` line per event prefixed with
  ``<N>``, the syslog priority, which systemd-journald turns into the entry's priority, so
  ``journalctl -p warning`` filters by level; the line carries the sentence as
  ``msg="..."``. An entry the journal refuses (its socket gone) is written as that line.
``auto`` picks journal when JOURNAL_STREAM is set (we run under systemd), console on
a terminal, json otherwise.

Every string value is escaped: control characters, newlines and invalid surrogates
from process names or command lines never reach a log line or a journal field raw.
"""

from __future__ import annotations

import errno
import importlib
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, TextIO

import structlog

from governor.escaping import escape
from governor.messages import message

__all__ = [
    "JOURNAL_FIELD_NAME_MAX",
    "JOURNAL_SOCKET",
    "JOURNAL_VALUE_MAX_CHARS",
    "LEVELS",
    "SYSLOG_IDENTIFIER",
    "SYSLOG_PRIORITY",
    "JournalLogger",
    "JournalSend",
    "configure",
    "escape",
    "get_logger",
    "journal_entry",
    "journal_field_name",
    "journal_sender",
    "reconfigure",
    "resolve_format",
    "stream_is_journal",
]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
SYSLOG_IDENTIFIER = "gpu-governor"
"""SYSLOG_IDENTIFIER= of every native journal entry (``journalctl -t gpu-governor``)."""
JOURNAL_FIELD_NAME_MAX = 64
"""Longest journal field name journald accepts (characters, A-Z 0-9 _)."""
JOURNAL_VALUE_MAX_CHARS = 8192
"""Longest value (characters) of one journal field; longer ones keep their head and tail."""

JOURNAL_SOCKET = "/run/systemd/journal/socket"
"""Where journald takes native entries (the library's fixed address; a LogNamespace= unit sees its own there)."""

JournalSend = Callable[[Sequence[str]], object]
"""Sends one native journal entry given as ``NAME=value`` strings; raises when the journal refuses it."""

_FIELD_RENAMES = {"uuid": "GPU_UUID"}
"""Event keys whose journal field is not simply the key upper-cased."""
_FIELD_ALIASES = {"from_w": "FROM", "from_zone": "FROM", "to_w": "TO", "to_zone": "TO"}
"""Extra fields: a decision's before and after also as plain FROM= and TO=, whatever their unit."""
_OWN_FIELDS = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT"})
_RESERVED_FIELDS = _OWN_FIELDS | frozenset(
    {
        "MESSAGE_ID", "SYSLOG_FACILITY", "SYSLOG_PID", "SYSLOG_TIMESTAMP", "SYSLOG_RAW", "CODE_FILE", "CODE_LINE",
        "CODE_FUNC", "ERRNO", "TID", "DOCUMENTATION", "INVOCATION_ID", "USER_INVOCATION_ID", "USER_UNIT",
    }
)  # fmt: skip
"""Field names journald or journalctl give a meaning of their own: an event key never takes them (GG_ prefix)."""
_NOT_LINE_KEYS = frozenset({"event", "_priority", "timestamp"})
"""Keys a journal line does not show as key=value (the event name leads it; journald stamps the time)."""


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
    the line. A bare value is read as it stands (up to the next space); in a quoted one
    backslashes are doubled as well as quotes escaped (as logfmt readers expect), so a
    name ending in ``\\`` or holding ``\\"`` cannot close its quote early and add a field.
    """
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, (int, float)) else str(value)
    if text and all(c not in text for c in ' "=') and text.isprintable():
        return text
    return '"' + escape(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _journal_line(priority: int, name: str, fields: Mapping[str, Any]) -> str:
    """``<N>event msg="sentence" key=value ...``: one line, with the syslog priority journald reads.

    ``msg`` is there only for an event with a template in governor.messages.
    """
    sentence = None if "msg" in fields else message(name, fields)
    parts = [] if sentence is None else [f"msg={_journal_value(sentence)}"]
    parts += [f"{key}={_journal_value(value)}" for key, value in fields.items()]
    return f"<{priority}>{name} {' '.join(parts)}".rstrip()


def _split(event: Mapping[str, Any]) -> tuple[int, str, dict[str, Any]]:
    """(syslog priority, event name, the other keys) of a rendered event."""
    rest = {key: value for key, value in event.items() if key not in _NOT_LINE_KEYS}
    return int(event.get("_priority", 6)), str(event.get("event", "")), rest


def _journal_renderer(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    """``<N>event key=value ...``: one line, with the syslog priority journald reads."""
    return _journal_line(*_split(event))


def journal_field_name(key: str) -> str:
    """The journal field for an event key: upper-cased, A-Z 0-9 _ only, not starting with ``_`` or a digit,
    at most JOURNAL_FIELD_NAME_MAX characters, never a field journald gives a meaning of its own."""
    name = _FIELD_RENAMES.get(key) or re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    if name in _RESERVED_FIELDS or name.startswith(("OBJECT_", "COREDUMP_")):
        name = "GG_" + name
    return name[:JOURNAL_FIELD_NAME_MAX]


def _bounded(text: str) -> str:
    """``text`` escaped and cut to JOURNAL_VALUE_MAX_CHARS, keeping its head and its tail (a traceback's end)."""
    text = escape(text)
    if len(text) <= JOURNAL_VALUE_MAX_CHARS:
        return text
    cut = f"...[{len(text) - JOURNAL_VALUE_MAX_CHARS} characters cut]..."
    keep = (JOURNAL_VALUE_MAX_CHARS - len(cut)) // 2
    return text[:keep] + cut + text[-keep:]


def _field_text(value: Any) -> str:
    """A value as the journal field's text (as in a journal line, without the quoting)."""
    if isinstance(value, str):
        return _bounded(value)
    return _bounded(str(value) if isinstance(value, (int, float)) else repr(value))


def journal_entry(event: Mapping[str, Any]) -> list[str]:
    """The native journal entry of a rendered event, as ``NAME=value`` strings.

    MESSAGE= (the sentence, or the event's journal line without its prefix when the
    event has no template), PRIORITY=, SYSLOG_IDENTIFIER=, EVENT=, then one field per
    key of the event (None values left out: absent, not "None"), plus FROM= and TO=
    for a decision's before and after. A name that two keys would share gets ``_2``.
    """
    priority, name, rest = _split(event)
    sentence = message(name, rest) or _journal_line(priority, name, rest).split(">", 1)[1]
    fields = [
        f"MESSAGE={_bounded(sentence)}",
        f"PRIORITY={priority}",
        f"SYSLOG_IDENTIFIER={SYSLOG_IDENTIFIER}",
        f"EVENT={_bounded(name)}",
    ]
    seen = set(_OWN_FIELDS)
    aliases: list[str] = []
    for key, value in rest.items():
        if value is None or key == "level":  # PRIORITY= says the level
            continue
        text = _field_text(value)
        field = journal_field_name(key)
        suffix = 1
        while field in seen:
            suffix += 1
            field = f"{journal_field_name(key)[: JOURNAL_FIELD_NAME_MAX - 4]}_{suffix}"
        seen.add(field)
        fields.append(f"{field}={text}")
        alias = _FIELD_ALIASES.get(key)
        if alias is not None:
            aliases.append(f"{alias}={text}")
    for alias in aliases:
        if alias.split("=", 1)[0] not in seen:
            seen.add(alias.split("=", 1)[0])
            fields.append(alias)
    return fields


def _journal_native(_: Any, __: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
    """The event as a native entry and, for when the journal refuses it, as its ``<N>`` line."""
    priority, name, rest = _split(event)
    return {"fields": journal_entry(event), "line": _journal_line(priority, name, rest)}


class JournalLogger:
    """Sends each event as a native journal entry; writes the event's ``<N>`` line instead when that fails.

    Nothing is lost and nothing raises when the journal's socket is gone: the event goes
    to the stream (which systemd also reads) as a line. The first failure of a run of
    failures is itself noted by a ``journal_send_failed`` line; a later success ends the run.
    """

    def __init__(self, stream: TextIO, send: JournalSend) -> None:
        self.stream = stream
        self.send = send
        self.failing = False
        self._lock = threading.Lock()

    def msg(self, fields: Sequence[str], line: str) -> None:
        """Send one entry (see the class docstring)."""
        try:
            self.send(fields)
        except Exception as exc:  # whatever the library raises, the event survives as a line
            with self._lock:
                if not self.failing:
                    error = f"{type(exc).__name__}: {exc}"
                    self.stream.write(_journal_line(4, "journal_send_failed", {"error": escape(error)}) + "\n")
                self.failing = True
                self.stream.write(line + "\n")
                self.stream.flush()
        else:
            self.failing = False

    log = debug = info = warn = warning = err = error = critical = exception = failure = fatal = msg


def journal_sender() -> JournalSend | None:
    """The journal library's sender (systemd.journal.sendv), or None when the library is not importable.

    libsystemd drops an entry without a word when the socket does not exist (ENOENT), so
    the sender looks for it first and raises instead: the event then goes as a line.
    """
    try:
        journal: Any = importlib.import_module("systemd.journal")  # optional: python3-systemd, systemd-python
    except ImportError:
        return None
    sendv = journal.sendv

    def send(fields: Sequence[str]) -> None:
        if not stat.S_ISSOCK(os.stat(JOURNAL_SOCKET).st_mode):  # FileNotFoundError when it is gone
            raise OSError(errno.ENOTSOCK, os.strerror(errno.ENOTSOCK), JOURNAL_SOCKET)
        sendv(*fields)

    return send


def stream_is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the one systemd connected to the journal: its device and inode are
    JOURNAL_STREAM's (``DEV:INODE``, decimal; see sd_journal_stream_fd(3) and systemd.exec(5))."""
    parts = os.environ.get("JOURNAL_STREAM", "").split(":")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        return False
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False
    return (status.st_dev, status.st_ino) == (int(parts[0]), int(parts[1]))


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


def configure(
    log_format: str = "auto", level: str = "info", stream: TextIO | None = None, journal_send: JournalSend | None = None
) -> str:
    """Configure structlog for the whole process; returns the concrete format chosen.

    In the journal format, events go as native entries when ``stream`` is the journal's
    (:func:`stream_is_journal`) and a sender exists: ``journal_send``, else the journal
    library's (:func:`journal_sender`); otherwise as ``<N>`` lines on ``stream``.
    """
    stream = sys.stderr if stream is None else stream
    _configured["stream"] = stream
    concrete = resolve_format(log_format, stream)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
        _escape_values,
    ]
    factory: Callable[..., Any] = structlog.PrintLoggerFactory(stream)
    send = None
    if concrete == "journal" and stream_is_journal(stream):
        send = journal_send if journal_send is not None else journal_sender()
    if send is not None:
        native = JournalLogger(stream, send)
        factory = lambda *_: native  # noqa: E731 - one logger: the failure state is the process's
        processors += [_journal_prefix, _journal_native]
    elif concrete == "journal":
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
        logger_factory=factory,
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
    """A structlog logger, with ``context`` bound to every event it logs.

    Lazy: each event goes through the configuration in force when it is logged, so a level or
    format that :func:`reconfigure` applies on a reload reaches the loggers made before it
    (the service's own among them). Binding more context to it freezes the configuration of
    the moment; pass the context here instead.
    """
    return structlog.get_logger(**context)
