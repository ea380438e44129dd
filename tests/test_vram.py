"""VRAM budgets: the pure rule, and the whole signalling path against real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import regex
from structlog.testing import capture_logs

from governor.actuator import Actuator, send_signal
from governor.classes import ProcessAction, ProcessClass, ProcessMatch, VramPolicy, config_warnings, parse_size
from governor.config import parse_config
from governor.model import Action, Decision, GpuReading, Outcome, Rule
from governor.processes import ProcessFacts, ProcessInspector, read_start_time
from governor.rules.vram import VramState, evaluate_vram
from governor.state import OriginalLimits
from tests.builders import SLEEPER, GiB, Harness, classes_toml, listing, spawn, wait_exit


def facts(pid: int, klass: str, protected: str | None = None, start: int | None = 1000) -> ProcessFacts:
    return ProcessFacts.of(
        pid=pid,
        start_time=start,
        name=f"p{pid}",
        exe=None,
        cmdline=None,
        uid=1000,
        user="u",
        cgroup=None,
        unit=None,
        slices=(),
        kernel_thread=False,
        klass=klass,
        why="test",
        protected=protected,
    )


def reading(*procs: tuple[int, int | None], used: int = 6 * GiB, total: int = 12 * GiB) -> GpuReading:
    """GPU-0 listing ``procs`` as (pid, used bytes), ``used`` of ``total`` bytes in use."""
    return listing(*procs, used=used, total=total)


PRIMARY = ProcessClass(
    "primary", ProcessMatch(name="p1", user="u"), 6 * GiB, priority=100, action=ProcessAction.TERMINATE, grace_s=30
)
SECONDARY = ProcessClass(
    "secondary", ProcessMatch(name="p2", user="u"), 3 * GiB, priority=50, action=ProcessAction.TERMINATE, grace_s=30
)
POLICY = VramPolicy(reserve_bytes=2 * GiB, classes=(PRIMARY, SECONDARY), cooldown_s=20)


def run(
    ticks: Sequence[tuple[float, GpuReading]], table: dict[int, ProcessFacts], policy: VramPolicy = POLICY
) -> list[Decision]:
    state = VramState()
    out: list[Decision] = []
    for t, r in ticks:
        state, decisions = evaluate_vram(r, table, policy, state, t)
        out.extend(decisions)
    return out


class TestVramRule:
    def test_over_budget_is_reported_once_then_terminated_after_grace(self) -> None:
        """A process over budget is reported once, then SIGTERMed once its grace has passed."""
        table = {2: facts(2, "secondary")}
        decisions = run([(t, reading((2, 4 * GiB))) for t in range(0, 40)], table)
        assert [(d.rule, d.action, d.t_s) for d in decisions] == [
            ("vram_over_budget", Action.NONE, 0),
            ("vram_enforce", Action.SIGNAL_TERM, 30),
        ]

    def test_state_kept_while_every_process_is_within_budget(self) -> None:
        """With every listed process within its budget and nothing remembered, the rule returns its state itself."""
        table = {1: facts(1, "primary"), 2: facts(2, "secondary")}
        state = VramState()
        kept, decisions = evaluate_vram(reading((1, 1 * GiB), (2, 1 * GiB)), table, POLICY, state, 5.0)
        assert decisions == [] and kept is state
        over, decisions = evaluate_vram(reading((2, 4 * GiB)), table, POLICY, state, 6.0)
        assert [d.rule for d in decisions] == ["vram_over_budget"] and over is not state

    def test_sigkill_follows_when_still_over_after_kill_after(self) -> None:
        """A process still there and over budget kill_after seconds after SIGTERM gets SIGKILL (and, still
        there kill_after after that, one more: tests/test_vram_kill_ineffective.py)."""
        table = {2: facts(2, "secondary")}
        decisions = run([(t, reading((2, 4 * GiB))) for t in range(0, 60)], table)
        kills = [d for d in decisions if d.action is Action.SIGNAL_KILL]
        assert [(d.rule, d.t_s) for d in kills] == [("vram_escalate", 40), ("vram_kill_ineffective", 50)]

    def test_no_sigkill_once_a_reload_made_the_class_observe(self) -> None:
        """A SIGTERMed process whose class turns observe-only on reload is not escalated to SIGKILL."""
        table = {2: facts(2, "secondary")}
        state = VramState()
        for t in range(0, 31):
            state, decisions = evaluate_vram(reading((2, 4 * GiB)), table, POLICY, state, t)
        assert decisions and decisions[-1].action is Action.SIGNAL_TERM
        observe = VramPolicy(
            classes=(PRIMARY, ProcessClass("secondary", SECONDARY.match, 3 * GiB, action=ProcessAction.OBSERVE))
        )
        later: list[Decision] = []
        for t in range(31, 100):
            state, decisions = evaluate_vram(reading((2, 4 * GiB)), table, observe, state, t)
            later.extend(decisions)
        assert all(d.action is Action.NONE for d in later)

    def test_back_under_budget_resets(self) -> None:
        """A process that drops under its budget before the grace ends is never signalled."""
        table = {2: facts(2, "secondary")}
        ticks = [(t, reading((2, 4 * GiB if t < 20 else 2 * GiB))) for t in range(0, 60)]
        assert [d.rule for d in run(ticks, table)] == ["vram_over_budget"]

    def test_protected_and_unknown_identity_are_never_signalled(self) -> None:
        """Protected processes and processes without a start time are reported, never signalled."""
        table = {2: facts(2, "secondary", protected="PID 1"), 3: facts(3, "secondary", start=None)}
        decisions = run([(t, reading((2, 4 * GiB), (3, 4 * GiB))) for t in range(0, 100)], table)
        assert {d.rule for d in decisions} == {"vram_over_budget"}
        assert "never signalled" in decisions[0].reason

    def test_pressure_acts_before_grace_on_lowest_priority_only(self) -> None:
        """Under pressure only the lowest-priority offender is chosen, without waiting for its grace."""
        table = {1: facts(1, "primary"), 2: facts(2, "secondary")}
        tight = reading((1, 7 * GiB), (2, 4 * GiB), used=11 * GiB)
        decisions = run([(0, tight), (1, tight)], table)
        signals = [d for d in decisions if d.action is not Action.NONE]
        assert [(d.pid, d.action) for d in signals] == [(2, Action.SIGNAL_TERM)]

    def test_cooldown_spaces_new_victims(self) -> None:
        """After a victim is chosen, the next one on that GPU waits for the cooldown."""
        table = {1: facts(1, "primary"), 2: facts(2, "secondary")}
        tight = reading((1, 7 * GiB), (2, 4 * GiB), used=11 * GiB)
        decisions = run([(t, tight) for t in range(0, 25)], table)
        enforce = [(d.pid, d.t_s) for d in decisions if d.rule == "vram_enforce"]
        assert enforce == [(2, 0), (1, 20)]

    def test_observe_class_only_reports(self) -> None:
        """An observe class never yields a signal."""
        observe = ProcessClass("obs", ProcessMatch(name="p2"), GiB, action=ProcessAction.OBSERVE, grace_s=0)
        policy = VramPolicy(classes=(observe,))
        decisions = run([(t, reading((2, 4 * GiB))) for t in range(0, 100)], {2: facts(2, "obs")}, policy)
        assert [d.rule for d in decisions] == ["vram_over_budget"]

    def test_dry_run_marks_decisions(self) -> None:
        """With [vram] dry_run the decisions carry dry_run so the actuator only logs them."""
        policy = VramPolicy(classes=(SECONDARY,), dry_run=True)
        decisions = run([(t, reading((2, 4 * GiB))) for t in range(0, 31)], {2: facts(2, "secondary")}, policy)
        assert decisions[-1].action is Action.SIGNAL_TERM and decisions[-1].dry_run


class TestClassesConfig:
    def test_sizes_parse_with_units(self) -> None:
        """Budgets accept binary and decimal units and plain byte counts."""
        assert parse_size("6GiB") == 6 * GiB
        assert parse_size("512 MiB") == 512 * 2**20
        assert parse_size("2GB") == 2 * 10**9
        assert parse_size(1024) == 1024
        assert parse_size("6 gigs") is None

    def test_overlap_and_never_matching_warnings(self) -> None:
        """check-config warns about a never-matching class and about overlaps, naming the winner."""
        cfg = parse_config(
            {
                "class": [
                    {"name": "a", "budget": "1GiB", "match": {"name": "python*"}},
                    {"name": "b", "budget": "1GiB", "match": {"name": "python3"}},
                    {"name": "c", "budget": "1GiB", "match": {}},
                ]
            },
            "t.toml",
        )
        warnings = config_warnings(cfg.vram)
        assert any("'a' and 'b'" in w and "'a' wins" in w for w in warnings)
        assert any("'c' has no match rule" in w for w in warnings)

    def test_rtx4070_example_expresses_the_workstation_split(self) -> None:
        """The shipped RTX 4070 example has primary 6 GiB, secondary 3 GiB and a 2 GiB reserve."""
        from governor.config import load_config

        cfg = load_config(Path(__file__).parents[1] / "config/examples/rtx4070.toml", enforce_trust=False)
        budgets = {c.name: c.budget_bytes for c in cfg.vram.classes}
        assert budgets["primary"] == 6 * GiB and budgets["secondary"] == 3 * GiB
        assert cfg.vram.reserve_bytes == 2 * GiB


class TestInspector:
    def test_classifies_a_real_process_and_explains_why(self) -> None:
        """A real child is matched on its command line and the explanation names the rule."""
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)", "worker-marker"],
            stdout=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == b"ready"  # exec'd: cmdline is final
            klass = ProcessClass("workers", ProcessMatch(cmdline=regex.compile("worker-marker")), GiB)
            policy = VramPolicy(classes=(klass,))
            got = ProcessInspector().facts(child.pid, None, policy)
            assert got.klass == "workers" and "cmdline matches" in got.why
            assert got.start_time == read_start_time(child.pid)
            assert got.user is not None and got.protected is None
        finally:
            child.kill()
            child.wait()

    def test_pid_1_and_self_are_protected(self) -> None:
        """PID 1 and the governor's own process are never signalled."""
        inspector = ProcessInspector()
        assert inspector.facts(1, None, VramPolicy()).protected == "PID 1"
        assert inspector.facts(os.getpid(), None, VramPolicy()).protected == "the governor itself"


