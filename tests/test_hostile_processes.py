"""Hostile processes: real children with hostile names and command lines, 1000 processes, vanishing processes.

Every child is a real process reported on the simulated GPU (see tests/test_vram.py's Harness). A child
names itself with prctl(PR_SET_NAME) or is started through a symlink whose basename is the name (the
kernel keeps the first 15 bytes as comm), so /proc holds exactly the bytes a hostile process would put
there: newlines, control characters, ``foo) Z`` (which breaks a naive parse of /proc/PID/stat), bytes
that are not UTF-8, and very long command lines.

Rows of the fault matrix covered elsewhere: a process ignoring SIGTERM gets SIGKILL
(tests/test_vram.py::TestRealProcesses::test_child_ignoring_sigterm_gets_sigkill); a reused PID is
never signalled (tests/test_vram.py::TestRealProcesses::test_reused_pid_is_left_alone).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from governor.backends.simulated import SYNTHETIC_PID_BASE
from governor.classes import VramPolicy
from governor.clock import VirtualClock
from governor.config import parse_config
from governor.logsetup import configure, escape
from governor.metrics import build_registry
from governor.processes import ProcessFacts, ProcessInspector, read_start_time
from governor.status import read_process_table, render_processes
from tests.builders import GiB, Harness, classes_toml, wait_exit

MiB = 2**20
CHILD = (
    "import ctypes, sys, time\n"
    "name = bytes.fromhex(sys.argv[1])\n"
    "if name:\n"
    "    libc = ctypes.CDLL(None, use_errno=True)\n"
    "    if libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0) != 0:\n"  # PR_SET_NAME
    "        raise OSError(ctypes.get_errno(), 'prctl(PR_SET_NAME)')\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)
MARKER = b"secondary-marker"
"""classes_toml() puts a command line matching /secondary-marker/ in class secondary (3 GiB, grace 10 s)."""
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
"""Characters that must never appear raw in a log line, a label or a table cell."""
JOURNAL_LINE = re.compile(r"<[0-7]>[a-z][a-z_]* ?")


@dataclass(frozen=True)
class Hostile:
    """A hostile child: the comm it ends up with, how it gets it, and extra command-line arguments."""

    id: str
    comm: bytes  # exactly what /proc/PID/comm holds (without the kernel's newline)
    link: bytes | None = None  # exec through a symlink with this basename instead of prctl
    args: tuple[bytes, ...] = (MARKER,)


LONG_LINK = b"long-x" + "\u00e9".encode() * 120  # 246 bytes; comm is cut to 15, inside a 2-byte character
CASES = (
    Hostile("newline", b"evil\nname"),
    Hostile("trailing-newline", b"evil\n"),
    Hostile("control", b"\x1b[31mred\x07\x08\x7f\t"),
    Hostile("paren", b"foo) Z"),
    Hostile("paren-fields", b"x) R 1 2 3 4 5"),
    Hostile("quotes", b'a"b=c\\d e'),
    Hostile("invalid-utf8-name", b"\xff\xfe\xc3(bad"),
    Hostile("very-long", LONG_LINK[:15], link=LONG_LINK, args=(MARKER, b"A" * 100_000)),
    Hostile("invalid-utf8-cmdline", b"argv", args=(b"--tag=\xff\xc3(" + MARKER + b"\xfe\x1b]0;pwned\x07", b"\n")),
)


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def hostile(request: pytest.FixtureRequest) -> Hostile:
    case: Hostile = request.param
    return case


def spawn_hostile(children: list[subprocess.Popen[bytes]], case: Hostile, tmp_path: Path) -> subprocess.Popen[bytes]:
    """Start the hostile child and wait until it has named itself (it prints ``ready``)."""
    if case.link is not None:
        link = os.path.join(os.fsencode(tmp_path), case.link)
        os.symlink(sys.executable, link)
        argv: list[bytes | str] = [link, "-c", CHILD, ""]
    else:
        argv = [sys.executable, "-c", CHILD, case.comm.hex()]
    child = subprocess.Popen([*argv, *case.args], stdout=subprocess.PIPE)
    children.append(child)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == b"ready"
    assert Path(f"/proc/{child.pid}/comm").read_bytes() == case.comm + b"\n"
    return child


def careful_start_time(pid: int, comm: bytes) -> int:
    """Field 22 of /proc/PID/stat, parsed knowing the exact comm: ``pid (comm) state ppid ...``."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    prefix = f"{pid} (".encode() + comm + b") "
    assert raw.startswith(prefix)
    return int(raw[len(prefix) :].split()[19])


