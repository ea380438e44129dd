"""The pure unit rules: stop-unit under pressure or over budget, resume with backoff, kill-restart loops."""

from __future__ import annotations

import math
from dataclasses import replace

from governor.model import Action, Decision, GpuReading, ProcessFacts, ProcessReading, Rule, Snapshot
from governor.policy import ProcessAction, ProcessClass, ProcessMatch, VramPolicy
from governor.rules.gaps import DEFAULT_MAX_GAP_S, max_gap_s
from governor.rules.units import (
    RETRY_MIN_S,
    Resumed,
    UnitsState,
    evaluate_units,
    record_start,
    record_stop,
    resume_at_s,
    resume_delay_s,
)
from governor.rules.vram import VramState, evaluate_vram
from tests.builders import GiB, process_facts

TOTAL = 12 * GiB
RESERVED = GiB // 4  # the driver's own, never a process's

PRIMARY = ProcessClass(
    "primary", ProcessMatch(unit="primary-llm.service"), 6 * GiB, priority=100, action=ProcessAction.TERMINATE
)
SECONDARY = ProcessClass(
    "secondary",
    ProcessMatch(unit="secondary-sd.service"),
    3 * GiB,
    priority=50,
    action=ProcessAction.STOP_UNIT,
    grace_s=30.0,
    resume=True,
    resume_after_s=60.0,
    resume_after_max_s=400.0,
    flap_window_s=900.0,
)
GAME = ProcessClass("interactive", ProcessMatch(slice="user.slice"), 2 * GiB, priority=200, protected=True)
POLICY = VramPolicy(reserve_bytes=2 * GiB, cooldown_s=30.0, classes=(PRIMARY, SECONDARY, GAME))

UNITS = {
    1: ("primary-llm.service", "primary", ("system.slice",)),
    2: ("secondary-sd.service", "secondary", ("system.slice",)),
    3: ("session-2.scope", "interactive", ("user.slice", "user-1000.slice")),
}


def facts_for(*pids: int, klass: str | None = None, slices: tuple[str, ...] | None = None) -> dict[int, ProcessFacts]:
    out = {}
    for pid in pids:
        unit, name, own_slices = UNITS.get(pid, (f"unit{pid}.service", "secondary", ("system.slice",)))
        out[pid] = process_facts(
            pid, klass or name, unit=unit, slices=own_slices if slices is None else slices, name=f"p{pid}"
        )
    return out


def gpu(*procs: tuple[int, int]) -> GpuReading:
    used = RESERVED + sum(u for _, u in procs)
    return GpuReading(
        index=0,
        uuid="GPU-0",
        memory_used_bytes=used,
        memory_total_bytes=TOTAL,
        processes=tuple(ProcessReading(pid=p, used_memory_bytes=u) for p, u in procs),
    )


def snap(t_s: float, reading: GpuReading) -> Snapshot:
    return Snapshot(t_s=t_s, wall_time_s=1_700_000_000.0 + t_s, gpus=(reading,))


