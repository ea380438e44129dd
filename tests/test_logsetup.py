"""Logging: journal and json formats, escaping of untrusted text, format auto-detection."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from governor.logsetup import configure, escape, get_logger, resolve_format

NASTY = "evil\nname\r\x1b[31mred\x00\ud800\u2028end"


class TtyBuffer(io.StringIO):
    """A text buffer that claims to be a terminal."""

    def isatty(self) -> bool:
        """Pretend to be a terminal."""
        return True


@pytest.fixture(autouse=True)
def _reset_structlog(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts without JOURNAL_STREAM and leaves structlog's defaults behind."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    yield
    structlog.reset_defaults()


def logged(log_format: str, level: str = "debug") -> tuple[io.StringIO, Any]:
    """A buffer and a logger configured to write ``log_format`` into it."""
    buffer = io.StringIO()
    assert configure(log_format, level, stream=buffer) == log_format
    return buffer, get_logger(gpu=0)


def lines(buffer: io.StringIO) -> list[str]:
    """The lines written to ``buffer``."""
    return buffer.getvalue().splitlines()


LOGFMT_FIELD = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^ "]*))(?: |$)')
"""One key=value of a logfmt line: a bare value up to the next space, or a quoted one with backslash escapes."""


def logfmt_fields(text: str) -> dict[str, str]:
    """The fields of ``key=value ...`` read as logfmt parsers (Loki, Vector, go-logfmt) read them."""
    fields: dict[str, str] = {}
    at = 0
    while at < len(text):
        match = LOGFMT_FIELD.match(text, at)
        assert match is not None, f"not logfmt from {text[at:]!r}"
        key, quoted, bare = match.groups()
        assert key not in fields, f"field {key} given twice in {text!r}"
        fields[key] = bare if quoted is None else re.sub(r"\\(.)", r"\1", quoted)
        at = match.end()
    return fields


class TestEscape:
    """escape(): untrusted text made printable."""

    def test_printable_text_unchanged(self) -> None:
        """Plain and printable non-ASCII text comes back unchanged."""
        for text in ("python3", "train.py --lr 0.1", "café 日本 🚀", ""):
            assert escape(text) == text

    @pytest.mark.parametrize(
        ("raw", "escaped"),
        [
            ("a\nb", "a\\x0ab"),
            ("a\r\nb", "a\\x0d\\x0ab"),
            ("tab\there", "tab\\x09here"),
            ("\x1b[31m", "\\x1b[31m"),
            ("nul\x00", "nul\\x00"),
            ("del\x7f", "del\\x7f"),
            ("nel\x85", "nel\\x85"),
            ("line\u2028sep", "line\\u2028sep"),
            ("lone\ud800", "lone\\ud800"),
            ("tag\U000e0001", "tag\\U000e0001"),
        ],
    )
    def test_control_characters_escaped(self, raw: str, escaped: str) -> None:
        """Newlines, control characters, separators and lone surrogates become backslash escapes."""
        assert escape(raw) == escaped

    @settings(max_examples=200, deadline=None)
    @given(st.text(alphabet=st.characters(codec=None)))
    def test_result_always_printable_utf8(self, text: str) -> None:
        """For any text the result is printable, one line and encodable as UTF-8."""
        result = escape(text)
        assert result.isprintable()
        assert "\n" not in result
        result.encode("utf-8")


class TestJournal:
    """journal format: <N>event key=value, one line per event."""

    @pytest.mark.parametrize(
        ("method", "priority"), [("debug", 7), ("info", 6), ("warning", 4), ("error", 3), ("critical", 2)]
    )
    def test_priority_prefix_matches_level(self, method: str, priority: int) -> None:
        """Each line starts with the syslog priority of its level."""
        buffer, log = logged("journal")
        getattr(log, method)("power_limit_stepped", to_w=180.0)
        (line,) = lines(buffer)
        assert line.startswith(f"<{priority}>power_limit_stepped ")

    def test_line_content(self) -> None:
        """The event name follows the prefix and bound context and values are key=value, without a timestamp."""
        buffer, log = logged("journal")
        log.info("zone_changed", to="hot")
        (line,) = lines(buffer)
        assert line == "<6>zone_changed gpu=0 to=hot level=info"

    def test_level_filtering(self) -> None:
        """At level warning, info and debug events are not written."""
        buffer, log = logged("journal", level="warning")
        log.debug("a")
        log.info("b")
        log.warning("c")
        assert [line[:3] for line in lines(buffer)] == ["<4>"]

    def test_untrusted_value_stays_on_one_line(self) -> None:
        """A value with newlines, escapes and surrogates gives exactly one line, with no raw control characters."""
        buffer, log = logged("journal")
        log.warning("process_over_budget", name=NASTY)
        out = buffer.getvalue()
        assert out.count("\n") == 1
        (line,) = lines(buffer)
        assert re.fullmatch(r"<4>process_over_budget .*", line)
        assert all(ch.isprintable() for ch in line)
        assert "name=evil\\x0aname\\x0d\\x1b[31mred\\x00\\ud800\\u2028end " in line

    def test_untrusted_event_name_stays_on_one_line(self) -> None:
        """An event string carrying a newline is escaped too."""
        buffer, log = logged("journal")
        log.info("line one\nline two")
        assert len(lines(buffer)) == 1

    @pytest.mark.parametrize(
        "name",
        [
            'p\\" rule=forged outcome=fake x=\\',  # p\" rule=forged ... x=\ : closes the quote early
            "trailing backslash \\",  # a quoted value ending in \ swallows the next field
            'a "quoted" = name\\\\" z',
        ],
    )
    def test_a_value_cannot_forge_a_field(self, name: str) -> None:
        """Read the logfmt way (a quoted value unescapes backslash escapes), a line gives back exactly the
        fields logged: a process name with quotes and backslashes cannot end its value early and add a field."""
        buffer, log = logged("journal")
        log.warning("process_over_budget", pid=42, process=name, rule="vram_budget")
        (line,) = lines(buffer)
        assert logfmt_fields(line.split(" ", 1)[1]) == {
            "msg": f"GPU 0: process 42 ({name}, class ?) over its VRAM budget: ? > ?",
            "gpu": "0",
            "pid": "42",
            "process": name,
            "rule": "vram_budget",
            "level": "warning",
        }

    def test_every_event_one_line(self) -> None:
        """Several events give exactly that many lines, each with a prefix."""
        buffer, log = logged("journal")
        for i in range(5):
            log.info("tick", n=i, note="a\nb")
        assert len(lines(buffer)) == 5
        assert all(re.match(r"<6>tick ", line) for line in lines(buffer))


class TestJson:
    """json format: one JSON object per line."""

    def test_valid_json_per_line(self) -> None:
        """Every line parses as a JSON object with event, level, timestamp and bound context."""
        buffer, log = logged("json")
        log.info("zone_changed", to="hot")
        log.error("set_failed", error="NO_PERMISSION")
        records = [json.loads(line) for line in lines(buffer)]
        assert [(r["event"], r["level"], r["gpu"]) for r in records] == [
            ("zone_changed", "info", 0),
            ("set_failed", "error", 0),
        ]
        assert all(r["timestamp"].endswith("Z") for r in records)

    def test_untrusted_value_one_line_and_escaped(self) -> None:
        """A value with a newline and a lone surrogate stays in one JSON line and decodes to its escaped form."""
        buffer, log = logged("json")
        log.warning("process_over_budget", name=NASTY)
        (line,) = lines(buffer)
        record = json.loads(line)
        assert record["name"] == escape(NASTY)
        assert "\n" not in record["name"]

    def test_non_string_values_kept(self) -> None:
        """Numbers and booleans are left as JSON numbers and booleans."""
        buffer, log = logged("json")
        log.info("stepped", to_w=180.5, dry_run=False, pid=42)
        record = json.loads(lines(buffer)[0])
        assert (record["to_w"], record["dry_run"], record["pid"]) == (180.5, False, 42)


class TestResolveFormat:
    """auto: journal under systemd, console on a terminal, else json."""

    def test_journal_when_journal_stream_set(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """JOURNAL_STREAM set picks journal even on a terminal."""
        monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
        assert resolve_format("auto", TtyBuffer()) == "journal"

    def test_console_on_terminal(self) -> None:
        """Without JOURNAL_STREAM, a terminal gets console."""
        assert resolve_format("auto", TtyBuffer()) == "console"

    def test_json_otherwise(self) -> None:
        """Without JOURNAL_STREAM, a pipe or file gets json."""
        assert resolve_format("auto", io.StringIO()) == "json"

    def test_empty_journal_stream_is_unset(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An empty JOURNAL_STREAM does not count as running under systemd."""
        monkeypatch.setenv("JOURNAL_STREAM", "")
        assert resolve_format("auto", io.StringIO()) == "json"

    def test_explicit_format_wins(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A format other than auto is used as given."""
        monkeypatch.setenv("JOURNAL_STREAM", "8:1")
        assert resolve_format("json", TtyBuffer()) == "json"

    def test_configure_auto_returns_concrete_format(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """configure('auto') under JOURNAL_STREAM writes journal lines and says so."""
        monkeypatch.setenv("JOURNAL_STREAM", "8:1")
        buffer = io.StringIO()
        assert configure("auto", "info", stream=buffer) == "journal"
        get_logger().info("started")
        assert lines(buffer) == ["<6>started level=info"]

    def test_console_format_one_event_per_line(self) -> None:
        """The console renderer writes an untrusted value escaped, on one line."""
        buffer = io.StringIO()
        configure("console", "info", stream=buffer)
        get_logger().info("started", name="a\nb")
        assert len(lines(buffer)) == 1