def assert_printable(text: str, where: str) -> None:
    """No control character, line separator or lone surrogate anywhere in ``text`` (one line)."""
    found = CONTROL.search(text)
    assert found is None, f"{where}: raw {found.group()!r} in {text!r}"


def over_budget_harness(tmp_path: Path, child: subprocess.Popen[bytes]) -> Harness:
    """A started daemon (per-process metrics on) with the child reported at 4 GiB, over its 3 GiB budget."""
    h = Harness(tmp_path, classes_toml(per_process_metrics=True))
    h.daemon.start()
    h.attach(child, 4 * GiB)
    h.step(1)
    return h


class TestHostileNames:
    def test_start_time_matches_a_careful_parse(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]], hostile: Hostile
    ) -> None:
        """The start time read from /proc/PID/stat is field 22 whatever the process calls itself."""
        child = spawn_hostile(children, hostile, tmp_path)
        assert read_start_time(child.pid) == careful_start_time(child.pid, hostile.comm)

    def test_name_and_cmdline_are_read_as_given_and_classified(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]], hostile: Hostile
    ) -> None:
        """The name is the comm exactly (undecodable bytes as surrogates) and the cmdline regex still classifies."""
        child = spawn_hostile(children, hostile, tmp_path)
        policy = parse_config(classes_toml(), "test.toml").vram
        facts = ProcessInspector().facts(child.pid, None, policy)
        assert facts.name == hostile.comm.decode("utf-8", "surrogateescape")
        assert facts.klass == "secondary" and "cmdline matches /secondary-marker/" in facts.why
        assert facts.cmdline is not None and len(facts.cmdline.encode("utf-8", "surrogateescape")) <= 4096
        for arg in hostile.args:
            if b"\xff" in arg:
                assert arg.decode("utf-8", "surrogateescape") in facts.cmdline
        assert facts.protected is None and facts.start_time == read_start_time(child.pid)

    def test_journal_log_is_one_printable_line_per_event_and_the_child_is_still_signalled(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]], hostile: Hostile
    ) -> None:
        """Over budget, the hostile child is reported once and SIGTERMed after grace; every journal line is clean."""
        child = spawn_hostile(children, hostile, tmp_path)
        stream = io.StringIO()
        configure("journal", stream=stream)
        h = over_budget_harness(tmp_path, child)
        h.step(8)
        assert child.poll() is None
        h.step(3)
        assert wait_exit(child) == -signal.SIGTERM
        lines = stream.getvalue().splitlines()
        for line in lines:
            assert JOURNAL_LINE.match(line), f"not a journal event line: {line!r}"
            assert_printable(line, "journal")
        events = [JOURNAL_LINE.match(line).group().strip()[3:] for line in lines]  # type: ignore[union-attr]
        assert events.count("process_over_budget") == 1 and events.count("process_signalled") == 1
        signalled = next(line for line in lines if line.startswith("<4>process_signalled"))
        assert f"pid={child.pid} " in signalled and "signal=SIGTERM" in signalled and "class=secondary" in signalled

    def test_json_log_is_one_printable_object_per_line(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]], hostile: Hostile
    ) -> None:
        """In json format each event is one line whose string values carry the name escaped."""
        child = spawn_hostile(children, hostile, tmp_path)
        stream = io.StringIO()
        configure("json", stream=stream)
        over_budget_harness(tmp_path, child)
        lines = stream.getvalue().splitlines()
        records = [json.loads(line) for line in lines]
        for line, record in zip(lines, records):
            assert_printable(line, "json line")
            for key, value in record.items():
                if isinstance(value, str):
                    assert_printable(value, f"json value {key}")
        over = [r for r in records if r["event"] == "process_over_budget"]
        assert len(over) == 1 and over[0]["pid"] == child.pid
        assert over[0]["process"] == escape(hostile.comm.decode("utf-8", "surrogateescape"))

    def test_metrics_exposition_parses_and_is_printable(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]], hostile: Hostile
    ) -> None:
        """With per-process metrics on, the exposition parses and the name label holds no raw control character."""
        child = spawn_hostile(children, hostile, tmp_path)
        h = over_budget_harness(tmp_path, child)
        published = h.daemon.published
        text = generate_latest(build_registry(lambda: published)).decode("utf-8")
        for line in text.splitlines():
            assert_printable(line, "exposition")
        samples = [
            s
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "gpu_governor_process_vram_used_bytes"
        ]
        assert [(s.labels["pid"], s.labels["class"], s.value) for s in samples] == [
            (str(child.pid), "secondary", 4.0 * GiB)
        ]
        assert_printable(samples[0].labels["name"], "name label")

    def test_status_process_table_is_printable(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]], hostile: Hostile
    ) -> None:
        """processes.json and the `status` process table show the hostile name escaped, one row per process."""
        child = spawn_hostile(children, hostile, tmp_path)
        over_budget_harness(tmp_path, child)
        rows = read_process_table(str(tmp_path / "processes.json"))
        assert rows is not None and [(r["pid"], r["class"]) for r in rows] == [(child.pid, "secondary")]
        for key, value in rows[0].items():
            if isinstance(value, str):
                assert_printable(value, f"processes.json {key}")
        table = render_processes(rows)
        lines = table.splitlines()
        assert len(lines) == 2
        for line in lines:
            assert_printable(line, "status table")


