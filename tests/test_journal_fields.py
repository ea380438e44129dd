"""Native journal entries: fields, MESSAGE sentences, the fallback to <N> lines, and a template for every event."""

from __future__ import annotations

import ast
import importlib.util
import io
import os
import re
import shutil
import socket
import string
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from governor import logsetup
from governor.logsetup import JOURNAL_FIELD_NAME_MAX, JOURNAL_VALUE_MAX_CHARS, configure, get_logger, journal_field_name
from governor.messages import MESSAGES, UNKNOWN, message
from governor.observers import EVENT_NAMES, UNIT_RULES
from governor.policy import Rule

REPO = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("GG_REQUIRE_SYSTEM_TESTS") == "1"
NASTY = "evil\nname\r\x1b[31mred\x00\ud800\u2028end"
UUID = "GPU-6f1c2a3b-0000-4000-8000-00000000abcd"
STEP = {
    "rule": "power_step_down",
    "action": "set_power_limit",
    "reason": "temperature 86 C >= 85 C for 3 consecutive samples",
    "from_w": 700.0,
    "to_w": 630.0,
    "temperature_c": 86.0,
    "threshold_c": 85.0,
    "outcome": "applied",
}
SENTENCE = "GPU 0 power limit 700 W -> 630 W: temperature 86 C >= 85 C for 3 consecutive samples"


def unavailable(reason: str) -> None:
    """Skip, or fail when CI requires every system test to run (GG_REQUIRE_SYSTEM_TESTS=1)."""
    if REQUIRED:
        pytest.fail(f"GG_REQUIRE_SYSTEM_TESTS=1 but {reason}")
    pytest.skip(reason)


def as_dict(fields: Sequence[str]) -> dict[str, str]:
    """NAME=value strings as a dict; a name sent twice fails the test."""
    out: dict[str, str] = {}
    for field in fields:
        name, value = field.split("=", 1)
        assert name not in out, f"{name} sent twice in {fields}"
        out[name] = value
    return out


class Recorder:
    """A journal sender that keeps every entry, or raises ``error`` while it is set."""

    def __init__(self) -> None:
        self.entries: list[dict[str, str]] = []
        self.error: Exception | None = None

    def __call__(self, fields: Sequence[str]) -> None:
        if self.error is not None:
            raise self.error
        self.entries.append(as_dict(fields))


@pytest.fixture
def stderr_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[io.TextIOWrapper]:
    """A real file standing in for the stderr systemd gave us: JOURNAL_STREAM names its device and inode."""
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stream:
        status = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        yield stream


def written(stream: io.TextIOWrapper) -> list[str]:
    """The lines written to ``stream`` so far."""
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def native(stream: io.TextIOWrapper, level: str = "debug") -> Recorder:
    """Logging configured in the journal format on ``stream`` with a recording sender."""
    recorder = Recorder()
    assert configure("auto", level, stream=stream, journal_send=recorder) == "journal"
    return recorder


class TestFieldNames:
    """journal_field_name(): event keys as valid journal field names."""

    @pytest.mark.parametrize(
        ("key", "field"),
        [
            ("gpu", "GPU"),
            ("uuid", "GPU_UUID"),
            ("rule", "RULE"),
            ("from_w", "FROM_W"),
            ("class", "CLASS"),
            ("retry_in_s", "RETRY_IN_S"),
            ("power-limit.range", "POWER_LIMIT_RANGE"),
            ("_private", "PRIVATE"),
            ("__", "F_"),
            ("2fast", "F_2FAST"),
            ("café", "CAF_"),
            ("message", "GG_MESSAGE"),
            ("priority", "GG_PRIORITY"),
            ("event_", "EVENT_"),
            ("code_file", "GG_CODE_FILE"),
            ("object_pid", "GG_OBJECT_PID"),
        ],
    )
    def test_names(self, key: str, field: str) -> None:
        """Keys are upper-cased, other characters become _, and names journald gives a meaning get GG_."""
        assert journal_field_name(key) == field

    def test_any_key_gives_a_valid_name(self) -> None:
        """Whatever the key, the name is A-Z0-9_, starts with a letter and is at most 64 characters."""
        for key in ("x" * 200, NASTY, "", "_", "9", "ÄÖÜ", "a b\tc", "SYSLOG_IDENTIFIER"):
            name = journal_field_name(key)
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), (key, name)
            assert len(name) <= JOURNAL_FIELD_NAME_MAX