# ----------------------------------------------------------------------------- real processes

IGNORE_TERM = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(120)"
)


class TestRealProcesses:
    def test_over_budget_child_gets_sigterm_after_grace(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """A real child over its 3 GiB budget is SIGTERMed once its 10 s grace passed, not before."""
        h = Harness(tmp_path, classes_toml())
        child = spawn(children, SLEEPER, "secondary-marker")
        h.daemon.start()
        h.attach(child, 4 * GiB)
        with capture_logs() as logs:
            h.step(9)
            assert child.poll() is None
            h.step(3)
        assert wait_exit(child) == -signal.SIGTERM
        events = [e["event"] for e in logs]
        assert events.count("process_over_budget") == 1 and events.count("process_signalled") == 1
        signalled = next(e for e in logs if e["event"] == "process_signalled")
        assert signalled["signal"] == "SIGTERM" and signalled["class"] == "secondary"
        assert "cmdline matches" in signalled["matched"]

    def test_status_process_table_says_which_rule_matched(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """The daemon's process table (for `status`) names each process's class and the rule that matched it."""
        from governor.status import read_process_table, render_processes

        h = Harness(tmp_path, classes_toml())
        child = spawn(children, SLEEPER, "secondary-marker")
        h.daemon.start()
        h.attach(child, 2 * GiB)
        h.step(1)
        rows = read_process_table(str(tmp_path / "processes.json"))
        assert rows is not None and len(rows) == 1
        assert rows[0]["pid"] == child.pid and rows[0]["class"] == "secondary"
        assert (tmp_path / "processes.json").stat().st_mode & 0o777 == 0o600
        table = render_processes(rows)
        assert "secondary" in table and "cmdline matches /secondary-marker/" in table and "3.00 GiB" in table

    def test_child_ignoring_sigterm_gets_sigkill(self, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
        """A child that ignores SIGTERM and stays over budget is SIGKILLed after kill_after."""
        h = Harness(tmp_path, classes_toml())
        child = spawn(children, IGNORE_TERM, "secondary-marker")
        h.daemon.start()
        h.attach(child, 4 * GiB)
        h.step(12)
        assert child.poll() is None  # SIGTERM ignored
        h.step(6)
        assert wait_exit(child) == -signal.SIGKILL

    def test_reused_pid_is_left_alone(self, children: list[subprocess.Popen[bytes]]) -> None:
        """A decision about (pid, old start time) never signals the process now holding that pid."""
        child = spawn(children, SLEEPER, "secondary-marker")
        start = read_start_time(child.pid)
        assert start is not None
        assert send_signal(child.pid, start - 1, signal.SIGTERM) == "pid reused by another process: left alone"
        decision = Decision(
            t_s=0,
            gpu_index=0,
            gpu_uuid="GPU-0",
            rule=Rule.VRAM_ENFORCE,
            action=Action.SIGNAL_KILL,
            reason="test",
            pid=child.pid,
            process_start_time=start - 1,
            process_class="secondary",
        )
        actuator = Actuator(_NoBackend(), OriginalLimits(None), [])
        result = actuator._signal(decision)
        assert result.outcome is Outcome.SKIPPED
        time.sleep(0.1)
        assert child.poll() is None

    def test_vanished_process_is_not_an_error(self) -> None:
        """Signalling a process that has exited reports 'vanished', no exception."""
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        assert send_signal(child.pid, 12345, signal.SIGTERM) == "vanished"

    def test_protected_child_is_never_signalled(self, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
        """A child whose class is protected stays alive however long it is over budget."""
        toml = classes_toml()
        toml["class"][1]["protected"] = True
        h = Harness(tmp_path, toml)
        child = spawn(children, SLEEPER, "secondary-marker")
        h.daemon.start()
        h.attach(child, 5 * GiB)
        with capture_logs() as logs:
            h.step(40)
        assert child.poll() is None
        over = [e for e in logs if e["event"] == "process_over_budget"]
        assert len(over) == 1 and "protected" in over[0]
        assert not any(e["event"] == "process_signalled" for e in logs)

    def test_dry_run_signals_nothing_and_logs_everything(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """With [vram] dry_run the child survives and the would-be SIGTERM and SIGKILL are logged."""
        h = Harness(tmp_path, classes_toml(dry_run=True))
        child = spawn(children, SLEEPER, "secondary-marker")
        h.daemon.start()
        h.attach(child, 4 * GiB)
        with capture_logs() as logs:
            h.step(20)
        assert child.poll() is None
        would = [e["signal"] for e in logs if e["event"] == "process_would_signal"]
        assert would == ["SIGTERM", "SIGKILL"]

    def test_pressure_stops_only_the_lowest_priority_offender(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """Under pressure the lower-priority offender is stopped at once; the other is left running."""
        toml = classes_toml()
        toml["class"][1]["grace_s"] = 3600.0
        h = Harness(tmp_path, toml)
        primary = spawn(children, SLEEPER, "primary-marker")
        secondary = spawn(children, SLEEPER, "secondary-marker")
        h.daemon.start()
        h.attach(primary, 7 * GiB)  # over 6 GiB
        h.attach(secondary, 4 * GiB)  # over 3 GiB: 11 GiB of 12 used, reserve 2 GiB -> pressure
        h.step(2)
        assert wait_exit(secondary) == -signal.SIGTERM
        h.step(30)
        assert primary.poll() is None
        assert h.daemon.published is not None
        assert h.daemon.published.gpus[0].memory_pressure is False


class _NoBackend:
    name = "none"
    waiting_reason: str | None = None
    state_warning: str | None = None

    def gpus(self) -> tuple[()]:
        return ()

    def read(self) -> Any:
        raise AssertionError("not used")

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        raise AssertionError("not used")

    def set_fan_speed(self, uuid: str, fan: int, percent: int) -> None:
        raise AssertionError("not used")

    def set_fan_auto(self, uuid: str, fan: int) -> None:
        raise AssertionError("not used")

    def close(self) -> None:
        return None