class TestHostileReportedName:
    def test_backend_reported_name_is_escaped_and_cut(self, tmp_path: Path) -> None:
        """A process /proc cannot show keeps the backend's name: escaped in logs, cut to 64 in labels."""
        stream = io.StringIO()
        configure("journal", stream=stream)
        h = Harness(tmp_path, classes_toml(per_process_metrics=True))
        h.daemon.start()
        pid = SYNTHETIC_PID_BASE + 7
        h.backend.attach_process(0, pid, GiB, name="x\n\x1b[2J\udcff" * 2000)
        h.step(2)
        assert h.daemon.governor.facts[pid].start_time is None
        published = h.daemon.published
        text = generate_latest(build_registry(lambda: published)).decode("utf-8")
        labels = [
            s.labels
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "gpu_governor_process_vram_used_bytes"
        ]
        assert len(labels) == 1 and len(labels[0]["name"]) <= 64
        assert_printable(labels[0]["name"], "name label")
        for line in [*stream.getvalue().splitlines(), *text.splitlines()]:
            assert_printable(line, "output")
        rows = read_process_table(str(tmp_path / "processes.json"))
        assert rows is not None
        assert_printable(render_processes(rows).replace("\n", " "), "status table")


class TestManyProcesses:
    def test_a_thousand_processes_on_one_gpu(self, tmp_path: Path) -> None:
        """1000 real processes on one GPU: every tick completes, all are classified, metrics and table render."""
        sleep = shutil.which("sleep")
        assert sleep is not None
        toml = classes_toml(per_process_metrics=True)
        toml["class"] = [
            {"name": "even", "budget": "16MiB", "action": "observe", "match": {"cmdline": "^sleep 300$"}},
            {"name": "odd", "budget": "1GiB", "action": "terminate", "grace_s": 3600.0, "match": {"cmdline": "301"}},
        ]
        stream = io.StringIO()
        configure("journal", stream=stream)
        h = Harness(tmp_path, toml)
        h.daemon.start()
        started: list[subprocess.Popen[bytes]] = []
        try:
            for i in range(1000):
                child = subprocess.Popen(
                    ["sleep", "300" if i % 2 == 0 else "301"],
                    executable=sleep,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                )
                started.append(child)
                # Popen returns once the exec happened: /proc shows "sleep 30x" from here on.
                h.attach(child, 32 * MiB if i % 100 == 0 else 8 * MiB)
            h.step(3)
            facts = h.daemon.governor.facts
            assert len(facts) == 1000
            assert {f.klass for f in facts.values()} == {"even", "odd"}
            assert all(f.start_time is not None and f.protected is None for f in facts.values())
            published = h.daemon.published
            assert published is not None and published.tick_count == 3
            gpu = published.gpus[0]
            assert gpu.unclassified_processes == 0
            assert [(c.name, c.processes, c.over_budget) for c in gpu.classes] == [("even", 500, 10), ("odd", 500, 0)]
            text = generate_latest(build_registry(lambda: published)).decode("utf-8")
            per_process = [
                s
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "gpu_governor_process_vram_used_bytes"
            ]
            assert len(per_process) == 1000
            rows = read_process_table(str(tmp_path / "processes.json"))
            assert rows is not None and len(rows) == 1000
            assert len(render_processes(rows).splitlines()) == 1001
            assert stream.getvalue().count("<4>process_over_budget ") == 10
            assert all(child.poll() is None for child in started)  # observe: reported, nobody signalled
        finally:
            for child in started:
                child.kill()
            for child in started:
                child.wait()