class TestNativeEntries:
    """The journal format under systemd with the library: one native entry per event, nothing on the stream."""

    def test_decision_entry_fields_and_sentence(self, stderr_file: io.TextIOWrapper) -> None:
        """A step down becomes MESSAGE (a sentence), PRIORITY, SYSLOG_IDENTIFIER, EVENT and upper-cased fields."""
        recorder = native(stderr_file)
        get_logger(gpu=0, uuid=UUID).info("power_limit_stepped", **STEP)
        (entry,) = recorder.entries
        assert entry == {
            "MESSAGE": SENTENCE,
            "PRIORITY": "6",
            "SYSLOG_IDENTIFIER": "gpu-governor",
            "EVENT": "power_limit_stepped",
            "GPU": "0",
            "GPU_UUID": UUID,
            "RULE": "power_step_down",
            "ACTION": "set_power_limit",
            "REASON": STEP["reason"],
            "FROM_W": "700.0",
            "TO_W": "630.0",
            "TEMPERATURE_C": "86.0",
            "THRESHOLD_C": "85.0",
            "OUTCOME": "applied",
            "FROM": "700.0",
            "TO": "630.0",
        }
        assert written(stderr_file) == []

    def test_process_entry_has_pid_class_unit(self, stderr_file: io.TextIOWrapper) -> None:
        """A process event carries PID, CLASS, UNIT and a sentence naming the process and the signal."""
        recorder = native(stderr_file)
        get_logger().warning(
            "process_signalled",
            gpu=1,
            uuid=UUID,
            rule="vram_enforce",
            action="sigterm",
            pid=4242,
            process="train.py",
            **{"class": "batch"},
            used_bytes=9 * 2**30,
            budget_bytes=8 * 2**30,
            reason="over budget for 61 s (grace 60 s)",
            unit="train.service",
            signal="SIGTERM",
            outcome="applied",
        )
        (entry,) = recorder.entries
        assert (entry["PID"], entry["CLASS"], entry["UNIT"], entry["ACTION"]) == (
            "4242",
            "batch",
            "train.service",
            "sigterm",
        )
        assert entry["PRIORITY"] == "4"
        assert entry["MESSAGE"] == (
            "GPU 1: process 4242 (train.py, class batch) sent SIGTERM: over budget for 61 s (grace 60 s)"
        )

    @pytest.mark.parametrize(("method", "priority"), [("debug", 7), ("info", 6), ("warning", 4), ("error", 3)])
    def test_priority_follows_level(self, stderr_file: io.TextIOWrapper, method: str, priority: int) -> None:
        """PRIORITY is the syslog priority of the event's level."""
        recorder = native(stderr_file)
        getattr(get_logger(), method)("governor_stopped")
        assert [e["PRIORITY"] for e in recorder.entries] == [str(priority)]

    def test_level_filtering(self, stderr_file: io.TextIOWrapper) -> None:
        """At level warning, info events are not sent."""
        recorder = native(stderr_file, level="warning")
        get_logger().info("governor_stopped")
        get_logger().warning("gpu_gone", uuid=UUID)
        assert [e["EVENT"] for e in recorder.entries] == ["gpu_gone"]

    def test_missing_values_are_absent(self, stderr_file: io.TextIOWrapper) -> None:
        """A None value is left out (absent, never "None" or 0), and the sentence shows it as unknown."""
        recorder = native(stderr_file)
        get_logger().info("power_limit_stepped", gpu=0, uuid=UUID, from_w=None, to_w=630.0, reason="r")
        (entry,) = recorder.entries
        assert "FROM_W" not in entry and "FROM" not in entry
        assert entry["MESSAGE"] == f"GPU 0 power limit {UNKNOWN} W -> 630 W: r"

    def test_untrusted_values_escaped_in_fields_and_message(self, stderr_file: io.TextIOWrapper) -> None:
        """Control characters, newlines and surrogates are escaped in every field and in MESSAGE."""
        recorder = native(stderr_file)
        get_logger().warning("process_inspect_failed", pid=7, error=NASTY, **{NASTY: NASTY})
        (entry,) = recorder.entries
        for name, value in entry.items():
            assert value.isprintable() and re.fullmatch(r"[A-Z][A-Z0-9_]*", name), (name, value)
        assert entry["ERROR"] == "evil\\x0aname\\x0d\\x1b[31mred\\x00\\ud800\\u2028end"
        assert entry["MESSAGE"] == f"Process 7 could not be inspected: {entry['ERROR']}"

    def test_long_value_bounded_head_and_tail(self, stderr_file: io.TextIOWrapper) -> None:
        """A value longer than the bound keeps its start and its end (a traceback's last line) within the bound."""
        recorder = native(stderr_file)
        long = "head " + "x" * 50_000 + " tail"
        get_logger().error("tick_failed", error=long, failures=1)
        (entry,) = recorder.entries
        assert len(entry["ERROR"]) <= JOURNAL_VALUE_MAX_CHARS
        assert entry["ERROR"].startswith("head ") and entry["ERROR"].endswith(" tail")
        assert "characters cut" in entry["ERROR"]
        assert len(entry["MESSAGE"]) <= JOURNAL_VALUE_MAX_CHARS

    def test_colliding_keys_keep_both_values(self, stderr_file: io.TextIOWrapper) -> None:
        """Two keys that give one field name are both sent, the second with a suffix."""
        recorder = native(stderr_file)
        get_logger().info("gpu_gone", uuid=UUID, **{"a-b": "first", "a_b": "second"})
        (entry,) = recorder.entries
        assert (entry["A_B"], entry["A_B_2"]) == ("first", "second")

    def test_event_without_template_still_has_a_message(self, stderr_file: io.TextIOWrapper) -> None:
        """An event with no template gets its key=value text as MESSAGE, never an empty one."""
        recorder = native(stderr_file)
        get_logger().info("not_a_real_event", to="hot")
        (entry,) = recorder.entries
        assert entry["MESSAGE"] == "not_a_real_event to=hot level=info"

    def test_exception_traceback_is_a_field(self, stderr_file: io.TextIOWrapper) -> None:
        """log.exception sends the traceback as EXCEPTION, escaped onto one line, at priority 3."""
        recorder = native(stderr_file)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            get_logger().exception("tick_failed", error="boom", failures=2)
        (entry,) = recorder.entries
        assert entry["PRIORITY"] == "3"
        assert "RuntimeError: boom" in entry["EXCEPTION"] and "\n" not in entry["EXCEPTION"]
        assert entry["MESSAGE"] == "A governing tick failed (2 in a row): boom"