SEED = ((1, 6 * GiB), (2, 3 * GiB))
"""The seed's split: primary 6 GiB, secondary 3 GiB (2.75 GiB free: the 2 GiB reserve holds)."""
WITH_GAME = (*SEED, (3, 3 * GiB // 2))
"""And a 1.5 GiB game: 1.25 GiB free, under the 2 GiB reserve."""


class TestStopUnit:
    def test_no_pressure_no_stop(self) -> None:
        """Within budget and with the reserve free, nothing is decided."""
        _, decisions = evaluate_vram(gpu(*SEED), facts_for(1, 2), POLICY, VramState(), 0.0)
        assert decisions == []

    def test_game_under_reserve_stops_the_secondary_unit_not_the_primary(self) -> None:
        """The game pushes free VRAM under the reserve: the stop-unit class's unit is stopped, within budget."""
        _, decisions = evaluate_vram(gpu(*WITH_GAME), facts_for(1, 2, 3), POLICY, VramState(), 0.0)
        assert [(d.action, d.unit, d.pid) for d in decisions] == [(Action.STOP_UNIT, "secondary-sd.service", 2)]
        assert "memory pressure" in decisions[0].reason and "stop unit secondary-sd.service" in decisions[0].reason

    def test_user_session_processes_are_never_stopped(self) -> None:
        """A stop-unit class whose process lives in user.slice is reported over budget, never stopped."""
        all_facts = facts_for(2, slices=("user.slice", "user-1000.slice"))
        reading = gpu((2, 5 * GiB), (3, 6 * GiB))
        state, decisions = evaluate_vram(reading, all_facts, POLICY, VramState(), 0.0)
        _, later = evaluate_vram(reading, all_facts, POLICY, state, 100.0)
        assert [d.action for d in decisions + later] == [Action.NONE]
        assert "user session" in decisions[0].reason

    def test_no_unit_no_stop(self) -> None:
        """A stop-unit process without a systemd unit is reported, never acted on."""
        all_facts = {2: process_facts(2, "secondary", unit=None, slices=())}
        _, decisions = evaluate_vram(gpu((2, 5 * GiB), (9, 6 * GiB)), all_facts, POLICY, VramState(), 100.0)
        assert [d.action for d in decisions] == [Action.NONE]
        assert "no systemd unit" in decisions[0].reason

    def test_over_budget_after_grace_without_pressure(self) -> None:
        """Over its budget with the reserve free, the unit is stopped after the grace, not before."""
        reading = gpu((2, 4 * GiB))
        state, first = evaluate_vram(reading, facts_for(2), POLICY, VramState(), 0.0)
        assert [d.action for d in first] == [Action.NONE]
        state, early = evaluate_vram(reading, facts_for(2), POLICY, state, 29.0)
        assert early == []
        _, late = evaluate_vram(reading, facts_for(2), POLICY, state, 30.0)
        assert [(d.action, d.unit) for d in late] == [(Action.STOP_UNIT, "secondary-sd.service")]
        assert "over budget" in late[0].reason

    def test_a_stopped_unit_is_not_stopped_again(self) -> None:
        """While its processes exit, a unit the governor stopped is not stopped a second time."""
        reading = gpu(*WITH_GAME)
        state, _ = evaluate_vram(reading, facts_for(1, 2, 3), POLICY, VramState(), 0.0)
        _, again = evaluate_vram(
            reading,
            facts_for(1, 2, 3),
            POLICY,
            state,
            100.0,
            frozenset({"secondary-sd.service"}),
        )
        assert again == []

    def test_dry_run_marks_the_stop(self) -> None:
        """Under a dry run the stop decision is marked dry (the actuator then only says it would)."""
        _, decisions = evaluate_vram(
            gpu(*WITH_GAME),
            facts_for(1, 2, 3),
            replace(POLICY, dry_run=True),
            VramState(),
            0.0,
        )
        assert decisions[0].action is Action.STOP_UNIT and decisions[0].dry_run

    def test_protected_deny_listed_process_is_left_alone(self) -> None:
        """A process the inspector marked protected (a deny-listed unit) is never chosen."""
        all_facts = {
            2: process_facts(2, "secondary", unit="secondary-sd.service", slices=("system.slice",), protected="x")
        }
        _, decisions = evaluate_vram(gpu((2, 3 * GiB), (9, 8 * GiB)), all_facts, POLICY, VramState(), 0.0)
        assert decisions == []


def stopped_state(t_s: float = 0.0, previous: Resumed | None = None) -> UnitsState:
    decision = Decision(
        t_s=t_s,
        gpu_index=0,
        gpu_uuid="GPU-0",
        rule=Rule.VRAM_ENFORCE,
        action=Action.STOP_UNIT,
        reason="r",
        pid=2,
        process_class="secondary",
        unit="secondary-sd.service",
    )
    state = UnitsState(resumed={} if previous is None else {"secondary-sd.service": previous})
    return record_stop(state, decision, SECONDARY, t_s, 1_700_000_000.0 + t_s, True, (2,))


class TestResume:
    def run(
        self, state: UnitsState, t_s: float, reading: GpuReading, pids: tuple[int, ...] = (1,)
    ) -> tuple[UnitsState, list[Decision]]:
        # The readings between the sampled ticks are left out, not missing: no gap (tests/test_rule_gaps.py).
        return evaluate_units(snap(t_s, reading), state, POLICY, facts_for(*pids), math.inf)

    def test_resumes_once_clear_for_resume_after(self) -> None:
        """The game gone, the unit is started again after resume_after_s of clear reserve, not before."""
        state = stopped_state()
        assert state.stopped["secondary-sd.service"].reason == "memory_pressure"
        state, early = self.run(state, 10.0, gpu((1, 6 * GiB)))
        state, still = self.run(state, 69.0, gpu((1, 6 * GiB)))
        assert early == still == []
        assert resume_at_s(state.stopped["secondary-sd.service"], SECONDARY, 69.0) == 70.0
        state, due = self.run(state, 70.0, gpu((1, 6 * GiB)))
        assert [(d.action, d.unit, d.rule) for d in due] == [
            (Action.START_UNIT, "secondary-sd.service", Rule.UNIT_RESUME)
        ]
        assert "clear for" in due[0].reason

    def test_no_resume_while_the_budget_would_break_the_reserve(self) -> None:
        """With the game still there, 3 GiB more would leave less than the reserve: never started."""
        state = stopped_state()
        for t in (10.0, 100.0, 1000.0):
            state, decisions = self.run(state, t, gpu((1, 6 * GiB), (3, 3 * GiB // 2)), pids=(1, 3))
            assert decisions == []
        assert resume_at_s(state.stopped["secondary-sd.service"], SECONDARY, 1000.0) is None

    def test_a_break_restarts_the_clear_time(self) -> None:
        """Pressure coming back resets the clock: resume_after_s counts from the last clear reading."""
        state = stopped_state()
        state, _ = self.run(state, 10.0, gpu((1, 6 * GiB)))
        state, _ = self.run(state, 50.0, gpu((1, 6 * GiB), (3, 3 * GiB // 2)), pids=(1, 3))
        state, at_70 = self.run(state, 70.0, gpu((1, 6 * GiB)))
        _, at_130 = self.run(state, 130.0, gpu((1, 6 * GiB)))
        assert at_70 == [] and [d.action for d in at_130] == [Action.START_UNIT]

    def test_class_without_resume_leaves_it_stopped(self) -> None:
        """resume = false (or a class reloaded away): the unit stays stopped."""
        state = stopped_state()
        policy = replace(POLICY, classes=(PRIMARY, replace(SECONDARY, resume=False), GAME))
        for t in (10.0, 1000.0):
            state, decisions = evaluate_units(snap(t, gpu((1, 6 * GiB))), state, policy, facts_for(1))
            assert decisions == []

    def test_started_by_someone_else_is_forgotten(self) -> None:
        """A new process of the unit on the GPU: it runs again, the governor forgets it; its old pid does not count."""
        state = stopped_state()
        state, exiting = self.run(state, 1.0, gpu((1, 6 * GiB), (2, 3 * GiB)), pids=(1, 2))
        assert exiting == [] and "secondary-sd.service" in state.stopped
        state, decisions = self.run(state, 2.0, gpu((1, 6 * GiB), (7, 3 * GiB)), pids=(1,))
        assert decisions == []
        new = facts_for(1)
        new[7] = process_facts(7, "secondary", unit="secondary-sd.service", slices=("system.slice",))
        state, decisions = evaluate_units(snap(3.0, gpu((1, 6 * GiB), (7, 3 * GiB))), state, POLICY, new)
        assert [d.action for d in decisions] == [Action.NONE] and state.stopped == {}

    def test_backoff_doubles_within_the_flap_window_up_to_the_max(self) -> None:
        """Stopped again soon after a resume: 60 -> 120 -> 240 -> 400 s (max); after the window, 60 again."""
        assert resume_delay_s(SECONDARY, None, 0.0) == 60.0
        assert resume_delay_s(SECONDARY, Resumed(100.0, 60.0), 200.0) == 120.0
        assert resume_delay_s(SECONDARY, Resumed(100.0, 240.0), 200.0) == 400.0
        assert resume_delay_s(SECONDARY, Resumed(100.0, 400.0), 1000.0) == 60.0
        assert resume_delay_s(replace(SECONDARY, flap_window_s=0.0), Resumed(100.0, 60.0), 101.0) == 60.0
        state = record_start(stopped_state(), "secondary-sd.service", 100.0, True)
        assert state.stopped == {}
        again = stopped_state(150.0, state.resumed["secondary-sd.service"])
        assert again.stopped["secondary-sd.service"].delay_s == 120.0

    def test_failed_start_is_retried_after_the_delay(self) -> None:
        """A start systemd refused keeps the unit stopped and is tried again no sooner than the delay."""
        state = stopped_state()
        state, _ = self.run(state, 1.0, gpu((1, 6 * GiB)))
        state, due = self.run(state, 61.0, gpu((1, 6 * GiB)))
        assert [d.action for d in due] == [Action.START_UNIT]
        state = record_start(state, "secondary-sd.service", 61.0, False)
        state, soon = self.run(state, 62.0, gpu((1, 6 * GiB)))
        _, later = self.run(state, 61.0 + max(60.0, RETRY_MIN_S), gpu((1, 6 * GiB)))
        assert soon == [] and [d.action for d in later] == [Action.START_UNIT]


class TestResumeAfterGap:
    """Time nobody read is no evidence of room: a gap in the ticks starts the clear run over."""

    def resume_ticks(self, times_s: list[float], max_gap_s: float = DEFAULT_MAX_GAP_S) -> list[float]:
        """The times of ``times_s`` (ticks of a GPU with room; resume_after_s 60 s) that started the unit."""
        state, started = stopped_state(), []
        for t_s in times_s:
            state, decisions = evaluate_units(snap(t_s, gpu((1, 6 * GiB))), state, POLICY, facts_for(1), max_gap_s)
            if any(d.action is Action.START_UNIT for d in decisions):
                started.append(t_s)
                break
        return started

    def test_a_stall_in_the_clear_run_restarts_it(self) -> None:
        """Clear for 10 s, then an hour with no tick (a frozen daemon): it waits 60 s of clear ticks after, not 0."""
        before = [float(t) for t in range(1, 11)]
        after = [3610.0 + t for t in range(0, 70)]
        assert self.resume_ticks(before + after) == [3670.0]

    def test_a_gap_within_the_limit_keeps_the_run(self) -> None:
        """Ticks 15 s apart (the limit at a 1 s poll) are one run: started 60 s after the first clear tick."""
        assert self.resume_ticks([1.0 + 15.0 * k for k in range(10)]) == [61.0]

    def test_the_limit_follows_the_poll_interval(self) -> None:
        """At a 10 s poll ticks 30 s apart are one run; at a 1 s poll they are gaps and it never starts."""
        ticks = [1.0 + 30.0 * k for k in range(10)]
        assert self.resume_ticks(ticks, max_gap_s(10.0)) == [61.0]
        assert self.resume_ticks(ticks, max_gap_s(1.0)) == []

    def test_a_clock_that_went_backwards_restarts_the_run(self) -> None:
        """A tick earlier than the last one is a break too: the run restarts at it."""
        assert self.resume_ticks([100.0 + t for t in range(50)] + [10.0 + t for t in range(70)]) == [70.0]


LOOPER = ProcessClass(
    "looper",
    ProcessMatch(unit="looper.service"),
    GiB,
    priority=10,
    action=ProcessAction.TERMINATE,
    grace_s=0.0,
    kill_after_s=5.0,
    restart_loop_count=3,
    restart_loop_window_s=600.0,
)
LOOP_POLICY = VramPolicy(reserve_bytes=0, cooldown_s=1.0, classes=(LOOPER,))


class TestKillRestartLoop:
    def step(self, state: VramState, t_s: float, pid: int) -> tuple[VramState, list[Decision]]:
        f = {pid: process_facts(pid, "looper", unit="looper.service", slices=("system.slice",))}
        return evaluate_vram(gpu((pid, 2 * GiB)), f, LOOP_POLICY, state, t_s)

    def test_loop_detected_after_n_restarts_and_signalling_stops(self) -> None:
        """Three SIGTERMs to processes of one unit, a fourth process over budget: one loop report, no signal."""
        state = VramState()
        signalled = []
        for i, pid in enumerate((11, 12, 13)):
            t = 10.0 * i
            state, decisions = self.step(state, t, pid)
            signalled += [d for d in decisions if d.action is Action.SIGNAL_TERM]
        assert [d.pid for d in signalled] == [11, 12, 13] and all(d.unit == "looper.service" for d in signalled)
        state, decisions = self.step(state, 30.0, 14)
        assert [d.rule for d in decisions] == [Rule.VRAM_OVER_BUDGET, Rule.UNIT_RESTART_LOOP]
        assert "kill-restart loop" in decisions[1].reason and decisions[1].unit == "looper.service"
        for t in (31.0, 100.0, 500.0):
            state, later = self.step(state, t, 14)
            assert later == []
        state, newer = self.step(state, 501.0, 15)
        assert [d.action for d in newer] == [Action.NONE] and "kill-restart loop" in newer[0].reason
        assert state.loops_s == {"looper.service": 501.0}

    def test_loop_forgotten_after_a_quiet_window(self) -> None:
        """Once no process of the unit was over budget for the window, signals resume."""
        state = VramState()
        for i, pid in enumerate((11, 12, 13, 14)):
            state, _ = self.step(state, 10.0 * i, pid)
        assert "looper.service" in state.loops_s
        quiet = evaluate_vram(gpu(), {}, LOOP_POLICY, state, 700.0)[0]
        assert quiet.loops_s == {} and quiet.unit_signals_s == {}
        _, decisions = self.step(quiet, 701.0, 20)
        assert [d.action for d in decisions] == [Action.NONE, Action.SIGNAL_TERM]

    def test_signals_spread_over_more_than_the_window_are_no_loop(self) -> None:
        """Restarts further apart than the window never add up to a loop."""
        state = VramState()
        for i, pid in enumerate((11, 12, 13, 14, 15)):
            state, decisions = self.step(state, 400.0 * i, pid)
            assert [d.action for d in decisions] == [Action.NONE, Action.SIGNAL_TERM]