class VanishingInspector(ProcessInspector):
    """An inspector that, once armed, kills and reaps a child right after reading its facts (mid-tick)."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock = clock
        self.victim: subprocess.Popen[bytes] | None = None
        self.at_s: float | None = None

    def facts(self, pid: int, reported_name: str | None, policy: VramPolicy) -> ProcessFacts:
        """Facts as usual; the victim dies right after they are read, at the armed time."""
        got = super().facts(pid, reported_name, policy)
        victim = self.victim
        if victim is not None and pid == victim.pid and self.clock.monotonic() >= (self.at_s or 0.0):
            victim.kill()
            victim.wait()
            self.victim = None
        return got


class TestVanishing:
    def test_process_vanishing_between_listing_and_signalling(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """A process gone between inspection and its SIGTERM is logged left alone (vanished); the loop goes on."""
        stream = io.StringIO()
        configure("json", stream=stream)
        h = Harness(tmp_path, classes_toml())
        inspector = VanishingInspector(h.clock)
        h.daemon.governor.inspector = inspector
        child = spawn_hostile(children, Hostile("victim", b"victim"), tmp_path)
        h.daemon.start()
        h.attach(child, 4 * GiB)  # over budget from t = 1; SIGTERM due at t = 11 (grace 10 s)
        h.step(10)
        assert child.poll() is None
        inspector.victim, inspector.at_s = child, 11.0
        h.step(1)
        assert child.returncode == -signal.SIGKILL  # killed by the test, not by the governor
        h.step(5)
        records = [json.loads(line) for line in stream.getvalue().splitlines()]
        left = [r for r in records if r["event"] == "process_left_alone"]
        assert [(r["pid"], r["signal"], r["outcome"], r["detail"]) for r in left] == [
            (child.pid, "SIGTERM", "skipped", "vanished")
        ]
        assert not any(r["event"] in ("process_signalled", "process_signal_failed") for r in records)
        assert h.daemon.published is not None and h.daemon.published.tick_count == 16
        assert dict(h.daemon.published.process_action_counts)[("secondary", "sigterm", "skipped")] == 1

    def test_process_gone_before_the_tick_is_never_signalled(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """A process still listed by the GPU but gone from /proc has no identity: never signalled, no error."""
        stream = io.StringIO()
        configure("json", stream=stream)
        h = Harness(tmp_path, classes_toml())
        child = spawn_hostile(children, Hostile("victim", b"victim"), tmp_path)
        pid = child.pid
        h.daemon.start()
        h.backend.attach_process(0, pid, 4 * GiB)  # not in h.attached: the GPU keeps listing it after it exits
        h.step(10)
        child.kill()
        child.wait()
        h.step(20)
        assert h.daemon.governor.facts[pid].start_time is None
        records = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert not any(r["event"].startswith("process_s") or r["level"] in ("error", "critical") for r in records)
        assert h.daemon.published is not None and h.daemon.published.tick_count == 30