class TestWhenNotNative:
    """Today's <N> lines whenever a native entry cannot or must not be sent."""

    def test_stream_not_the_journal_gives_lines(self, stderr_file: io.TextIOWrapper, tmp_path: Path) -> None:
        """JOURNAL_STREAM names another file (stdout to the journal, stderr elsewhere): lines, nothing sent."""
        with open(tmp_path / "other", "w+", encoding="utf-8") as other:
            recorder = native(other)
            get_logger(gpu=0).info("power_limit_stepped", to_w=630.0)
            assert recorder.entries == []
            sentence = f"GPU 0 power limit {UNKNOWN} W -> 630 W: {UNKNOWN}"
            assert written(other) == [f'<6>power_limit_stepped msg="{sentence}" gpu=0 to_w=630.0 level=info']

    @pytest.mark.parametrize("value", ["", "garbage", "1:2:3", "-1:5"])
    def test_malformed_journal_stream_gives_lines(
        self, stderr_file: io.TextIOWrapper, monkeypatch: pytest.MonkeyPatch, value: str
    ) -> None:
        """A JOURNAL_STREAM that is not DEV:INODE never counts as the journal."""
        monkeypatch.setenv("JOURNAL_STREAM", value)
        recorder = Recorder()
        configure("journal", "info", stream=stderr_file, journal_send=recorder)
        get_logger().info("governor_stopped")
        assert recorder.entries == []
        assert written(stderr_file) == ['<6>governor_stopped msg="gpu-governor stopped" level=info']

    def test_no_library_gives_lines(self, stderr_file: io.TextIOWrapper, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without the journal library, the journal stream still gets <N> lines."""
        monkeypatch.setattr(logsetup, "journal_sender", lambda: None)
        assert configure("auto", "info", stream=stderr_file) == "journal"
        get_logger(gpu=3).warning("gpu_lost", reason="gone")
        assert written(stderr_file) == ['<4>gpu_lost msg="GPU 3 lost: gone" gpu=3 reason=gone level=warning']

    def test_json_format_unchanged_under_journal_stream(self, stderr_file: io.TextIOWrapper) -> None:
        """An explicit json format stays json even on the journal's stream: nothing native, no msg key."""
        recorder = Recorder()
        assert configure("json", "info", stream=stderr_file, journal_send=recorder) == "json"
        get_logger().info("governor_stopped")
        assert recorder.entries == []
        (line,) = written(stderr_file)
        assert '"event": "governor_stopped"' in line and "msg" not in line

    def test_send_failure_falls_back_to_the_line(self, stderr_file: io.TextIOWrapper) -> None:
        """The socket gone: the event is written as its <N> line after one journal_send_failed line; no raise."""
        recorder = native(stderr_file)
        log = get_logger(gpu=0, uuid=UUID)
        recorder.error = FileNotFoundError(2, "No such file or directory")
        log.info("power_limit_stepped", **STEP)
        log.info("power_limit_stepped", **STEP)
        lines = written(stderr_file)
        assert len(lines) == 3
        assert lines[0].startswith('<4>journal_send_failed msg="The journal refused a native entry (')
        assert "No such file or directory" in lines[0]
        expected = f'<6>power_limit_stepped msg="{SENTENCE}" gpu=0 uuid={UUID} rule=power_step_down'
        assert lines[1].startswith(expected) and lines[1] == lines[2]
        assert lines[1].endswith(" level=info")
        # The journal back: entries go native again, and a later failure is noted again.
        recorder.error = None
        log.info("power_limit_stepped", **STEP)
        assert [e["EVENT"] for e in recorder.entries] == ["power_limit_stepped"]
        recorder.error = ConnectionRefusedError(111, "Connection refused")
        log.info("governor_stopped")
        assert [line.split(" ", 1)[0] for line in written(stderr_file)[3:]] == [
            "<4>journal_send_failed",
            "<6>governor_stopped",
        ]

    def test_fallback_line_is_the_line_format(self, stderr_file: io.TextIOWrapper, tmp_path: Path) -> None:
        """The fallback line is exactly what the line format writes for the same event."""
        recorder = native(stderr_file)
        recorder.error = OSError("gone")
        get_logger(gpu=0, uuid=UUID).info("power_limit_stepped", **STEP)
        fallback = written(stderr_file)[1]
        with open(tmp_path / "plain", "w+", encoding="utf-8") as plain:
            configure("journal", "info", stream=plain)  # not the journal's stream: lines
            get_logger(gpu=0, uuid=UUID).info("power_limit_stepped", **STEP)
            assert written(plain) == [fallback]


class TestTemplates:
    """Every event the governor logs has a sentence."""

    LEVELS = frozenset({"debug", "info", "warning", "error", "critical", "exception", "msg", "fatal"})

    @staticmethod
    def logger_calls() -> Iterator[tuple[str, int, ast.expr, set[str] | None]]:
        """(file, line, event argument, keyword names or None when ``**`` passes them) of every logger call."""
        for path in sorted((REPO / "governor").rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
                    continue
                receiver = ast.unparse(node.func.value)
                if node.func.attr in TestTemplates.LEVELS and re.search(r"(^|\.)_?log(ger)?$|get_logger\(", receiver):
                    names = {k.arg for k in node.keywords if k.arg is not None}
                    spread = any(k.arg is None for k in node.keywords)
                    yield str(path.relative_to(REPO)), node.lineno, node.args[0], None if spread else names

    def event_names(self) -> dict[str, str]:
        """Event name -> where it is logged; a non-literal name must come from observers.EVENT_NAMES."""
        found: dict[str, str] = {}
        for where, line, arg, _ in self.logger_calls():
            literals = [c.value for c in ast.walk(arg) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            if not literals:
                assert (where, ast.unparse(arg)) == ("governor/observers.py", "event"), (
                    f"{where}:{line}: the event name {ast.unparse(arg)} is not a literal: add its names here"
                )
                literals = list(EVENT_NAMES.values())
            for name in literals:
                found.setdefault(name, f"{where}:{line}")
        return found

    def test_scan_finds_the_known_events(self) -> None:
        """The source scan sees events of every kind of logger (observers, service, NVML, processes)."""
        names = self.event_names()
        for name in ("power_limit_stepped", "config_reload_failed", "nvml_gpu_lost", "process_match_timed_out"):
            assert name in names
        assert len(names) >= 40

    def test_every_logged_event_has_a_template(self) -> None:
        """Each event name logged anywhere under governor/ has a message template."""
        missing = {name: where for name, where in self.event_names().items() if name not in MESSAGES}
        assert missing == {}, f"add a sentence to governor/messages.py MESSAGES for: {missing}"

    def test_gpu_decisions_all_have_an_event_name(self) -> None:
        """Every GPU-level rule maps to an event name (the fallback to the rule name never reaches the log);
        process (vram_*) and unit rules are logged by their own methods, with their own names."""
        gpu_rules = {r.value for r in Rule if not r.value.startswith("vram_") and r.value not in UNIT_RULES}
        assert gpu_rules == set(EVENT_NAMES)

    def test_templates_name_only_keys_the_event_has(self) -> None:
        """A template of an event logged with explicit keywords uses only those keywords (no "?" by typo)."""
        formatter = string.Formatter()
        for where, line, arg, keywords in self.logger_calls():
            if keywords is None or not isinstance(arg, ast.Constant) or not isinstance(arg.value, str):
                continue
            template = MESSAGES[arg.value]
            used = {field for _, field, _, _ in formatter.parse(template) if field}
            assert used <= keywords, f"{where}:{line} {arg.value}: the template uses {used - keywords}"

    def test_every_template_formats(self) -> None:
        """Every template renders with all its keys, numbers shown without a trailing .0 and sizes for people."""
        formatter = string.Formatter()
        for name, template in MESSAGES.items():
            keys = {field for _, field, _, _ in formatter.parse(template) if field}
            text = message(name, dict.fromkeys(keys, 2.0))
            assert text is not None and UNKNOWN not in text and "2.0" not in text, (name, text)
        assert message("memory_pressure_began", {"gpu": 0, "used_bytes": 7 * 2**30, "total_bytes": 8 * 2**30}) == (
            "GPU 0 VRAM pressure began: 7GiB used of 8GiB"
        )
        assert message("config_reload_failed", {"config": "/c", "kept": "/k", "errors": ["a", "b"]}) == (
            "Configuration /c refused, /k kept: a; b"
        )
        assert message("no_such_event", {}) is None

    def test_daemon_run_sentences_are_complete(self, stderr_file: io.TextIOWrapper, make_daemon: Any) -> None:
        """A hot GPU governed from start to stop sends entries whose sentences have every value filled in."""
        recorder = native(stderr_file)
        daemon, _, clock = make_daemon(lambda t, i: 90.0)
        daemon.start()
        for _ in range(8):
            clock.advance(1.0)
            daemon.tick()
        daemon.stop()
        structlog.reset_defaults()
        events = {e["EVENT"]: e for e in recorder.entries}
        for name in ("governor_starting", "gpu_found", "thermal_zone_changed", "power_limit_stepped",
                     "governor_ready", "power_limit_restored", "governor_stopped"):  # fmt: skip
            assert name in events, sorted(events)
        for entry in recorder.entries:
            assert UNKNOWN not in entry["MESSAGE"], entry
        step = events["power_limit_stepped"]
        assert step["RULE"] == "power_step_down" and step["ACTION"] == "set_power_limit"
        assert step["GPU_UUID"].startswith("GPU-") and step["GPU"] == "0"
        assert re.fullmatch(
            r"GPU 0 power limit \d+ W -> \d+ W: temperature 90 C >= \d+ C for \d+ consecutive samples", step["MESSAGE"]
        ), step["MESSAGE"]
        assert float(step["TO"]) < float(step["FROM"])
        assert written(stderr_file) == []


# ----------------------------------------------------------------------------- the real library


CHILD = textwrap.dedent(
    f"""\
    import os, sys
    status = os.fstat(sys.stderr.fileno())
    os.environ["JOURNAL_STREAM"] = f"{{status.st_dev}}:{{status.st_ino}}"
    from governor import logsetup
    assert logsetup.configure("auto", "info") == "journal"
    logsetup.get_logger(gpu=0, uuid={UUID!r}).info(
        "power_limit_stepped", rule="power_step_down", action="set_power_limit",
        reason={STEP["reason"]!r}, from_w=700.0, to_w=630.0, name={NASTY!r},
    )
    print("sent")
    """
)
"""Run under a private /run: logs one step down through the real library (NASTY as a field)."""


def parse_native(datagram: bytes) -> dict[str, str]:
    """Fields of one datagram in journald's native protocol (NAME=value lines, or NAME, size, bytes)."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        head, _, rest = rest.partition(b"\n")
        if b"=" in head:
            name, value = head.split(b"=", 1)
        else:
            size = int.from_bytes(rest[:8], "little")
            name, value, rest = head, rest[8 : 8 + size], rest[8 + size + 1 :]
        fields[name.decode()] = value.decode()
    return fields


def run_child_in_namespace(tmp_path: Path, journal_dir: Path | None) -> subprocess.CompletedProcess[str]:
    """Run CHILD with /run/systemd replaced (private mount namespace) by ``journal_dir``, or by nothing."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        unavailable("the real-socket journal test needs root and unshare (a private /run/systemd)")
    if importlib.util.find_spec("systemd") is None or importlib.util.find_spec("systemd.journal") is None:
        unavailable("the journal library (systemd-python, the [journal] extra) is not installed")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    bind = f'mkdir -p /run/systemd && mount --bind "{journal_dir}" /run/systemd && ' if journal_dir else ""
    shell = f'mount -t tmpfs tmpfs /run && {bind}exec "$0" "$@"'
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, sys.executable, str(script)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


class TestRealLibrary:
    """systemd.journal.sendv itself, sending to a real AF_UNIX datagram socket at /run/systemd/journal/socket."""

    def test_entry_reaches_the_socket(self, tmp_path: Path) -> None:
        """The library's datagram carries MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, EVENT and the fields, escaped."""
        root = tmp_path / "systemd"
        (root / "journal").mkdir(parents=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(str(root / "journal" / "socket"))
            server.settimeout(30)
            child = run_child_in_namespace(tmp_path, root)
            assert child.returncode == 0, child.stderr
            assert child.stdout == "sent\n" and child.stderr == "", child.stderr
            entry = parse_native(server.recv(1 << 20))
        assert entry["MESSAGE"] == SENTENCE
        assert (entry["PRIORITY"], entry["SYSLOG_IDENTIFIER"], entry["EVENT"]) == (
            "6",
            "gpu-governor",
            "power_limit_stepped",
        )
        assert (entry["GPU"], entry["GPU_UUID"], entry["RULE"], entry["FROM"], entry["TO"]) == (
            "0",
            UUID,
            "power_step_down",
            "700.0",
            "630.0",
        )
        assert entry["NAME"] == "evil\\x0aname\\x0d\\x1b[31mred\\x00\\ud800\\u2028end"

    @pytest.mark.parametrize("socket_state", ["absent", "not a socket", "nobody listening"])
    def test_socket_gone_falls_back_to_lines(self, tmp_path: Path, socket_state: str) -> None:
        """No journal at the socket: the event is written to stderr as its <N> line after a note, exit 0."""
        root = tmp_path / "systemd"
        (root / "journal").mkdir(parents=True)
        if socket_state == "not a socket":
            (root / "journal" / "socket").write_text("")
        elif socket_state == "nobody listening":
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
                server.bind(str(root / "journal" / "socket"))  # closed at once: the path stays, refusing
        child = run_child_in_namespace(tmp_path, None if socket_state == "absent" else root)
        assert child.returncode == 0, child.stderr
        lines = child.stderr.splitlines()
        assert len(lines) == 2, child.stderr
        assert lines[0].startswith('<4>journal_send_failed msg="The journal refused a native entry (')
        assert lines[1].startswith(f'<6>power_limit_stepped msg="{SENTENCE}" gpu=0 uuid={UUID} ')
